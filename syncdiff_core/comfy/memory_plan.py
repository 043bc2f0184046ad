"""The memory plan's inputs from ComfyUI: what is free on the device once the models are loaded (fully or partially,
as ComfyUI loads them), and what one window costs in each pass, estimated from the model's and the window's size.

The estimates are per pixel of the window and per row of the guider's batch (cond and uncond), scaled by the
compute dtype's size; their coefficients come from measured runs at real model sizes (``bench/memory_bench.py``,
docs/dev/memory.md). They are deliberately on the high side: an estimate too low is caught by the batch's
out-of-memory fallback, at the cost of a retry.
"""
from __future__ import annotations

import logging
import math
import weakref

import torch

import comfy.model_management

from ..memory import GIB, MemoryPlan, WindowCosts, plan_memory
from .autograd_patches import block_keys

log = logging.getLogger("syncdiffusion")

#: Bytes per window pixel and guider row at 2-byte elements, for SD's UNets: the plain pass, the gradient pass's
#: saved activations (scaled by the square root of the parameter count over SD 2's 865M).
UNET_PLAIN, UNET_GRAD, UNET_PARAMS = 260.0, 2600.0, 865e6
#: For diffusion transformers, per token and hidden unit at 2-byte elements: live tensors in the plain pass, saved
#: tensors per block in the gradient pass, and per block with the blocks recomputed (its input, plus one block's
#: full set while it is recomputed).
DIT_PLAIN, DIT_GRAD_PER_BLOCK, DIT_CHECKPOINTED_PER_BLOCK = 22.0, 14.0, 1.5
#: Bytes per decoded pixel of the loss decoder and LPIPS with gradients, by ``loss_decoder`` (``vae_half`` decodes a
#: quarter of the pixels), and of a decode without gradient (its working set).
DECODER_GRAD = {"vae": 14000.0, "vae_checkpointed": 7200.0, "vae_half": 3600.0, "taesd": 1600.0}
DECODE_WORKING = 700.0
#: Once per pass (the anchor's decoded target, kernel workspaces, fragmentation).
FIXED = 384 * 2 ** 20
#: Headroom on every per-window figure.
MARGIN = 1.15
#: Parameter counts by diffusion model (counted once per model, not at every run).
_PARAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def free_memory(device) -> float:
    """Bytes a run may still allocate on ``device``: ComfyUI's free-memory figure (the torch cache's free part
    included) less what ComfyUI keeps for inference itself."""
    mm = comfy.model_management
    return float(mm.get_free_memory(device) - mm.minimum_inference_memory())


def window_costs(run, inner, rows: int) -> WindowCosts:
    """The per-window costs of ``run`` (a ``RunPlan``) for ``inner`` (the guider's model, a ComfyUI ``BaseModel``),
    ``rows`` guider rows a window. Reads only sizes and dtypes: the model need not be loaded."""
    dm = inner.diffusion_model
    element = _compute_itemsize(inner) / 2.0
    scale = run.facts.pixel_scale
    latent = run.plan.window_height * run.plan.window_width
    pixels = latent * scale * scale
    params = _PARAMS.get(dm) or _PARAMS.setdefault(dm, sum(p.numel() for p in dm.parameters()))
    blocks = len(block_keys(dm))
    if blocks:
        tokens = latent / run.facts.patch ** 2
        hidden = getattr(dm, "hidden_size", None) or math.sqrt(params / (12 * blocks))
        unit = tokens * hidden * 2.0 * element * rows
        plain, model = DIT_PLAIN * unit, DIT_GRAD_PER_BLOCK * blocks * unit
        checkpointed = DIT_CHECKPOINTED_PER_BLOCK * blocks * unit + DIT_GRAD_PER_BLOCK * unit
    else:
        plain = UNET_PLAIN * pixels * rows * element
        model = UNET_GRAD * pixels * rows * element * math.sqrt(max(params, 1) / UNET_PARAMS)
        checkpointed = None
    decoder = DECODER_GRAD.get(run.windowing.loss_decoder, DECODER_GRAD["vae"]) * pixels
    return WindowCosts(plain=MARGIN * plain, model=MARGIN * model,
                       model_checkpointed=None if checkpointed is None else MARGIN * checkpointed,
                       decoder=MARGIN * decoder, decode=MARGIN * DECODE_WORKING * pixels, fixed=FIXED)


def guider_rows(guider) -> int:
    """Rows a window takes in one prediction of ``guider``: one per conditioning it holds (cond, uncond, ...)."""
    return max(1, len(getattr(guider, "conds", {}) or {}))


def memory_cap(run) -> float:
    """The user's cap on the plan's memory, in bytes (``memory_cap_gb`` counts GiB, as ``--reserve-vram`` does; 0:
    none)."""
    cap = run.windowing.memory_cap_gb
    return cap * GIB if cap > 0 else math.inf


def _plan(run, inner, rows: int, free: float) -> MemoryPlan:
    w = run.windowing
    return plan_memory(free, window_costs(run, inner, rows), len(run.plan), sync=run.sync,
                       window_batch=w.window_batch, sync_batch=w.sync_batch,
                       auto_sync_batch=w.gradient_batch(run.window_pixels), checkpoint_model=w.checkpoint_model,
                       cap=memory_cap(run))


def check_cap(run, inner, rows: int) -> None:
    """Refuse a ``memory_cap_gb`` below what any exact plan of ``run`` needs (:class:`NoExactPlan`, naming the cap,
    the least need and the ways out), from sizes alone: called before any model or asset is loaded."""
    if not math.isinf(memory_cap(run)):
        _plan(run, inner, rows, math.inf)


def decide(run, guider, free: float | None = None) -> MemoryPlan:
    """The run's :class:`MemoryPlan` on its device (``free``: bytes, read from ComfyUI when None; the user's cap
    applies on top), logged."""
    free = free_memory(run.patcher.load_device) if free is None else free
    plan = _plan(run, guider.inner_model, guider_rows(guider), free)
    log.info("SyncDiffusion: %d windows; memory plan: %s", len(run.plan), plan.describe(run.sync))
    return plan


def _compute_itemsize(inner) -> int:
    dtype = getattr(inner, "manual_cast_dtype", None) or inner.get_dtype()
    return max(2, torch.empty((), dtype=dtype).element_size())
