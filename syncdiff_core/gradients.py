"""Autograd through code written for inference, with PyTorch's own mechanisms only (plain torch, no ComfyUI).

The synchronization step differentiates ``decode(x0(x))`` with respect to a window latent, through a diffusion
model and a VAE decoder written for inference and loaded under ``torch.inference_mode()``. Three things break
plain autograd there; each has a scoped remedy here that neither edits nor copies the model code:

* **In-place updates of saved activations** (Flux-style blocks add into the residual stream after a norm saved
  it). :func:`saved_activation_copies` saves a private copy of every activation autograd keeps, and keeps
  constants by reference with a version check, because pack hooks switch autograd's own check off and an
  unchecked in-place change would give a wrong gradient without an error.
* **Memory.** :class:`Recompute` is gradient checkpointing that is safe for such blocks (``torch.utils.checkpoint``
  is not: it meets the same in-place error, and its reentrant form refuses ``torch.autograd.grad``). It runs the
  block on copies of all its inputs, since a block may also update inputs that do not require grad.
* **Inference tensors that are not module weights** (latent formats' mean/std tensors).
  :func:`inference_tensors_usable` hands every op a normal alias (same storage, no copy) of any inference-tensor
  argument while gradients are on; in-place ops pass through untouched, so ComfyUI's objects are never modified.

The per-family findings behind these remedies: docs/dev/families.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["CopyStats", "saved_activation_copies", "Recompute", "recompute", "inference_tensors_usable",
           "normal_alias", "SavedTensorModifiedError"]


class SavedTensorModifiedError(RuntimeError):
    """A constant saved for backward (weights, conditioning) was modified in place before backward."""


@dataclasses.dataclass
class CopyStats:
    """What :func:`saved_activation_copies` did: ``copies`` / ``copied_bytes`` of activations, ``references`` /
    ``referenced_bytes`` of constants kept by reference (``referenced_bytes`` counts a tensor once per save)."""

    copies: int = 0
    copied_bytes: int = 0
    references: int = 0
    referenced_bytes: int = 0


@contextlib.contextmanager
def saved_activation_copies(stats: CopyStats | None = None):
    """Within the block, autograd saves a copy of each activation it needs for backward (once per tensor and
    version, shared by every op that saves it), and keeps constants by reference with a version check.

    Use it around the *forward* of a gradient pass through code that updates saved activations in place. Memory:
    a saved activation normally shares storage with the live tensor; here it does not, so the extra memory is what
    stays alive besides the copy (the residual stream, mostly) -- see docs/FAMILIES.md for measurements."""
    stats = stats if stats is not None else CopyStats()
    copies: dict[int, tuple] = {}  # id(tensor) -> (weakref to tensor, version, copy)

    def pack(t: torch.Tensor):
        if t.requires_grad:
            key = id(t)
            hit = copies.get(key)
            if hit is not None and hit[0]() is t and hit[1] == t._version:
                return hit[2]
            c = t.detach().clone()
            try:
                copies[key] = (weakref.ref(t), t._version, c)
            except TypeError:  # pragma: no cover - tensors are weak-referenceable
                pass
            stats.copies += 1
            stats.copied_bytes += c.numel() * c.element_size()
            return c
        stats.references += 1
        stats.referenced_bytes += t.numel() * t.element_size()
        return _Reference(t)

    def unpack(p):
        if isinstance(p, _Reference):
            return p.get()
        return p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield stats


class _Reference:
    """A constant kept by reference, with the version it had when saved."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: torch.Tensor):
        self.tensor, self.version = t, t._version

    def get(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise SavedTensorModifiedError(
                f"a tensor of shape {tuple(self.tensor.shape)} saved for backward (a weight or constant) was modified "
                "in place before backward; the gradient would be wrong")
        return self.tensor


class Recompute(torch.autograd.Function):
    """Gradient checkpointing for functions that update activations in place (see the module docstring).

    ``Recompute.apply(fn, *tensors) -> tuple of tensors``: the forward runs ``fn`` without gradient on copies of the
    inputs (``fn`` may update any of them in place: Flux's first double block adds into ``txt``, which does not
    require grad, and the kept input would silently change) and keeps the inputs; the backward
    runs ``fn`` again with gradient under :func:`saved_activation_copies` and returns the input gradients. ``fn``
    must be deterministic, take tensors and return a tuple of tensors (or None); tensors it reads from elsewhere
    must not require grad.
    Autocast state is the forward's in the recompute."""

    @staticmethod
    def forward(ctx, fn, *tensors):
        ctx.fn = fn
        ctx.autocast = _autocast_state(tensors)
        ctx.save_for_backward(*tensors)
        outs = fn(*[t.clone() for t in tensors])  # fn may update any input in place (Flux: img and txt)
        if not isinstance(outs, tuple):
            raise TypeError("Recompute: fn must return a tuple of tensors")
        return outs

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
        with torch.enable_grad(), _autocast(ctx.autocast), saved_activation_copies():
            outs = ctx.fn(*[t.clone() for t in inputs])
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                    allow_unused=True) if pairs and wanted else [None] * len(wanted)
        result = [None] * len(inputs)
        for i, g in zip(wanted, found):
            result[i] = g
        return (None, *result)


def recompute(fn, *tensors: torch.Tensor) -> tuple:
    """``fn(*tensors)`` (a tuple of tensors), checkpointed with :class:`Recompute` when gradients are on and some
    input requires grad; a plain call otherwise."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return Recompute.apply(fn, *tensors)
    return fn(*tensors)


def _autocast_state(tensors):
    device = next((t.device.type for t in tensors), "cpu")
    if device not in ("cuda", "cpu", "xpu", "mps"):
        return None
    try:
        return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    except (TypeError, RuntimeError):  # pragma: no cover - older torch
        return None


def _autocast(state):
    if state is None or not state[1]:
        return contextlib.nullcontext()
    return torch.autocast(state[0], dtype=state[2])


# ---------------------------------------------------------------------------------------- inference tensors

def normal_alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor over ``t``'s storage: no copy; autograd may save it. Call outside
    inference mode."""
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name in ("set_", "copy_")


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        mapped = [_map_tensors(o, fn) for o in obj]
        return type(obj)(mapped) if not hasattr(obj, "_fields") else type(obj)(*mapped)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # subclasses (quantized weights) are left alone


class _InferenceTensorsUsable(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and not _is_inplace(func) \
                and "out" not in kwargs:
            swap = lambda t: normal_alias(t) if type(t) in _PLAIN and t.is_inference() else t  # noqa: E731
            args, kwargs = _map_tensors(args, swap), _map_tensors(kwargs, swap)
        return func(*args, **kwargs)


@contextlib.contextmanager
def inference_tensors_usable():
    """Within the block (and while gradients are on), ops read inference tensors through normal aliases, so
    autograd can save them. Nothing is copied and no object changes; in-place ops and ``out=`` calls are not
    touched (they still refuse to write to an inference tensor). Costs one Python call per torch op: scope it to
    small code (latent-format conversion, a VAE decoder), not a whole diffusion model."""
    with _InferenceTensorsUsable():
        yield
