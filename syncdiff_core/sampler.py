"""The windowed DDIM (eta 0) loop of SyncDiffusion / MultiDiffusion, over small callables.

The sampler works in k-diffusion's space (``x = x0 + sigma * eps``), where DDIM with eta 0 is the Euler
step ``x_next = x0 + (sigma_next / sigma) * (x - x0)``. Callables:

- ``denoise(x, sigma, windows, step) -> x0``: the guided x0 prediction of a batch of window crops; ``x`` is
  (len(windows) * N, C, h, w), window-major, ``sigma`` has one entry per row of ``x``.
- ``decode(x0) -> image`` in [-1, 1], differentiable (only needed when synchronizing).
- ``loss(images, targets) -> per-item loss`` (only needed when synchronizing).
"""
from __future__ import annotations

from typing import Callable

import torch

from .batching import BatchSize
from .fusion import Fusion
from .sync import Anchor, SyncSettings, synchronize
from .windows import WindowPlan, crop

NO_SYNC = SyncSettings(weight=0.0, steps=0)


def sample(
    denoise: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    plan: WindowPlan,
    *,
    sync: SyncSettings = NO_SYNC,
    decode: Callable | None = None,
    loss: Callable | None = None,
    anchor: Anchor = Anchor(),
    input_scale: Callable[[torch.Tensor], float] = lambda sigma: 1.0,
    window_batch: int = 8,
    sync_batch: int | None = None,
    window_weight: Callable | None = None,
    callback: Callable | None = None,
    interrupt: Callable[[], None] = lambda: None,
    oom_errors: tuple = (),
    release_memory: Callable[[], None] | None = None,
    sync_batch_setting: str = "window_batch",
    oom_advice: str = "",
) -> torch.Tensor:
    """Run the windowed loop from the noisy canvas ``x`` (N, C, H, W) along ``sigmas`` and return the last x.

    ``window_weight(window)`` may give a per-pixel weight (1 or N, 1, h, w) for region-based fusion.
    ``callback(step, x, x0)`` is called after each step with the fused canvas and the fused x0 prediction.
    ``interrupt()`` is called before each batch of windows; it should raise to stop.
    ``window_batch`` windows go through ``denoise`` together (``sync_batch``, default ``window_batch``, in the
    gradient pass). An error of a type in ``oom_errors`` halves that batch size once (``release_memory()`` is
    called before the retry); a second one fails with a message naming the setting to lower.
    """
    if sync.active and (decode is None or loss is None):
        raise ValueError("synchronization needs decode and loss callables")
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    oom = dict(oom_errors=oom_errors, release=release_memory, advice=oom_advice)
    window_batch = BatchSize(min(window_batch, len(plan)), "window_batch", **oom)
    sync_batch = BatchSize(min(sync_batch or window_batch.size, len(plan)), sync_batch_setting, **oom)
    n = x.shape[0]
    weights = [window_weight(w) if window_weight else None for w in plan]
    order = list(range(len(plan)))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        views = [crop(x, w) for w in plan]
        if sync.is_sync_step(i):
            views = synchronize(
                views, sigma, i, plan, denoise=denoise, decode=decode, loss=loss, anchor=anchor,
                weight=sync.weight_at(i), input_scale=input_scale(sigma), batch=sync_batch, interrupt=interrupt,
            )
        fused, fused_x0 = Fusion(x), Fusion(x) if callback else None

        def step(group):
            interrupt()
            xb = torch.cat([views[j] for j in group])
            with torch.no_grad():
                x0 = denoise(xb, sigma.reshape(1).expand(xb.shape[0]), [plan[j] for j in group], i)
            return x0, x0 + (sigma_next / sigma) * (xb - x0)

        for group, (x0, x_next) in window_batch.run(order, step):
            for k, j in enumerate(group):
                part = slice(k * n, (k + 1) * n)
                fused.add(plan[j], x_next[part], weights[j])
                if fused_x0 is not None:
                    fused_x0.add(plan[j], x0[part], weights[j])
        x = fused.result(x)
        if callback is not None:
            callback(i, x, fused_x0.result(x))
    return x
