"""SyncDiffusion through the real ComfyUI path on the tiny model: the gradient step, the schedule, the seed,
unaltered models, Cancel, and bad input.

The expected values are computed here independently of the pack: the UNet and the VAE decoder are called
with cloned weights through ``torch.func.functional_call``, the CFG and DDIM arithmetic is written out.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call

from devtools import harness as h

H, W, WIN, STRIDE = 8, 24, 8, 4  # latent px: 64x192 px canvas, 64 px windows, 32 px stride -> 5 windows
CFG = 5.0


def job(pack, **kw):
    return h.make_job(pack, **{"seed": 3, "steps": 2, "cfg": CFG, "window_px": WIN * 8, "stride_px": STRIDE * 8,
                               "window_batch": 8, **kw})


def run(pack, tiny, vae, j, loss=None, width=W):
    return h.sample(pack, tiny.model, tiny.positive, tiny.negative, (1, 4, H, width), j, vae=vae, loss=loss)


class Independent:
    """The tiny model's guided x0 and the VAE decode, computed without the pack's code."""

    def __init__(self, tiny, vae):
        inner = tiny.model.model
        self.ms = inner.model_sampling
        self.unet = inner.diffusion_model
        self.unet_params = {k: v.clone() for k, v in self.unet.state_dict().items()}
        self.dec = vae.first_stage_model
        self.dec_params = {k: v.clone() for k, v in self.dec.state_dict().items()}
        self.scale = inner.latent_format.scale_factor
        self.cond, self.uncond = tiny.positive[0][0], tiny.negative[0][0]

    def x0(self, x, sigma):
        s = torch.full((x.shape[0],), float(sigma))
        xin = x / math.sqrt(1 + float(sigma) ** 2)
        t = self.ms.timestep(s).float()
        eps = [functional_call(self.unet, self.unet_params, (xin, t), {"context": c.expand(x.shape[0], -1, -1)})
               for c in (self.cond, self.uncond)]
        eps = eps[1] + CFG * (eps[0] - eps[1])
        return x - float(sigma) * eps

    def decode(self, x0):
        sub = lambda prefix: {k[len(prefix):]: v for k, v in self.dec_params.items() if k.startswith(prefix)}  # noqa
        z = functional_call(self.dec.post_quant_conv, sub("post_quant_conv."), (x0 / self.scale,))
        return functional_call(self.dec.decoder, sub("decoder."), (z,)).float().clamp(-1, 1)


def plain_windows():
    return [(0, l) for l in range(0, W - WIN + 1, STRIDE)]


def test_reference_schedule(comfy, pack, micro):
    ms = micro.model.get_model_object("model_sampling")
    sig = pack.families.sampling_sigmas(micro.model, 50)
    t = ms.timestep(sig[:-1]).round().long().tolist()
    assert t == list(range(981, 0, -20))
    assert float(sig[-1]) == pytest.approx(float(ms.sigmas[0]))


def test_single_window_equals_reference_ddim(comfy, pack, micro, tiny_kl_vae):
    """A canvas of one window is plain DDIM (eta 0) from unit-variance noise at t0, ending at alphabar_0."""
    ind = Independent(micro, tiny_kl_vae)
    got = run(pack, micro, tiny_kl_vae, job(pack, steps=3), width=WIN)
    ms = micro.model.get_model_object("model_sampling")
    import comfy.sample
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, H, WIN), 3)
    acp = 1 / (1 + ms.sigmas.double() ** 2)  # alphabar_t from the model's sigma table
    timesteps = [667, 334, 1]  # diffusers' DDIM, 3 steps, steps_offset=1
    x = noise.double()  # VP latent at t0, unit variance
    with torch.no_grad():
        for k, t in enumerate(timesteps):
            a = acp[t]
            a_prev = acp[timesteps[k + 1]] if k + 1 < len(timesteps) else acp[0]
            sigma = ((1 - a) / a).sqrt()
            x0 = ind.x0((x / a.sqrt()).float(), sigma).double()
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    got = got.double() * micro.model.model.latent_format.scale_factor  # LATENT holds the VAE's raw latent
    rel = (got - x).norm() / x.norm()
    assert rel < 1e-4, rel


@pytest.mark.slow
def test_one_sync_step_moves_windows_by_minus_w_grad(comfy, pack, micro, tiny_kl_vae, lpips):
    """One step, synchronized: the output equals a from-scratch computation of the method (docs/dev/method.md)
    with autograd."""
    w = 20.0
    got = run(pack, micro, tiny_kl_vae, job(pack, steps=1, w=w, sync_steps=1, window_batch=2), loss=lpips)
    ind = Independent(micro, tiny_kl_vae)
    sig = pack.families.sampling_sigmas(micro.model, 1)
    s0, s1 = float(sig[0]), float(sig[1])
    import comfy.sample
    x = comfy.sample.prepare_noise(torch.zeros(1, 4, H, W), 3) * math.sqrt(1 + s0**2)
    views = plain_windows()
    a = len(views) // 2
    c = 1 / math.sqrt(1 + s0**2)
    with torch.inference_mode(False):
        x = x.clone()
        with torch.no_grad():
            t, l = views[a]
            target = ind.decode(ind.x0(x[..., t:t + WIN, l:l + WIN], s0))
        value, count = torch.zeros_like(x), torch.zeros_like(x)
        moved_by = []
        for v, (t, l) in enumerate(views):
            xv = x[..., t:t + WIN, l:l + WIN]
            if v != a:
                u = (xv * c).requires_grad_(True)
                loss = lpips(ind.decode(ind.x0(u / c, s0)), target).sum()
                (g,) = torch.autograd.grad(loss, u)
                moved_by.append(float(g.abs().max()) * w)
                xv = (u.detach() - w * g) / c
            with torch.no_grad():
                x0 = ind.x0(xv, s0)
            value[..., t:t + WIN, l:l + WIN] += x0 + (s1 / s0) * (xv - x0)
            count[..., t:t + WIN, l:l + WIN] += 1
        want = (value / count) / math.sqrt(1 + s1**2) / ind.scale  # LATENT holds the VAE's raw latent
    assert min(moved_by) > 1e-4, "the gradient step should move every non-anchor window"
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-4, rel
    no_sync = run(pack, micro, tiny_kl_vae, job(pack, steps=1))
    assert (got - no_sync).abs().max() > 1e-4


def test_same_seed_same_panorama_and_w0_is_multidiffusion(comfy, pack, micro, tiny_kl_vae, lpips):
    synced = [run(pack, micro, tiny_kl_vae, job(pack, w=20.0, sync_steps=1), loss=lpips) for _ in range(2)]
    assert torch.equal(synced[0], synced[1])
    md_w0 = run(pack, micro, tiny_kl_vae, job(pack, w=0.0, sync_steps=2))
    md_off = run(pack, micro, tiny_kl_vae, job(pack, w=20.0, sync_steps=0))
    assert torch.equal(md_w0, md_off)
    assert not torch.equal(md_w0, synced[0])
    other_seed = run(pack, micro, tiny_kl_vae, job(pack, seed=4))
    assert not torch.equal(other_seed, md_w0)


def test_loaded_models_are_left_unaltered(comfy, pack, micro, tiny_kl_vae, lpips):
    before = {k: (p, p.is_inference(), p.detach().clone()) for k, p in
              micro.model.model.diffusion_model.named_parameters()}
    vae_before = {k: p for k, p in tiny_kl_vae.first_stage_model.named_parameters()}
    run(pack, micro, tiny_kl_vae, job(pack, steps=1, w=20.0, sync_steps=1), loss=lpips)
    after = dict(micro.model.model.diffusion_model.named_parameters())
    for k, (p, was_inference, value) in before.items():
        assert after[k] is p and p.is_inference() == was_inference and torch.equal(p, value), k
    for k, p in tiny_kl_vae.first_stage_model.named_parameters():
        assert vae_before[k] is p


class _Quantized(torch.Tensor):
    """Stands for a weight tensor subclass (ComfyUI's QuantizedTensor): its storage need not be its values."""


def test_trainable_weights_alias_the_storage_and_put_the_objects_back(pack):
    """Within the block the weights are normal tensors (autograd can save them) over the loaded weights' own
    storage: no copy, the same memory whether pinned or not, tied weights tied.
    Afterwards, also after Cancel, the modules hold the very objects they held before."""
    with torch.inference_mode():
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                  torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)).eval()
        net[3].weight = net[2].weight  # tied
        net[0].register_buffer("scale", torch.ones(4).as_subclass(_Quantized))
        net.requires_grad_(False)
    state = lambda: {**dict(net.named_parameters(remove_duplicate=False)), **dict(net.named_buffers())}  # noqa: E731
    before = state()
    assert all(t.is_inference() for t in before.values())
    values = {k: t.detach().clone() for k, t in before.items()}
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    for cancel in (False, True):
        try:
            with pack.weights.trainable_weights(net), torch.enable_grad():
                inside = state()
                for k, t in inside.items():
                    if k == "0.scale":  # a subclass without the wrapper protocol stays itself: never copied
                        assert t is before[k], k
                        continue
                    assert not t.is_inference() and torch.equal(t, values[k]), k
                    assert t.data_ptr() == before[k].data_ptr(), k  # no copy
                assert inside["3.weight"] is inside["2.weight"]
                (grad,) = torch.autograd.grad(net(x).square().sum(), x)
                assert torch.isfinite(grad).all() and grad.abs().sum() > 0
                if cancel:
                    raise KeyboardInterrupt  # Cancel in the middle of sampling
        except KeyboardInterrupt:
            assert cancel
        after = state()
        assert after.keys() == before.keys()
        for k, t in after.items():
            assert t is before[k] and t.is_inference() and torch.equal(t, values[k]), k


