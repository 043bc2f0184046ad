"""360° panorama output: a seam-free circular VAE decode, and saving with the metadata 360° viewers read."""
from __future__ import annotations

import io as _bytes_io
import json
import os

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..syncdiff_core.panorama_decode import DEFAULT_PADDING
from .common import CATEGORY

MAX_PX = 32768


def validate_decode_inputs(padding: int, tile_width: int, tile_overlap: int) -> None:
    """Refuse bad values before any decoding; the messages name the input."""
    if padding < 0:
        raise ValueError(f"padding must be >= 0 latent px, got {padding}")
    if tile_width < 0:
        raise ValueError(f"tile_width must be >= 0 pixels (0 = no tiling), got {tile_width}")
    if tile_overlap < 0:
        raise ValueError(f"tile_overlap must be >= 0 pixels, got {tile_overlap}")
    if tile_width > 0 and tile_overlap >= tile_width:
        raise ValueError(
            f"tile_overlap ({tile_overlap} px) must be smaller than tile_width ({tile_width} px); "
            "tiles would not advance")


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
        from ..syncdiff_core import comfy_bridge

        validate_decode_inputs(padding, tile_width, tile_overlap)
        image = comfy_bridge.decode_panorama_image(
            vae, samples["samples"], wrap=wrap, padding=padding, tile_width_px=tile_width,
            tile_overlap_px=tile_overlap if tile_width else 0)
        return io.NodeOutput(image)


# ------------------------------------------------------------------------------------------------------------
# Saving with GPano XMP metadata
# ------------------------------------------------------------------------------------------------------------

XMP_KEY = "XML:com.adobe.xmp"
JPEG_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"


def gpano_layout(width: int, height: int) -> dict[str, int]:
    """The equirectangular layout of a ``width`` x ``height`` panorama that spans 360° horizontally.

    The full sphere is ``width`` x ``width/2``; a wider-than-2:1 image (a cylindrical panorama, one row of windows) is
    a band centred on the horizon, with the vertical field of view its square pixels give (360° · height / width).
    """
    full_height = width // 2
    if height > full_height:
        raise ValueError(
            f"a 360° equirectangular panorama is at most half as tall as it is wide; the image is {width}x{height} "
            f"px (at most {full_height} px tall for this width)")
    return {
        "FullPanoWidthPixels": width,
        "FullPanoHeightPixels": full_height,
        "CroppedAreaImageWidthPixels": width,
        "CroppedAreaImageHeightPixels": height,
        "CroppedAreaLeftPixels": 0,
        "CroppedAreaTopPixels": (full_height - height) // 2,
    }


def gpano_xmp(width: int, height: int, initial_heading: float = 0.0) -> str:
    """An XMP packet with Google's photo sphere (GPano) fields for an equirectangular 360° panorama."""
    fields = {"ProjectionType": "equirectangular", "UsePanoramaViewer": "True", **gpano_layout(width, height),
              "PoseHeadingDegrees": f"{initial_heading:.1f}", "InitialViewHeadingDegrees": f"{initial_heading:.0f}"}
    body = "\n".join(f"   <GPano:{k}>{v}</GPano:{k}>" for k, v in fields.items())
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about="" xmlns:GPano="http://ns.google.com/photos/1.0/panorama/">\n'
        f"{body}\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )


def jpeg_with_xmp(jpeg: bytes, xmp: str) -> bytes:
    """Insert an XMP APP1 segment into a JPEG file, after SOI and the JFIF APP0 segment (if any)."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream")
    payload = JPEG_XMP_HEADER + xmp.encode("utf-8")
    if len(payload) + 2 > 0xFFFF:
        raise ValueError("XMP packet too large for one JPEG segment")
    pos = 2
    if jpeg[2:4] == b"\xff\xe0":  # JFIF APP0 must stay first
        pos = 4 + int.from_bytes(jpeg[4:6], "big")
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:pos] + segment + jpeg[pos:]


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
                io.Combo.Input("format", options=["png", "jpeg"], default="png",
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
        import folder_paths
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        if format not in ("png", "jpeg"):
            raise ValueError(f"format must be 'png' or 'jpeg', got {format!r}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be an RGB IMAGE batch (batch, height, width, 3), got "
                             f"{tuple(images.shape)}")
        height, width = int(images.shape[1]), int(images.shape[2])
        xmp = gpano_xmp(width, height)  # validates the size before anything is written
        out_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height)
        workflow_text = cls._workflow_text()
        results = []
        for b, image in enumerate(images):
            pixels = np.clip(image.float().cpu().numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)
            pil = Image.fromarray(pixels)
            base = name.replace("%batch_num%", str(b))
            if format == "png":
                file = f"{base}_{counter:05}_.png"
                info = PngInfo()
                for key, text in workflow_text.items():
                    info.add_text(key, text)
                info.add_itxt(XMP_KEY, xmp, lang="", tkey="", zip=False)
                pil.save(os.path.join(out_dir, file), pnginfo=info, compress_level=4)
            else:
                file = f"{base}_{counter:05}_.jpg"
                buffer = _bytes_io.BytesIO()
                pil.save(buffer, format="JPEG", quality=jpeg_quality)
                with open(os.path.join(out_dir, file), "wb") as f:
                    f.write(jpeg_with_xmp(buffer.getvalue(), xmp))
            results.append(ui.SavedResult(file, subfolder, io.FolderType.output))
            counter += 1
        return io.NodeOutput(ui=ui.SavedImages(results))

    @classmethod
    def _workflow_text(cls) -> dict[str, str]:
        """The prompt and workflow as Save Image embeds them (unless ComfyUI runs with --disable-metadata)."""
        from comfy.cli_args import args

        hidden = getattr(cls, "hidden", None)
        if args.disable_metadata or hidden is None:
            return {}
        text = {}
        if hidden.prompt is not None:
            text["prompt"] = json.dumps(hidden.prompt)
        for key, value in (hidden.extra_pnginfo or {}).items():
            text[key] = json.dumps(value)
        return text


NODES = [PanoramaDecode, SavePanorama360]
