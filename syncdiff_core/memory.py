"""The memory plan of a run: which exact levers fit the memory the device has, chosen before sampling.

Plain torch. The bridge measures what is free after the models are loaded and estimates what one window costs in
each pass (:class:`WindowCosts`); :func:`plan_memory` then picks, in order of speed, the largest batches and the
fewest recomputations that fit, every one of them exact (the panorama does not depend on the plan):

1. the plain pass's window batch (``window_batch`` 0: as many windows as fit, up to all);
2. the gradient pass, fastest first: one graph through the model, the loss decoder and LPIPS; the same with the
   diffusion model's blocks recomputed in the backward pass (where the model has them); the gradient in two
   stages (dL/dx0 through the decoder and LPIPS first, then the model's vector-Jacobian product, so the two graphs
   are never held at once); as a last resort the saved activations kept in host memory.

The approximate loss decoders (``vae_half``, ``taesd``) are never chosen here: only the user picks them. Settings
the user saved (``window_batch``, ``sync_batch`` above 0, ``checkpoint_model`` on) are kept as they are. A memory cap
(``memory_cap_gb``, for users who run other models beside the pack) bounds the plan's budget like free memory does;
a cap below the least any exact plan needs is refused with the cap, that need and the ways out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2 ** 30


@dataclass(frozen=True)
class WindowCosts:
    """Bytes one window needs beyond the loaded weights, per pass (estimates; the out-of-memory fallback of
    :mod:`batching` stays as the safety net under them).

    ``plain``: the plain pass (no gradient). ``model``: the diffusion model's saved activations with gradients;
    ``model_checkpointed``: the same with its blocks recomputed (None: the model has no blocks to recompute);
    ``decoder``: the loss decoder and LPIPS with gradients; ``decode``: their working memory without saved
    activations (what stays on the device when those are kept in host memory). ``fixed``: once per pass (the
    anchor's target, workspaces)."""

    plain: float
    model: float
    model_checkpointed: float | None
    decoder: float
    decode: float
    fixed: float = 0.0


#: The gradient pass's exact ways, fastest first: (blocks recomputed, two stages, activations on the host).
GRADIENT_WAYS = ((False, False, False), (True, False, False), (False, True, False), (True, True, False),
                 (False, True, True), (True, True, True))


@dataclass(frozen=True)
class MemoryPlan:
    """What a run does to fit: batch sizes and exact levers, with the estimated peak beyond the weights."""

    window_batch: int
    sync_batch: int = 1
    checkpoint_model: bool = False
    two_stage: bool = False
    offload: bool = False
    peak: float = 0.0
    budget: float = math.inf
    capped: bool = False

    def describe(self, sync: bool) -> str:
        parts = [f"window_batch {self.window_batch}"]
        if sync:
            parts.append(f"sync_batch {self.sync_batch}")
            parts += [name for name, on in (("model blocks recomputed", self.checkpoint_model),
                                            ("gradient in two stages", self.two_stage),
                                            ("activations in host memory", self.offload)) if on]
        budget = "" if math.isinf(self.budget) else f" of {self.budget / GIB:.1f} GiB " + (
            "(memory_cap_gb)" if self.capped else "free")
        return f"{', '.join(parts)}; estimated peak {self.peak / GIB:.2f} GiB{budget}"


class NoExactPlan(ValueError):
    """No exact plan fits the free memory; the message says what would."""


def gradient_need(costs: WindowCosts, batch: int, checkpoint: bool, two_stage: bool, offload: bool) -> float:
    """Estimated bytes of one gradient pass over ``batch`` windows."""
    if offload:  # saved activations live in host memory: the device holds one layer's working set at a time
        return costs.fixed + batch * max(costs.plain, costs.decode)
    model = costs.model_checkpointed if checkpoint else costs.model
    if two_stage:  # the decoder's graph is freed before the model's is built
        return costs.fixed + batch * max(model, costs.decoder)
    return costs.fixed + batch * (model + costs.decoder)


def plan_memory(free: float, costs: WindowCosts, windows: int, *, sync: bool, window_batch: int = 0,
                sync_batch: int = 0, auto_sync_batch: int = 1, checkpoint_model: bool = False,
                cap: float = math.inf) -> MemoryPlan:
    """The fastest exact plan within ``free`` bytes (and the user's ``cap``, bytes) for ``windows`` windows.

    ``window_batch`` / ``sync_batch`` 0: chosen here (the gradient batch up to ``auto_sync_batch``); above 0: kept.
    ``checkpoint_model`` on: kept on. Raises :class:`NoExactPlan` when even one window at a time with every exact
    lever does not fit (only for what the plan chooses: batch sizes the user set are left to the out-of-memory
    fallback, which names them); its message names the cap when the cap is what does not fit."""
    capped = cap < free
    free = min(free, cap)
    plain_one = costs.fixed + costs.plain
    if window_batch:
        plain = window_batch
    elif math.isinf(free):
        plain = windows
    else:
        plain = max(1, min(windows, int((free - costs.fixed) // max(costs.plain, 1.0))))
    plain_peak = costs.fixed + plain * costs.plain
    if not sync:
        if not window_batch and plain_one > free:
            raise NoExactPlan(_too_small(free, plain_one, sync=False, capped=capped))
        return MemoryPlan(plain, peak=plain_peak, budget=free, capped=capped)
    movers = max(1, windows - 1)
    most = min(sync_batch or auto_sync_batch, movers)
    ways = [w for w in GRADIENT_WAYS if (costs.model_checkpointed is not None or not w[0])
            and (w[0] or not checkpoint_model)]
    for checkpoint, two_stage, offload in ways:
        for batch in range(most, 0, -1) if not sync_batch else (most,):
            need = gradient_need(costs, batch, checkpoint, two_stage, offload)
            if need <= free:
                return MemoryPlan(plain, batch, checkpoint, two_stage, offload, max(plain_peak, need), free, capped)
    checkpoint, two_stage, offload = ways[-1]
    least = gradient_need(costs, 1, checkpoint, two_stage, offload)
    if sync_batch:  # the user's batch: let it run, the out-of-memory fallback names the setting
        need = gradient_need(costs, most, checkpoint, two_stage, offload)
        return MemoryPlan(plain, most, checkpoint, two_stage, offload, max(plain_peak, need), free, capped)
    raise NoExactPlan(_too_small(free, least, sync=True, capped=capped))


def _too_small(free: float, least: float, sync: bool, capped: bool = False) -> str:
    what = "synchronizing one window at a time, with every exact memory saving" if sync else \
        "one window at a time"
    fixes = "a smaller window_size, loss_decoder 'taesd' (approximate, much less memory), sync_weight 0 " \
            "(MultiDiffusion), or a card with more memory" if sync else "a smaller window_size or a card with more " \
                                                                       "memory"
    if capped:
        return (f"SyncDiffusion: memory_cap_gb {free / GIB:.2f} GiB is below what any exact plan needs: about "
                f"{least / GIB:.2f} GiB beyond the loaded models ({what}). Raise memory_cap_gb to at least "
                f"{math.ceil(least / GIB * 100) / 100:.2f} (0 = no cap), or use {fixes}")
    return (f"SyncDiffusion: not enough GPU memory: {what} needs about {least / GIB:.1f} GiB beyond the loaded "
            f"models, and {max(free, 0) / GIB:.1f} GiB is free. Use {fixes}; or close what else uses the GPU")
