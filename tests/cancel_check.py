"""Cancel pressed in each phase of a SyncDiffusion graph, and the checks of what it must leave as it was: shared by
the CPU test (``test_cancel_phases.py``, the micro model) and the GPU test (``test_gpu_reliability.py``, real-size
random models).

Cancel is pressed the way the UI's button does (``comfy.model_management.interrupt_current_processing``), from
places ComfyUI and torch offer for code to run: a model function wrapper (``set_model_unet_function_wrapper``), a
tensor's backward hook, a module's forward pre-hook, and the progress hook. Where the phase has no check of its own,
the hook also calls ComfyUI's ``throw_exception_if_processing_interrupted``, so the interrupt surfaces exactly there
(the worst case: the gradient pass is left half-way, its stand-in weights in place).
"""
import contextlib

import numpy as np
import torch
from PIL import Image

from devtools import harness as h

PHASES = ("plain step", "anchor decode", "gradient forward", "gradient backward", "decode node", "save node")


class Cancel:
    """Presses Cancel once, in the armed phase."""

    def __init__(self):
        import comfy.model_management as mm

        self.mm = mm
        self.phase = None
        self.fired = None  # what the phase looked like when Cancel was pressed
        self.grad_calls = 0

    def arm(self, phase):
        self.phase, self.fired, self.grad_calls = phase, None, 0

    def press(self, where: str, throw: bool = True):
        self.fired = where
        self.mm.interrupt_current_processing(True)
        if throw:
            self.mm.throw_exception_if_processing_interrupted()

    # a model function wrapper: ComfyUI calls it for every UNet evaluation
    def unet(self, apply_model, args):
        grad = torch.is_grad_enabled()
        self.grad_calls += grad
        if self.fired is None:
            if self.phase == "gradient forward" and grad:
                self.press("UNet forward with gradient")
            if self.phase == "plain step" and not grad and self.grad_calls:
                self.press("UNet forward of the plain step after the gradient pass")
        out = apply_model(args["input"], args["timestep"], **args["c"])
        if self.phase == "gradient backward" and grad and self.fired is None:
            out.register_hook(self._backward)
        return out

    def _backward(self, grad):
        if self.fired is None:
            self.press("backward through the UNet")
        return grad

    # a forward pre-hook on the VAE's decoder: the anchor's decode is its first call
    def decoder(self, module, inputs):
        if self.phase == "anchor decode" and self.fired is None:
            assert not torch.is_grad_enabled(), "the first decode of the run should be the anchor's (no gradient)"
            self.press("VAE decoder forward of the anchor")

    # the progress hook (the harness's, as main.py's): ComfyUI throws there itself
    def progress(self, node_id, value, total):
        if self.fired is None and (self.phase, node_id) in (("decode node", "dec"), ("save node", "save")) \
                and value == 1:
            self.press(f"progress {value}/{total} of node {node_id}", throw=False)


