"""The memory plan (``syncdiff_core.memory``) and the exact gradient ways it chooses between (plain torch)."""
import re
import types

import pytest
import torch

from reference import Toy, input_scale
from syncdiff_core import BatchPolicy, Lanes, SyncSettings, plan_windows, sample
from syncdiff_core.memory import GIB, NoExactPlan, WindowCosts, gradient_need, plan_memory
from syncdiff_core.sync import GradientWay
from test_batching import SIGMAS, canvas

WAYS = [GradientWay(two_stage=True), GradientWay(offload=True), GradientWay(two_stage=True, offload=True)]


@pytest.mark.parametrize("way", WAYS, ids=["two stages", "offload", "two stages + offload"])
def test_every_gradient_way_gives_the_same_panorama(way):
    toy = Toy(seed=4)
    plan = plan_windows(16, 24, 8, 4)
    x = canvas(3, 16, 24)
    kw = dict(sync=SyncSettings(weight=20.0, steps=3), input_scale=input_scale, batching=BatchPolicy(4, 3))
    lanes = Lanes.single(toy.denoise, toy.decode, toy.loss)
    want = sample(lanes, x.clone(), SIGMAS, plan, **kw)
    calls = len(toy.batches)
    got = sample(lanes, x.clone(), SIGMAS, plan, way=way, **kw)
    extra = len(toy.batches) - 2 * calls
    assert (got - want).abs().max() < 1e-10
    assert (got - sample(lanes, x.clone(), SIGMAS, plan, input_scale=input_scale)).abs().max() > 1e-3
    # two stages: one more prediction per gradient batch (14 movers in batches of 3: 5 a sync step, 3 sync steps)
    assert extra == (5 * 3 if way.two_stage else 0)


COSTS = WindowCosts(plain=0.1 * GIB, model=1.0 * GIB, model_checkpointed=0.3 * GIB, decoder=1.5 * GIB,
                    decode=0.3 * GIB, fixed=0.2 * GIB)


def test_the_plan_chooses_differently_under_different_free_memory():
    frees = (80, 5, 2.2, 1.8, 1.0)
    plans = {free: plan_memory(free * GIB, COSTS, 21, sync=True, auto_sync_batch=2) for free in frees}
    big, mid, small, tiny, least = (plans[f] for f in frees)
    assert (big.window_batch, big.sync_batch, big.checkpoint_model, big.two_stage) == (21, 2, False, False)
    assert (mid.sync_batch, mid.checkpoint_model, mid.two_stage) == (1, False, False)
    assert (small.sync_batch, small.checkpoint_model, small.two_stage) == (1, True, False)
    assert (tiny.sync_batch, tiny.two_stage, tiny.offload) == (1, True, False)
    assert least.offload and least.window_batch >= 1
    for plan in plans.values():
        assert plan.peak <= plan.budget
    assert len({(p.sync_batch, p.checkpoint_model, p.two_stage, p.offload) for p in plans.values()}) >= 4


def test_without_sync_the_window_batch_grows_with_free_memory_up_to_all_windows():
    assert plan_memory(80 * GIB, COSTS, 21, sync=False).window_batch == 21
    assert plan_memory(0.65 * GIB, COSTS, 21, sync=False).window_batch == 4
    assert plan_memory(0.65 * GIB, COSTS, 21, sync=False, window_batch=8).window_batch == 8  # saved: kept


def test_saved_settings_are_kept():
    plan = plan_memory(80 * GIB, COSTS, 21, sync=True, window_batch=8, sync_batch=3, checkpoint_model=True)
    assert (plan.window_batch, plan.sync_batch, plan.checkpoint_model) == (8, 3, True)
    # a saved sync_batch that does not fit is left to the out-of-memory fallback (which names it), not refused
    assert plan_memory(1.0 * GIB, COSTS, 21, sync=True, sync_batch=4).sync_batch == 4


def test_nothing_exact_fits_names_what_would():
    need = gradient_need(COSTS, 1, False, True, True)
    with pytest.raises(NoExactPlan, match=r"needs about 0\.5 GiB .* 0\.4 GiB is free\. Use a smaller window_size, "
                                          r"loss_decoder 'taesd'"):
        plan_memory(0.4 * GIB, COSTS, 21, sync=True)
    assert need == pytest.approx(0.5 * GIB)
    with pytest.raises(NoExactPlan, match="one window at a time needs about 0.3 GiB"):
        plan_memory(0.25 * GIB, COSTS, 21, sync=False)


