"""360° panorama output: a seam-free circular VAE decode, and saving with the metadata 360° viewers read."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from .inputs import expect, expect_option
from ..syncdiff_core.job import MAX_PX
from ..syncdiff_core.panorama_decode import DEFAULT_PADDING
from .common import CATEGORY

#: SavePanorama360's file formats.
FORMATS = ["png", "jpeg"]


class PanoramaDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PanoramaDecode",
            display_name="Panorama Decode (360° seamless)",
            category=CATEGORY,
            description="VAE decode for panoramas. With wrap, the latent is decoded with circular context in "
                        "width, so the left and right edges of a 360° panorama meet without a seam; tiling along "
                        "the width keeps memory bounded for very wide canvases.",
            inputs=[
                io.Latent.Input("samples", tooltip="The panorama latent, e.g. from SyncDiffusion Sampler."),
                io.Vae.Input("vae", tooltip="The VAE to decode with."),
                io.Boolean.Input("wrap", default=True,
                                 tooltip="Circular padding in width so that the left and right edges meet (360° "
                                         "panoramas sampled with wrap). Off: an ordinary decode."),
                io.Int.Input("padding", default=DEFAULT_PADDING, min=0, max=MAX_PX // 8,
                             tooltip="Latent pixels of circular context decoded on each side (of the canvas, "
                                     "or of each tile) and cropped off again. 16 covers the SD VAE decoder's "
                                     "reach; more only costs time."),
                io.Int.Input("tile_width", default=0, min=0, max=MAX_PX, step=8,
                             tooltip="Decode in tiles this many pixels wide (plus the padding) to bound memory; "
                                     "0 = decode the whole canvas at once."),
                io.Int.Input("tile_overlap", default=64, min=0, max=MAX_PX, step=8,
                             tooltip="Pixels by which neighbouring tiles overlap; they are blended there with "
                                     "linear ramps. Must be smaller than tile_width. Unused without tiling."),
            ],
            outputs=[io.Image.Output(tooltip="The decoded panorama, (batch, height, width, 3) in [0, 1].")],
        )

    @classmethod
    def execute(cls, samples, vae, wrap: bool, padding: int, tile_width: int, tile_overlap: int) -> io.NodeOutput:
        from ..syncdiff_core.comfy.decode import decode_panorama_image

        expect(samples=(samples, "LATENT"), vae=(vae, "VAE"))

        image = decode_panorama_image(
            vae, samples["samples"], wrap=wrap, padding=padding, tile_width_px=tile_width,
            tile_overlap_px=tile_overlap if tile_width else 0)
        return io.NodeOutput(image)


class PanoramaEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PanoramaEncode",
            display_name="Panorama Encode (360° seamless)",
            category=CATEGORY,
            description="VAE encode for panoramas. With wrap, the image is encoded with circular context in width, "
                        "so the latent of a 360° panorama continues across its left/right border (for img2img, "
                        "hires refining or seam repair with wrap on).",
            inputs=[
                io.Image.Input("pixels", tooltip="The panorama; width and height multiples of the VAE's scale "
                                                 "(8 px for SD-family VAEs)."),
                io.Vae.Input("vae", tooltip="The VAE to encode with."),
                io.Boolean.Input("wrap", default=True,
                                 tooltip="Circular padding in width (360° panoramas). Off: an ordinary encode."),
                io.Int.Input("padding", default=DEFAULT_PADDING, min=0, max=MAX_PX // 8,
                             tooltip="Latent pixels of circular context encoded on each side and cropped off "
                                     "again."),
            ],
            outputs=[io.Latent.Output(tooltip="The panorama's latent.")],
        )

    @classmethod
    def execute(cls, pixels, vae, wrap: bool, padding: int) -> io.NodeOutput:
        from ..syncdiff_core.comfy.decode import encode_panorama_image

        expect(pixels=(pixels, "IMAGE"), vae=(vae, "VAE"))

        return io.NodeOutput({"samples": encode_panorama_image(vae, pixels, wrap=wrap, padding=padding)})


class SavePanorama360(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SavePanorama360",
            display_name="Save Panorama 360°",
            category=CATEGORY,
            description="Saves panoramas to ComfyUI's output folder with photo sphere (GPano XMP) metadata, so "
                        "360° viewers show them as equirectangular panoramas. Images wider than 2:1 are marked "
                        "as a horizon band of the sphere (a cylindrical panorama).",
            inputs=[
                io.Image.Input("images", tooltip="Panoramas that span 360° horizontally (sampled and decoded "
                                                 "with wrap), at most half as tall as wide."),
                io.String.Input("filename_prefix", default="panorama360",
                                tooltip="File name prefix; may contain a subfolder and ComfyUI's %date% "
                                        "style placeholders, as in Save Image."),
                io.Combo.Input("format", options=FORMATS, default="png",
                               tooltip="png: lossless, keeps the workflow too. jpeg: smaller, the format most "
                                       "photo sphere viewers and sites expect."),
                io.Int.Input("jpeg_quality", default=95, min=1, max=100,
                             tooltip="JPEG quality (1-100); unused for png."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images: torch.Tensor, filename_prefix: str, format: str, jpeg_quality: int) -> io.NodeOutput:
        from ..syncdiff_core.comfy.output import save_panoramas

        expect(images=(images, "IMAGE"))
        expect_option("format", format, FORMATS)

        hidden = getattr(cls, "hidden", None)
        saved = save_panoramas(images, filename_prefix, format, jpeg_quality, prompt=getattr(hidden, "prompt", None),
                               extra_pnginfo=getattr(hidden, "extra_pnginfo", None))
        return io.NodeOutput(ui=ui.SavedImages([ui.SavedResult(f, sub, io.FolderType.output) for f, sub in saved]))


NODES = [PanoramaDecode, PanoramaEncode, SavePanorama360]
