"""The VAE decoder for the synchronization loss, in plain torch: block-wise gradient checkpointing of the KL
decoder, and the attention kernels its backward runs with.

Nothing here imports ComfyUI: the decoder is walked through the attributes of SD's KL ``Decoder`` layout
(``conv_in / mid / up / norm_out / conv_out``), from the input the autoencoder's own decode gives it.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def attention_backends(avoid_efficient: bool = True):
    """A context selecting SDPA backends for the loss decoder.

    With ``avoid_efficient`` PyTorch's memory-efficient kernel is left out: the SD VAE's mid-block attention is one
    head of 512 channels over 4096 positions (64x64 latent), too wide for the flash kernels, so SDPA would fall
    back to the memory-efficient kernel, whose backward is slow at that width; the math path's 4096x4096 score
    matrix costs 32 MiB a window in fp16 (measurements: docs/dev/levers.md). A no-op when ``avoid_efficient`` is
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


#: Groups of at least this many elements (channels per group x pixels) take :class:`GroupNormStats`' statistics.
#: The general reduction pays off only for large groups (the SD VAE decoder's norms at 256 and 512 px); below
#: this size the native kernel is faster (measurements: docs/dev/levers.md).
WIDE_GROUP = 1 << 20


class GroupNormStats(torch.autograd.Function):
    """``F.group_norm`` whose statistics come from PyTorch's general reduction, which spreads one group over many
    thread blocks. The native CUDA kernel gives each group one block: the loss decoder's 512 px stages have 2 x 32
    groups of a million elements, so a few dozen blocks do all the work and most of the GPU stays idle.

    Everything else is the native op's: the statistics are summed in float32, the output is ``x * a + b`` with
    ``a``, ``b`` per channel in float32, the mean and 1/std are saved in the input's dtype as the native forward
    saves them, and the backward is ``aten.native_group_norm_backward`` itself. Only the statistics' rounding can
    differ from ``F.group_norm``'s.

    ``GroupNormStats.apply(x, groups, weight, bias, eps)``, with ``weight`` and ``bias`` in ``x``'s dtype (or None).
    """

    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps):
        n, c = x.shape[:2]
        flat = x.reshape(n, groups, -1)
        acc = torch.promote_types(x.dtype, torch.float32)
        # float32 sums, as in the native kernel: a half-precision variance overflows (65504) on real VAEs'
        # activations, and a half-precision mean in the output loses a small spread around a large mean. The
        # standard deviation fits where the variance does not.
        mean = flat.mean(-1, dtype=acc)
        rstd = torch.rsqrt(torch.std_mean(flat, dim=-1, correction=0)[0].to(acc).square() + eps)
        a = rstd.repeat_interleave(c // groups, dim=1)  # (n, c)
        if weight is not None:
            a = a * weight.to(acc)
        b = -mean.repeat_interleave(c // groups, dim=1) * a
        if bias is not None:
            b = b + bias.to(acc)
        shape = (n, c) + (1,) * (x.ndim - 2)
        y = torch.empty_like(x)
        torch.addcmul(b.reshape(shape), x, a.reshape(shape), out=y)  # float32 arithmetic, one pass
        ctx.save_for_backward(x, mean.to(x.dtype), rstd.to(x.dtype), weight)  # as the native forward keeps them
        ctx.groups = groups
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, weight = ctx.saved_tensors
        n, c = x.shape[:2]
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            dy.contiguous(), x, mean, rstd, weight, n, c, x[0, 0].numel(), ctx.groups, wanted)
        return dx, None, dw, db if ctx.has_bias else None, None


class _WideGroupNorm(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.group_norm and torch.is_grad_enabled():
            named = dict(zip(("input", "num_groups", "weight", "bias", "eps"), args), **kwargs)
            x, groups = named["input"], named["num_groups"]
            weight, bias = named.get("weight"), named.get("bias")
            # mixed dtypes (e.g. bfloat16 input, float32 weight) stay native: its statistics then take the weight's
            same = all(t is None or t.dtype == x.dtype for t in (weight, bias))
            if same and x.ndim >= 3 and x.is_contiguous() and x[0].numel() // groups >= WIDE_GROUP:
                return GroupNormStats.apply(x, groups, weight, bias, named.get("eps", 1e-5))
        return func(*args, **kwargs)


def wide_group_norm(enabled: bool = True):
    """A context in which ``F.group_norm`` of wide groups (:data:`WIDE_GROUP`), while gradients are on, runs as
    :class:`GroupNormStats`; a no-op when not ``enabled``. A ``TorchFunctionMode``: the modules are only called,
    never changed; it costs one Python call per torch op, so scope it to the loss decoder."""
    return _WideGroupNorm() if enabled else contextlib.nullcontext()


@contextlib.contextmanager
def decoder_backends(avoid_efficient: bool = True, wide: bool = False):
    """The loss decoder's kernel choices together: :func:`attention_backends` and :func:`wide_group_norm`. Enter a
    fresh one around the forward pass and another around checkpointing's recompute, which must choose as the
    forward did."""
    with attention_backends(avoid_efficient), wide_group_norm(wide):
        yield


def is_walkable(first_stage) -> bool:
    """Whether the autoencoder's ``decoder`` has the SD/KL ``Decoder`` layout that :func:`checkpointed_decode` walks
    (SD, SDXL, the 16-channel engine of SD3/Flux/Lumina, Flux.2's); not causal 3-D decoders."""
    dec = getattr(first_stage, "decoder", None)
    return (type(dec).__name__ == "Decoder" and getattr(first_stage, "max_batch_size", None) is None
            and not getattr(dec, "give_pre_end", False) and not getattr(dec, "tanh_out", False)
            and not getattr(dec, "carried", False)
            and all(hasattr(dec, a) for a in ("conv_in", "mid", "up", "norm_out", "conv_out", "num_resolutions")))


class _Captured(Exception):
    def __init__(self, value):
        self.value = value


def decoder_input(first_stage, z: torch.Tensor) -> torch.Tensor:
    """The tensor ``first_stage.decoder`` receives when ``first_stage.decode(z)`` runs, computed by the autoencoder's
    own code (``post_quant_conv`` where it has one; Flux.2's batch-norm de-normalization and unpatchify) and
    differentiable: a temporary forward pre-hook on the decoder takes its input and stops the decode there."""
    def grab(module, args):
        raise _Captured(args[0])

    handle = first_stage.decoder.register_forward_pre_hook(grab)
    try:
        first_stage.decode(z)
    except _Captured as c:
        return c.value
    finally:
        handle.remove()
    raise RuntimeError("the VAE's decode did not call its decoder module")


def checkpointed_decode(decoder, h: torch.Tensor, context_fn=None, plain_stages: int = 0) -> torch.Tensor:
    """The KL ``Decoder``'s forward from its input ``h``, block by block, each block under ``torch.utils.checkpoint``:
    backward keeps only block inputs and recomputes the rest (same gradients, about 2 GiB less per 512 px window).
    The modules are only called, never modified. ``context_fn``: checkpoint's (forward, recompute) contexts.

    ``plain_stages``: the first stages in decoding order (the middle, then the up levels from the lowest
    resolution) keep their activations instead: their blocks are not recomputed in backward. They are the cheap
    ones to keep (few pixels for their channels): each kept stage trades memory for one recomputation fewer
    (measured trade-offs: docs/dev/levers.md). The gradient is the same for any value."""
    from torch.utils.checkpoint import checkpoint

    extra = {"context_fn": context_fn} if context_fn is not None else {}

    def run(stage: int, block, *a):
        return block(*a) if stage < plain_stages else checkpoint(block, *a, use_reentrant=False, **extra)

    h = decoder.conv_in(h)
    h = run(0, decoder.mid.block_1, h, None)
    h = run(0, decoder.mid.attn_1, h)
    h = run(0, decoder.mid.block_2, h, None)
    for stage, level in enumerate(reversed(range(decoder.num_resolutions)), start=1):
        up = decoder.up[level]
        for i, block in enumerate(up.block):
            h = run(stage, block, h, None)
            if len(up.attn) > 0:
                h = run(stage, up.attn[i], h)
        if level != 0:
            h = run(stage, up.upsample, h)
    h = decoder.norm_out(h)
    return decoder.conv_out(torch.nn.functional.silu(h))


def images_for_loss(decoded: torch.Tensor) -> torch.Tensor:
    """A decoder output as (N, 3, h, w) images: 5-D video-VAE output (B, 3, T, h, w) becomes (B·T, 3, h, w)."""
    if decoded.ndim == 5:
        decoded = decoded.movedim(2, 1).flatten(0, 1)
    if decoded.ndim != 4:
        raise ValueError(f"the VAE decoded to shape {tuple(decoded.shape)}, not images")
    return decoded


_COMPILED: dict = {}


def compiled(fn, backend: str):
    """``fn`` through ``torch.compile`` with ``backend`` (static shapes), compiled once per (function, backend):
    dynamo caches its graphs per code object and guards, so later runs and new weights reuse them."""
    key = (fn, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=backend, dynamic=False)
    return _COMPILED[key]
