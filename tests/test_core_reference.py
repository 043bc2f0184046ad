"""The core's batched loop against a deliberately plain, one-window-at-a-time float64 reading of DESIGN §1."""
import math

import pytest
import torch

from syncdiff_core import Anchor, SyncSettings, plan_windows, sample
from syncdiff_core.sync import synchronize
from syncdiff_core.windows import crop
from toys import Toy



@pytest.fixture(autouse=True)
def float64_default():
    """These tests compare in float64; the default dtype is restored for the rest of the session."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def input_scale(sigma):
    return 1.0 / math.sqrt(1.0 + float(sigma) ** 2)


def reference_loop(x, sigmas, win, stride, toy, w, decay, sync_steps, every, anchor):
    """DESIGN §1 read literally: one window at a time, raster grid, value / count fusion."""
    n_rows = (x.shape[-2] - win) // stride + 1
    n_cols = (x.shape[-1] - win) // stride + 1
    views = [(r * stride, c * stride) for r in range(n_rows) for c in range(n_cols)]
    a = len(views) // 2 if anchor is None else anchor
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        value, count = torch.zeros_like(x), torch.zeros_like(x)
        syncing = w > 0 and (i + 1) % every == 0 and i < sync_steps
        if syncing:
            with torch.no_grad():
                t, l = views[a]
                img_a = toy.decode(toy.denoise(x[..., t:t + win, l:l + win], s.reshape(1)))
        for v, (t, l) in enumerate(views):
            xv = x[..., t:t + win, l:l + win].clone()
            if syncing and v != a:
                c = input_scale(s)
                u = (xv * c).detach().requires_grad_(True)
                loss = toy.loss(toy.decode(toy.denoise(u / c, s.reshape(1))), img_a).sum()
                (g,) = torch.autograd.grad(loss, u)
                xv = (u.detach() - w * decay**i * g) / c
            x0 = toy.denoise(xv, s.reshape(1))
            x_prev = x0 + (s_next / s) * (xv - x0)
            value[..., t:t + win, l:l + win] += x_prev
            count[..., t:t + win, l:l + win] += 1
        x = torch.where(count > 0, value / count, value)
    return x


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
    want = reference_loop(x.clone(), sigmas, win, stride, toy, w, 0.95, 3, 1, None)
    plan = plan_windows(h, wd, win, stride)
    got = sample(toy.denoise, x.clone(), sigmas, plan, sync=sync, decode=toy.decode, loss=toy.loss,
                 input_scale=input_scale, window_batch=3)
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-6, f"relative error {rel:.2e}"


def test_sync_every_and_index_anchor_match_reference():
    toy = Toy(seed=3)
    g = torch.Generator().manual_seed(2)
    sigmas = torch.tensor([10.0, 4.0, 1.5, 0.5, 0.029])
    x = torch.randn(1, 4, 8, 24, generator=g) * 10
    want = reference_loop(x.clone(), sigmas, 8, 4, toy, 30.0, 0.9, 4, 2, 0)
    got = sample(toy.denoise, x.clone(), sigmas, plan_windows(8, 24, 8, 4),
                 sync=SyncSettings(weight=30.0, decay=0.9, steps=4, every=2), decode=toy.decode, loss=toy.loss,
                 anchor=Anchor(mode="index", index=0), input_scale=input_scale, window_batch=5)
    assert (got - want).norm() / want.norm() < 1e-6


def test_sync_changes_the_result_and_window_batch_does_not():
    toy = Toy()
    x = torch.randn(2, 4, 8, 32, generator=torch.Generator().manual_seed(5)) * 10
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.029])
    plan = plan_windows(8, 32, 8, 4)
    kw = dict(decode=toy.decode, loss=toy.loss, input_scale=input_scale)
    base = sample(toy.denoise, x, sigmas, plan, **kw)
    synced = [sample(toy.denoise, x, sigmas, plan, sync=SyncSettings(weight=20.0), window_batch=b, **kw)
              for b in (1, 4, 100)]
    assert (synced[0] - base).abs().max() > 1e-3
    for other in synced[1:]:
        assert torch.allclose(other, synced[0], rtol=1e-10, atol=1e-10)


def test_anchor_is_not_moved_and_others_are():
    toy = Toy()
    plan = plan_windows(8, 32, 8, 4)
    x = torch.randn(1, 4, 8, 32, generator=torch.Generator().manual_seed(7)) * 5
    views = [crop(x, w) for w in plan]
    moved = synchronize(views, torch.tensor(5.0), 0, plan, denoise=toy.denoise, decode=toy.decode, loss=toy.loss,
                        anchor=Anchor(), weight=20.0, input_scale=input_scale(5.0), batch=3)
    a = plan.center_index
    assert torch.equal(moved[a], views[a])
    for j, (before, after) in enumerate(zip(views, moved)):
        if j != a:
            assert (before - after).abs().max() > 0, f"window {j} did not move"


def test_image_anchor_moves_every_window_toward_the_image():
    toy = Toy()
    plan = plan_windows(8, 24, 8, 8)
    x = torch.randn(1, 4, 8, 24, generator=torch.Generator().manual_seed(8)) * 3
    views = [crop(x, w) for w in plan]
    target = torch.zeros(1, 3, 16, 16)
    kw = dict(denoise=toy.denoise, decode=toy.decode, loss=toy.loss, anchor=Anchor(mode="image", image=target),
              input_scale=input_scale(3.0), batch=2)
    moved = synchronize(views, torch.tensor(3.0), 0, plan, weight=0.5, **kw)
    sig = torch.tensor([3.0])
    for before, after in zip(views, moved):
        l_before = toy.loss(toy.decode(toy.denoise(before, sig)), target)
        l_after = toy.loss(toy.decode(toy.denoise(after, sig)), target)
        assert l_after < l_before


class Bimodal:
    """A denoiser whose windows settle into one of two modes (all +1 or all -1) by the sign of their mean."""

    def denoise(self, x, sigma, windows=None, step=None):
        s = sigma.reshape(-1, 1, 1, 1)
        m = x.mean(dim=(1, 2, 3), keepdim=True) / torch.sqrt(1 + s**2)
        return torch.tanh(2 * m) * torch.ones_like(x)

    def decode(self, x0):
        return x0[:, :3]

    def loss(self, images, targets):
        return ((images - targets) ** 2).flatten(1).mean(1)


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
        kw = dict(decode=model.decode, loss=model.loss, input_scale=input_scale)
        free.append(spread(sample(model.denoise, x, sigmas, plan, **kw), plan, model))
        synced.append(spread(sample(model.denoise, x, sigmas, plan, sync=SyncSettings(weight=20.0, steps=10), **kw),
                             plan, model))
    assert sum(free) / 8 > 0.3, "the toy should leave windows in different modes without sync"
    assert sum(synced) / 8 < 0.1 * sum(free) / 8
