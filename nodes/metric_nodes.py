"""PanoramaCoherence: the SyncDiffusion paper's coherence metrics of a panorama, inside the graph."""
from __future__ import annotations

from pathlib import Path

import torch
from comfy_api.latest import io, ui

from ..syncdiff_core import perceptual
from .common import CATEGORY


class PanoramaCoherence(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PanoramaCoherence",
            display_name="Panorama Coherence (Intra-LPIPS, Intra-Style-L)",
            category=CATEGORY,
            description=(
                "Measures how coherent a panorama is, as the SyncDiffusion paper does: the image is cut into "
                "non-overlapping window-size crops, and every pair of crops is compared. Lower is more coherent. "
                "Needs torchvision's VGG16 and VGG19 ImageNet files (vgg16-397923af.pth, vgg19-dcbb9e9d.pth) "
                "in models/lpips."
            ),
            inputs=[
                io.Image.Input(
                    "image",
                    tooltip="The panorama (decoded image). It must hold at least two non-overlapping "
                            "window_size crops. A batch is measured image by image and averaged.",
                ),
                io.Int.Input(
                    "window_size", default=512, min=16, max=8192, step=8,
                    tooltip="Crop size in pixels: the model's native size (512 for SD1.x/2.x, 1024 for SDXL). "
                            "Crops start at the top-left corner; a right or bottom remainder narrower than a "
                            "window is left out.",
                ),
            ],
            outputs=[
                io.Float.Output(display_name="intra_lpips",
                                tooltip="Mean LPIPS (VGG) over all pairs of crops; lower is more coherent."),
                io.Float.Output(display_name="intra_style_l",
                                tooltip="Mean Gram-matrix style loss (VGG19 relu1_1..relu5_1) over all pairs of "
                                        "crops; lower is more coherent."),
                io.String.Output(display_name="summary", tooltip="Both numbers, the crop count, and the files used."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image: torch.Tensor, window_size: int) -> io.NodeOutput:
        from ..syncdiff_core.comfy import assets

        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image: expected a ComfyUI IMAGE (batch, height, width, channels), got {shape}")
        _, height, width, channels = image.shape
        rows, cols = perceptual.crop_counts(height, width, window_size)  # before any network is loaded
        device = assets.perceptual_device()
        lpips_fn = assets.get_lpips(device)
        style_fn = assets.get_style_features(device)
        rgb = image[..., :3] if channels >= 3 else image.expand(-1, -1, -1, 3)
        x = rgb.movedim(-1, 1).to(device=device, dtype=torch.float32) * 2 - 1
        with torch.no_grad():
            lp = perceptual.intra_lpips(x, window_size, lpips_fn, chunk=4).cpu()
            st = perceptual.intra_style_l(x, window_size, style_fn, chunk=4).cpu()
        n_crops = rows * cols
        lines = [
            f"Intra-LPIPS {lp.mean():.4f}, Intra-Style-L {st.mean():.4g} (lower = more coherent)",
            f"{n_crops} crops of {window_size}x{window_size} px ({rows}x{cols}), {n_crops * (n_crops - 1) // 2} pairs"
            + (f", mean of {len(lp)} images" if len(lp) > 1 else ""),
        ]
        if len(lp) > 1:
            lines += [f"  image {i}: Intra-LPIPS {a:.4f}, Intra-Style-L {b:.4g}" for i, (a, b) in
                      enumerate(zip(lp.tolist(), st.tolist()))]
        lines.append(f"trunks: {Path(lpips_fn.source).name}, {Path(style_fn.source).name}")
        summary = "\n".join(lines)
        return io.NodeOutput(float(lp.mean()), float(st.mean()), summary, ui=ui.PreviewText(summary))


NODES = [PanoramaCoherence]
