"""ComfyUI's MultiGPU (0.33+) driving the pack's lanes, on the CPU with a stand-in second GPU.

``cpu:1`` is a torch device distinct from ``cpu`` (a different dict key, so ComfyUI keeps a clone and a worker
thread for it) whose tensors are CPU tensors. ComfyUI's MultiGPU CFG Split makes clones for the devices
``model_management.get_all_torch_devices`` lists; the test replaces that list (only the test patches ComfyUI) and
then prepares the model with ComfyUI's own ``create_multigpu_deepclones``, as the node does.
"""
import pytest
import torch

from devtools import harness as h

FAKE = torch.device("cpu", 1)
H, W, WIN, STRIDE = 8, 40, 8, 4  # latent px: 9 windows


@pytest.fixture
def multigpu(comfy):
    try:
        import comfy.multigpu
    except ImportError:
        pytest.skip("this ComfyUI has no MultiGPU (comfy/multigpu.py): the pack runs on one device unchanged")
    return comfy.multigpu


def prepare(multigpu, monkeypatch, model, extra=FAKE):
    """``model`` as ComfyUI's MultiGPU CFG Split (max_gpus 2) prepares it on a machine whose devices are the
    model's own and ``extra``."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "get_all_torch_devices", lambda exclude_current=False: [model.load_device, extra])
    prepared = multigpu.create_multigpu_deepclones(model, 2)
    assert [m.load_device for m in prepared.get_additional_models_with_key("multigpu")] == [extra]
    return prepared


def rows_seen(model, log, name):
    """Record (name, rows, gradient on) for every call of the patcher's diffusion model."""
    return model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args: log.append((name, args[0].shape[0], torch.is_grad_enabled())))


def run(pack, model, tiny, vae, loss, w, window_batch=2):
    job = h.make_job(pack, w=w, sync_steps=2, seed=5, steps=3, cfg=5.0, window_px=WIN * 8, stride_px=STRIDE * 8,
                     window_batch=window_batch, sync_batch=1)
    return h.sample(pack, model, tiny.positive, tiny.negative, (1, 4, H, W), job, vae=vae, loss=loss)


@pytest.mark.slow
@pytest.mark.parametrize("w", [0.0, 20.0])
def test_windows_are_shared_between_the_gpus_and_the_result_is_unchanged(pack, multigpu, monkeypatch, tiny_sd15,
                                                                         tiny_kl_vae, lpips, w):
    one = run(pack, tiny_sd15.model, tiny_sd15, tiny_kl_vae, lpips, w)
    model = prepare(multigpu, monkeypatch, tiny_sd15.model.clone())
    clone = model.get_additional_models_with_key("multigpu")[0]
    assert clone.model is not model.model  # a model of its own, as on a second GPU
    log = []
    hooks = [rows_seen(model, log, "main"), rows_seen(clone, log, "second")]
    try:
        two = run(pack, model, tiny_sd15, tiny_kl_vae, lpips, w)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.isfinite(two).all()
    assert (two - one).norm() / one.norm() < 1e-5
    plain = {name: sum(rows for n, rows, grad in log if n == name and not grad) for name in ("main", "second")}
    # 3 steps; 9 windows shared 5 + 4, cond and uncond (2 rows a window); with sync, the anchor's x0 on the main
    # GPU at each of the 2 sync steps
    assert plain == {"main": 3 * 5 * 2 + (2 * 2 if w else 0), "second": 3 * 4 * 2}
    if w:  # the gradient pass: 8 moving windows, 4 a GPU, one a call (sync_batch 1), 2 sync steps
        grad = {name: [rows for n, rows, g in log if n == name and g] for name in ("main", "second")}
        assert grad == {"main": [2] * 8, "second": [2] * 8}
        free = run(pack, tiny_sd15.model, tiny_sd15, tiny_kl_vae, lpips, 0.0)
        assert (free - two).abs().max() > 1e-4  # the second GPU's windows were synchronized too


def test_a_missing_gpu_is_named_before_any_model_call(pack, multigpu, monkeypatch, tiny_sd15, tiny_kl_vae, lpips):
    model = prepare(multigpu, monkeypatch, tiny_sd15.model.clone(), extra=torch.device("cuda", 7))
    log = []
    hook = rows_seen(model, log, "main")
    try:
        with pytest.raises(ValueError, match=r"cuda:7 is not present on this machine"):
            run(pack, model, tiny_sd15, tiny_kl_vae, lpips, 20.0)
    finally:
        hook.remove()
    assert log == []


