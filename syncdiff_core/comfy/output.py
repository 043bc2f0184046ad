"""Saving panoramas into ComfyUI's output folder: file names as Save Image makes them, the workflow embedded as
Save Image embeds it, and the photo sphere (GPano XMP) metadata 360° viewers read.

Files are never overwritten and never seen half-written: each image is written to a temporary file in the target
folder and then published under its final name with an operation that fails when that name exists (a hard link,
or where the file system has none, an exclusive create of the name followed by a rename over it); on a clash the
counter moves on. Cancel between images leaves the images saved so far, complete, and no temporary file.
"""
from __future__ import annotations

import errno
import io
import json
import os
import uuid

import numpy as np
import torch

import comfy.model_management
import comfy.utils
import folder_paths

from ..gpano import XMP_KEY, gpano_xmp, jpeg_with_xmp

#: How many taken names in a row :func:`save_panoramas` skips before giving up (a folder full of files of this prefix).
MAX_NAME_CLASHES = 100_000
TEMP_PREFIX = ".syncdiff-"
TEMP_SUFFIX = ".partial"


class OutputFolderError(PermissionError):
    """The output folder cannot be written (read-only, no permission, full)."""


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


def encode_image(image: torch.Tensor, fmt: str, jpeg_quality: int, text: dict[str, str], xmp: str) -> bytes:
    """One (height, width, 3) image in [0, 1] as the bytes of a PNG (with the workflow text and XMP) or a JPEG
    (with the XMP segment)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    pixels = np.clip(image.float().cpu().numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)
    pil = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        info.add_itxt(XMP_KEY, xmp, lang="", tkey="", zip=False)
        pil.save(buffer, format="PNG", pnginfo=info, compress_level=4)
        return buffer.getvalue()
    pil.save(buffer, format="JPEG", quality=jpeg_quality)
    return jpeg_with_xmp(buffer.getvalue(), xmp)


def _folder_error(folder: str, error: OSError) -> OutputFolderError:
    reason = error.strerror or str(error)
    return OutputFolderError(
        f"SavePanorama360 cannot write into the output folder {folder} ({reason}). Make the folder writable (or "
        f"free space on its disk), or save elsewhere: another subfolder in filename_prefix, or ComfyUI's "
        f"--output-directory.")


#: What os.link raises where the file system has no hard links (FAT, some network shares, some containers).
NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP,
                 getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _publish(temp: str, final: str) -> bool:
    """Give the complete file ``temp`` the name ``final`` unless that name exists; False when it does."""
    try:
        os.link(temp, final)  # atomic, and fails when final exists
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        try:
            os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))  # claim the name
        except FileExistsError:
            return False
        os.replace(temp, final)  # the claimed empty file becomes the complete one in one step
        return True
    os.unlink(temp)
    return True


def write_new_file(folder: str, data: bytes, name_for) -> str:
    """Write ``data`` under the first free name ``name_for(k)``, k = 0, 1, ... (a name that exists is skipped, never
    overwritten), atomically through a temporary file in ``folder``. Returns the file name used."""
    temp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise _folder_error(folder, e) from e
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _folder_error(folder, e) from e
        for k in range(MAX_NAME_CLASHES):
            name = name_for(k)
            try:
                if _publish(temp, os.path.join(folder, name)):
                    return name
            except OSError as e:
                if e.errno == errno.ENAMETOOLONG:
                    raise ValueError(f"filename_prefix makes the file name {name[:60]!r}... ({len(name)} characters), "
                                     f"too long for the file system of {folder}; use a shorter filename_prefix") from e
                raise _folder_error(folder, e) from e
        raise FileExistsError(f"SavePanorama360: {MAX_NAME_CLASHES} file names in a row from {name_for(0)} on are "
                              f"taken in {folder}; use another filename_prefix")
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


def save_panoramas(images: torch.Tensor, filename_prefix: str, fmt: str, jpeg_quality: int,
                   prompt=None, extra_pnginfo=None) -> list[tuple[str, str]]:
    """Write each image of the IMAGE batch as a 360° panorama; returns ``(file name, subfolder)`` per image.
    Names are Save Image's (``prefix_00001_.png``, the counter after the largest one in the folder); a name taken
    meanwhile is skipped."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be an RGB IMAGE batch (batch, height, width, 3), got {tuple(images.shape)}")
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"format must be 'png' or 'jpeg', got {fmt!r}")
    if "\x00" in filename_prefix:
        raise ValueError("filename_prefix must not contain a NUL character")
    height, width = int(images.shape[1]), int(images.shape[2])
    xmp = gpano_xmp(width, height)  # validates the size before anything is written
    output_dir = folder_paths.get_output_directory()
    try:
        out_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir, width,
                                                                                height)
    except PermissionError as e:  # the subfolder could not be made
        raise _folder_error(e.filename or output_dir, e) from e
    text = workflow_text(prompt, extra_pnginfo)
    extension = "png" if fmt == "png" else "jpg"
    pbar = comfy.utils.ProgressBar(len(images))
    saved = []
    for b, image in enumerate(images):
        comfy.model_management.throw_exception_if_processing_interrupted()
        base = name.replace("%batch_num%", str(b))
        data = encode_image(image, fmt, jpeg_quality, text, xmp)
        file = write_new_file(out_dir, data, lambda k, c=counter: f"{base}_{c + k:05}_.{extension}")
        saved.append((file, subfolder))
        counter = int(file[len(base) + 1:].split("_", 1)[0]) + 1
        pbar.update_absolute(b + 1, len(images))
    return saved
