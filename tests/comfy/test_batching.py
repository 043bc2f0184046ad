"""Batched windows: the same result as one window at a time, the out-of-memory fallback, the loss decoders.

Core tests use small float64 toy callables (no ComfyUI); the ComfyUI tests run the micro SD1.x UNet on the CPU.
"""
import logging
import math

import pytest
import torch

from devtools import harness as h
from reference import F64, Toy, input_scale, reference_loop
from syncdiff_core import BatchPolicy, Lanes, SyncSettings, plan_windows, sample
from syncdiff_core.batching import BatchSize, even_group_sizes


def views(plan):
    return [(w.top, w.left, w.height, w.width) for w in plan]


SIGMAS = torch.tensor([12.0, 5.0, 2.0, 0.7, 0.029], dtype=F64)


def canvas(seed=0, h=8, w=40):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed), dtype=F64) * 12.0


@pytest.mark.parametrize("w", [0.0, 20.0])
def test_window_batch_1_reproduces_the_one_at_a_time_baseline_exactly(w):
    toy = Toy()
    plan = plan_windows(8, 40, 8, 4)
    x = canvas()
    want = reference_loop(x.clone(), SIGMAS, views(plan), toy, w=w, sync_steps=2)
    got = sample(Lanes.single(toy.denoise, toy.decode, toy.loss), x.clone(), SIGMAS, plan,
                 sync=SyncSettings(weight=w, steps=2), input_scale=input_scale, batching=BatchPolicy(window_batch=1))
    assert torch.equal(got, want)


@pytest.mark.parametrize("w", [0.0, 20.0])
@pytest.mark.parametrize("window_batch,sync_batch", [(3, None), (4, 2), (9, 9), (100, None), (2, 7)])
def test_batched_equals_one_at_a_time(w, window_batch, sync_batch):
    toy = Toy(seed=1)
    plan = plan_windows(16, 24, 8, 4)  # several rows: 3 x 5 windows
    x = canvas(1, 16, 24)
    kw = dict(sync=SyncSettings(weight=w, steps=3), input_scale=input_scale)
    lanes = Lanes.single(toy.denoise, toy.decode, toy.loss)
    base = sample(lanes, x.clone(), SIGMAS, plan, batching=BatchPolicy(window_batch=1), **kw)
    got = sample(lanes, x.clone(), SIGMAS, plan, batching=BatchPolicy(window_batch, sync_batch), **kw)
    assert (got - base).abs().max() < 1e-12
    # clamped to the grid, and split into as few and as even groups as the batch size allows (15 windows at 9:
    # 8 + 7); the gradient pass covers the 14 windows that are not the anchor
    n = len(plan)
    want = even_group_sizes(n, window_batch)[0]  # the largest group
    if w:
        want = max(want, even_group_sizes(n - 1, min(sync_batch or window_batch, n))[0])
    assert max(toy.batches) == want


