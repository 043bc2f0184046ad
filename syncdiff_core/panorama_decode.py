"""Seam-free decoding (and encoding) of 360° panorama latents, in plain torch (no ComfyUI here).

A wrap panorama's latent is periodic in width: column ``W`` is column ``0``. A VAE decoder does not know that:
its convolutions pad the borders with zeros, so the left and right edges of the image are decoded without
their true neighbours and do not meet. Decoding a latent that is circularly padded in width (the right end
glued before the left border, the left start after the right border) and cropping the decoded image back
gives the border columns the context they have in the loop.

Wide canvases can be decoded in tiles along the width. Each tile is decoded from its latent columns plus
``padding`` columns of context on each side (taken around the seam under wrap), the context is cropped off,
and neighbouring tiles are blended across ``overlap`` with linear ramps that sum to one, so tile borders leave
no seams and only one tile is in the decoder at a time. Under wrap the tiles are spaced evenly around the
circle and the last one straddles the seam.

Encoding is the mirror image: the picture is padded circularly before the encoder and the padding is cropped off
the latent (``encode_panorama``).

Everything here is written against a ``decode(latent) -> image`` (or ``encode``) callable. Latents are
``(..., W)`` (the width is the last axis, as in ComfyUI's LATENT); the image's width axis is ``width_dim``
(``-1`` for (B, C, H, W), ``-2`` for ComfyUI's channel-last IMAGE). Sizes of latents are in latent px; ``scale``
is the decoder's spatial factor (8 for SD).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

DEFAULT_PADDING = 16
"""Latent px of circular context on each side; see docs/panorama.md for the measurement behind it."""


def wrap_columns(width: int, start: int, stop: int, device=None) -> torch.Tensor:
    """Canvas column indices ``start, start+1, …, stop-1`` taken modulo ``width`` (may run past either border)."""
    return torch.arange(start, stop, device=device) % width


def circular_pad_width(z: torch.Tensor, pad: int) -> torch.Tensor:
    """``z`` (..., W) with ``pad`` columns of its own right end before column 0 and of its left start after
    column W-1; ``pad`` may exceed ``W`` (the loop then repeats)."""
    if pad < 0:
        raise ValueError(f"padding must be >= 0, got {pad}")
    if pad == 0:
        return z
    width = z.shape[-1]
    return z.index_select(-1, wrap_columns(width, -pad, width + pad, z.device))


def crop_width(image: torch.Tensor, start: int, length: int, width_dim: int = -1) -> torch.Tensor:
    """The columns ``start:start+length`` of ``image`` along ``width_dim``."""
    return image.narrow(width_dim, start, length)


@dataclass(frozen=True)
class Tile:
    """A tile of the canvas: latent columns ``start:start+width`` (mod the canvas width under wrap), decoded with
    ``context_left`` / ``context_right`` extra columns, blended with ramps on the sides that have a neighbour."""

    start: int
    width: int
    context_left: int
    context_right: int
    ramp_left: bool
    ramp_right: bool


def plan_tiles(
    width: int, tile_width: int = 0, tile_overlap: int = 0, padding: int = 0, wrap: bool = True,
    px_per_unit: int = 1,
) -> list[Tile]:
    """Tiles covering a latent canvas ``width`` columns wide (all sizes in latent px).

    ``tile_width`` 0 (or at least the canvas width) means one tile: the whole canvas, with ``padding`` columns of
    circular context under wrap (none without wrap: there is nothing beyond the borders). Otherwise tiles of
    ``tile_width`` columns overlap their neighbours by at least ``tile_overlap`` columns; without wrap the first and
    last tiles are flush with the borders, under wrap the tiles are spread evenly around the loop.
    ``px_per_unit``: pixels per latent px; error messages give tile sizes in pixels when it is above 1.
    """
    size = (lambda v: f"{v * px_per_unit} px") if px_per_unit > 1 else (lambda v: f"{v} latent px")  # noqa: E731
    if width < 1:
        raise ValueError(f"the latent must be at least 1 column wide, got {width}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0 latent px, got {padding}")
    if tile_width < 0:
        raise ValueError(f"tile_width must be >= 0 (0 = no tiling), got {size(tile_width)}")
    if tile_overlap < 0:
        raise ValueError(f"tile_overlap must be >= 0, got {size(tile_overlap)}")
    if tile_width == 0 or tile_width >= width:
        pad = padding if wrap else 0
        return [Tile(0, width, pad, pad, False, False)]
    if tile_overlap >= tile_width:
        rounded = f" (both rounded to whole latent px of {px_per_unit} px)" if px_per_unit > 1 else ""
        raise ValueError(f"tile_overlap ({size(tile_overlap)}) must be smaller than tile_width "
                         f"({size(tile_width)}){rounded}; tiles would not advance")
    step = tile_width - tile_overlap
    if wrap:
        count = max(2, math.ceil(width / step))
        starts = [round(i * width / count) for i in range(count)]
        return [Tile(s, tile_width, padding, padding, True, True) for s in starts]
    count = math.ceil((width - tile_overlap) / step)
    starts = [round(i * (width - tile_width) / (count - 1)) for i in range(count)]
    tiles = []
    for i, s in enumerate(starts):
        left = min(padding, s)
        right = min(padding, width - s - tile_width)
        tiles.append(Tile(s, tile_width, left, right, i > 0, i < count - 1))
    return tiles


def tiles_from_pixels(tile_width_px: int, tile_overlap_px: int, scale: int) -> tuple[int, int]:
    """Tile width and overlap typed in pixels, in whole latent px of a decoder with ``scale`` pixels per latent px:
    the width rounded down, the overlap up (0, 0 without tiling)."""
    if tile_width_px <= 0:
        return 0, 0
    tile, overlap = tile_width_px // scale, -(-tile_overlap_px // scale)
    if tile == 0:
        raise ValueError(f"tile_width ({tile_width_px} px) is smaller than one latent pixel of this VAE "
                         f"({scale} px); use 0 for no tiling or at least {scale * 2} px")
    return tile, overlap


def encode_panorama(
    encode: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scale: int,
    *,
    wrap: bool = True,
    padding: int = DEFAULT_PADDING,
    width_dim: int = -2,
) -> torch.Tensor:
    """Encode an image whose width (along ``width_dim``; -2 for ComfyUI's IMAGE) is a multiple of ``scale`` into a
    latent ``width / scale`` columns wide; under ``wrap`` the image is padded circularly by ``padding`` latent px
    (``padding * scale`` pixels) on each side first, so the border columns are encoded with their true neighbours
    around the loop, and the padding is cropped off the latent. ``encode(image) -> latent (..., W)``."""
    width = image.shape[width_dim]
    if width % scale:
        raise ValueError(f"image: its width ({width} px) must be a multiple of the VAE's {scale} px per latent pixel")
    pad = padding * scale if wrap else 0
    if pad:
        dim = width_dim % image.ndim
        image = image.index_select(dim, wrap_columns(width, -pad, width + pad, image.device))
    latent = encode(image)
    if latent.shape[-1] != width // scale + 2 * (pad // scale):
        raise ValueError(f"the encoder turned {width + 2 * pad} pixel columns into {latent.shape[-1]} latent columns, "
                         f"not {(width + 2 * pad) // scale}: wrong scale factor ({scale})")
    return latent[..., pad // scale: pad // scale + width // scale]


def _ramp_weights(tile: Tile, ramp: int, scale: int) -> torch.Tensor:
    """Per-pixel-column blending weight of a tile: linear ramps of ``ramp`` latent px on its shared sides.

    The ramp values ``(i + 0.5) / n`` of one tile and ``1 - (i + 0.5) / n`` of its neighbour sum to exactly one where
    two tiles overlap by ``ramp``; where they overlap more, the sum is normalised away by the accumulator.
    """
    n = tile.width * scale
    w = torch.ones(n, dtype=torch.float64)
    r = min(ramp * scale, n)
    if r > 0:
        up = (torch.arange(r, dtype=torch.float64) + 0.5) / r
        if tile.ramp_left:
            w[:r] = torch.minimum(w[:r], up)
        if tile.ramp_right:
            w[n - r:] = torch.minimum(w[n - r:], up.flip(0))
    return w


def decode_panorama(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    scale: int,
    *,
    wrap: bool = True,
    padding: int = DEFAULT_PADDING,
    tile_width: int = 0,
    tile_overlap: int = 0,
    width_dim: int = -1,
    progress: Callable[[int, int], None] | None = None,
    interrupt: Callable[[], None] = lambda: None,
) -> torch.Tensor:
    """Decode the latent ``z`` (..., H, W) into an image ``W * scale`` pixels wide, seam-free under ``wrap``.

    ``padding``, ``tile_width`` and ``tile_overlap`` are in latent px. ``decode`` gets latents of the same leading
    shape as ``z`` and at most ``tile_width + 2 * padding`` columns wide, one at a time; the result is assembled in
    float32 on the device of the first decoded tile. ``progress(done, total)`` is called after each tile and
    ``interrupt()`` before each (it should raise to stop).
    """
    if scale < 1:
        raise ValueError(f"the decoder's scale factor must be >= 1, got {scale}")
    width = z.shape[-1]
    tiles = plan_tiles(width, tile_width, tile_overlap, padding, wrap)
    out = total = None
    for k, tile in enumerate(tiles):
        interrupt()
        cols = wrap_columns(width, tile.start - tile.context_left, tile.start + tile.width + tile.context_right,
                            z.device)
        image = decode(z.index_select(-1, cols))
        dim = width_dim % image.ndim
        expected = cols.numel() * scale
        if image.shape[dim] != expected:
            raise ValueError(
                f"the decoder turned {cols.numel()} latent columns into {image.shape[dim]} pixel columns along "
                f"axis {width_dim}, not {expected}: wrong scale factor ({scale}) or width axis")
        part = crop_width(image, tile.context_left * scale, tile.width * scale, dim).float()
        if len(tiles) == 1:  # the whole canvas: nothing to blend
            if progress is not None:
                progress(1, 1)
            return part
        if out is None:
            shape = list(part.shape)
            shape[dim] = width * scale
            out = torch.zeros(shape, dtype=torch.float32, device=part.device)
            total = torch.zeros(width * scale, dtype=torch.float64)
        weight = _ramp_weights(tile, tile_overlap, scale)
        pixel_cols = wrap_columns(width * scale, tile.start * scale, (tile.start + tile.width) * scale)
        view = [1] * part.ndim
        view[dim] = -1
        out.index_add_(dim, pixel_cols.to(out.device), part * weight.to(part).reshape(view))
        total.index_add_(0, pixel_cols, weight)
        if progress is not None:
            progress(k + 1, len(tiles))
    view = [1] * out.ndim
    view[dim] = -1
    return out / total.to(out).reshape(view)