def test_a_memory_cap_bounds_the_plan_like_free_memory():
    free = plan_memory(2.2 * GIB, COSTS, 21, sync=True, auto_sync_batch=2)
    capped = plan_memory(80 * GIB, COSTS, 21, sync=True, auto_sync_batch=2, cap=2.2 * GIB)
    uncapped = plan_memory(80 * GIB, COSTS, 21, sync=True, auto_sync_batch=2)
    assert capped.sync_batch == 1 and capped.checkpoint_model and not uncapped.checkpoint_model
    assert (capped.window_batch, capped.sync_batch, capped.checkpoint_model, capped.two_stage, capped.peak) == \
        (free.window_batch, free.sync_batch, free.checkpoint_model, free.two_stage, free.peak)
    assert capped.describe(sync=True).endswith("of 2.2 GiB (memory_cap_gb)")
    # a cap above what is free changes nothing: the free memory binds
    loose = plan_memory(2.2 * GIB, COSTS, 21, sync=True, auto_sync_batch=2, cap=40 * GIB)
    assert loose == free and loose.describe(sync=True).endswith("of 2.2 GiB free")


def test_a_cap_below_any_exact_plan_names_the_cap_the_need_and_the_options():
    need = gradient_need(COSTS, 1, True, True, True)  # the least: every exact saving, one window
    with pytest.raises(NoExactPlan, match=r"memory_cap_gb 0\.40 GiB is below what any exact plan needs: about "
                                          r"0\.50 GiB beyond the loaded models \(synchronizing one window at a time, "
                                          r"with every exact memory saving\)\. Raise memory_cap_gb to at least 0\.50 "
                                          r"\(0 = no cap\), or use a smaller window_size, loss_decoder 'taesd'.*"
                                          r"sync_weight 0"):
        plan_memory(80 * GIB, COSTS, 21, sync=True, cap=0.4 * GIB)
    assert need == pytest.approx(0.5 * GIB)
    with pytest.raises(NoExactPlan, match=r"memory_cap_gb 0\.25 GiB .* about 0\.30 GiB .* \(one window at a time\)"):
        plan_memory(80 * GIB, COSTS, 21, sync=False, cap=0.25 * GIB)


@pytest.mark.parametrize("cap", [-1.0, float("nan"), float("inf"), 5000.0])
def test_a_memory_cap_outside_its_range_is_refused_by_name(pack, cap):
    with pytest.raises(ValueError, match=r"memory_cap_gb must be"):
        pack.job.Windowing(memory_cap_gb=cap)


def test_a_model_without_blocks_skips_block_recomputation():
    costs = WindowCosts(plain=0.1 * GIB, model=1.0 * GIB, model_checkpointed=None, decoder=1.5 * GIB, decode=0.3 * GIB)
    plan = plan_memory(2.0 * GIB, costs, 5, sync=True)
    assert not plan.checkpoint_model and plan.two_stage
    assert "gradient in two stages" in plan.describe(sync=True) and "of 2.0 GiB free" in plan.describe(sync=True)
    assert torch.isfinite(torch.tensor(plan.peak))


# ----------------------------------------------------------------------------- through ComfyUI (the tiny model)

def sync_run(pack, micro, vae, lpips, free, monkeypatch, **kw):
    """A synchronized run with the free-memory reading injected (bytes); returns (samples, the plan's log line)."""
    import logging

    from test_sync_comfy import job, run

    monkeypatch.setattr(pack.memory_plan, "free_memory", lambda device: free)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("syncdiffusion")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        out = run(pack, micro, vae, job(pack, **{"steps": 2, "w": 20.0, "sync_steps": 2, "window_batch": 0, **kw}),
                  loss=lpips)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    plans = [r.getMessage() for r in records if "memory plan" in r.getMessage()]
    assert len(plans) == 1, plans
    return out, plans[0]


