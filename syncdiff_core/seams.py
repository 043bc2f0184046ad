"""The left/right seam of a 360° image: how visible it is, and the band around it that a repair redoes.

Plain torch. Images are (B, H, W, C) (ComfyUI's IMAGE); widths and bands are in pixels.
"""
from __future__ import annotations

import torch

#: Columns on each side of the border whose neighbour differences set the scale of "a normal step".
SEAM_CONTEXT = 8


def seam_score(image: torch.Tensor, context: int = SEAM_CONTEXT) -> torch.Tensor:
    """How much larger the jump across the left/right border is than the jumps between neighbouring columns next
    to it: mean |last column − first column| over the mean |column c+1 − column c| of the ``context`` column pairs
    on each side of the border. About 1 for an image that continues across the border (a seamless 360°
    panorama); much larger for a hard seam. One value per image: (B,)."""
    if image.ndim != 4:
        raise ValueError(f"image must be an IMAGE (batch, height, width, channels), got shape {tuple(image.shape)}")
    width = image.shape[2]
    if width < 2 * context + 2:
        raise ValueError(f"image must be at least {2 * context + 2} px wide to measure its seam, got {width} px")
    x = image.float()
    jump = (x[:, :, -1] - x[:, :, 0]).abs().mean(dim=(1, 2))
    steps = torch.cat([x[:, :, 1:context + 1] - x[:, :, :context], x[:, :, -context:] - x[:, :, -context - 1:-1]],
                      dim=2)
    return jump / steps.abs().mean(dim=(1, 2, 3)).clamp_min(1e-6)


def band_weights(width: int, band: int, feather: int, centre: float | None = None) -> torch.Tensor:
    """Per-column weights (width,) of a band centred on the boundary ``centre`` (default ``width / 2``; a column
    boundary, so ``centre`` columns lie left of it): 1 over ``band`` columns, falling linearly to 0 over ``feather``
    columns on each side, 0 elsewhere (exactly 0: those columns are kept as they are)."""
    if band < 1:
        raise ValueError(f"band_width must be at least 1 px, got {band}")
    if feather < 0:
        raise ValueError(f"feather must be >= 0 px, got {feather}")
    if band + 2 * feather > width:
        raise ValueError(f"band_width ({band} px) plus twice the feather ({feather} px) must fit in the image's "
                         f"width ({width} px); lower band_width or feather")
    offset = torch.arange(width, dtype=torch.float64) + 0.5 - (width / 2 if centre is None else centre)
    distance = offset.abs() - band / 2  # <= 0 inside the band
    weights = (1 - distance / feather).clamp(0, 1) if feather else (distance <= 0).double()
    return weights.float()
