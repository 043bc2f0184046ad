"""The memory plan (``syncdiff_core.memory``) and the exact gradient ways it chooses between (plain torch)."""
from __future__ import annotations

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


def test_a_model_without_blocks_skips_block_recomputation():
    costs = WindowCosts(plain=0.1 * GIB, model=1.0 * GIB, model_checkpointed=None, decoder=1.5 * GIB, decode=0.3 * GIB)
    plan = plan_memory(2.0 * GIB, costs, 5, sync=True)
    assert not plan.checkpoint_model and plan.two_stage
    assert "gradient in two stages" in plan.describe(sync=True) and "of 2.0 GiB free" in plan.describe(sync=True)
    assert torch.isfinite(torch.tensor(plan.peak))
