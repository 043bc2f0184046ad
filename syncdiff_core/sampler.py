"""The windowed DDIM (eta 0) loop of SyncDiffusion / MultiDiffusion, over small callables.

The sampler works in k-diffusion's space (``x = x0 + sigma * eps``), where DDIM with eta 0 is the Euler
step ``x_next = x0 + (sigma_next / sigma) * (x - x0)``. Each device is a lane (:mod:`lanes`) of callables:

- ``denoise(x, sigma, windows, step) -> x0``: the guided x0 prediction of a batch of window crops; ``x`` is
  (len(windows) * N, C, h, w), window-major, ``sigma`` has one entry per row of ``x``.
- ``decode(x0) -> image`` in [-1, 1], differentiable (only needed when synchronizing).
- ``loss(images, targets) -> per-item loss`` (only needed when synchronizing).
"""
from __future__ import annotations

from typing import Callable

import torch

from .batching import BatchPolicy
from .fusion import Fusion
from .lanes import Lanes
from .sync import NO_SYNC, Anchor, GradientWay, SyncSettings, synchronize
from .windows import WindowPlan, crop


def sample(
    lanes: Lanes,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    plan: WindowPlan,
    *,
    sync: SyncSettings = NO_SYNC,
    anchor: Anchor = Anchor(),
    input_scale: Callable[[torch.Tensor], float] = lambda sigma: 1.0,
    batching: BatchPolicy = BatchPolicy(),
    way: GradientWay = GradientWay(),
    callback: Callable | None = None,
    interrupt: Callable[[], None] = lambda: None,
) -> torch.Tensor:
    """Run the windowed loop from the noisy canvas ``x`` (N, C, ..., H, W) along ``sigmas``; return the last x.

    ``callback(step, x, x0)`` is called after each step with the fused canvas and the fused x0 prediction.
    ``interrupt()`` is called before each batch of windows; it should raise to stop. ``batching`` says how many
    windows go through ``denoise`` together and what an out-of-memory error does (see :class:`BatchPolicy`);
    each lane (``Lanes.single(denoise, decode, loss)`` for one device) batches its own share of each pass by it;
    ``way`` says how the gradient is computed (:class:`sync.GradientWay`, the same result every way).
    """
    if sync.active and any(lane.decode is None or lane.loss is None for lane in lanes):
        raise ValueError("synchronization needs decode and loss callables")
    window_batch, sync_batch = zip(*(batching.sizes(len(plan)) for _ in range(len(lanes))))
    n = x.shape[0]
    order = list(range(len(plan)))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # 1. crop the windows
        views = [crop(x, w) for w in plan]
        # 2. on a sync step, move every window but the anchor by the LPIPS gradient
        if sync.is_sync_step(i):
            views = synchronize(
                lanes, views, sigma, i, plan, anchor=anchor, weight=sync.weight_at(i), input_scale=input_scale(sigma),
                batches=sync_batch, way=way, interrupt=interrupt,
            )
        fused, fused_x0 = Fusion(x), Fusion(x) if callback else None

        # 3. one DDIM (eta 0) step of every window, each lane its part
        lane_pass = _ddim_pass(lanes, views, plan, sigma, sigma_next, i, window_batch, interrupt)

        # 4. fuse the windows in window order (MultiDiffusion)
        for results in lanes.map(order, lane_pass):
            for group, (x0, x_next) in results:
                for k, j in enumerate(group):
                    part = slice(k * n, (k + 1) * n)
                    fused.add(plan[j], x_next[part])
                    if fused_x0 is not None:
                        fused_x0.add(plan[j], x0[part])
        x = fused.result(x)
        if callback is not None:
            callback(i, x, fused_x0.result(x))
    return x


def _ddim_pass(lanes: Lanes, views, plan: WindowPlan, sigma, sigma_next, step: int, batches, interrupt) -> Callable:
    """``lane_pass(k, part)``: lane k's DDIM (eta 0) step of the windows in ``part``, batched by ``batches[k]``;
    a list of ``(group, (x0, x_next))``."""
    def lane_pass(k, part):
        def one_batch(group):
            interrupt()
            xb = torch.cat([views[j] for j in group])
            with torch.no_grad():
                x0 = lanes[k].denoise(xb, sigma.reshape(1).expand(xb.shape[0]), [plan[j] for j in group], step)
            return x0, x0 + (sigma_next / sigma) * (xb - x0)

        return list(batches[k].run(part, one_batch))

    return lane_pass
