"""Batches of windows whose size halves once when the device runs out of memory.

Plain torch, no ComfyUI: the caller says which exception types mean "out of memory" (the bridge passes
ComfyUI's ``OOM_EXCEPTION``) and what to call to release cached memory before the retry.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

log = logging.getLogger("syncdiffusion")


@dataclass(frozen=True)
class BatchPolicy:
    """How windows are grouped for the model, and what happens when the device runs out of memory.

    ``window_batch`` windows go through the model together in the plain pass, ``sync_batch`` (None: the same)
    in the gradient pass. An error of a type in ``oom_errors`` halves a pass's batch size once (``release()`` is
    called before the retry); a second one fails with a message naming the setting to lower (``sync_setting``
    for the gradient pass: the node's ``sync_batch`` when the user set it, else ``window_batch``) and ``advice``.
    """

    window_batch: int = 8
    sync_batch: int | None = None
    sync_setting: str = "window_batch"
    oom_errors: tuple = ()
    release: Callable[[], None] | None = None
    advice: str = ""

    def __post_init__(self):
        if self.window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {self.window_batch}")
        if self.sync_batch is not None and self.sync_batch < 1:
            raise ValueError(f"{self.sync_setting} must be >= 1, got {self.sync_batch}")

    def sizes(self, count: int) -> tuple["BatchSize", "BatchSize"]:
        """Fresh batch sizes for a run over ``count`` windows: (plain pass, gradient pass)."""
        kw = dict(oom_errors=self.oom_errors, release=self.release, advice=self.advice)
        plain = min(self.window_batch, count)
        grad = min(self.sync_batch or self.window_batch, count)
        return BatchSize(plain, "window_batch", **kw), BatchSize(grad, self.sync_setting, **kw)


class OutOfMemory(RuntimeError):
    """Raised (chained to the original error) when a batch ran out of memory after the one retry."""


class BatchSize:
    """How many windows go through the model together.

    :meth:`run` calls ``fn(group)`` on consecutive groups of at most ``size`` items. When a call raises one
    of ``oom_errors``, the size is halved (once per object, for the rest of the sampling), ``release()`` is
    called outside the ``except`` block (so the failed batch's tensors are gone), a warning is logged, and the
    same group is retried in smaller pieces. A second out-of-memory error, or one at size 1, raises an error
    of the original type (so ComfyUI still recognises it) whose message names ``setting``.
    """

    def __init__(self, size: int, setting: str = "window_batch", oom_errors: Sequence[type] = (),
                 release: Callable[[], None] | None = None, advice: str = ""):
        if size < 1:
            raise ValueError(f"{setting} must be >= 1, got {size}")
        self.size = self.requested = int(size)
        self.setting = setting
        self.oom_errors = tuple(oom_errors)
        self.release = release
        self.advice = advice
        self.halved = False

    def run(self, items: Sequence, fn: Callable) -> Iterator[tuple[Sequence, object]]:
        """Yield ``(group, fn(group))`` for groups covering ``items`` in order.

        The groups are as many as ``size`` requires and as even as possible (21 windows at size 8: 7, 7, 7,
        not 8, 8, 5): the same number of model calls, fewer distinct batch shapes (one compiled graph each
        under torch.compile)."""
        start = 0
        while start < len(items):
            group = items[start:start + even_group_sizes(len(items) - start, self.size)[0]]
            outcome = None
            try:
                result = fn(group)
            except self.oom_errors as e:  # an empty tuple catches nothing
                outcome = self._give_up(e)
            if outcome is not None:  # outside the except block: the failed batch's frames are gone
                if isinstance(outcome, BaseException):
                    raise outcome
                if self.release is not None:
                    self.release()
                continue  # the same group again, in pieces of the halved size
            yield group, result
            start += len(group)

    def _give_up(self, error: BaseException):
        """An error to raise, or a :class:`_Retry` marker after halving the size."""
        if self.halved or self.size == 1:
            what = f"{self.setting}={self.size}" + (f" (halved from {self.requested})" if self.halved else "")
            if self.size > 1:
                fix = f"Lower {self.setting}" + (f", or {self.advice}" if self.advice else "")
            else:
                fix = "Even one window at a time does not fit" + (f": {self.advice}" if self.advice else "")
            msg = f"SyncDiffusion ran out of GPU memory with {what}. {fix}. Original error: {error}"
            try:
                out = type(error)(msg)
            except Exception:  # noqa: BLE001 - an exception type with an unusual constructor
                out = OutOfMemory(msg)
            out.__cause__ = error
            return out
        old = self.size
        self.size = max(1, self.size // 2)
        self.halved = True
        log.warning("SyncDiffusion: out of GPU memory with %s=%d; retrying with %d (lower %s to avoid this)",
                    self.setting, old, self.size, self.setting)
        return _Retry()

    def __repr__(self) -> str:
        return f"BatchSize({self.size}, {self.setting!r}, halved={self.halved})"


def even_group_sizes(count: int, size: int) -> list[int]:
    """Sizes of the fewest groups of at most ``size`` covering ``count`` items, as even as possible,
    larger groups first: ``even_group_sizes(21, 8) == [7, 7, 7]``, ``even_group_sizes(7, 3) == [3, 2, 2]``."""
    if size < 1:
        raise ValueError(f"group size must be at least 1, got {size}")
    return even_split(count, -(-count // size))


def even_split(count: int, parts: int) -> list[int]:
    """Sizes of ``parts`` groups covering ``count`` items, as even as possible, larger groups first (some are 0
    when ``parts > count``): ``even_split(21, 2) == [11, 10]``, ``even_split(1, 2) == [1, 0]``."""
    if parts == 0:
        return []
    base, extra = divmod(count, parts)
    return [base + 1] * extra + [base] * (parts - extra)


class _Retry:
    """Marker returned by :meth:`BatchSize._give_up`: release memory, then retry."""
