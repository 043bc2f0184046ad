"""The loss decoder's GroupNorm with split reductions (``decoders.GroupNorm``, ``decoders.split_group_norm``): the
values and gradients of ``F.group_norm``, used only for large groups while gradients are on, and the loss decoder's
gradient unchanged by it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from syncdiff_core import decoders
from syncdiff_core.decoders import GroupNorm, split_group_norm


def rand(*shape, seed=0, dtype=torch.float64, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 8, 5, 6), (1, 6, 3, 4, 5)])
def test_gradcheck_against_the_exact_gradient(affine, shape):
    x = rand(*shape, seed=1, scale=3.0, shift=2.0).requires_grad_(True)
    c = shape[1]
    w = rand(c, seed=2).requires_grad_(True) if affine else None
    b = rand(c, seed=3).requires_grad_(True) if affine else None
    assert torch.autograd.gradcheck(lambda x, w, b: GroupNorm.apply(x, 2, w, b, 1e-5), (x, w, b))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_values_and_gradients_equal_f_group_norm(dtype, tol):
    x = rand(2, 64, 16, 16, seed=4, scale=5.0, shift=-3.0, dtype=dtype)
    w, b = rand(64, seed=5, dtype=dtype), rand(64, seed=6, dtype=dtype)
    dy = rand(2, 64, 16, 16, seed=7, dtype=dtype)
    got_x, want_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = GroupNorm.apply(got_x, 32, w, b, 1e-6)
    want = F.group_norm(want_x, 32, w, b, 1e-6)
    assert got.dtype == want.dtype == dtype
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    (g,), (h,) = torch.autograd.grad(got, got_x, dy), torch.autograd.grad(want, want_x, dy)
    assert (g.float() - h.float()).abs().max() <= tol * h.float().abs().max()


def test_the_mode_takes_large_groups_with_gradients_only(monkeypatch):
    calls = []
    original = GroupNorm.apply
    monkeypatch.setattr(GroupNorm, "apply", lambda *a: calls.append(a[0].shape) or original(*a))
    norm = torch.nn.GroupNorm(4, 16)
    small = torch.randn(2, 16, 4, 4, requires_grad=True)  # 64 elements a group
    large = torch.randn(1, 4, 128, 256, requires_grad=True)  # 32768 a group, one group per channel
    norm_large = torch.nn.GroupNorm(4, 4)
    with split_group_norm():
        norm(small)
        norm_large(large)
        with torch.no_grad():
            norm_large(large)
    with split_group_norm(enabled=False):
        norm_large(large)
    assert calls == [large.shape]
    monkeypatch.setattr(decoders, "SPLIT_GROUP_NORM_MIN", 1)
    with split_group_norm():
        y = norm(small)
    assert calls[-1] == small.shape and y.requires_grad


@pytest.mark.parametrize("mode", ["vae", "vae_checkpointed"])
def test_the_loss_decoder_gradient_is_unchanged(pack, micro, tiny_kl_vae, monkeypatch, mode):
    """Through ComfyUI's KL VAE (every GroupNorm taken: the threshold lowered for the tiny model), in the forward
    pass and in the checkpointed recompute alike."""
    core = pack.decoders  # the pack's module as ComfyUI imported it
    monkeypatch.setattr(core, "SPLIT_GROUP_NORM_MIN", 1)
    calls = []
    original = core.GroupNorm.apply
    monkeypatch.setattr(core.GroupNorm, "apply", lambda *a: calls.append(1) or original(*a))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    grads = {}
    for split in (False, True):
        decode = pack.loss_decoders.decoder_for_gradients(tiny_kl_vae, micro.model, mode, split_norms=split)
        with pack.weights.trainable_weights(tiny_kl_vae.first_stage_model), pack.model.gradient_section():
            u = z.clone().requires_grad_(True)
            image = decode(u)
            grads[split] = (image.detach(), torch.autograd.grad((image * image.flip(-1)).sum(), u)[0])
        assert bool(calls) == split
    (im0, g0), (im1, g1) = grads[False], grads[True]
    assert (im1 - im0).abs().max() < 1e-5
    assert (g1 - g0).norm() / g0.norm() < 1e-5
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in tiny_kl_vae.first_stage_model.decoder.modules())
    assert len(calls) >= norms  # every GroupNorm of the decoder (twice each when checkpointed)
