"""Clocks: per-step times through ComfyUI's progress hook, a synchronized profiler of UNet / VAE / LPIPS, host-sync
counts, and timings of a callable alone. Everything that is swapped in (a progress hook, wrapped methods,
``torch.autograd.grad``, a log handler, the sync debug mode) is swapped back when its ``with`` block ends.

Import after ``bench.options.start_comfy``.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

import comfy.utils

from .state import Bench, now

_MISSING = object()


@contextlib.contextmanager
def patched(obj, name: str, value):
    """``obj.name = value`` within the block; afterwards the attribute is as it was (an instance attribute that
    only shadowed the class's is removed again)."""
    own = vars(obj).get(name, _MISSING)
    setattr(obj, name, value)
    try:
        yield value
    finally:
        if own is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, own)


# ------------------------------------------------------------------------------------------------------------
# Step times


def mark(cuda: bool):
    """A point in time: a CUDA event recorded on the stream (no host synchronization), or host time on the CPU."""
    if cuda:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return now()


def intervals(b: Bench, t0, marks) -> list[float]:
    """Seconds between consecutive marks (events: after a synchronize)."""
    b.synchronize()
    pairs = zip([t0] + marks[:-1], marks)
    return [a.elapsed_time(c) / 1e3 for a, c in pairs] if b.cuda else [c - a for a, c in pairs]


class StepClock:
    """Per-step times of a pack run through ComfyUI's progress hook (the sampler reports once per step)::

        with StepClock(b) as clock:
            ...                      # the run
        clock.step_s                 # seconds per step

    The hook is ComfyUI's global ``PROGRESS_BAR_HOOK``; the one before is put back when the block ends."""

    def __init__(self, b: Bench):
        self.b = b
        self.marks: list = []
        self.t0 = None
        self.step_s: list[float] = []
        self._previous = None

    def __call__(self, value, total, preview=None, **kw):
        self.marks.append(mark(self.b.cuda))

    def __enter__(self):
        self._previous = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(self)
        self.marks = []
        self.t0 = mark(self.b.cuda)
        return self

    def __exit__(self, *exc):
        comfy.utils.set_progress_bar_global_hook(self._previous)
        self.step_s = intervals(self.b, self.t0, self.marks)
        return False


@contextlib.contextmanager
def captured_notes(logger: str = "syncdiffusion"):
    """The pack's log messages during the block, as a list of strings."""
    notes: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record):
            notes.append(record.getMessage())

    handler = Handler()
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield notes
    finally:
        log.removeHandler(handler)


# ------------------------------------------------------------------------------------------------------------
# Profiling: synchronized timers around the UNet, the VAE decoder and LPIPS, forward and backward


class Profiler:
    """Synchronized timers. Backward time is split by hooks on each component's input: the gradient reaches
    LPIPS' input, then the decoder's input, then the UNet's input, in that order. Made by :func:`profiling`."""

    def __init__(self, b: Bench):
        self.b = b
        self.t = defaultdict(float)
        self.mark = None

    def _hook_input(self, name, tensor):
        def hook(grad):
            if self.mark is not None:
                self.b.synchronize()
                t = now()
                self.t[name + "_bwd"] += t - self.mark
                self.mark = t
        tensor.register_hook(hook)

    def wrap(self, fn, name):
        def wrapper(*args, **kwargs):
            first = next((a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)), None)
            if first is not None and first.requires_grad and torch.is_grad_enabled():
                self._hook_input(name, first)
            self.b.synchronize()
            t0 = now()
            out = fn(*args, **kwargs)
            self.b.synchronize()
            self.t[name + "_fwd"] += now() - t0
            return out
        return wrapper

    def wrap_grad(self, orig):
        def grad(*args, **kwargs):
            self.b.synchronize()
            self.mark = t0 = now()
            out = orig(*args, **kwargs)
            self.b.synchronize()
            t1 = now()
            self.t["other_bwd"] += t1 - self.mark
            self.t["grad_total"] += t1 - t0
            self.mark = None
            return out
        return grad

    def split(self, wall):
        """Seconds per component: unet, vae, lpips (forward + backward), other = wall - the rest."""
        t = self.t
        out = {k: t[k + "_fwd"] + t[k + "_bwd"] for k in ("unet", "vae", "lpips")}
        out["other"] = wall - sum(out.values())
        return out


@contextlib.contextmanager
def profiling(b: Bench, models):
    """Within the block the UNet's forward, the VAE decoder, LPIPS' ``features`` / ``distance`` and
    ``torch.autograd.grad`` run under a :class:`Profiler`'s timers; all of them are restored afterwards."""
    prof = Profiler(b)
    unet = models.model.model.diffusion_model
    first = models.vae.first_stage_model
    loss = models.loss
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(unet, "forward", prof.wrap(unet.forward, "unet")))
        stack.enter_context(patched(first, "decode", prof.wrap(first.decode, "vae")))
        stack.enter_context(patched(loss, "features", prof.wrap(loss.features, "lpips")))
        stack.enter_context(patched(loss, "distance", prof.wrap(loss.distance, "lpips")))
        stack.enter_context(patched(torch.autograd, "grad", prof.wrap_grad(torch.autograd.grad)))
        yield prof


# ------------------------------------------------------------------------------------------------------------
# Host syncs, and a callable alone


def count_syncs(b: Bench, fn) -> dict:
    """Host synchronizations while ``fn()`` runs (``torch.cuda.set_sync_debug_mode``), by source line."""
    if not b.cuda:
        return {}
    counts = Counter()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for wr in caught:
        if "synchroniz" in str(wr.message):
            counts[f"{Path(wr.filename).name}:{wr.lineno}"] += 1
    return dict(counts.most_common(12)) | {"total": sum(counts.values())}


def timed(b: Bench, fn, reps: int) -> dict:
    """First-call seconds, median milliseconds of ``reps`` further calls (CUDA events), peak GiB."""
    b.fresh_memory()
    b.synchronize()
    t0 = now()
    fn()
    b.synchronize()
    first = now() - t0
    fn()
    times = []
    for _ in range(reps):
        if b.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = now()
            fn()
            times.append(now() - t)
    return {"first_s": round(first, 2), "median_ms": round(statistics.median(times) * 1e3, 2), **b.memory()}
