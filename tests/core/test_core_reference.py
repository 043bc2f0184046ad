"""The core's batched loop against a deliberately plain, one-window-at-a-time float64 reading of the method
(docs/dev/method.md)."""
import math

import pytest
import torch

from reference import Bimodal, Toy, input_scale, raster_views, reference_loop
from syncdiff_core import Anchor, BatchPolicy, Lanes, SyncSettings, plan_windows, sample
from syncdiff_core.batching import BatchSize
from syncdiff_core.sync import synchronize
from syncdiff_core.windows import crop

DEFAULT_DTYPE = torch.float64  # these tests compare in float64 (tests/conftest.py sets it per test)


GRIDS = {
    "one row": (8, 32, 8, 4),              # H, W, window, stride (latent px)
    "several rows": (16, 24, 8, 4),
    "stride = window": (8, 32, 8, 8),
    "stride = window / 8": (8, 12, 8, 1),
}


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("w", [0.0, 20.0])
def test_core_matches_per_window_reference(grid, w):
    h, wd, win, stride = GRIDS[grid]
    toy = Toy()
    g = torch.Generator().manual_seed(1)
    sigmas = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.029])
    x = torch.randn(1, 4, h, wd, generator=g) * math.sqrt(1 + 14.6**2)
    sync = SyncSettings(weight=w, decay=0.95, steps=3, every=1)
    want = reference_loop(x.clone(), sigmas, raster_views(h, wd, win, stride), toy, w=w, decay=0.95, sync_steps=3)
    plan = plan_windows(h, wd, win, stride)
    got = sample(Lanes.single(toy.denoise, toy.decode, toy.loss), x.clone(), sigmas, plan, sync=sync,
                 input_scale=input_scale, batching=BatchPolicy(window_batch=3))
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-6, f"relative error {rel:.2e}"


def test_sync_every_and_index_anchor_match_reference():
    toy = Toy(seed=3)
    g = torch.Generator().manual_seed(2)
    sigmas = torch.tensor([10.0, 4.0, 1.5, 0.5, 0.029])
    x = torch.randn(1, 4, 8, 24, generator=g) * 10
    want = reference_loop(x.clone(), sigmas, raster_views(8, 24, 8, 4), toy, w=30.0, decay=0.9, sync_steps=4,
                          every=2, anchor=0)
    got = sample(Lanes.single(toy.denoise, toy.decode, toy.loss), x.clone(), sigmas, plan_windows(8, 24, 8, 4),
                 sync=SyncSettings(weight=30.0, decay=0.9, steps=4, every=2),
                 anchor=Anchor(mode="index", index=0), input_scale=input_scale, batching=BatchPolicy(window_batch=5))
    assert (got - want).norm() / want.norm() < 1e-6


def test_sync_changes_the_result_and_window_batch_does_not():
    toy = Toy()
    x = torch.randn(2, 4, 8, 32, generator=torch.Generator().manual_seed(5)) * 10
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.029])
    plan = plan_windows(8, 32, 8, 4)
    kw = dict(input_scale=input_scale)
    lanes = Lanes.single(toy.denoise, toy.decode, toy.loss)
    base = sample(lanes, x, sigmas, plan, **kw)
    synced = [sample(lanes, x, sigmas, plan, sync=SyncSettings(weight=20.0), batching=BatchPolicy(window_batch=b),
                     **kw)
              for b in (1, 4, 100)]
    assert (synced[0] - base).abs().max() > 1e-3
    for other in synced[1:]:
        assert torch.allclose(other, synced[0], rtol=1e-10, atol=1e-10)


def test_anchor_is_not_moved_and_others_are():
    toy = Toy()
    plan = plan_windows(8, 32, 8, 4)
    x = torch.randn(1, 4, 8, 32, generator=torch.Generator().manual_seed(7)) * 5
    views = [crop(x, w) for w in plan]
    moved = synchronize(Lanes.single(toy.denoise, toy.decode, toy.loss), views, torch.tensor(5.0), 0, plan,
                        anchor=Anchor(), weight=20.0, input_scale=input_scale(5.0), batches=[BatchSize(3)])
    a = plan.center_index
    assert torch.equal(moved[a], views[a])
    for j, (before, after) in enumerate(zip(views, moved)):
        if j != a:
            assert (before - after).abs().max() > 0, f"window {j} did not move"


