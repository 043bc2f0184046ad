"""The VAE decoder for the synchronization loss, in plain torch: block-wise gradient checkpointing of the KL
decoder, and the attention kernels its backward runs with.

Nothing here imports ComfyUI: the decoder is walked through the attributes of SD's KL autoencoder layout
(``post_quant_conv``, ``decoder.conv_in / mid / up / norm_out / conv_out``), whoever built it.
"""
from __future__ import annotations

import contextlib

import torch


def attention_backends(avoid_efficient: bool = True):
    """A context selecting SDPA backends for the loss decoder.

    With ``avoid_efficient`` PyTorch's memory-efficient kernel is left out: the SD VAE's mid-block attention is one
    head of 512 channels over 4096 positions (64x64 latent), too wide for the flash kernels, so SDPA falls back
    to the memory-efficient kernel, whose backward took 9.5 ms per call of 2 windows on an H100 (bench/probe.py,
    2026-11-25); the math path's 4096x4096 score matrix is 32 MiB a window. A no-op when ``avoid_efficient`` is
    off or this torch has no ``torch.nn.attention``.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    if not avoid_efficient:
        return contextlib.nullcontext()
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends.insert(1, SDPBackend.CUDNN_ATTENTION)
    return sdpa_kernel(backends)


def is_walkable(first_stage) -> bool:
    """Whether the autoencoder has the SD/KL layout that :func:`checkpointed_decode` walks."""
    dec = getattr(first_stage, "decoder", None)
    return (type(dec).__name__ == "Decoder" and hasattr(first_stage, "post_quant_conv")
            and getattr(first_stage, "bn", None) is None and getattr(first_stage, "max_batch_size", None) is None
            and not getattr(dec, "give_pre_end", False) and not getattr(dec, "tanh_out", False)
            and all(hasattr(dec, a) for a in ("conv_in", "mid", "up", "norm_out", "conv_out", "num_resolutions")))


def checkpointed_decode(first_stage, z: torch.Tensor, context_fn=None) -> torch.Tensor:
    """The KL decoder's forward, block by block, each block under ``torch.utils.checkpoint``: backward keeps
    only block inputs and recomputes the rest (same gradients, about 2 GiB less per 512 px window). The
    modules are only called, never modified. ``context_fn``: checkpoint's (forward, recompute) contexts."""
    from torch.utils.checkpoint import checkpoint

    dec = first_stage.decoder
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    run = lambda block, *a: checkpoint(block, *a, use_reentrant=False, **extra)  # noqa: E731
    h = dec.conv_in(first_stage.post_quant_conv(z))
    h = run(dec.mid.block_1, h, None)
    h = run(dec.mid.attn_1, h)
    h = run(dec.mid.block_2, h, None)
    for level in reversed(range(dec.num_resolutions)):
        up = dec.up[level]
        for i, block in enumerate(up.block):
            h = run(block, h, None)
            if len(up.attn) > 0:
                h = run(up.attn[i], h)
        if level != 0:
            h = run(up.upsample, h)
    h = dec.norm_out(h)
    return dec.conv_out(torch.nn.functional.silu(h))


def kl_decode(first_stage, z: torch.Tensor, checkpointed: bool, context_fn=None) -> torch.Tensor:
    """``first_stage.decode(z)``, or its checkpointed walk."""
    return checkpointed_decode(first_stage, z, context_fn) if checkpointed else first_stage.decode(z)


_COMPILED: dict = {}


def compiled_kl_decode(backend: str):
    """:func:`kl_decode` through ``torch.compile`` with ``backend`` (static shapes), one compiled function per
    backend: dynamo caches its graphs per code object and guards, so later runs and new weights reuse them."""
    fn = _COMPILED.get(backend)
    if fn is None:
        fn = _COMPILED[backend] = torch.compile(kl_decode, backend=backend, dynamic=False)
    return fn
