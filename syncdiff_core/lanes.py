"""Several devices sampling one canvas at once (plain torch, no ComfyUI).

A :class:`Lane` is one device's callables: ``denoise`` and, when synchronizing, ``decode`` and ``loss``. Each pass
of a step shares its windows out among the lanes in contiguous, near-equal parts; the lanes run their parts at the
same time (through ``runner``), and the results come back in window order, so the canvas is fused exactly as with
one lane. Contract: a lane's ``denoise`` takes and returns tensors on the canvas's device (it moves the work to
its own device and back, differentiably); its ``decode`` and ``loss`` compute on ``device``, where the sampler puts
the anchor's target for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .batching import even_split

__all__ = ["Lane", "Lanes", "run_in_turn", "shares"]


@dataclass(frozen=True)
class Lane:
    """One device's share of the work: ``denoise(x, sigma, windows, step)`` as the sampler's, ``decode`` and
    ``loss`` computing on ``device`` (None when not synchronizing; a ``device`` of None: the canvas's own)."""

    device: torch.device | None
    denoise: Callable
    decode: Callable | None = None
    loss: Callable | None = None


#: ``runner(tasks) -> results``: ``tasks`` is a list of ``(lane, thunk)``, at most one per lane; it calls every
#: thunk (on its lane's device, at the same time where it can) and returns their results in order, or raises the
#: first error once every thunk has finished.
Runner = Callable[[list], list]


def run_in_turn(tasks: list) -> list:
    """The runner of one thread: each thunk in turn."""
    return [thunk() for _, thunk in tasks]


def shares(count: int, parts: int) -> list[range]:
    """``count`` items in ``parts`` contiguous ranges, as even as possible, larger ones first; empty ranges are
    left out: ``shares(21, 2) == [range(0, 11), range(11, 21)]``, ``shares(1, 2) == [range(0, 1)]``."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    out, start = [], 0
    for size in even_split(count, parts):
        if size:
            out.append(range(start, start + size))
        start += size
    return out


class Lanes:
    """The lanes of a run and the runner that drives them; one lane runs everything in the calling thread."""

    def __init__(self, lanes: Sequence[Lane], runner: Runner | None = None):
        if not lanes:
            raise ValueError("at least one lane is needed")
        devices = [str(lane.device) for lane in lanes]
        if len(set(devices)) != len(devices):
            raise ValueError(f"each lane needs its own device, got {devices}")
        self.lanes = tuple(lanes)
        self.runner = runner if runner is not None and len(lanes) > 1 else run_in_turn

    @classmethod
    def single(cls, denoise: Callable, decode: Callable | None = None, loss: Callable | None = None,
               device: torch.device | None = None) -> "Lanes":
        """One lane that computes everything in the calling thread (``device`` None: on the canvas's device)."""
        return cls([Lane(device, denoise, decode, loss)])

    def __len__(self) -> int:
        return len(self.lanes)

    def __getitem__(self, k: int) -> Lane:
        return self.lanes[k]

    def map(self, items: Sequence, fn: Callable[[int, Sequence], object]) -> list:
        """``[fn(k, part_k) ...]`` for each lane ``k`` with a non-empty contiguous part of ``items``, run by the
        runner; the parts, in order, are ``items``."""
        tasks = []
        for k, part in enumerate(shares(len(items), len(self.lanes))):
            chunk = items[part.start:part.stop]
            tasks.append((self.lanes[k], lambda k=k, chunk=chunk: fn(k, chunk)))
        return self.runner(tasks)
