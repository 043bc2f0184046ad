"""The seam-free panorama decode through ComfyUI's public ``VAE.decode`` (see ``panorama_decode``)."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils

from ..job import check_canvas_pixels
from ..panorama_decode import decode_panorama, encode_panorama, plan_tiles, tiles_from_pixels
from .families import vae_scale


def decode_panorama_image(vae, samples: torch.Tensor, *, wrap: bool = True, padding: int = 16,
                          tile_width_px: int = 0, tile_overlap_px: int = 0) -> torch.Tensor:
    """Decode a LATENT's ``samples`` (B, C, H, W) to an IMAGE (B, H·s, W·s, 3) in [0, 1], s = the VAE's scale.

    ``wrap``: circular context in width so the left and right edges meet (360° panoramas). ``padding``: latent px
    of that context on each side (of the canvas, or of each tile). ``tile_width_px`` (0 = whole canvas at once) and
    ``tile_overlap_px`` are in pixels; they are rounded to whole latent px (the width down, the overlap up).
    Every input is checked before anything is decoded.
    """
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    if getattr(samples, "is_nested", False):
        raise ValueError("PanoramaDecode does not support nested latents (several images in one latent)")
    if samples.ndim not in (4, 5):
        raise ValueError(f"PanoramaDecode needs an image latent (batch, channels, height, width), got shape "
                         f"{tuple(samples.shape)}")
    scale = vae_scale(vae)
    tile, overlap = tiles_from_pixels(tile_width_px, tile_overlap_px, scale)
    tiles = plan_tiles(samples.shape[-1], tile, overlap, padding, wrap, px_per_unit=scale)
    images = samples.shape[0] * (samples.shape[2] if samples.ndim == 5 else 1)
    height, width = samples.shape[-2] * scale, samples.shape[-1] * scale
    check_canvas_pixels(width, height, images, "PanoramaDecode: the decoded image", ("batch", "width", "height"))
    widest = max(t.context_left + t.width + t.context_right for t in tiles) * scale
    check_canvas_pixels(widest, height, images, "PanoramaDecode: one decoded piece with its padding",
                        ("batch", "width", "height"))
    total = len(tiles)
    pbar = comfy.utils.ProgressBar(total)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z)  # (B, H, W, C) or (B, T, H, W, C) in [0, 1] on ComfyUI's intermediate device

    with torch.no_grad():
        image = decode_panorama(
            decode, samples, scale, wrap=wrap, padding=padding, tile_width=tile, tile_overlap=overlap,
            width_dim=-2, progress=lambda done, n: pbar.update_absolute(done, n),
            interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
        )
    if image.ndim == 5:  # video VAEs: frames become images, as ComfyUI's VAEDecode does
        image = image.reshape(-1, *image.shape[-3:])
    return image.clamp(0.0, 1.0)


def encode_panorama_image(vae, image: torch.Tensor, *, wrap: bool = True, padding: int = 16) -> torch.Tensor:
    """Encode an IMAGE (B, H, W, C) into the VAE's latent; under ``wrap`` with ``padding`` latent px of circular
    context on each side, so the latent of a 360° image continues across its left/right border."""
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    if image.ndim != 4:
        raise ValueError(f"pixels must be an IMAGE (batch, height, width, channels), got shape {tuple(image.shape)}")
    scale = int(vae.spacial_compression_encode()) if hasattr(vae, "spacial_compression_encode") else \
        vae_scale(vae)
    width_px = image.shape[2] + (2 * padding * scale if wrap else 0)
    check_canvas_pixels(width_px, image.shape[1], image.shape[0], "pixels (with the circular padding)",
                        ("batch", "width", "height"))
    if image.shape[1] % scale:
        raise ValueError(f"pixels: the image's height ({image.shape[1]} px) must be a multiple of the VAE's {scale} px "
                         "per latent pixel")
    with torch.no_grad():
        return encode_panorama(lambda x: vae.encode(x[..., :3]), image, scale, wrap=wrap, padding=padding,
                               width_dim=-2)
