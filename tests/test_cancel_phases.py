"""Cancel at any point (issue 15): ComfyUI's own interrupt pressed in each phase of a SyncDiffusion graph -- a plain
step, the anchor's decode, the gradient pass (its forward and its backward), the decode node, the save node. After
each, the loaded models are exactly as before (every weight and buffer: the same object, values, requires_grad,
inference-ness; the patcher's patches and options; ComfyUI's switches), no temporary file is left, and the next run
with the same seed is bit-identical to an uninterrupted one.

Cancel is pressed the way the UI's button does (``comfy.model_management.interrupt_current_processing``), from
places ComfyUI and torch offer for code to run: a model function wrapper (``set_model_unet_function_wrapper``), a
tensor's backward hook, a module's forward pre-hook, and the progress hook. Where the phase has no check of its own,
the hook also calls ComfyUI's ``throw_exception_if_processing_interrupted``, so the interrupt surfaces exactly there
(the worst case: the gradient pass is left half-way, its stand-in weights in place).
"""
from __future__ import annotations

import pytest
import torch

from layout_helpers import one_thread

SEED = 21
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


@pytest.fixture(scope="module")
def setup(comfy, pack, micro, tiny_kl_vae, lpips, object_node):
    cancel = Cancel()
    model = micro.model.clone()
    model.set_model_unet_function_wrapper(cancel.unet)
    hook = tiny_kl_vae.first_stage_model.decoder.register_forward_pre_hook(cancel.decoder)
    prompt = {
        "model": object_node(model, "MODEL"), "pos": object_node(micro.positive, "CONDITIONING"),
        "neg": object_node(micro.negative, "CONDITIONING"), "vae": object_node(tiny_kl_vae, "VAE"),
        "lat": {"class_type": "PanoramaLatent", "inputs": {"width": 192, "height": 64, "batch_size": 2}},
        "sampler": {"class_type": "SyncDiffusionSampler", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["vae", 0],
            "latent_image": ["lat", 0], "seed": SEED, "steps": 2, "cfg": 5.0, "window_size": 64, "stride": 32,
            "sync_weight": 20.0, "sync_decay": 0.95, "sync_steps": 1, "sync_every": 1, "wrap": False,
            "window_batch": 2, "loss_decoder": "vae_checkpointed", "sync_batch": 2}},
        "dec": {"class_type": "PanoramaDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0], "wrap": True,
                                                           "padding": 4, "tile_width": 64, "tile_overlap": 16}},
        "save": {"class_type": "SavePanorama360", "inputs": {"images": ["dec", 0], "filename_prefix": "cancel/pano",
                                                             "format": "png", "jpeg_quality": 95}},
    }
    try:
        with one_thread():
            cancel.arm(None)
            reference = comfy.run_prompt(prompt)
        yield {"cancel": cancel, "model": model, "prompt": prompt, "reference": reference,
               "before": snapshot(model, tiny_kl_vae, lpips), "vae": tiny_kl_vae, "lpips": lpips}
    finally:
        hook.remove()


def _outputs(result):
    return result["sampler"][0]["samples"], result["dec"][0]


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_cancel_in_each_phase_leaves_models_and_the_next_run_unchanged(setup, comfy, phase):
    cancel, prompt = setup["cancel"], setup["prompt"]
    ref_latent, ref_image = _outputs(setup["reference"])
    assert len(setup["reference"].image_files("save")) == 2
    folder = comfy.output_dir / "cancel"
    files_before = set(folder.iterdir())
    with one_thread():
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

        again = comfy.run_prompt(prompt)
    latent, image = _outputs(again)
    assert torch.equal(latent, ref_latent), f"the run after Cancel in {phase} differs from an uninterrupted one"
    assert torch.equal(image, ref_image)
    import numpy as np
    from PIL import Image

    for new, old in zip(again.image_files("save"), setup["reference"].image_files("save")):
        with Image.open(new) as a, Image.open(old) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))