def test_every_plan_gives_the_unconstrained_panorama(comfy, pack, micro, tiny_kl_vae, lpips, monkeypatch):
    """The plan follows the free memory (injected) and the user's memory cap, and every exact lever it picks gives
    the panorama of the unconstrained plan."""
    costs = pack.memory_plan.window_costs
    seen = {}

    def spy(run, guider, rows):
        seen["costs"] = costs(run, guider, rows)
        return seen["costs"]

    monkeypatch.setattr(pack.memory_plan, "window_costs", spy)
    _, line = sync_run(pack, micro, tiny_kl_vae, lpips, 64 * GIB, monkeypatch)
    assert "window_batch 5, sync_batch 4;" in line  # all five windows, all four movers (small windows)
    # the reference: one graph, one window a gradient pass (float32 sums depend on the batch's composition)
    want, line = sync_run(pack, micro, tiny_kl_vae, lpips, 64 * GIB, monkeypatch, sync_batch=1)
    assert line.endswith("of 64.0 GiB free") and "two stages" not in line
    c = seen["costs"]
    tight = c.fixed + max(c.model, c.decoder) * 1.01  # two stages fit, one graph does not
    offload = c.fixed + max(c.plain, c.decode) * 1.01  # only host memory fits
    # the same levers from the free memory, and from memory_cap_gb alone with plenty free
    for free, cap, expect in ((tight, 0.0, "gradient in two stages"), (offload, 0.0, "activations in host memory"),
                              (64 * GIB, tight / GIB, "gradient in two stages")):
        got, line = sync_run(pack, micro, tiny_kl_vae, lpips, free, monkeypatch, memory_cap_gb=cap)
        assert expect in line and "sync_batch 1" in line, line
        assert line.endswith("(memory_cap_gb)" if cap else "GiB free"), line
        rel = float((got - want).norm() / want.norm())
        assert rel < 1e-5, (expect, rel)
    dm = micro.model.model.diffusion_model  # counted once, by the first of these runs
    assert pack.memory_plan._PARAMS[dm] == sum(p.numel() for p in dm.parameters())


@pytest.mark.parametrize("node", ["SyncDiffusionSampler", "SyncDiffusionCustomSampler"])
def test_a_cap_too_small_is_refused_before_anything_is_loaded(comfy, pack, micro, tiny_kl_vae, monkeypatch, node):
    """Through each sampler node: the cap's error comes before any model call, any model load and LPIPS (the
    free memory is plenty: only the cap is too small)."""
    import comfy.model_management as mm
    import comfy.samplers

    calls = []
    model = micro.model.clone()
    model.set_model_unet_function_wrapper(lambda apply, args: calls.append("model") or apply(
        args["input"], args["timestep"], **args["c"]))
    monkeypatch.setattr(pack.memory_plan, "free_memory", lambda device: 64 * GIB)
    monkeypatch.setattr(pack.run_plan, "get_lpips", lambda device: calls.append("lpips"))
    loads = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **k: loads.append(models))
    sn = pack.sampler_nodes
    widgets = dict(window_size=16, stride=8, sync_weight=20.0, sync_decay=0.95, sync_steps=1, sync_every=1,
                   wrap=False, window_batch=0, memory_cap_gb=0.01)
    latent = {"samples": torch.zeros(1, 4, 2, 6)}
    with pytest.raises(ValueError, match=r"memory_cap_gb 0\.01 GiB is below what any exact plan needs: about "
                                         r"(\d+\.\d\d) GiB beyond the loaded models \(synchronizing .*\)\. Raise "
                                         r"memory_cap_gb to at least \d+\.\d\d \(0 = no cap\), or use a smaller "
                                         r"window_size, loss_decoder 'taesd'") as refused:
        with torch.inference_mode():
            if node == "SyncDiffusionSampler":
                sn.SyncDiffusionSampler.execute(model=model, positive=micro.positive, negative=micro.negative,
                                                vae=tiny_kl_vae, latent_image=latent, seed=1, steps=2, cfg=5.0,
                                                **widgets)
            else:
                sampler = sn.SyncDiffusionCustomSampler.execute(vae=tiny_kl_vae, **widgets).args[0]
                guider = comfy.samplers.CFGGuider(model)
                guider.set_conds(micro.positive, micro.negative)
                guider.set_cfg(5.0)
                sigmas = pack.families.sampling_sigmas(model, 2, 1.0)
                guider.sample(torch.randn(1, 4, 2, 6), latent["samples"], sampler, sigmas, seed=1)
    assert float(re.search(r"about (\d+\.\d\d) GiB", str(refused.value)).group(1)) > 0.01
    assert calls == []
    if node == "SyncDiffusionSampler":  # SamplerCustomAdvanced's guider loads the model before any sampler runs
        assert loads == []


def test_no_exact_plan_is_refused_before_any_model_call(comfy, pack, micro, tiny_kl_vae, monkeypatch):
    from test_sync_comfy import job, run

    calls = []
    model = micro.model.clone()
    model.set_model_unet_function_wrapper(lambda apply, args: calls.append(1) or apply(args["input"],
                                                                                       args["timestep"], **args["c"]))
    tiny = types.SimpleNamespace(model=model, positive=micro.positive, negative=micro.negative)
    monkeypatch.setattr(pack.memory_plan, "free_memory", lambda device: 1.0)
    with pytest.raises(ValueError, match=r"not enough GPU memory: synchronizing one window at a time.* Use a "
                                         r"smaller window_size, loss_decoder 'taesd'"):
        run(pack, tiny, tiny_kl_vae, job(pack, steps=2, w=20.0, sync_steps=1), loss=lambda a, b: calls.append(1))
    assert calls == []
