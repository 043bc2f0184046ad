"""Shared by test_layout.py and test_controlnet_windows.py: the micro SD1.x UNet and ControlNet
(``devtools.models``: SD's architecture at model_channels 32, about 100x cheaper than the checkpoint-sized tiny
models, for the dozen panoramas these tests make), prompts as conditioning tensors, and ``reference_panorama``: what
the windowed sampler should compute, without the pack's cropping code (every window denoised by a stock
``CFGGuider`` on its own crop, with conditioning built for that window by ComfyUI's own nodes from the window's part
of the input, then the windows averaged, as docs/dev/method.md describes).
"""
import contextlib
import math

import torch

from devtools.models import MICRO_CTX as CTX, MICRO_UNET, build_micro_controlnet, build_micro_model  # noqa: F401

CFG = 5.0


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread while the block runs. These tests' tensors are tiny: on a shared 2-core
    machine a second OpenMP thread mostly waits for a busy core (a 32-channel conv measured 93 ms with two
    threads under load, 1.3 ms with one)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def prompt(seed: int, tokens: int = 8, scale: float = 1.0) -> list:
    """A CONDITIONING ``[[cond (1, tokens, CTX), {"pooled_output": ...}]]`` from random numbers."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CTX, generator=g) * scale, {"pooled_output": torch.randn(1, CTX, generator=g)}]]


def stock_node(comfy, name: str):
    return comfy.nodes.NODE_CLASS_MAPPINGS[name]()


# ----------------------------------------------------------------------------- reference

class OneStep:
    """A ``comfy.samplers.Sampler`` doing one DDIM (eta 0) step from ``noise`` (used as x itself) along
    ``sigmas[0] -> sigmas[1]``; the new x is kept in ``self.x_next`` (no latent-format round trip)."""

    def __new__(cls):
        import comfy.samplers

        class _OneStep(comfy.samplers.Sampler):
            x_next = None

            def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
                       denoise_mask=None, disable_pbar=False):
                s = sigmas[0].reshape(1).expand(noise.shape[0])
                x0 = model_wrap(noise, s, **extra_args)
                self.x_next = x0 + (sigmas[1] / sigmas[0]) * (noise - x0)
                return self.x_next

        return _OneStep()


def reference_panorama(model, window_conds, shape, seed: int, sigmas: torch.Tensor, plan,
                       cfg: float = CFG) -> torch.Tensor:
    """What the pack's ``sample_panorama(...)["samples"]`` should be, computed window by window with stock
    ComfyUI: ``window_conds(window) -> (positive, negative)`` gives each window its own conditioning.

    Starts as the pack documents (ComfyUI's seeded noise times sqrt(1 + sigma0^2), DDIM along the
    reference schedule, windows averaged each step, the final x scaled to x_VP and by the latent format)."""
    import comfy.sample
    import comfy.samplers

    inner = model.model
    noise = comfy.sample.prepare_noise(torch.zeros(shape), seed)
    x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    conds = [window_conds(w) for w in plan]
    for i in range(len(sigmas) - 1):
        value, count = torch.zeros_like(x), torch.zeros_like(x[:, :1])
        for w, (pos, neg) in zip(plan, conds):
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(pos, neg)
            guider.set_cfg(cfg)
            step = OneStep()
            rows = slice(w.top, w.top + w.height)
            cols = (torch.arange(w.width) + w.left) % w.canvas_width
            xw = x[:, :, rows][..., cols]
            guider.sample(xw, torch.zeros_like(xw), step, sigmas[i:i + 2], disable_pbar=True, seed=seed)
            value[:, :, rows, cols] += step.x_next.to(x)
            count[:, :, rows, cols] += 1
        x = value / count
    x = x / math.sqrt(1.0 + float(sigmas[-1]) ** 2)
    return inner.process_latent_out(x)


def window_columns_px(w, scale: int = 8) -> torch.Tensor:
    """The canvas pixel columns a window covers, in window order (wrap-aware)."""
    return (torch.arange(w.width * scale) + w.left * scale) % (w.canvas_width * scale)
