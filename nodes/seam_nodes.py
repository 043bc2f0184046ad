"""Seams of 360° images: how visible the left/right border is, and repairing it."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from .inputs import expect
from ..syncdiff_core.job import MAX_PX, MAX_WINDOW_BATCH, PanoramaJob
from ..syncdiff_core.seams import SEAM_CONTEXT, seam_score
from ..syncdiff_core.sync import NO_SYNC
from .common import CATEGORY


class PanoramaSeamScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PanoramaSeamScore",
            display_name="Panorama Seam Score",
            category=CATEGORY,
            description="How visible the left/right seam of a 360° image is: the jump across the border over the "
                        f"typical jump between neighbouring columns next to it ({SEAM_CONTEXT} on each side). About 1 "
                        "for a seamless panorama; a hard seam scores several times more.",
            inputs=[io.Image.Input("image", tooltip="The panorama (a batch is scored image by image).")],
            outputs=[
                io.Float.Output(display_name="seam_score", tooltip="The batch's mean score; ~1 = seamless."),
                io.String.Output(display_name="summary", tooltip="The score of each image."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image: torch.Tensor) -> io.NodeOutput:
        expect(image=(image, "IMAGE"))
        scores = seam_score(image)
        summary = "seam score " + ", ".join(f"{float(s):.2f}" for s in scores) + " (about 1 = seamless)"
        return io.NodeOutput(float(scores.mean()), summary, ui=ui.PreviewText(summary))


class PanoramaSeamRepair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PanoramaSeamRepair",
            display_name="Panorama Seam Repair (360°)",
            category=CATEGORY,
            description="Makes the left and right edges of a 360° image meet (e.g. one made by a 360° LoRA): the "
                        "image is rolled so its seam is in the middle, a band around it is redone by the windowed "
                        "sampler (MultiDiffusion) from the image partially noised, blended in with soft edges, and "
                        "rolled back. Pixels outside the band are left exactly as they were.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model."),
                io.Conditioning.Input("positive", tooltip="What the image shows."),
                io.Conditioning.Input("negative", tooltip="What to avoid."),
                io.Vae.Input("vae", tooltip="Encodes the image and decodes the repaired band (circularly)."),
                io.Image.Input("image", tooltip="The equirectangular or cylindrical 360° image; width and height "
                                                "multiples of the VAE's scale (8 px for SD-family VAEs)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="DDIM steps of the redone band."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Float.Input("denoise", default=0.7, min=0.01, max=1.0, step=0.01,
                               tooltip="How much of the band is redone: low keeps more of the image, high joins "
                                       "hard seams better."),
                io.Int.Input("band_width", default=256, min=8, max=MAX_PX, step=8,
                             tooltip="Pixels around the seam that are fully redone."),
                io.Int.Input("feather", default=64, min=0, max=MAX_PX, step=8,
                             tooltip="Pixels on each side of the band over which the repair fades into the image."),
                io.Int.Input("window_size", default=0, min=0, max=MAX_PX, step=8,
                             tooltip="Window side in pixels; 0 = the model's native size."),
                io.Int.Input("stride", default=0, min=0, max=MAX_PX, step=8,
                             tooltip="Distance between neighbouring windows in pixels, at most the window size; 0 = "
                                     "the model's default (a quarter of its window)."),
                io.Int.Input("window_batch", default=8, min=1, max=MAX_WINDOW_BATCH,
                             tooltip="Windows sent through the model together; lower it if memory runs short."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The image with its seam repaired."),
                io.Mask.Output(display_name="band", tooltip="Where the image changed (1 = redone, 0 = untouched)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, image, seed, steps, cfg, denoise, band_width, feather,
                window_size, stride, window_batch) -> io.NodeOutput:
        from ..syncdiff_core.comfy.seam_repair import repair_seam

        expect(model=(model, "MODEL"), positive=(positive, "CONDITIONING"), negative=(negative, "CONDITIONING"),
               vae=(vae, "VAE"), image=(image, "IMAGE"))

        job = PanoramaJob(seed=seed, steps=steps, cfg=cfg, denoise=denoise, window_px=window_size, stride_px=stride,
                          window_batch=window_batch, sync=NO_SYNC)
        repaired, band = repair_seam(model, positive, negative, vae, image, job, band_width, feather)
        return io.NodeOutput(repaired, band)


NODES = [PanoramaSeamRepair, PanoramaSeamScore]
