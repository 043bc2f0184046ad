"""Several devices sharing a panorama's windows (syncdiff_core.lanes), with float64 toy callables on the CPU.

Two lanes stand for two GPUs: each has its own toy (same weights, its own call log) and its own device name
(``cpu`` and ``cpu:1``, distinct as torch devices, both the CPU for tensors). What must hold: the canvas is the same
as with one lane, each lane gets its contiguous share of every pass, and an error in one lane reaches the caller
only after every lane has finished.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from reference import Toy, input_scale
from syncdiff_core import BatchPolicy, SyncSettings, plan_windows, sample
from syncdiff_core.lanes import Lane, Lanes, shares
from test_batching import SIGMAS, canvas

DEVICES = (torch.device("cpu"), torch.device("cpu", 1))


class Logged(Toy):
    """A toy that records which windows each call got and from which thread."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.windows, self.threads = [], []

    def denoise(self, x, sigma, windows=None, step=None):
        self.windows.append((step, torch.is_grad_enabled(), [(w.top, w.left) for w in windows]))
        self.threads.append(threading.get_ident())
        return super().denoise(x, sigma, windows, step)


def threaded(tasks):
    """A runner with one thread per lane, like ComfyUI's MultiGPU thread pool."""
    with ThreadPoolExecutor(len(tasks)) as pool:
        futures = [pool.submit(thunk) for _, thunk in tasks]
        errors = [f.exception() for f in futures]  # waits for every thunk
    for e in errors:
        if e is not None:
            raise e
    return [f.result() for f in futures]


def two_lanes(runner=None, seed=1):
    toys = [Logged(seed=seed), Logged(seed=seed)]
    return toys, Lanes([Lane(d, t.denoise, t.decode, t.loss) for d, t in zip(DEVICES, toys)], runner)


@pytest.mark.parametrize("count,parts,want", [(21, 2, [11, 10]), (20, 2, [10, 10]), (1, 2, [1]), (7, 3, [3, 2, 2]),
                                              (0, 2, []), (5, 1, [5])])
def test_shares_are_contiguous_and_even(count, parts, want):
    got = shares(count, parts)
    assert [len(r) for r in got] == want
    assert [i for r in got for i in r] == list(range(count))


def test_each_lane_needs_its_own_device():
    toy = Toy()
    with pytest.raises(ValueError, match="its own device"):
        Lanes([Lane(torch.device("cpu"), toy.denoise), Lane(torch.device("cpu"), toy.denoise)])
    with pytest.raises(ValueError, match="at least one lane"):
        Lanes([])


@pytest.mark.parametrize("runner", [None, threaded], ids=["in-turn", "threads"])
@pytest.mark.parametrize("w", [0.0, 20.0])
def test_two_lanes_give_the_one_lane_canvas(runner, w):
    plan = plan_windows(16, 24, 8, 4)  # 3 x 5 windows
    x = canvas(1, 16, 24)
    kw = dict(sync=SyncSettings(weight=w, steps=2), input_scale=input_scale, batching=BatchPolicy(4))
    one = Logged(seed=1)
    want = sample(Lanes.single(one.denoise, one.decode, one.loss), x.clone(), SIGMAS, plan, **kw)
    toys, lanes = two_lanes(runner)
    got = sample(lanes, x.clone(), SIGMAS, plan, **kw)
    assert (got - want).abs().max() < 1e-12
    # the plain pass: windows 0-7 on the first lane, 8-14 on the second, every step
    windows = [(w.top, w.left) for w in plan]
    for k, (toy, share) in enumerate(zip(toys, (windows[:8], windows[8:]))):
        for step in range(len(SIGMAS) - 1):
            calls = [ws for s, grad, ws in toy.windows if s == step and not grad]
            if w and step < 2 and k == 0:  # a sync step starts with the anchor's x0 on the first lane
                assert calls.pop(0) == [windows[plan.center_index]]
            assert [p for ws in calls for p in ws] == share
    if w:  # the gradient pass: the 14 windows but the anchor (the center, 7), 7 a lane; the anchor by the first
        movers = [p for j, p in enumerate(windows) if j != plan.center_index]
        for toy, share in zip(toys, (movers[:7], movers[7:])):
            seen = [p for s, grad, ws in toy.windows if s == 0 and grad for p in ws]
            assert seen == share
    if runner is threaded:  # the lanes ran in the runner's threads, the anchor's x0 in the caller's
        here = threading.get_ident()
        for toy in toys:
            for (s, grad, ws), thread in zip(toy.windows, toy.threads):
                anchor = w and s < 2 and not grad and ws == [windows[plan.center_index]]
                assert (thread == here) == bool(anchor)