class OOM(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError."""


class Limited(Toy):
    """A denoiser that runs out of memory for batches of more than ``limit`` windows."""

    def __init__(self, limit, **kw):
        super().__init__(**kw)
        self.limit, self.failures = limit, 0

    def denoise(self, x, sigma, windows=None, step=None):
        if x.shape[0] > self.limit:
            self.failures += 1
            raise OOM(f"CUDA out of memory (batch {x.shape[0]})")
        return super().denoise(x, sigma, windows, step)


@pytest.mark.parametrize("w", [0.0, 20.0])
def test_out_of_memory_halves_the_batch_once_and_retries(w, caplog):
    plan = plan_windows(8, 40, 8, 4)  # 9 windows
    x = canvas(2)
    released = []
    kw = dict(sync=SyncSettings(weight=w, steps=2), input_scale=input_scale)
    want = sample(Lanes.single(Toy().denoise, Toy().decode, Toy().loss), x.clone(), SIGMAS, plan,
                  batching=BatchPolicy(window_batch=1), **kw)
    toy = Limited(limit=4)
    policy = BatchPolicy(window_batch=8, oom_errors=(OOM,), release=lambda: released.append(1))
    with caplog.at_level(logging.WARNING, logger="syncdiffusion"):
        got = sample(Lanes.single(toy.denoise, toy.decode, toy.loss), x.clone(), SIGMAS, plan, batching=policy, **kw)
    assert (got - want).abs().max() < 1e-12
    # once per BatchSize (the denoise pass; with sync also the gradient pass, which defaults to window_batch)
    assert toy.failures == len(released) == (2 if w else 1)
    assert max(toy.batches) <= 4  # 9 windows at the halved size 4: three even groups of 3
    notes = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert notes and all("window_batch=8" in m and "retrying with 4" in m for m in notes)


def test_out_of_memory_twice_fails_naming_the_setting():
    toy = Limited(limit=1)
    with pytest.raises(OOM, match=r"window_batch=4 \(halved from 8\)\. Lower window_batch") as info:
        sample(Lanes.single(toy.denoise), canvas(3), SIGMAS, plan_windows(8, 40, 8, 4),
               batching=BatchPolicy(window_batch=8, oom_errors=(OOM,)))
    assert isinstance(info.value.__cause__, OOM)
    assert toy.failures == 2


def test_out_of_memory_at_one_window_says_so():
    toy = Limited(limit=0)
    with pytest.raises(OOM, match="Even one window at a time does not fit: free memory"):
        sample(Lanes.single(toy.denoise), canvas(3), SIGMAS, plan_windows(8, 40, 8, 4),
               batching=BatchPolicy(window_batch=1, oom_errors=(OOM,), advice="free memory"))


def test_other_errors_are_not_retried():
    calls = []

    def fn(group):
        calls.append(len(group))
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        list(BatchSize(8, oom_errors=(OOM,)).run(list(range(10)), fn))
    assert calls == [5]  # one call (10 items at 8: two even groups of 5), not retried


def test_bad_window_batch():
    with pytest.raises(ValueError, match="window_batch must be >= 1"):
        BatchPolicy(window_batch=0)


def test_lpips_target_features_once_equal_repeated_targets():
    """The sync step computes the anchor's LPIPS features once; the loss is the one with repeated targets."""
    from devtools import models as tiny_models
    from syncdiff_core import perceptual
    from syncdiff_core.sync import _against_fixed_target

    lp = perceptual.build_lpips(tiny_models.random_trunk_state_dict("vgg16", seed=0))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    for target in (torch.rand(1, 3, 32, 32) * 2 - 1,):
        want = lp(images, target.repeat(3, 1, 1, 1))
        got = _against_fixed_target(lp, target)(images, 3)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    two = torch.rand(2, 3, 32, 32) * 2 - 1  # a latent batch of 2: targets repeated per window
    imgs = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.allclose(_against_fixed_target(lp, two)(imgs, 2), lp(imgs, two.repeat(2, 1, 1, 1)), rtol=1e-5,
                          atol=1e-7)


# --------------------------------------------- Through ComfyUI, the micro SD1.x UNet (conftest ``micro``) on the CPU

H, W, WIN, STRIDE = 8, 32, 8, 4  # latent px: 7 windows


def run(pack, model, tiny, vae, loss, *, w, window_batch, sync_batch=0, loss_decoder="vae", steps=3):
    job = h.make_job(pack, w=w, sync_steps=2, seed=5, steps=steps, cfg=5.0, window_px=WIN * 8,
                     stride_px=STRIDE * 8, window_batch=window_batch, sync_batch=sync_batch, loss_decoder=loss_decoder)
    return h.sample(pack, model, tiny.positive, tiny.negative, (1, 4, H, W), job, vae=vae, loss=loss)


@pytest.mark.slow
@pytest.mark.parametrize("w", [0.0, 20.0])
def test_comfy_batched_equals_one_window_at_a_time(pack, tiny_sd15, tiny_kl_vae, lpips, w):
    # the checkpoint-sized UNet: on the micro one the two differ by ~1e-4 relative (measured), at the tolerance
    one = run(pack, tiny_sd15.model, tiny_sd15, tiny_kl_vae, lpips, w=w, window_batch=1)
    many = run(pack, tiny_sd15.model, tiny_sd15, tiny_kl_vae, lpips, w=w, window_batch=5, sync_batch=3)
    assert torch.isfinite(one).all()
    rel = (many - one).norm() / one.norm()
    assert rel < 1e-4, rel
    if w:
        free = run(pack, tiny_sd15.model, tiny_sd15, tiny_kl_vae, lpips, w=0.0, window_batch=5)
        assert (free - one).abs().max() > 1e-4  # sync did something


@pytest.mark.slow
def test_comfy_out_of_memory_fallback(pack, micro, tiny_kl_vae, lpips, caplog):
    """A model wrapper raising ComfyUI's OOM exception for more than 2 windows (CFG doubles the rows)."""
    import comfy.model_management as mm

    limit = {"rows": 2 * 2, "failures": 0}

    def wrapper(apply_model, args):
        if args["input"].shape[0] > limit["rows"]:
            limit["failures"] += 1
            raise mm.OOM_EXCEPTION("CUDA out of memory (simulated)")
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = micro.model.clone()
    model.set_model_unet_function_wrapper(wrapper)
    want = run(pack, micro.model, micro, tiny_kl_vae, lpips, w=20.0, window_batch=2)
    with caplog.at_level(logging.WARNING, logger="syncdiffusion"):
        got = run(pack, model, micro, tiny_kl_vae, lpips, w=20.0, window_batch=4, sync_batch=4)
    assert limit["failures"] == 2  # once in the denoise pass, once in the gradient pass
    assert (got - want).norm() / want.norm() < 1e-4
    notes = [r.getMessage() for r in caplog.records]
    assert any("window_batch=4; retrying with 2" in m for m in notes)
    assert any("sync_batch=4; retrying with 2" in m for m in notes)
    limit["rows"] = 0
    with pytest.raises(mm.OOM_EXCEPTION, match="window_batch"):
        run(pack, model, micro, tiny_kl_vae, lpips, w=0.0, window_batch=4, steps=1)


@pytest.mark.parametrize("mode", ["vae", "vae_checkpointed"])
def test_loss_decoder_attention_backends_hold_in_forward_and_recompute(pack, micro, tiny_kl_vae, mode):
    """The loss decoder's attention runs with the memory-efficient SDPA kernel off, in the forward pass and in the
    checkpointed recompute alike (a recompute under other kernels saves other tensors and autograd fails).
    ``plain_stages`` 0 checkpoints the middle stage too, so its attention is recomputed."""
    seen = []
    attn = tiny_kl_vae.first_stage_model.decoder.mid.attn_1
    handle = attn.register_forward_pre_hook(lambda *a: seen.append(torch.backends.cuda.mem_efficient_sdp_enabled()))
    try:
        decode = pack.loss_decoders.decoder_for_gradients(tiny_kl_vae, micro.model, mode, plain_stages=0)
        with pack.weights.trainable_weights(tiny_kl_vae.first_stage_model), pack.model.gradient_section():
            z = torch.randn(1, 4, WIN, WIN, requires_grad=True)
            torch.autograd.grad(decode(z).square().mean(), z)
    finally:
        handle.remove()
    assert torch.backends.cuda.mem_efficient_sdp_enabled()  # restored outside
    assert seen == [False] * (2 if mode == "vae_checkpointed" else 1)


@pytest.mark.parametrize("mode", ["vae", "vae_checkpointed"])
def test_loss_decoder_wide_norms_keep_the_gradient(pack, micro, tiny_kl_vae, mode, monkeypatch):
    """``wide_norms``: the decoder's GroupNorms (all of them, with the threshold lowered for the tiny VAE) run as
    GroupNormStats in the forward pass and the checkpointed recompute; the gradient is the native one."""
    calls = []
    real = pack.decoders.GroupNormStats.apply
    monkeypatch.setattr(pack.decoders.GroupNormStats, "apply", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(pack.decoders, "WIDE_GROUP", 1)
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in tiny_kl_vae.first_stage_model.decoder.modules())
    z = torch.randn(1, 4, WIN, WIN, generator=torch.Generator().manual_seed(5))
    grads = []
    with pack.weights.trainable_weights(tiny_kl_vae.first_stage_model), pack.model.gradient_section():
        for wide in (False, True):
            decode = pack.loss_decoders.decoder_for_gradients(tiny_kl_vae, micro.model, mode, wide_norms=wide)
            u = z.clone().requires_grad_(True)
            loss = decode(u).square().mean()
            forward = len(calls)
            grads.append(torch.autograd.grad(loss, u)[0])
    assert forward == norms
    if mode == "vae_checkpointed":  # the recompute (every checkpointed block's norms) took it too
        assert norms < len(calls) < 2 * norms + 1
    else:
        assert len(calls) == norms
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-5


def test_loss_decoder_wide_norms_default_only_on_cuda(pack, micro, tiny_kl_vae, monkeypatch):
    """``WIDE_GROUP_NORM`` turns the wide GroupNorms on for VAEs on CUDA devices only: this VAE is on the CPU, where
    the native op is faster, so the default leaves them native; ``wide_norms=True`` still asks for them."""
    calls = []
    real = pack.decoders.GroupNormStats.apply
    monkeypatch.setattr(pack.decoders.GroupNormStats, "apply", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(pack.decoders, "WIDE_GROUP", 1)
    monkeypatch.setattr(pack.loss_decoders, "WIDE_GROUP_NORM", True)
    z = torch.randn(1, 4, WIN, WIN, generator=torch.Generator().manual_seed(5))
    counts = []
    with pack.weights.trainable_weights(tiny_kl_vae.first_stage_model), pack.model.gradient_section():
        for wide in (None, True):
            decode = pack.loss_decoders.decoder_for_gradients(tiny_kl_vae, micro.model, "vae", wide_norms=wide)
            decode(z.clone().requires_grad_(True))
            counts.append(len(calls))
    assert counts[0] == 0 < counts[1]


@pytest.mark.parametrize("plain_stages", [1, 3, 9])
def test_loss_decoder_plain_stages_keep_the_gradient(pack, micro, tiny_kl_vae, plain_stages, monkeypatch):
    """``plain_stages``: the first stages (the middle, then the lowest-resolution up levels) run without
    checkpointing, the rest with it; the images and the gradient are those of every block checkpointed."""
    import torch.utils.checkpoint as tuc

    dec = tiny_kl_vae.first_stage_model.decoder
    stages = [[dec.mid.block_1, dec.mid.attn_1, dec.mid.block_2]] + [
        list(dec.up[lv].block) + list(dec.up[lv].attn) + ([dec.up[lv].upsample] if lv else [])
        for lv in reversed(range(dec.num_resolutions))]
    wanted = [id(m) for stage in stages[plain_stages:] for m in stage]
    seen = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda fn, *a, **k: seen.append(id(fn)) or real(fn, *a, **k))
    z = torch.randn(1, 4, WIN, WIN, generator=torch.Generator().manual_seed(6))
    out = []
    with pack.weights.trainable_weights(tiny_kl_vae.first_stage_model), pack.model.gradient_section():
        for stages_kept in (0, plain_stages):
            seen.clear()
            decode = pack.loss_decoders.decoder_for_gradients(tiny_kl_vae, micro.model, "vae_checkpointed",
                                                              plain_stages=stages_kept)
            u = z.clone().requires_grad_(True)
            images = decode(u)
            out.append((images.detach(), torch.autograd.grad(images.square().mean(), u)[0]))
    assert sorted(seen) == sorted(wanted)
    assert torch.allclose(out[1][0], out[0][0], atol=1e-6)
    assert (out[1][1] - out[0][1]).norm() / out[0][1].norm() < 1e-5


@pytest.mark.slow
def test_comfy_checkpointed_and_half_decoders(pack, micro, tiny_kl_vae, lpips):
    assert pack.decoders.is_walkable(tiny_kl_vae.first_stage_model), "the KL decoder should take the checkpointed walk"
    full = run(pack, micro.model, micro, tiny_kl_vae, lpips, w=20.0, window_batch=4)
    ckpt = run(pack, micro.model, micro, tiny_kl_vae, lpips, w=20.0, window_batch=4,
               loss_decoder="vae_checkpointed")
    assert (ckpt - full).norm() / full.norm() < 1e-5  # same gradients, recomputed
    half = run(pack, micro.model, micro, tiny_kl_vae, lpips, w=20.0, window_batch=4, loss_decoder="vae_half")
    assert torch.isfinite(half).all() and (half - full).abs().max() > 0
    # the decoder's modules are left unpatched
    assert not any("forward" in m.__dict__ for m in tiny_kl_vae.first_stage_model.modules())


@pytest.mark.slow
def test_comfy_taesd_loss_decoder(pack, comfy, micro, lpips):
    with pytest.raises(ValueError, match="taesd_decoder"):
        run(pack, micro.model, micro, None, lpips, w=20.0, window_batch=4, loss_decoder="taesd")
    import comfy.taesd.taesd as taesd
    from safetensors.torch import save_file

    torch.manual_seed(0)
    dec = taesd.TAESD().taesd_decoder
    for p in dec.parameters():
        torch.nn.init.normal_(p, std=0.05)
    # in the session's own vae_approx folder: a folder registered with ComfyUI stays in its file-list cache,
    # which fails later lookups once pytest deletes a passed test's tmp_path
    path = comfy.model_folder("vae_approx") / "taesd_decoder.safetensors"
    save_file({k: v.contiguous() for k, v in dec.state_dict().items()}, str(path))
    try:
        out = run(pack, micro.model, micro, None, lpips, w=20.0, window_batch=4, loss_decoder="taesd")
    finally:
        path.unlink()
    assert torch.isfinite(out).all()


def test_comfy_bad_settings(pack):
    with pytest.raises(ValueError, match="loss_decoder"):
        h.make_job(pack, seed=0, steps=1, cfg=1.0, window_px=64, stride_px=32, loss_decoder="nope")
    with pytest.raises(ValueError, match="window_batch"):
        h.make_job(pack, seed=0, steps=1, cfg=1.0, window_px=64, stride_px=32, window_batch=-1)  # 0 is automatic


@pytest.mark.parametrize("count", range(0, 30))
@pytest.mark.parametrize("size", [1, 2, 3, 8, 40])
def test_even_group_sizes_cover_every_item_in_the_fewest_groups(count, size):
    sizes = even_group_sizes(count, size)
    assert sum(sizes) == count
    assert len(sizes) == math.ceil(count / size)
    assert all(1 <= s <= size for s in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_batch_size_runs_groups_of_even_group_sizes():
    seen = [len(g) for g, _ in BatchSize(8).run(list(range(21)), lambda g: None)]
    assert seen == even_group_sizes(21, 8) == [7, 7, 7]
    with pytest.raises(ValueError, match="at least 1"):
        even_group_sizes(3, 0)
