"""Gradients through weights that were created under ``torch.inference_mode()`` (plain torch).

ComfyUI loads models under inference mode, and autograd refuses to save inference tensors for backward. The
synchronization step differentiates through the diffusion model and the VAE decoder, so for the length of the
gradient pass their weights are replaced by normal tensors over the same memory.
"""
from __future__ import annotations

import contextlib

import torch

from .gradients import normal_alias


@contextlib.contextmanager
def trainable_weights(*modules: torch.nn.Module):
    """Within the block every inference-mode parameter and buffer of ``modules`` is replaced in its module by
    a normal tensor over the same storage, so autograd can save it for backward; the original objects are put
    back afterwards, so the models loaded in ComfyUI are left exactly as they were. Nothing is copied (a copy
    would double the model's memory), tied weights stay tied, and no restore needs memory. A tensor subclass
    (ComfyUI's quantized weights) is rebuilt over normal aliases of its inner tensors through PyTorch's wrapper
    subclass protocol (``__tensor_flatten__`` / ``__tensor_unflatten__``), so it is not copied either; one that
    cannot be rebuilt stays as it is (its layer dequantizes it per call, and autograd saves that result)."""
    swapped = []  # (store, name, original)
    stand_ins = {}  # id(original) -> its stand-in (the originals are alive in ``swapped``)
    try:
        with torch.inference_mode(False):
            for module in modules:
                for owner in module.modules():
                    for store in (owner._parameters, owner._buffers):
                        for name, t in list(store.items()):
                            if t is None or not t.is_inference():
                                continue
                            stand_in = stand_ins.get(id(t))
                            if stand_in is None:
                                stand_in = stand_ins[id(t)] = _stand_in(t)
                            if stand_in is None:  # a subclass that cannot be rebuilt: its layer casts it
                                continue
                            store[name] = stand_in
                            swapped.append((store, name, t))
        yield
    finally:
        for store, name, original in reversed(swapped):
            store[name] = original


def _stand_in(t: torch.Tensor) -> torch.Tensor | None:
    data = _alias(t)
    if data is None:
        return None
    return torch.nn.Parameter(data, requires_grad=False) if isinstance(t, torch.nn.Parameter) else data


def _alias(t: torch.Tensor) -> torch.Tensor | None:
    """A normal tensor over ``t``'s memory: plain tensors directly, wrapper subclasses through their inner tensors;
    None for a subclass without the wrapper protocol."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return normal_alias(t) if t.is_inference() else t.detach()
    flatten = getattr(type(t), "__tensor_flatten__", None)
    unflatten = getattr(type(t), "__tensor_unflatten__", None)
    if flatten is None or unflatten is None:
        return None
    names, context = t.__tensor_flatten__()
    inner = {name: _alias(getattr(t, name)) for name in names}
    if any(v is None for v in inner.values()):
        return None
    return unflatten(inner, context, t.size(), t.stride())
