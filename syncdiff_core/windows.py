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

    def scaled(self, s: int) -> "Window":
        """The same window on a canvas ``s`` times finer (e.g. in pixels instead of latent px)."""
        return Window(self.top * s, self.left * s, self.height * s, self.width * s, self.canvas_width * s)

    def area_pieces(self, area) -> list[tuple[int, int, int, int]]:
        """A 2-D conditioning area ``(h, w, y, x)`` in canvas units intersected with the window: the pieces in
        window coordinates, as ``(h, w, y, x)``; none when the area misses the window. An area that runs across
        the wrap seam inside the window stays one piece."""
        if len(area) != 4:
            raise ValueError(f"SyncDiffusion supports 2-D conditioning areas only, got area {tuple(area)}")
        h, w, y, x = area
        top, bottom = max(y, self.top), min(y + h, self.top + self.height)
        if bottom <= top:
            return []
        found = []
        for a, b, s in self.column_ranges():
            left, right = max(x, a), min(x + w, b)
            if right > left:
                piece = (bottom - top, right - left, top - self.top, left - a + s)
                if found and found[-1][3] + found[-1][1] == piece[3]:  # contiguous across the seam: one area
                    piece = (piece[0], found[-1][1] + piece[1], piece[2], found[-1][3])
                    found.pop()
                found.append(piece)
        return found


@dataclass(frozen=True)
class WindowPlan:
    canvas_height: int
    canvas_width: int
    window_height: int
    window_width: int
    stride: int
    wrap: bool
    windows: tuple[Window, ...]
    px_per_unit: int = 1  # pixels per latent px, for messages in the user's units

    def describe(self, window: Window) -> str:
        """Where ``window`` is, in pixels when the plan knows the pixel scale (for messages)."""
        unit = "px" if self.px_per_unit > 1 else "latent px"
        return f"top {window.top * self.px_per_unit}, left {window.left * self.px_per_unit} {unit}"

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
    px_per_unit: int = 1,
) -> WindowPlan:
    """Plan square (or rectangular) windows over a latent canvas, in raster order (row by row).

    ``wrap`` closes the loop horizontally: window starts run every ``stride`` over the whole width, so every
    column is covered as often as an interior column is, and the canvas width must be a multiple of the stride.
    ``px_per_unit``: pixels per latent px; error messages give sizes in pixels when it is above 1 (the units of
    the widgets the user typed), in latent px otherwise.
    """
    size = (lambda v: f"{v * px_per_unit} px") if px_per_unit > 1 else (lambda v: f"{v} latent px")  # noqa: E731
    wh, ww = (window, window) if isinstance(window, int) else window
    if wh <= 0 or ww <= 0:
        raise ValueError(f"window size must be positive, got {size(wh)} x {size(ww)}")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {size(stride)}")
    if stride > min(wh, ww):
        raise ValueError(
            f"stride ({size(stride)}) must not exceed the window size ({size(min(wh, ww))}): windows would "
            "leave gaps; lower stride or raise window_size"
        )
    if canvas_height < wh or canvas_width < ww:
        raise ValueError(
            f"the canvas ({size(canvas_width)} wide, {size(canvas_height)} tall) is smaller than one window "
            f"({size(ww)} x {size(wh)}); make the image at least that large or lower window_size"
        )
    rows = _positions(canvas_height, wh, stride)
    if wrap:
        if canvas_width < 2 * ww:
            raise ValueError(
                f"wrap needs a canvas at least two windows wide: width {size(canvas_width)} < 2 x {size(ww)}"
            )
        if canvas_width % stride:
            raise ValueError(
                f"under wrap the stride must divide the canvas width: {size(canvas_width)} is not a multiple "
                f"of stride {size(stride)}"
            )
        cols = list(range(0, canvas_width, stride))
    else:
        cols = _positions(canvas_width, ww, stride)
    windows = tuple(Window(t, l, wh, ww, canvas_width) for t in rows for l in cols)
    return WindowPlan(canvas_height, canvas_width, wh, ww, stride, wrap, windows, px_per_unit)


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


def crop_stack(t: torch.Tensor, windows, n: int) -> torch.Tensor:
    """Crops of a canvas-shaped tensor (B, ..., H, W) for each window, window-major, each window's batch made
    ``n`` long (a batch of 1 is expanded): (len(windows) * n, ..., h, w)."""
    parts = []
    for w in windows:
        part = crop(t, w)
        if part.shape[0] != n:
            part = part[:1].expand(n, *part.shape[1:]) if part.shape[0] == 1 else part[:n]
        parts.append(part)
    return torch.cat(parts)
