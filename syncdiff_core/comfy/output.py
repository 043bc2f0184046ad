"""Saving panoramas into ComfyUI's output folder: file names as Save Image makes them, the workflow embedded as
Save Image embeds it, and the photo sphere (GPano XMP) metadata 360° viewers read."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import torch

import folder_paths

from ..gpano import XMP_KEY, gpano_xmp, jpeg_with_xmp


def workflow_text(prompt, extra_pnginfo) -> dict[str, str]:
    """The prompt and workflow as text chunks, as Save Image embeds them (none with --disable-metadata)."""
    from comfy.cli_args import args

    if args.disable_metadata:
        return {}
    text = {}
    if prompt is not None:
        text["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        text[key] = json.dumps(value)
    return text


def save_panoramas(images: torch.Tensor, filename_prefix: str, fmt: str, jpeg_quality: int,
                   prompt=None, extra_pnginfo=None) -> list[tuple[str, str]]:
    """Write each image of the IMAGE batch as a 360° panorama; returns ``(file name, subfolder)`` per image."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be an RGB IMAGE batch (batch, height, width, 3), got {tuple(images.shape)}")
    height, width = int(images.shape[1]), int(images.shape[2])
    xmp = gpano_xmp(width, height)  # validates the size before anything is written
    out_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory(), width, height)
    text = workflow_text(prompt, extra_pnginfo)
    saved = []
    for b, image in enumerate(images):
        pixels = np.clip(image.float().cpu().numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)
        pil = Image.fromarray(pixels)
        base = name.replace("%batch_num%", str(b))
        if fmt == "png":
            file = f"{base}_{counter:05}_.png"
            info = PngInfo()
            for key, value in text.items():
                info.add_text(key, value)
            info.add_itxt(XMP_KEY, xmp, lang="", tkey="", zip=False)
            pil.save(os.path.join(out_dir, file), pnginfo=info, compress_level=4)
        else:
            file = f"{base}_{counter:05}_.jpg"
            buffer = io.BytesIO()
            pil.save(buffer, format="JPEG", quality=jpeg_quality)
            with open(os.path.join(out_dir, file), "wb") as f:
                f.write(jpeg_with_xmp(buffer.getvalue(), xmp))
        saved.append((file, subfolder))
        counter += 1
    return saved