def test_anchor_prediction_is_not_compiled():
    """With a ``torch.compile``d denoiser, the anchor's prediction (one window, once per sync step) runs its
    original code: only the gradient batch's shape is compiled, and the windows move as without compile."""
    import torch._dynamo

    toy = Toy()
    plan = plan_windows(8, 24, 8, 4)  # 5 windows: the anchor and 4 movers in one gradient batch
    x = torch.randn(1, 4, 8, 24, generator=torch.Generator().manual_seed(9)) * 5
    views = [crop(x, w) for w in plan]
    rows = []

    def backend(gm, inputs):
        rows.extend(t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.ndim == 4)
        return gm.forward

    kw = dict(anchor=Anchor(), weight=20.0, input_scale=input_scale(5.0), batches=[BatchSize(4)])
    torch._dynamo.reset()
    try:
        compiled = synchronize(Lanes.single(torch.compile(toy.denoise, backend=backend), toy.decode, toy.loss), views,
                               torch.tensor(5.0), 0, plan, **kw)
    finally:
        torch._dynamo.reset()
    plain = synchronize(Lanes.single(toy.denoise, toy.decode, toy.loss), views, torch.tensor(5.0), 0, plan, **kw)
    assert rows and set(rows) == {4}  # the gradient batch's graph only; the anchor's 1 row never compiled
    assert toy.batches.count(1) == 2  # the anchor did run, once per call
    for a, b in zip(compiled, plain):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_image_anchor_moves_every_window_toward_the_image():
    toy = Toy()
    plan = plan_windows(8, 24, 8, 8)
    x = torch.randn(1, 4, 8, 24, generator=torch.Generator().manual_seed(8)) * 3
    views = [crop(x, w) for w in plan]
    target = torch.zeros(1, 3, 16, 16)
    kw = dict(anchor=Anchor(mode="image", image=target), input_scale=input_scale(3.0), batches=[BatchSize(2)])
    moved = synchronize(Lanes.single(toy.denoise, toy.decode, toy.loss), views, torch.tensor(3.0), 0, plan, weight=0.5,
                        **kw)
    sig = torch.tensor([3.0])
    for before, after in zip(views, moved):
        l_before = toy.loss(toy.decode(toy.denoise(before, sig)), target)
        l_after = toy.loss(toy.decode(toy.denoise(after, sig)), target)
        assert l_after < l_before


def spread(canvas, plan, model):
    """Mean loss between each window's final content and the anchor window's."""
    views = [crop(canvas, w) for w in plan]
    a = views[plan.center_index]
    return float(sum(model.loss(model.decode(v), model.decode(a)) for v in views) / len(views))


def test_synchronization_reduces_the_spread_between_windows():
    model = Bimodal()
    plan = plan_windows(4, 64, 4, 4)  # 16 side-by-side windows: no overlap, so nothing else couples them
    sigmas = torch.linspace(3.0, 0.0, 11)
    free, synced = [], []
    for seed in range(8):
        x = torch.randn(1, 4, 4, 64, generator=torch.Generator().manual_seed(seed)) * 3
        lanes = Lanes.single(model.denoise, model.decode, model.loss)
        free.append(spread(sample(lanes, x, sigmas, plan, input_scale=input_scale), plan, model))
        synced.append(spread(sample(lanes, x, sigmas, plan, sync=SyncSettings(weight=20.0, steps=10),
                                    input_scale=input_scale), plan, model))
    assert sum(free) / 8 > 0.3, "the toy should leave windows in different modes without sync"
    assert sum(synced) / 8 < 0.1 * sum(free) / 8