@pytest.mark.slow
def test_compiled_path_matches_eager(comfy, pack, micro, tiny_kl_vae, lpips):
    """``compile`` runs the UNet (through ComfyUI's compile wrapper) and the loss decoder's gradient pass through
    torch.compile. With ``aot_eager`` (dynamo's and AOTAutograd's graphs, eager kernels: no inductor compile time on
    a CPU) the panorama equals the eager one within rounding; the user's model carries no compile wrapper after."""
    from torch._dynamo.utils import counters

    options_before = dict(micro.model.model_options)
    graphs_before = counters["stats"]["unique_graphs"]
    for decoder in ("vae", "vae_checkpointed"):
        eager = run(pack, micro, tiny_kl_vae, job(pack, w=20.0, sync_steps=2, loss_decoder=decoder), loss=lpips)
        compiled = run(pack, micro, tiny_kl_vae, job(pack, w=20.0, sync_steps=2, loss_decoder=decoder,
                                                     compile="aot_eager"), loss=lpips)
        assert torch.isfinite(compiled).all()
        rel = float((compiled - eager).norm() / eager.norm())
        assert rel < 1e-4, (decoder, rel)
        assert not torch.equal(eager, run(pack, micro, tiny_kl_vae, job(pack, w=0.0)))  # sync did move it
    assert micro.model.model_options.keys() == options_before.keys()
    assert any(backend == "aot_eager" for _, backend in pack.decoders._COMPILED)
    assert counters["stats"]["unique_graphs"] > graphs_before  # dynamo really traced, not a silent fallback


