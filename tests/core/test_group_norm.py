"""decoders.GroupNormStats: F.group_norm with its statistics from torch's general reduction and the native
backward; wide_group_norm routes only wide groups, only while gradients are on, and nothing else."""
import pytest
import torch
import torch.nn.functional as F

from syncdiff_core import decoders
from syncdiff_core.decoders import GroupNormStats, wide_group_norm


def _inputs(dtype, c=8, side=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, c, side, side, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    w = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b


def test_gradcheck_float64():
    x, w, b = (t.requires_grad_() for t in _inputs(torch.float64))
    assert torch.autograd.gradcheck(lambda x, w, b: GroupNormStats.apply(x, 4, w, b, 1e-5), (x, w, b))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_equals_group_norm(dtype, tol, affine):
    x, w, b = _inputs(dtype, c=16, side=10, seed=1)
    w, b = (w, b) if affine else (None, None)
    x.requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    want = F.group_norm(x, 4, w, b, 1e-6)
    got = GroupNormStats.apply(x, 4, w, b, 1e-6)
    assert got.dtype == want.dtype
    assert (got - want).abs().max() <= tol * want.abs().max()
    (dwant,) = torch.autograd.grad(want, x, g)
    (dgot,) = torch.autograd.grad(got, x, g)
    assert (dgot - dwant).abs().max() <= tol * dwant.abs().max()


def test_bfloat16_differs_only_by_rounding():
    """The mean and 1/std are kept in bfloat16 (as CUDA's native kernel keeps them; the CPU kernel keeps more), so
    ``x * a + b`` can be off by a few bfloat16 steps of its terms' size, never more."""
    x, w, b = _inputs(torch.bfloat16, c=16, side=16, seed=3)
    want, got = F.group_norm(x, 4, w, b, 1e-6), GroupNormStats.apply(x, 4, w, b, 1e-6)
    exact = F.group_norm(x.double(), 4, w.double(), b.double(), 1e-6)
    assert got.dtype == torch.bfloat16
    scale = exact.abs().max()
    assert (got.double() - exact).abs().max() <= 2.0 ** -6 * scale
    assert (got.double() - want.double()).abs().max() <= 2.0 ** -6 * scale


@pytest.mark.parametrize("spread,offset", [(1000.0, 300.0), (0.01, 5.0)])
def test_float16_statistics_are_summed_in_float32(spread, offset):
    """Half-precision activations whose variance overflows float16 (spread 1000: variance 1e6 > 65504), and a small
    spread around a large mean (which a float16 mean in the output would lose): within float16's rounding of the
    float32 result, as the native op is; a variance kept in float16 gave inf there, and a float16 mean an error of
    a fifth of the spread."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 8, 6, 6, generator=g) * spread + offset).half()
    w, b = torch.randn(8, generator=g).half(), torch.randn(8, generator=g).half()
    exact = F.group_norm(x.float(), 4, w.float(), b.float(), 1e-6)
    got = GroupNormStats.apply(x, 4, w, b, 1e-6)
    native = F.group_norm(x, 4, w, b, 1e-6)
    assert torch.isfinite(got).all()
    assert (got.float() - exact).abs().max() <= 2 * (native.float() - exact).abs().max() + 2.0 ** -10


def test_mode_leaves_mixed_dtypes_native(monkeypatch):
    """A bfloat16 input with float32 weights (the native op then keeps float32 statistics for its backward) is not
    routed: the gradient flows, as the native op's."""
    seen = []
    real = GroupNormStats.apply
    monkeypatch.setattr(GroupNormStats, "apply", lambda *a: seen.append(a[0].dtype) or real(*a))
    monkeypatch.setattr(decoders, "WIDE_GROUP", 1)
    x, w, b = _inputs(torch.float32)
    x = x.bfloat16().requires_grad_()
    with wide_group_norm():
        y = F.group_norm(x, 4, w, b, 1e-6)
        (dx,) = torch.autograd.grad(y.float().square().sum(), x)
        F.group_norm(x, 4, w.bfloat16(), b.bfloat16(), 1e-6)
    assert seen == [torch.bfloat16]  # only the call with matching dtypes
    assert dx.dtype == torch.bfloat16 and torch.isfinite(dx).all()


def test_mode_routes_wide_groups_with_gradients_only(monkeypatch):
    seen = []
    real = GroupNormStats.apply
    monkeypatch.setattr(GroupNormStats, "apply", lambda *a: seen.append(a[0].shape) or real(*a))
    monkeypatch.setattr(decoders, "WIDE_GROUP", 2 * 36)  # 8 channels / 4 groups x 6 x 6 px = 72 a group
    norm = torch.nn.GroupNorm(4, 8).double()
    narrow = torch.nn.GroupNorm(2, 2).double()  # 1 channel x 36 px a group: native
    x, _, _ = _inputs(torch.float64)
    with wide_group_norm():
        with torch.no_grad():
            norm(x)
        assert seen == []  # no gradient: the native op
        y = norm(x.requires_grad_())
        narrow(x[:, :2])
    assert seen == [x.shape]
    assert (y - F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)).abs().max() < 1e-12
    with wide_group_norm(enabled=False):
        norm(x)
    assert len(seen) == 1
