"""The perceptual networks' files in ComfyUI: the ``lpips`` model folder (``models/lpips``, plus any ``lpips``
paths from extra_model_paths.yaml), and the networks loaded on ComfyUI's compute device."""
from __future__ import annotations

import os

import folder_paths

import comfy.model_management

from .. import perceptual

LPIPS_FOLDER_NAME = "lpips"


def register_lpips_folder() -> None:
    """Declare ``models/lpips`` to ComfyUI's folder_paths (idempotent; called by the extension's entry point)."""
    default = os.path.join(folder_paths.models_dir, LPIPS_FOLDER_NAME)
    if LPIPS_FOLDER_NAME not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[LPIPS_FOLDER_NAME] = ([default], {".pth", ".safetensors"})
    else:  # already declared (extra_model_paths.yaml): keep its folders, add the default one
        folder_paths.add_model_folder_path(LPIPS_FOLDER_NAME, default)


def lpips_search_paths() -> list[str]:
    """The folders searched for VGG trunk files, in order (``models/lpips`` and any extra ``lpips`` paths)."""
    register_lpips_folder()
    return folder_paths.get_folder_paths(LPIPS_FOLDER_NAME)


def perceptual_device():
    """Where the perceptual networks run: ComfyUI's compute device."""
    return comfy.model_management.get_torch_device()


def get_lpips(device=None):
    """LPIPS-VGG ``loss(images, targets) -> (B,)`` on ``device`` (default: ComfyUI's compute device), images in
    [-1, 1] of any float dtype, computed in float32 and differentiable w.r.t. ``images``. Loaded once per
    device: the trunk from ``models/lpips``, torch's hub cache, or a download, else a clear error
    (``perceptual.TrunkWeightsNotFound``) that names the file and the folders."""
    return perceptual.load_lpips(lpips_search_paths(), perceptual_device() if device is None else device)


def get_style_features(device=None):
    """VGG19 style features for Intra-Style-L, found and cached like :func:`get_lpips`'s trunk."""
    return perceptual.load_style_features(lpips_search_paths(), perceptual_device() if device is None else device)
