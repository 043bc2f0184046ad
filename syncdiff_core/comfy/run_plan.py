"""A windowed run, prepared once: every rule that needs the model, the VAE and the canvas, checked before any model
call, and every fact the sampler needs, worked out here and nowhere downstream (the role of diffusers'
``check_inputs``). Both entry points use it: the sampler node's ``sample_panorama`` prepares the run and hands it
to the sampler; the SAMPLER node's sampler prepares it when ComfyUI's custom sampling calls it."""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..job import Windowing, check_canvas_pixels, plan_canvas
from ..windows import WindowPlan
from . import families, memory_plan, multigpu
from .assets import get_lpips
from .compile import check_compile_backend
from .loss_decoders import taesd_path
from .model import gradient_ready_patcher

log = logging.getLogger("syncdiffusion")


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run of the windowed sampler works from.

    ``windowing``: the settings with ``sync_steps`` clamped to the run's ``steps``, an image anchor fitted to
    the window and a kept-region anchor resolved to its window's index; ``facts``: the model family's
    (:class:`families.Facts`); ``plan``: the windows over the canvas; ``patcher``: the patcher whose model
    predicts in the gradient pass (the model's own unless it loads its weights per call); ``loss``: LPIPS, None
    when not synchronizing."""

    windowing: Windowing
    facts: families.Facts
    plan: WindowPlan
    steps: int
    patcher: object
    loss: object | None = None

    @property
    def sync(self) -> bool:
        return self.windowing.sync.active

    @property
    def window_pixels(self) -> int:
        """Pixels of one window (what the automatic gradient batch is scaled by)."""
        return self.plan.window_height * self.plan.window_width * self.facts.pixel_scale ** 2


def check_sigmas(sigmas: torch.Tensor) -> None:
    """A schedule the windowed sampler can follow: at least one step, strictly decreasing, first sigma > 0."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must hold at least two values (one step), got shape {tuple(sigmas.shape)}")
    if not bool(torch.all(sigmas[1:] < sigmas[:-1])) or float(sigmas[0]) <= 0:
        values = ", ".join(f"{float(s):.4g}" for s in sigmas[:6]) + (", ..." if sigmas.numel() > 6 else "")
        raise ValueError(f"sigmas must be strictly decreasing from a positive value, got [{values}]; use a "
                         "scheduler's output (flipped sigmas cannot be sampled)")


def check_latent_size(samples: torch.Tensor, scale: int) -> None:
    """The canvas a latent stands for, at ``scale`` pixels per latent px, must be within the pack's pixel limit
    (``job.MAX_CANVAS_PIXELS``)."""
    if samples.ndim < 3:
        raise ValueError(f"latent_image must be a LATENT (batch, channels, height, width), got shape "
                         f"{tuple(samples.shape)}")
    frames = samples.shape[0] * (samples.shape[2] if samples.ndim == 5 else 1)
    check_canvas_pixels(samples.shape[-1] * scale, samples.shape[-2] * scale, frames, "latent_image",
                        names=("batch", "width", "height"))


def prepare_run(windowing: Windowing, model, vae, latent: torch.Tensor, steps: int, loss=None,
                rows: int = 1, noise_mask: torch.Tensor | None = None) -> RunPlan:
    """The :class:`RunPlan` of ``windowing`` for ``model`` (a ModelPatcher) on ``latent`` (in the model's layout)
    over ``steps`` steps, ``rows`` guider rows a window (cond, uncond); ``loss`` replaces LPIPS (tests);
    ``noise_mask``: the latent's noise mask (any size), which a kept-region anchor without a mask of its own
    follows. Raises a ValueError naming the input before any model call when the family cannot be sampled (or
    synchronized) on this latent, the canvas is over the pixel limit, the windows do not fit it in the family's
    pixels, synchronization lacks its VAE (or TAESD file), canvas positions lack the model's RoPE hook, compile
    cannot run, a kept-region anchor has no mask or the mask keeps nothing, a GPU ComfyUI's MultiGPU prepared is
    missing, or ``memory_cap_gb`` is below what any exact memory plan needs (checked before LPIPS or the gradient
    path is loaded)."""
    # 1. the devices, the family and the canvas
    multigpu.check_devices_present(multigpu.prepared_devices(model))
    windowing = windowing.for_steps(steps)
    sync = windowing.sync.active
    facts = families.check_supported(model, latent, sync=sync, vae=vae if sync else None)
    check_latent_size(latent, facts.pixel_scale)

    # 2. the windows over the canvas, in the family's pixels
    plan = plan_canvas(windowing, latent.shape[-2], latent.shape[-1], facts.pixel_scale, facts.native_latent,
                       facts.default_stride_px)

    # 3. what the options need
    if sync and windowing.loss_decoder == "taesd":
        taesd_path(model)  # a missing file fails here
    elif sync and vae is None:
        raise ValueError("vae is required when sync_weight > 0 and sync_steps > 0 (it decodes the windows for the "
                         "LPIPS loss)")
    if windowing.positions == "canvas" and not families.rope_shift_supported(model):
        raise ValueError(f"positions 'canvas' needs a model that reads ComfyUI's RoPE options (Flux.1, Flux.2, "
                         f"Lumina 2, Z-Image); {facts.family} does not: use positions 'window'")
    if windowing.compile:
        check_compile_backend(windowing.compile, model.load_device)
    memory_plan.check_cap(RunPlan(windowing, facts, plan, steps, model), model.model, rows)

    # 4. the gradient path: the anchor at the window's pixel size (or the window of the kept region), weights that
    # can carry gradients, LPIPS
    patcher = model
    if sync:
        scale = facts.pixel_scale
        anchor = windowing.anchor.fitted(plan.window_height * scale, plan.window_width * scale)
        if anchor.mode == "kept_region":
            anchor = anchor.for_plan(plan, noise_mask)
            log.info("SyncDiffusion: anchor window %d of %d, the one the kept region covers most", anchor.index,
                     len(plan))
        windowing = dataclasses.replace(windowing, anchor=anchor)
        patcher = gradient_ready_patcher(model)
        loss = loss if loss is not None else get_lpips(model.load_device)
    return RunPlan(windowing, facts, plan, steps, patcher, loss if sync else None)
