"""Seam repair of an existing 360° image: its left/right border rolled into the middle, a band around it redone
by the windowed sampler (a latent noise mask limits it, with a soft edge), composited back, rolled home."""
from __future__ import annotations

import torch

from ..job import PanoramaJob, plan_canvas
from ..seams import band_weights
from .decode import decode_panorama_image, encode_panorama_image
from .families import facts as family_facts, vae_scale
from .sampling import sample_panorama


def repair_seam(model, positive, negative, vae, image: torch.Tensor, job: PanoramaJob, band_px: int,
                feather_px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image with its seam band redone, and the band's weights as a MASK (B, H, W) in the image's frame.
    Pixels outside the band (weight 0) are returned unchanged, bit for bit."""
    # 1. every rule before any model work: sizes in pixels, the band, the windows over the canvas
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise ValueError(f"image must be an RGB IMAGE (batch, height, width, 3), got shape {tuple(image.shape)}")
    image = image[..., :3]
    batch, height, width, _ = image.shape
    scale = vae_scale(vae)
    if width % scale or height % scale:
        raise ValueError(f"image: its size ({width}x{height} px) must be a multiple of the VAE's {scale} px per "
                         f"latent pixel in both directions; crop or resize it first")
    shift = width // 2 // scale * scale  # the seam moves to this column boundary, a whole latent px
    weights = band_weights(width, band_px, feather_px, centre=shift)
    facts = family_facts(model, vae)
    # the windows over the canvas, before the encode (the sampler's own run plan checks the rest)
    plan_canvas(job, height // scale, width // scale, facts.pixel_scale, facts.native_latent, facts.default_stride_px)

    # 2. the seam in the middle, encoded with circular context; the band redone
    rolled = torch.roll(image, shift, dims=2)
    mask = weights.reshape(1, 1, width).expand(1, height, width)
    latent = {"samples": encode_panorama_image(vae, rolled, wrap=True), "noise_mask": mask}
    samples = sample_panorama(model, positive, negative, latent, job, vae=vae)["samples"]
    decoded = decode_panorama_image(vae, samples, wrap=True).to(rolled)

    # 3. composited back in pixels (outside the band: the input itself), rolled home
    w = weights.to(rolled).reshape(1, 1, width, 1)
    blended = torch.where(w > 0, rolled * (1 - w) + decoded * w, rolled)
    return torch.roll(blended, -shift, dims=2), torch.roll(mask, -shift, dims=2).expand(batch, -1, -1).clone()