def snapshot(patcher, vae, lpips) -> dict:
    """Everything Cancel must leave as it was: each weight and buffer (object, values, flags), the patcher's state."""
    import comfy.model_management as mm
    from comfy.cli_args import args

    state = {}
    for label, module in (("unet", patcher.model), ("vae", vae.first_stage_model), ("lpips", lpips)):
        tensors = {**dict(module.named_parameters(remove_duplicate=False)),
                   **dict(module.named_buffers(remove_duplicate=False))}
        for name, t in tensors.items():
            with torch.inference_mode(False):
                state[f"{label}.{name}"] = (id(t), type(t), t.is_inference(), t.requires_grad, t.dtype, t.device,
                                            t.data_ptr(), t.detach().clone())
    state["patcher"] = (dict(patcher.patches), dict(patcher.object_patches), repr(patcher.model_options),
                        dict(patcher.backup), patcher.model.device if hasattr(patcher.model, "device") else None)
    state["switches"] = (getattr(mm, "in_training", None), getattr(args, "disable_comfy_compiler", None),
                         torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    return state


def assert_same(before: dict, after: dict, phase: str):
    assert before.keys() == after.keys(), phase
    for key, b in before.items():
        a = after[key]
        if isinstance(b, tuple) and b and isinstance(b[-1], torch.Tensor):
            assert a[:-1] == b[:-1], f"after Cancel in {phase}: {key} changed (object/flags) {a[:-1]} != {b[:-1]}"
            assert torch.equal(a[-1], b[-1]), f"after Cancel in {phase}: {key} changed values"
        else:
            assert a == b, f"after Cancel in {phase}: {key} changed"


def cancel_prompt(model, vae, positive, negative, *, width: int, height: int, window: int, stride: int,
                  steps: int, sync_steps: int, tile: int, overlap: int, seed: int, batch: int = 2) -> dict:
    """The graph Cancel is pressed in: the sampler (sync on, checkpointed VAE loss), the decode node, the save node."""
    return h.panorama_prompt(objects=(model, positive, negative, vae), width=width, height=height, batch=batch,
                             seed=seed, steps=steps, window_size=window, stride=stride, sync_steps=sync_steps,
                             window_batch=2, loss_decoder="vae_checkpointed", sync_batch=2,
                             decode=("PanoramaDecode", {**h.DECODE_360[1], "tile_width": tile, "tile_overlap": overlap}),
                             save=(h.SAVE_360[0], {**h.SAVE_360[1], "filename_prefix": "cancel/pano"}))


@contextlib.contextmanager
def armed(comfy, model, vae, lpips, positive, negative, **graph):
    """A ``Cancel`` wired into a clone of ``model`` (its function wrapper) and ``vae``'s decoder (a pre-hook), the
    graph, an uninterrupted reference run and the snapshot of everything Cancel must leave as it was."""
    cancel = Cancel()
    model = model.clone()
    model.set_model_unet_function_wrapper(cancel.unet)
    first_stage = vae.first_stage_model  # a KL VAE (.decoder), or a tiny checkpoint's TAESD (.taesd_decoder)
    decoder = getattr(first_stage, "decoder", None) or first_stage.taesd_decoder
    hook = decoder.register_forward_pre_hook(cancel.decoder)
    prompt = cancel_prompt(model, vae, positive, negative, **graph)
    try:
        cancel.arm(None)
        reference = comfy.run_prompt(prompt)
        yield {"cancel": cancel, "model": model, "prompt": prompt, "reference": reference,
               "before": snapshot(model, vae, lpips), "vae": vae, "lpips": lpips}
    finally:
        hook.remove()


def outputs(result):
    return result["sampler"][0]["samples"], result["dec"][0]


def cancel_in(setup, comfy, phase):
    """Press Cancel in ``phase``: the run stops, the models and switches are as before, no temporary file is left, only
    a complete save (of one of two images) when cancelled in the save node. Returns what fired."""
    cancel, prompt = setup["cancel"], setup["prompt"]
    assert len(setup["reference"].image_files("save")) == 2
    folder = comfy.output_dir / "cancel"
    files_before = set(folder.iterdir())
    cancel.arm(phase)
    result = comfy.run_prompt(prompt, on_progress=cancel.progress)
    fired = cancel.fired
    cancel.arm(None)
    assert fired is not None, f"the run never reached the phase '{phase}'"
    assert result.interrupted and not result.success, f"Cancel in {phase} ({fired}) did not stop the run"
    assert_same(setup["before"], snapshot(setup["model"], setup["vae"], setup["lpips"]), f"{phase} ({fired})")
    new_files = set(folder.iterdir()) - files_before
    assert not [f for f in new_files if f.name.startswith(".syncdiff-")], "a temporary file was left"
    assert len(new_files) == (1 if phase == "save node" else 0), new_files  # the save: one of two, complete
    return fired


def assert_next_run_identical(setup, comfy, phase):
    """The run after Cancel in ``phase`` gives the uninterrupted run's latent, image and saved files, bit for bit."""
    ref_latent, ref_image = outputs(setup["reference"])
    again = comfy.run_prompt(setup["prompt"])
    latent, image = outputs(again)
    assert torch.equal(latent, ref_latent), f"the run after Cancel in {phase} differs from an uninterrupted one"
    assert torch.equal(image, ref_image)
    for new, old in zip(again.image_files("save"), setup["reference"].image_files("save")):
        with Image.open(new) as a, Image.open(old) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))