def compiled_by_user(tiny):
    """``tiny`` with its model compiled as ComfyUI's TorchCompileModel node compiles it (``aot_eager``)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    model = tiny.model.clone()
    set_torch_compile_wrapper(model, backend="aot_eager", dynamic=False)
    return SimpleNamespace(model=model, positive=tiny.positive, negative=tiny.negative)


@pytest.mark.slow
def test_one_compile_serves_every_step_count(comfy, pack, micro, tiny_kl_vae, lpips):
    """ComfyUI passes the whole sigma schedule to the diffusion model; dynamo would guard on its length and
    recompile the UNet for each new step count (minutes with inductor; eager after 8). The compiled clone
    drops it before the UNet, whether the pack compiled it or the user did with TorchCompileModel."""
    from comfy.patcher_extension import WrappersMP
    from torch._dynamo.utils import counters

    for tiny, backend in ((micro, "aot_eager"), (compiled_by_user(micro), "")):
        options_before = dict(tiny.model.model_options)
        run(pack, tiny, tiny_kl_vae, job(pack, w=20.0, sync_steps=1, steps=2, compile=backend), loss=lpips)
        graphs = counters["stats"]["unique_graphs"]
        for steps in (3, 5):
            out = run(pack, tiny, tiny_kl_vae, job(pack, w=20.0, sync_steps=1, steps=steps, compile=backend),
                      loss=lpips)
            assert torch.isfinite(out).all()
        assert counters["stats"]["unique_graphs"] == graphs, f"recompiled for a new step count ({backend!r})"
        assert tiny.model.model_options.keys() == options_before.keys()
    patched = pack.compile.compiled_patcher(micro.model, "aot_eager")
    assert patched is not micro.model and patched.get_wrappers(WrappersMP.APPLY_MODEL, pack.compile.SCHEDULE_FREE_KEY)
    assert pack.compile.compiled_patcher(micro.model, "") is micro.model  # nothing compiled: the model as given


@pytest.mark.slow
@pytest.mark.parametrize("compiled_by", ["pack", "TorchCompileModel"])
def test_plain_and_synchronized_runs_share_the_compiled_plain_pass(comfy, pack, micro, tiny_kl_vae, lpips,
                                                                   compiled_by):
    """A synchronized run swaps normal tensors in for the inference-mode weights (dynamo guards on the tensor kind);
    a compiled MultiDiffusion run takes the same stand-ins, so both share the plain pass's graph: after either, the
    other compiles only what it adds (else the UNet's inductor compile, half a minute on a GPU, again). So too for a
    model compiled with ComfyUI's TorchCompileModel. The panorama is the eager one's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    assert next(micro.model.model.diffusion_model.parameters()).is_inference()  # as a loader leaves them
    tiny, backend = (micro, "aot_eager") if compiled_by == "pack" else (compiled_by_user(micro), "")

    def new_graphs(w):
        before = counters["stats"]["unique_graphs"]
        out = run(pack, tiny, tiny_kl_vae, job(pack, w=w, sync_steps=1, compile=backend), loss=lpips)
        return counters["stats"]["unique_graphs"] - before, out

    torch._dynamo.reset()
    sync_alone, _ = new_graphs(20.0)
    md_after_sync, md = new_graphs(0.0)
    assert md_after_sync == 0
    torch._dynamo.reset()
    md_alone, _ = new_graphs(0.0)
    sync_after_md, _ = new_graphs(20.0)
    assert md_alone >= 1 and sync_after_md == sync_alone - md_alone
    eager = run(pack, micro, tiny_kl_vae, job(pack, w=0.0))
    assert float((md - eager).norm() / eager.norm()) < 1e-5
    assert next(micro.model.model.diffusion_model.parameters()).is_inference()  # the stand-ins were put back


def test_compile_backend_is_checked_before_sampling(comfy, pack, micro, tiny_kl_vae):
    calls = []
    with pytest.raises(ValueError, match="compile backend 'no_such_backend'"):
        run(pack, micro, tiny_kl_vae, job(pack, w=20.0, compile="no_such_backend"),
            loss=lambda a, b: calls.append(1))
    assert not calls


@pytest.mark.slow
def test_image_anchor_runs_and_differs_from_window_anchor(comfy, pack, micro, tiny_kl_vae, lpips):
    sync = pack.sync
    img = torch.rand(1, 3, 40, 100) * 2 - 1  # any size: fitted to the window
    by_image = run(pack, micro, tiny_kl_vae, job(pack, w=20.0, sync_steps=1,
                                                     anchor=sync.Anchor(mode="image", image=img)), loss=lpips)
    by_center = run(pack, micro, tiny_kl_vae, job(pack, w=20.0, sync_steps=1), loss=lpips)
    assert torch.isfinite(by_image).all()
    assert (by_image - by_center).abs().max() > 1e-5


def test_nan_gradient_stops_with_step_and_window(comfy, pack, micro, tiny_kl_vae):
    def nan_loss(images, targets):
        return (images - targets).pow(2).flatten(1).mean(1) * float("nan")

    with pytest.raises(FloatingPointError, match=r"step 1, window \d"):
        run(pack, micro, tiny_kl_vae, job(pack, w=20.0, sync_steps=1), loss=nan_loss)


@pytest.mark.parametrize("kw,match", [
    (dict(w=-1.0), "sync_weight"),
    (dict(w=1.0, decay=0.0), "sync_decay"),
    (dict(w=1.0, decay=1.5), "sync_decay"),
])
def test_bad_sync_settings(pack, kw, match):
    with pytest.raises(ValueError, match=match):
        job(pack, **kw)


def test_bad_input_is_rejected_before_sampling(comfy, pack, micro, tiny_kl_vae):
    sync = pack.sync
    calls = []
    loss = lambda a, b: calls.append(1)  # noqa: E731  (never reached)
    cases = [
        (job(pack, w=20.0, anchor=sync.Anchor(mode="index", index=5)), "anchor index 5 is outside the grid"),
        (job(pack, w=20.0, anchor=sync.Anchor(mode="kept_region")), "'kept region' needs a mask"),  # no noise mask
        (job(pack, w=20.0, anchor=sync.Anchor(mode="kept_region", mask=torch.ones(1, H * 8, W * 8))), "keeps nothing"),
        (job(pack, stride_px=36), "stride must be a positive multiple of 8"),
        (job(pack, stride_px=128), "must not exceed the window size"),
        (job(pack, window_px=256), "smaller than one window"),
        (job(pack, wrap=True, stride_px=40), "wrap"),
    ]
    for j, match in cases:
        with pytest.raises(ValueError, match=match):
            run(pack, micro, tiny_kl_vae, j, loss=loss)
    assert not calls


def test_anchor_selector_rejects_wrong_channels(comfy, pack):
    node = pack.sampler_nodes.AnchorSelector
    with pytest.raises(ValueError, match="3 channels"):
        node.execute(mode="reference image", index=0, image=torch.rand(1, 32, 32, 4))
    with pytest.raises(ValueError, match="needs an image"):
        node.execute(mode="reference image", index=0, image=None)
    out = node.execute(mode="reference image", index=0, image=torch.rand(1, 32, 32, 3)).args[0]
    assert out.mode == "image" and out.image.shape == (1, 3, 32, 32) and out.image.min() >= -1
    with pytest.raises(ValueError, match="mask must be a MASK"):
        node.execute(mode="kept region", index=0, mask="mask.png")
    mask = torch.ones(1, 32, 64)
    out = node.execute(mode="kept region", index=0, mask=mask).args[0]
    assert out.mode == "kept_region" and out.mask is mask
    assert node.execute(mode="kept region", index=0).args[0].mask is None  # the latent's noise mask, when sampled


def test_cancel_stops_within_one_window_batch(comfy, pack, micro, tiny_kl_vae):
    import comfy.model_management as mm

    seen = []
    j = job(pack, steps=4, window_batch=1)

    def wrapper(apply_model, args):
        seen.append(1)
        if len(seen) == 3:
            mm.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = micro.model.clone()
    model.set_model_unet_function_wrapper(wrapper)
    latent = {"samples": torch.zeros(1, 4, H, W)}
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            pack.sampling.sample_panorama(model, micro.positive, micro.negative, latent, j, vae=tiny_kl_vae)
    finally:
        mm.interrupt_current_processing(False)
    assert len(seen) == 3, f"the model ran {len(seen) - 3} more times after Cancel"


def sampler_graph(ckpt_name: str, steps: int = 3, sync_weight: float = 20.0) -> dict:
    return h.panorama_prompt(ckpt_name, width=W * 8, height=H * 8, steps=steps, sync_weight=sync_weight,
                             window_size=WIN * 8, stride=STRIDE * 8, cfg=CFG, decode=("VAEDecode", {}),
                             save=("SaveImage", {"filename_prefix": "sync_graph"}))


@pytest.mark.slow
def test_graph_reports_progress_per_step_and_saves(run_prompt, tiny_sd15, lpips_trunk):
    result = run_prompt(sampler_graph(tiny_sd15.ckpt_name, steps=3))
    steps = [(v, t) for node, v, t in result.progress if node == "sampler"]
    assert [v for v, _ in steps] == [1, 2, 3] and {t for _, t in steps} == {3}
    files = result.image_files("save")
    assert len(files) == 1 and files[0].stat().st_size > 0


@pytest.mark.slow
def test_graph_cancel_interrupts_the_sampler(run_prompt, tiny_sd15):
    result = run_prompt(sampler_graph(tiny_sd15.ckpt_name, steps=6, sync_weight=0.0), interrupt_after_progress=2)
    assert result.interrupted
    assert max(v for node, v, _ in result.progress if node == "sampler") < 6
