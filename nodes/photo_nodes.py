"""A photo placed on a panorama canvas, flat or projected onto a 360° sphere, with the mask to outpaint."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from .inputs import expect, expect_option
from ..syncdiff_core.job import MAX_PX, check_canvas_pixels
from ..syncdiff_core.photo import CANVAS_MULTIPLE, PLACEMENTS, PROJECTIONS, Camera, Placement, place_photo
from .common import CATEGORY


class PanoramaPhotoCanvas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PanoramaPhotoCanvas",
            display_name="Panorama From Photo",
            category=CATEGORY,
            description="Puts a photo on a panorama canvas and makes the mask of the rest, to outpaint it into a "
                        "wide panorama (flat) or a full 360° sphere (equirectangular, the photo projected as a "
                        "pinhole camera sees it). Connect the image and mask to VAE Encode (for Inpainting), "
                        "InpaintModelConditioning or VAE Encode + Set Latent Noise Mask, and the photo to a "
                        "SyncDiffusion Anchor Selector in 'reference image' mode to pull the new windows toward "
                        "its look.",
            inputs=[
                io.Image.Input("image", tooltip="The photo. Flat: at most the canvas' size (scale it first). "
                                                "Equirectangular: any size, sampled bilinearly."),
                io.Int.Input("width", default=2048, min=64, max=MAX_PX, step=CANVAS_MULTIPLE,
                             tooltip="Canvas width in pixels (a multiple of 8); twice the height for a 360° "
                                     "equirectangular canvas."),
                io.Int.Input("height", default=512, min=64, max=MAX_PX, step=CANVAS_MULTIPLE,
                             tooltip="Canvas height in pixels (a multiple of 8)."),
                io.Combo.Input("projection", options=list(PROJECTIONS), default=PROJECTIONS[0],
                               tooltip="flat: the photo pasted as it is, for wide panoramas. equirectangular: the "
                                       "photo projected onto a 360° sphere from its field of view, yaw and pitch "
                                       "(sample with wrap on)."),
                io.Combo.Input("placement", options=list(PLACEMENTS), default=PLACEMENTS[0],
                               tooltip="Flat only: where the photo goes horizontally (vertically it is centred); "
                                       "offset: at offset_x, offset_y."),
                io.Int.Input("offset_x", default=0, min=0, max=MAX_PX, step=1,
                             tooltip="Flat, placement 'offset': the photo's left edge in pixels from the canvas' "
                                     "left edge."),
                io.Int.Input("offset_y", default=0, min=0, max=MAX_PX, step=1,
                             tooltip="Flat, placement 'offset': the photo's top edge in pixels from the canvas' "
                                     "top edge."),
                io.Float.Input("fov", default=70.0, min=0.1, max=179.9, step=0.5,
                               tooltip="Equirectangular only: the photo's horizontal field of view in degrees "
                                       "(a phone's main camera: about 65-75; 26 mm equivalent is 69)."),
                io.Float.Input("yaw", default=0.0, min=-360.0, max=360.0, step=1.0,
                               tooltip="Equirectangular only: where the camera looks, in degrees of longitude; 0 = "
                                       "the canvas' centre, positive = to the right, ±180 = across the wrap seam."),
                io.Float.Input("pitch", default=0.0, min=-90.0, max=90.0, step=1.0,
                               tooltip="Equirectangular only: the camera's tilt in degrees; 0 = the horizon, "
                                       "positive = up, 90 = straight up."),
                io.Int.Input("feather", default=32, min=0, max=MAX_PX // 2, step=1,
                             tooltip="Width in photo pixels of the soft ramp inside the photo's border where it "
                                     "meets the generated area (never along a canvas border), so the new part "
                                     "blends in; 0 = a hard edge. At most half the photo's shorter side."),
            ],
            outputs=[
                io.Image.Output(display_name="image",
                                tooltip="The canvas: the photo, the rest mid grey (0.5)."),
                io.Mask.Output(display_name="mask",
                               tooltip="1 = generate, 0 = keep the photo, the feather in between; at the canvas' "
                                       "size."),
            ],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, width: int, height: int, projection: str, placement: str, offset_x: int,
                offset_y: int, fov: float, yaw: float, pitch: float, feather: int) -> io.NodeOutput:
        expect(image=(image, "IMAGE"))
        expect_option("projection", projection, PROJECTIONS)
        expect_option("placement", placement, PLACEMENTS)
        check_canvas_pixels(width, height, image.shape[0], "Panorama From Photo")
        placed = Placement(width=width, height=height, projection=projection, placement=placement,
                           offset_x=offset_x, offset_y=offset_y, camera=Camera(fov=fov, yaw=yaw, pitch=pitch),
                           feather=feather)
        canvas, mask = place_photo(image, placed)
        return io.NodeOutput(canvas, mask)


NODES = [PanoramaPhotoCanvas]