@pytest.mark.slow
def test_controlnet_keeps_every_window_on_the_main_gpu(pack, multigpu, monkeypatch, tiny_kl_vae, lpips):
    """ControlNet hints are cropped per window on the main GPU's ControlNet: with them, the panorama runs on the
    main GPU alone (ComfyUI's per-GPU ControlNet clones would get the whole hint), synchronized, with the result
    of an unprepared model; the second GPU's model is never called."""
    from layout_helpers import build_micro_controlnet, build_micro_model, one_thread, prompt, stock_node

    def build():
        return build_micro_model(seed=21)

    with one_thread(), torch.inference_mode():
        base, cnet = build(), build_micro_controlnet(seed=22)
        base.cached_patcher_init = (build, ())  # a loader's factory: what ComfyUI's MultiGPU clones from
        hint = torch.rand(1, H * 8, W * 8, 3, generator=torch.Generator().manual_seed(3))
        positive, negative = stock_node(h.runtime(), "ControlNetApplyAdvanced").apply_controlnet(
            prompt(31), prompt(33), cnet, hint, 1.0, 0.0, 1.0)[:2]
    tiny = type("Tiny", (), {"positive": positive, "negative": negative})
    one = run(pack, base, tiny, tiny_kl_vae, lpips, 20.0)
    model = prepare(multigpu, monkeypatch, base.clone())
    log = []
    hooks = [rows_seen(model, log, "main"), rows_seen(model.get_additional_models_with_key("multigpu")[0], log,
                                                       "second")]
    try:
        two = run(pack, model, tiny, tiny_kl_vae, lpips, 20.0)
    finally:
        for hook in hooks:
            hook.remove()
    assert (two - one).norm() / one.norm() < 1e-5
    assert {n for n, _, _ in log} == {"main"} and any(g for _, _, g in log)


@pytest.mark.slow
def test_a_dit_with_canvas_positions_and_checkpointed_blocks(pack, multigpu, monkeypatch, lpips):
    """Flux.1 (tiny): RoPE canvas positions per window and checkpointed DiT blocks in the gradient pass, both lanes
    synchronizing their windows; the result is the one-device result."""
    from devtools import families as fm

    if "flux" not in fm.available():
        pytest.skip("this ComfyUI has no Flux family")
    fam = fm.build("flux")

    def factory():  # the loader's factory: the same weights again
        with torch.inference_mode():
            return fm.build_model(fam.spec, fm.SEED)

    base = fam.model.clone()
    base.cached_patcher_init = (factory, ())
    scale = int(fam.vae.spacial_compression_decode())
    job = h.make_job(pack, w=200.0, sync_steps=1, seed=7, steps=2, cfg=2.0, window_px=4 * scale,
                     stride_px=2 * scale, positions="canvas", checkpoint_model=True, window_batch=1, sync_batch=1)

    def sample(model):
        with torch.inference_mode():
            return pack.sampling.sample_panorama(model, fam.positive, fam.negative,
                                                 {"samples": fam.latent(4 * scale, 8 * scale)}, job, vae=fam.vae,
                                                 loss=lpips)["samples"]

    one = sample(base)
    model = prepare(multigpu, monkeypatch, base.clone())
    log = []
    hooks = [rows_seen(model, log, "main"), rows_seen(model.get_additional_models_with_key("multigpu")[0], log,
                                                       "second")]
    try:
        two = sample(model)
    finally:
        for hook in hooks:
            hook.remove()
    assert (two - one).norm() / one.norm() < 1e-5
    assert {(n, g) for n, _, g in log} == {("main", False), ("main", True), ("second", False), ("second", True)}


def test_gradient_options_run_the_model_on_the_lane_device_and_keep_the_gradient(pack):
    """The gradient pass's model function wrapper: the lane's model gets inputs on its device (conditioning and
    transformer options included), the result comes back, and the gradient flows through both moves; a wrapper
    already in the options wraps the call."""
    multigpu = pack.multigpu
    seen = {}

    class Model:
        def apply_model(self, x, t, **c):
            seen.update(x=x.device, t=t.device, ctx=c["c_crossattn"].device, sig=c["transformer_options"]["sigmas"].device)
            return x * c["c_crossattn"].mean()

    outer_calls = []

    def outer(apply_model, args):
        outer_calls.append(args["input"].shape)
        return apply_model(args["input"], args["timestep"], **args["c"]) * 2

    options = {"multigpu_clones": {}, "multigpu_thread_pool": object(), "model_function_wrapper": outer,
               "transformer_options": {"a": 1}}
    got = multigpu.gradient_options(options, FAKE, Model())
    assert "multigpu_clones" not in got and "multigpu_thread_pool" not in got
    assert got["transformer_options"] == {"a": 1}
    x = torch.ones(2, 3, requires_grad=True)
    c = {"c_crossattn": torch.full((2, 4), 3.0), "transformer_options": {"sigmas": torch.ones(2)}}
    out = got["model_function_wrapper"](None, {"input": x, "timestep": torch.ones(2), "c": c})
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.full((2, 3), 6.0)) and outer_calls == [torch.Size([2, 3])]
    assert set(seen.values()) == {torch.device("cpu")}  # moved (cpu:1 tensors live on the CPU)


def test_one_device_keeps_comfyui_s_own_options(pack):
    multigpu = pack.multigpu
    assert multigpu.device_patchers({}) == {}
    assert multigpu.device_patchers({"multigpu_clones": {torch.device("cpu"): object()}}) == {}
    multigpu.check_devices_present([torch.device("cpu")])  # one device: nothing to check
