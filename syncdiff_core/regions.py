"""Layout-guided generation (MultiDiffusion's region-based mode): masks, background, bootstrapping.

Each region is a prompt with a mask over the canvas. Per window, the regions' x0 predictions are fused with
the masks as weights; the background prompt takes whatever the foreground masks leave uncovered
(``1 - Σ m_fg``, clipped at 0). Because the DDIM step is linear in x0 and the per-pixel weight Σ_r m_r is the
same in every window covering a pixel, fusing x0 inside each window and then averaging the windows equals
MultiDiffusion's ``value += Σ_r m_r x_r; count += Σ_r m_r`` exactly for binary masks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("syncdiffusion")

REGION_KEY = "syncdiffusion_region"


@dataclass(frozen=True)
class RegionSpec:
    """What a LayoutMaskRegion node attaches to its conditioning: bootstrapping and mask handling."""

    bootstrap_fraction: float = 0.2
    soft: bool = False

    def __post_init__(self):
        if not 0.0 <= self.bootstrap_fraction <= 1.0:  # NaN fails too
            raise ValueError(f"bootstrap_fraction must be in [0, 1], got {self.bootstrap_fraction}")

    def bootstrap_steps(self, steps: int) -> int:
        return int(round(self.bootstrap_fraction * steps))


def as_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A MASK as (batch, height, width) (a single (height, width) mask gets a batch of 1), or a clear error."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3 or mask.shape[-1] < 1 or mask.shape[-2] < 1:
        raise ValueError(f"{name} must be a MASK of shape (batch, height, width), got {tuple(mask.shape)}")
    return mask


def mask_to_canvas(mask: torch.Tensor, height: int, width: int, soft: bool, name: str = "mask") -> torch.Tensor:
    """A MASK of any size → (B, height, width) at latent resolution, binarized at 0.5 unless ``soft``."""
    mask = as_mask(mask, name)
    mh, mw = mask.shape[-2:]
    if abs(mw / mh - width / height) > 0.01 * (width / height):
        log.warning("SyncDiffusion: %s is %dx%d but the canvas is %dx%d (latent px): its aspect ratio differs, "
                    "so it is stretched to the canvas", name, mw, mh, width, height)
    m = torch.nn.functional.interpolate(mask.float().unsqueeze(1), size=(height, width), mode="bilinear",
                                        align_corners=False).squeeze(1)
    return m.clamp(0, 1) if soft else (m >= 0.5).float()


def layout_masks(fg_masks: list[torch.Tensor], batch: int, has_background: bool) -> tuple[list[int], torch.Tensor]:
    """Check the foreground masks (already at canvas size) and derive the background's.

    Returns the indices of the regions to keep (an empty mask is dropped with a warning) and the background
    mask ``clip(1 - Σ m_fg, 0)``. Without a background every pixel must be covered by some region.
    """
    keep = []
    for i, m in enumerate(fg_masks):
        if m.shape[0] not in (1, batch):
            raise ValueError(f"region {i + 1}'s mask has a batch of {m.shape[0]}; it must be 1 or the latent "
                             f"batch ({batch})")
        if float(m.max()) <= 0:
            log.warning("SyncDiffusion: region %d has an empty mask (nothing selected at the canvas' "
                        "resolution); the region is ignored", i + 1)
            continue
        keep.append(i)
    if not keep:
        total = torch.zeros_like(fg_masks[0][:1]) if fg_masks else None
    else:
        total = sum(fg_masks[i].expand(batch, -1, -1) if fg_masks[i].shape[0] == 1 else fg_masks[i] for i in keep)
    background = (1 - total).clamp_min(0) if total is not None else None
    if not has_background and total is not None and bool((total <= 0).any()):
        uncovered = int((total <= 0).sum())
        raise ValueError(f"the region masks leave {uncovered} latent pixels with no prompt and there is no "
                         "background prompt: add an unmasked prompt to the positive conditioning (it becomes the "
                         "background), or make the masks cover the whole canvas")
    return keep, background


def bootstrap_input(x: torch.Tensor, mask: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """A foreground region's input during bootstrapping: its own latent inside the mask, a noised flat-colour
    latent outside it (so the object fits its mask tightly)."""
    return x * mask + background * (1 - mask)


def flat_colour_images(count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` images of one random colour each, (count, height, width, 3) in [0, 1] (ComfyUI's IMAGE)."""
    colours = torch.rand(count, 1, 1, 3, generator=generator)
    return colours.expand(count, height, width, 3).contiguous()
