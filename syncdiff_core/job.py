"""A panorama job: every setting of one SyncDiffusion run and every rule on them, in one place.

The node schemas take their options and limits from the constants here (one list, no copies). The rules are
checked when the job is made and when it is planned on a canvas, before any model is loaded; messages speak the
units of the widgets the user typed (pixels).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

from .batching import BatchPolicy
from .memory import MemoryPlan
from .sync import Anchor, SyncSettings
from .windows import WindowPlan, plan_windows

log = logging.getLogger("syncdiffusion")

#: The largest canvas side, window or stride the nodes accept, in pixels.
MAX_PX = 32768
#: The most pixels (batch x width x height) one run may make, decode or encode: 2^28, about 268 megapixels (one
#: 32768x8192 px panorama, or 64 of 2048x2048). The decoded IMAGE alone takes 12 bytes a pixel (3.2 GB here) and the
#: VAE's activations many times that: beyond it a run would fail for memory anyway, after long work, or take the
#: machine's memory from everything else. Checked before anything is allocated.
MAX_CANVAS_PIXELS = 2**28
#: What decodes x0 for the synchronization loss; the first is the default. ``vae_checkpointed``: the full VAE as in
#: the paper, its larger blocks recomputed in the backward pass (same gradients as ``vae``, less memory); ``vae``: the
#: full VAE; ``vae_half``: the VAE on the latent downscaled 2x (approximate); ``taesd``: TAESD from models/vae_approx
#: (approximate, much cheaper).
LOSS_DECODERS = ("vae_checkpointed", "vae", "vae_half", "taesd")
#: The smallest window side, in latent pixels, that the loss decoder takes while synchronizing (its GroupNorms need
#: more than one value per group, LPIPS' VGG a few pixels after its pooling); twice that for ``vae_half``.
MIN_SYNC_WINDOW_LATENT = 2
#: Windows per gradient batch when ``sync_batch`` is 0, for windows of ``SYNC_BATCH_AUTO_PX`` pixels; larger windows
#: get proportionally fewer (at least 1). Two checkpointed windows keep an SD-sized sync step on a mid-size card and
#: are faster than one uncheckpointed window (docs/PERFORMANCE.md has the figures).
SYNC_BATCH_AUTO = 2
SYNC_BATCH_AUTO_PX = 512 * 512
#: The largest window_batch / sync_batch the sampler node offers.
MAX_WINDOW_BATCH = 256
#: The largest ``memory_cap_gb`` the sampler nodes offer, in GiB.
MAX_MEMORY_CAP_GB = 1024.0
#: The compile backend the sampler's ``compile`` switch turns on.
COMPILE_BACKEND = "inductor"
#: Where a DiT window's rotary positions come from: ``window`` (each window is an image starting at 0, as the models
#: were trained; the default) or ``canvas`` (its place on the panorama; families with ComfyUI's RoPE hook).
POSITIONS = ("window", "canvas")


def require_multiple(name: str, value_px: int, scale: int) -> None:
    """``value_px`` must be a positive multiple of ``scale`` pixels (one latent pixel of the model)."""
    if value_px <= 0 or value_px % scale:
        raise ValueError(f"{name} must be a positive multiple of {scale} pixels (one latent pixel of this "
                         f"model), got {value_px}")


def check_canvas_pixels(width_px: int, height_px: int, batch: int = 1, what: str = "the canvas",
                        names: tuple[str, str, str] = ("batch_size", "width", "height")) -> None:
    """``batch`` images of ``width_px`` x ``height_px`` must stay within :data:`MAX_CANVAS_PIXELS`, or a clear error
    that names the widgets (``names``: the batch, width and height inputs) before anything is allocated."""
    total = int(batch) * int(width_px) * int(height_px)
    if total > MAX_CANVAS_PIXELS:
        b, w, h = names
        raise ValueError(
            f"{what}: {b} {batch} x {w} {width_px} x {h} {height_px} px = {total / 1e6:,.0f} megapixels, more than "
            f"the {MAX_CANVAS_PIXELS / 1e6:.0f} megapixels one run may make (the decoded images alone would take "
            f"{12 * total / 1e9:,.1f} GB of memory); lower {w}, {h} or {b}")


def require_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


@dataclass(frozen=True, kw_only=True)
class Windowing:
    """How the windowed sampler covers the canvas and synchronizes it, whatever drives it (the sampler node, or
    ComfyUI's custom sampling as a SAMPLER). Sizes are in pixels; ``window_px`` 0 means the model's native
    window and ``stride_px`` 0 the model's default stride, as in the widgets. ``window_batch`` and ``sync_batch`` 0:
    chosen by the memory plan (:mod:`memory`; the gradient batch at most :meth:`gradient_batch`).
    ``memory_cap_gb``: the most GPU memory, in GiB, the plan may give the run's own work beyond the loaded models
    (0: what is free). ``compile``: "" for
    eager, else a ``torch.compile`` backend for the
    diffusion model and the loss decoder. Only rules on single values live here; the rules that need the model and
    the canvas are in :func:`plan_canvas` (and the bridge's ``prepare_run``)."""

    window_px: int = 0
    stride_px: int = 0
    sync: SyncSettings = field(default_factory=SyncSettings)
    anchor: Anchor = field(default_factory=Anchor)
    wrap: bool = False
    window_batch: int = 0
    sync_batch: int = 0
    loss_decoder: str = LOSS_DECODERS[0]
    compile: str = ""
    checkpoint_model: bool = False
    positions: str = POSITIONS[0]
    memory_cap_gb: float = 0.0

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {list(POSITIONS)}, got {self.positions!r}")
        if self.stride_px < 0:
            raise ValueError(f"stride must be >= 0 pixels (0 = the model's default), got {self.stride_px}")
        if self.window_px < 0:
            raise ValueError(f"window_size must be >= 0 pixels (0 = the model's native size), got {self.window_px}")
        if self.window_batch < 0 or self.sync_batch < 0:
            raise ValueError(f"window_batch and sync_batch must be >= 0 (0 = automatic), got "
                             f"{self.window_batch} and {self.sync_batch}")
        require_finite("memory_cap_gb", self.memory_cap_gb)
        if not 0.0 <= self.memory_cap_gb <= MAX_MEMORY_CAP_GB:
            raise ValueError(f"memory_cap_gb must be between 0 (no cap) and {MAX_MEMORY_CAP_GB:g} GiB, got "
                             f"{self.memory_cap_gb}")
        if self.loss_decoder not in LOSS_DECODERS:
            raise ValueError(f"loss_decoder must be one of {list(LOSS_DECODERS)}, got {self.loss_decoder!r}")

    def for_steps(self, steps: int):
        """These settings for a run of ``steps`` steps: ``sync_steps`` above ``steps`` become ``steps`` (logged)."""
        if self.sync.steps <= steps:
            return self
        log.info("SyncDiffusion: sync_steps %d > steps %d; synchronizing all %d steps", self.sync.steps, steps, steps)
        return replace(self, sync=replace(self.sync, steps=steps))

    def gradient_batch(self, window_pixels: int = SYNC_BATCH_AUTO_PX) -> int:
        """The most windows per gradient pass for windows of ``window_pixels`` pixels: ``sync_batch`` when set,
        else :data:`SYNC_BATCH_AUTO` scaled by the window's area (at most ``window_batch`` when that is set)."""
        if self.sync_batch > 0:
            return self.sync_batch
        auto = max(1, int(SYNC_BATCH_AUTO * SYNC_BATCH_AUTO_PX / window_pixels))
        return min(self.window_batch, auto) if self.window_batch else auto

    def batching(self, plan: MemoryPlan, oom_errors: tuple = (), release=None) -> BatchPolicy:
        """The batching policy of a memory ``plan`` for these settings; ``oom_errors`` and ``release`` come from the
        runtime."""
        advice = f"use loss_decoder '{LOSS_DECODERS[0]}' or 'taesd'" if self.sync.active else ""
        return BatchPolicy(window_batch=plan.window_batch, sync_batch=plan.sync_batch, sync_setting="sync_batch",
                           oom_errors=oom_errors, release=release, advice=advice)


def plan_canvas(windowing: Windowing, canvas_height: int, canvas_width: int, scale: int, native_window: int,
                default_stride_px: int) -> WindowPlan:
    """The windows of ``windowing`` over a latent canvas of ``canvas_height`` x ``canvas_width`` latent px, for a
    model with ``scale`` pixels per latent px, a native window of ``native_window`` latent px and a default stride of
    ``default_stride_px`` pixels; every rule on the sizes is checked here, in pixels."""
    stride_px = windowing.stride_px or default_stride_px
    require_multiple("stride", stride_px, scale)
    if windowing.window_px:
        require_multiple("window_size", windowing.window_px, scale)
    window = windowing.window_px // scale if windowing.window_px else native_window
    least = MIN_SYNC_WINDOW_LATENT * (2 if windowing.loss_decoder == "vae_half" else 1)
    if windowing.sync.active and window < least:
        raise ValueError(f"window_size must be at least {least * scale} px while synchronizing (sync_weight > 0 "
                         f"and sync_steps > 0): loss_decoder '{windowing.loss_decoder}' and LPIPS cannot take "
                         f"smaller windows; got {window * scale} px. Raise window_size (0 = the model's native size) "
                         f"or set sync_weight to 0")
    plan = plan_windows(canvas_height, canvas_width, window, stride_px // scale, wrap=windowing.wrap,
                        px_per_unit=scale)
    if windowing.anchor.mode == "index":  # on the grid (a kept-region anchor is resolved with the run's mask)
        windowing.anchor.window_index(plan)
    return plan


@dataclass(frozen=True, kw_only=True)
class PanoramaJob(Windowing):
    """A whole run of the sampler node: the windowing plus the seed, the DDIM steps, the guidance scale and the
    denoising strength (1 = from pure noise; below 1 the run starts from the input latent partially noised, as
    KSampler does at the same denoise)."""

    seed: int = 0
    steps: int = 50
    cfg: float = 7.5
    denoise: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        require_finite("cfg", self.cfg)
        if not 0.0 < self.denoise <= 1.0:
            raise ValueError(f"denoise must be in (0, 1], got {self.denoise}")