def test_lane_targets_are_moved_to_the_lane_device():
    """The anchor's decoded target reaches each lane's loss on that lane's device."""
    plan = plan_windows(8, 40, 8, 4)
    seen = []
    toys = [Toy(seed=2), Toy(seed=2)]

    def loss_on(toy, device):
        def loss(images, targets):
            seen.append((device, targets.device))
            return toy.loss(images, targets)
        return loss

    lanes = Lanes([Lane(d, t.denoise, t.decode, loss_on(t, d)) for d, t in zip(DEVICES, toys)])
    sample(lanes, canvas(), SIGMAS, plan, sync=SyncSettings(weight=20.0, steps=1), input_scale=input_scale)
    assert {d for d, _ in seen} == set(DEVICES)
    assert all(t.type == d.type for d, t in seen)


class Boom(RuntimeError):
    pass


def test_an_error_in_one_lane_is_raised_after_every_lane_finished():
    plan = plan_windows(8, 40, 8, 4)
    finished = []
    good = Toy()

    def slow(x, sigma, windows=None, step=None):
        out = good.denoise(x, sigma, windows, step)
        finished.append(step)
        return out

    def broken(x, sigma, windows=None, step=None):
        raise Boom("lane 2 failed")

    lanes = Lanes([Lane(DEVICES[0], slow), Lane(DEVICES[1], broken)], threaded)
    with pytest.raises(Boom, match="lane 2"):
        sample(lanes, canvas(), SIGMAS, plan, batching=BatchPolicy(1))
    assert finished == [0] * 5  # the first lane's five windows of step 0 ran to the end


def test_sync_with_lanes_needs_decode_and_loss():
    toy = Toy()
    lanes = Lanes([Lane(DEVICES[0], toy.denoise, toy.decode, toy.loss), Lane(DEVICES[1], toy.denoise)])
    with pytest.raises(ValueError, match="decode and loss"):
        sample(lanes, canvas(), SIGMAS, plan_windows(8, 40, 8, 4), sync=SyncSettings(weight=1.0, steps=1))


class FakeOOM(RuntimeError):
    pass


def test_each_lane_halves_its_own_batch_size():
    """``synchronize`` called directly with a BatchSize per lane: the first lane's out-of-memory halving stays its
    own; the second lane keeps the size it was given."""
    from syncdiff_core.batching import BatchSize
    from syncdiff_core.sync import Anchor, synchronize

    plan = plan_windows(16, 24, 8, 4)  # 15 windows; 14 move, 7 a lane
    views = [canvas(j, 8, 8) for j in range(len(plan))]
    toys, sizes = [Toy(seed=3), Toy(seed=3)], [[], []]

    def denoise_of(k, fail_first):
        def denoise(x, sigma, windows=None, step=None):
            if torch.is_grad_enabled():
                if fail_first and not sizes[k]:
                    sizes[k].append(-len(windows))
                    raise FakeOOM("out of memory (simulated)")
                sizes[k].append(len(windows))
            return toys[k].denoise(x, sigma, windows, step)
        return denoise

    lanes = Lanes([Lane(d, denoise_of(k, k == 0), toys[k].decode, toys[k].loss) for k, d in enumerate(DEVICES)])
    batch, second = (BatchSize(4, "sync_batch", oom_errors=(FakeOOM,)) for _ in lanes)
    kw = dict(anchor=Anchor(), weight=1.0, input_scale=input_scale(5.0))
    synchronize(lanes, views, torch.tensor(5.0), 0, plan, batches=[batch, second], **kw)
    assert sizes[0] == [-4, 2, 2, 2, 1]  # halved to 2 after the failed 4
    assert sizes[1] == [4, 3]
    assert batch.halved and batch.size == 2
    assert not second.halved and second.size == 4
    with pytest.raises(ValueError, match="one batch size per lane is needed: 2 lanes, 1 batch sizes"):
        synchronize(lanes, views, torch.tensor(5.0), 0, plan, batches=[batch], **kw)
