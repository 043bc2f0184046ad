"""The SyncDiffusion synchronization step: settings, weight schedule, anchors, and the gradient step."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from .batching import BatchSize
from .lanes import Lanes
from .photo import keep_mask_for_latent, kept_window_index
from .windows import WindowPlan

ANCHOR_MODES = ("center", "index", "image", "kept_region")


@dataclass(frozen=True)
class SyncSettings:
    """``weight`` w, ``decay`` (w_i = w · decay^i), the first ``steps`` steps synchronize, every ``every``-th one."""

    weight: float = 20.0
    decay: float = 0.95
    steps: int = 10
    every: int = 1

    def __post_init__(self):
        if not (self.weight >= 0 and self.weight != float("inf")):
            raise ValueError(f"sync_weight must be a finite number >= 0, got {self.weight}")
        if not (0 < self.decay <= 1):
            raise ValueError(f"sync_decay must be in (0, 1], got {self.decay}")
        if self.steps < 0:
            raise ValueError(f"sync_steps must be >= 0, got {self.steps}")
        if self.every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.every}")

    @property
    def active(self) -> bool:
        return self.weight > 0 and self.steps > 0

    def is_sync_step(self, i: int) -> bool:
        return self.active and (i + 1) % self.every == 0 and i < self.steps

    def weight_at(self, i: int) -> float:
        return self.weight * self.decay**i


#: Synchronization off: the windowed loop is plain MultiDiffusion.
NO_SYNC = SyncSettings(weight=0.0, steps=0)


@dataclass(frozen=True)
class GradientWay:
    """How the gradient pass is computed; every way gives the same gradient. ``two_stage``: dL/dx0 through the
    decoder and LPIPS first (the prediction made once without gradient), then the model's vector-Jacobian product
    with it, so the decoder's and the model's graphs are never held at once (one more forward pass of the model).
    ``offload``: the saved activations (the model's, the decoder's and LPIPS') are kept in host memory until the
    backward pass."""

    two_stage: bool = False
    offload: bool = False

    def saving(self):
        """The context the model's gradient forward runs in."""
        if self.offload:
            return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Anchor:
    """What the other windows are pulled toward.

    ``center``: the middle window of the raster order (the reference code). ``index``: window ``index``
    (0 is the paper's algorithm box). ``image``: a fixed target image (N or 1, 3, h, w) in [-1, 1] of the
    window's pixel size; then no window is the anchor and every window moves. ``kept_region``: the window that the
    kept part of ``mask`` covers most, so that the windows follow a photo being outpainted; ``mask`` is a noise
    mask ((batch, [1,]) height, width; 1 = generate, 0 = keep) of any size, resized to the canvas' latent size as
    ComfyUI resizes a noise mask. Without one, the run's own latent noise mask is used (:meth:`for_plan`).
    """

    mode: str = "center"
    index: int = 0
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.mode not in ANCHOR_MODES:
            raise ValueError(f"anchor mode must be one of {ANCHOR_MODES}, got {self.mode!r}")
        if self.mode == "image":
            img = self.image
            if img is None or img.ndim != 4 or img.shape[1] != 3:
                what = "nothing" if img is None else f"shape {tuple(img.shape)}"
                raise ValueError(f"the anchor image must be an RGB image (3 channels), got {what}; convert "
                                 "RGBA or grayscale images to RGB first")
        if self.mask is not None and not (isinstance(self.mask, torch.Tensor) and 2 <= self.mask.ndim <= 4):
            raise ValueError("the anchor mask must be a mask ((batch, [1,]) height, width), got "
                             f"{tuple(self.mask.shape) if isinstance(self.mask, torch.Tensor) else type(self.mask)}")

    def fitted(self, height: int, width: int) -> "Anchor":
        """This anchor with its image resized to cover ``height`` x ``width`` px (aspect kept), center-cropped to
        it and clamped to [-1, 1]; an index or center anchor is returned unchanged."""
        if self.mode != "image":
            return self
        return replace(self, image=fit_image(self.image, height, width).clamp(-1, 1))

    def for_plan(self, plan: WindowPlan, noise_mask: torch.Tensor | None = None) -> "Anchor":
        """This anchor as a run over ``plan`` uses it: a kept-region anchor becomes the index anchor of its window
        (found once, from its own mask, else from ``noise_mask``, the run's latent noise mask); any other anchor is
        returned unchanged."""
        if self.mode != "kept_region":
            return self
        chosen = self if self.mask is not None else replace(self, mask=noise_mask)
        return Anchor(mode="index", index=chosen.window_index(plan))

    def window_index(self, plan: WindowPlan) -> int | None:
        """The anchor window's index in ``plan``, or None for an image anchor."""
        if self.mode == "image":
            return None
        if self.mode == "center":
            return plan.center_index
        if self.mode == "kept_region":
            if self.mask is None:
                raise ValueError("anchor mode 'kept region' needs a mask: connect the mask (1 = generate) to the "
                                 "Anchor Selector's mask input, or sample a latent with a noise mask (Set Latent "
                                 "Noise Mask, or InpaintModelConditioning with noise_mask on)")
            keep = keep_mask_for_latent(self.mask, plan.canvas_height, plan.canvas_width)
            return kept_window_index(plan, keep)
        if not 0 <= self.index < len(plan):
            raise ValueError(
                f"anchor index {self.index} is outside the grid: this canvas has {len(plan)} windows "
                f"(0 to {len(plan) - 1})"
            )
        return self.index


def synchronize(
    lanes: Lanes,
    views: list[torch.Tensor],
    sigma: torch.Tensor,
    step: int,
    plan: WindowPlan,
    *,
    anchor: Anchor,
    weight: float,
    input_scale: float,
    batches: Sequence[BatchSize],
    way: GradientWay = GradientWay(),
    interrupt: Callable[[], None] = lambda: None,
) -> list[torch.Tensor]:
    """One synchronization step: returns the window latents moved by ``-weight · ∂L/∂x`` in the model's input space.

    ``views[j]`` is window j's noisy latent (N, C, h, w) in the sampler's space; the model's input is
    ``input_scale * x`` (the variance-preserving latent for SD), and the step is taken there, as in the paper.
    The moving windows are shared out among the ``lanes`` (one device each), lane k batching its part by
    ``batches[k]`` (its own, so one lane's halving on out-of-memory does not shrink the others'); the anchor is
    predicted and decoded by the first lane. ``way``: how the gradient is computed (:class:`GradientWay`).
    """
    if len(batches) != len(lanes):
        raise ValueError(f"one batch size per lane is needed: {len(lanes)} lanes, {len(batches)} batch sizes")
    n = views[0].shape[0]
    sig = lambda k: sigma.reshape(1).expand(k * n)  # noqa: E731
    a = anchor.window_index(plan)
    target = _anchor_target(lanes[0], views, sig(1), step, plan, anchor)
    out = list(views)
    movers = [j for j in range(len(plan)) if j != a]
    finite = []  # one flag per window, checked once at the end: no host sync per batch

    def lane_pass(k, part):
        lane = lanes[k]
        per_item_loss = _against_fixed_target(lane.loss, target.to(lane.device or target.device))

        def grad_step(group):
            interrupt()
            with torch.enable_grad():
                u = (torch.cat([views[j] for j in group]) * input_scale).detach().requires_grad_(True)
                windows, k = [plan[j] for j in group], len(group)
                grad = _loss_gradient(u, lambda: lane.denoise(u / input_scale, sig(k), windows, step),
                                      lambda x0: per_item_loss(lane.decode(x0), k).sum(), way)
            return (u.detach() - weight * grad) / input_scale, torch.isfinite(grad.flatten(1)).all(dim=1)

        return list(batches[k].run(part, grad_step))

    for results in lanes.map(movers, lane_pass):
        for group, (moved, ok) in results:
            finite.append(ok)
            for k, j in enumerate(group):
                out[j] = moved[k * n : (k + 1) * n]
    if finite:
        _check_finite(torch.cat(finite), movers, n, step, plan)
    return out


def _loss_gradient(u: torch.Tensor, predict: Callable, loss: Callable, way: GradientWay) -> torch.Tensor:
    """d loss(predict()) / du, where ``predict()`` is the model's x0 from ``u``, computed the ``way`` asked."""
    if not way.two_stage:
        with way.saving():
            total = loss(predict())
        return torch.autograd.grad(total, u)[0]
    with torch.no_grad():  # 1. dL/dx0 at the model's prediction, made without gradient
        x0 = predict()
    x0.requires_grad_(True)
    with way.saving():
        total = loss(x0)
    (grad_x0,) = torch.autograd.grad(total, x0)
    with way.saving():  # 2. the model's vector-Jacobian product with it
        x0 = predict()
    return torch.autograd.grad(x0, u, grad_x0)[0]


@torch.no_grad()
def _anchor_target(lane, views, sigma, step: int, plan: WindowPlan, anchor: Anchor) -> torch.Tensor:
    """What the windows are pulled toward: the anchor window's decoded prediction, or the anchor's image."""
    a, n = anchor.window_index(plan), views[0].shape[0]
    if a is not None:
        with eager():  # one call per sync step in a batch shape of its own: not worth a compile
            return lane.decode(lane.denoise(views[a], sigma, [plan[a]], step))
    target = anchor.image.to(views[0].device)
    if target.shape[0] not in (1, n):
        raise ValueError(f"anchor image batch {target.shape[0]} must be 1 or the latent batch {n}")
    return target.expand(n, -1, -1, -1)


def _check_finite(ok: torch.Tensor, movers: list[int], n: int, step: int, plan: WindowPlan) -> None:
    """A clear error naming the first window whose gradient is not finite (``ok``: one flag per moved row)."""
    bad = ~ok
    if bad.any():
        j = movers[int(bad.nonzero()[0]) // n]
        raise FloatingPointError(
            f"SyncDiffusion: the LPIPS gradient is NaN or Inf at step {step + 1}, window {j} "
            f"({plan.describe(plan[j])}); lower sync_weight or use float32"
        )


def eager():
    """A context in which ``torch.compile``d functions run their original code (``torch.compiler.set_stance``;
    a no-op in a torch without it). The anchor's prediction takes it: a compiled model would otherwise compile a
    graph for its one-window batch (a minute or more with inductor, for one call per sync step)."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _against_fixed_target(loss: Callable, target: torch.Tensor) -> Callable:
    """``f(images, windows) -> per-item loss`` against ``target`` (the same for every window).

    A loss with ``features`` / ``distance`` (the pack's LPIPS) gets the target's features once per sync step
    instead of once per window; the result is the same as ``loss(images, target repeated)``.
    """
    if not (hasattr(loss, "features") and hasattr(loss, "distance")):
        return lambda images, k: loss(images, target.repeat(k, 1, 1, 1))
    with torch.no_grad():
        feats = [f.detach() for f in loss.features(target)]
    n = target.shape[0]
    return lambda images, k: loss.distance(loss.features(images), [f if n == 1 else f.repeat(k, 1, 1, 1)
                                                                    for f in feats])


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (B, C, h, w) to cover ``height`` x ``width`` keeping its aspect, then center-crop to it."""
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    image = torch.nn.functional.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return image[..., top:top + height, left:left + width]
