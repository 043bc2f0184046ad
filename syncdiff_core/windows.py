"""Window planning over a panorama latent, and crop / paste with horizontal wrap-around.

All sizes here are in latent pixels. A window is a rectangle of the canvas; under ``wrap`` its columns
continue past the right border onto the left one, so a window may straddle the seam of a 360° panorama.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    """One view of the canvas: rows ``top:top+height``, columns ``left:left+width`` (mod ``canvas_width``)."""

    top: int
    left: int
    height: int
    width: int
    canvas_width: int

    @property
    def wraps(self) -> bool:
        return self.left + self.width > self.canvas_width

    def columns(self, device=None) -> torch.Tensor:
        """Canvas column index of each of the window's columns (wrap-aware)."""
        return (torch.arange(self.width, device=device) + self.left) % self.canvas_width

    def column_ranges(self) -> list[tuple[int, int, int]]:
        """The window's columns as contiguous canvas pieces: ``(canvas_start, canvas_stop, window_start)``."""
        first = min(self.width, self.canvas_width - self.left)
        pieces = [(self.left, self.left + first, 0)]
        if first < self.width:
            pieces.append((0, self.width - first, first))
        return pieces


@dataclass(frozen=True)
class WindowPlan:
    canvas_height: int
    canvas_width: int
    window_height: int
    window_width: int
    stride: int
    wrap: bool
    windows: tuple[Window, ...]

    def __len__(self) -> int:
        return len(self.windows)

    def __iter__(self):
        return iter(self.windows)

    def __getitem__(self, i: int) -> Window:
        return self.windows[i]

    @property
    def center_index(self) -> int:
        """The reference code's anchor: the middle view of the raster order (``len(views) // 2``)."""
        return len(self.windows) // 2


def _positions(length: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis without wrap: every ``stride``, plus one flush with the far edge.

    Where ``length - window`` is a multiple of ``stride`` this is exactly the reference grid; otherwise the
    reference leaves a margin uncovered, and we add a last window ending at the border instead.
    """
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def plan_windows(
    canvas_height: int,
    canvas_width: int,
    window: int | tuple[int, int],
    stride: int,
    wrap: bool = False,
) -> WindowPlan:
    """Plan square (or rectangular) windows over a latent canvas, in raster order (row by row).

    ``wrap`` closes the loop horizontally: window starts run every ``stride`` over the whole width, so every
    column is covered as often as an interior column is, and the canvas width must be a multiple of the stride.
    """
    wh, ww = (window, window) if isinstance(window, int) else window
    if wh <= 0 or ww <= 0:
        raise ValueError(f"window size must be positive, got {wh}x{ww} latent px")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride} latent px")
    if stride > min(wh, ww):
        raise ValueError(
            f"stride ({stride} latent px) must not exceed the window size ({min(wh, ww)} latent px): "
            "windows would leave gaps"
        )
    if canvas_height < wh or canvas_width < ww:
        raise ValueError(
            f"the latent ({canvas_height}x{canvas_width} latent px) is smaller than one window "
            f"({wh}x{ww} latent px); make the image at least {wh * 8}x{ww * 8} px or lower window_size"
        )
    rows = _positions(canvas_height, wh, stride)
    if wrap:
        if canvas_width < 2 * ww:
            raise ValueError(
                f"wrap needs a canvas at least two windows wide: width {canvas_width * 8} px < 2 x {ww * 8} px"
            )
        if canvas_width % stride:
            raise ValueError(
                f"under wrap the stride must divide the canvas width: {canvas_width * 8} px is not a multiple "
                f"of stride {stride * 8} px"
            )
        cols = list(range(0, canvas_width, stride))
    else:
        cols = _positions(canvas_width, ww, stride)
    windows = tuple(Window(t, l, wh, ww, canvas_width) for t in rows for l in cols)
    return WindowPlan(canvas_height, canvas_width, wh, ww, stride, wrap, windows)


def crop(x: torch.Tensor, win: Window) -> torch.Tensor:
    """The window's part of a canvas-shaped tensor ``(..., H, W)``; wraps around in width."""
    rows = x[..., win.top : win.top + win.height, :]
    if not win.wraps:
        return rows[..., win.left : win.left + win.width]
    return torch.cat([rows[..., a:b] for a, b, _ in win.column_ranges()], dim=-1)


def paste_add(canvas: torch.Tensor, win: Window, values: torch.Tensor) -> None:
    """``canvas[window] += values`` in place, wrap-aware."""
    rows = canvas[..., win.top : win.top + win.height, :]
    for a, b, s in win.column_ranges():
        rows[..., a:b] += values[..., s : s + (b - a)]


def crop_many(x: torch.Tensor, windows) -> torch.Tensor:
    """Stack the crops of ``x`` (N, C, H, W) for several windows, window-major: (len(windows) * N, C, h, w)."""
    return torch.cat([crop(x, w) for w in windows], dim=0)
