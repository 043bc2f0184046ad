# --- perceptual (owned by metrics) ---
# LPIPS / VGG trunk loading for the synchronization loss and the coherence metrics. The trunk files live in a
# ``lpips`` folder of ComfyUI's models directory (``models/lpips``), registered through folder_paths so that
# extra_model_paths.yaml can add more folders under the name ``lpips``.

LPIPS_FOLDER_NAME = "lpips"


def _register_lpips_folder() -> None:
    import os

    import folder_paths

    default = os.path.join(folder_paths.models_dir, LPIPS_FOLDER_NAME)
    if LPIPS_FOLDER_NAME not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[LPIPS_FOLDER_NAME] = ([default], {".pth", ".safetensors"})
    else:  # already declared (extra_model_paths.yaml): keep its folders, add the default one
        folder_paths.add_model_folder_path(LPIPS_FOLDER_NAME, default)


def lpips_search_paths() -> list[str]:
    """The folders searched for VGG trunk files, in order (``models/lpips`` and any extra ``lpips`` paths)."""
    import folder_paths

    _register_lpips_folder()
    return folder_paths.get_folder_paths(LPIPS_FOLDER_NAME)


def perceptual_device():
    """Where the perceptual networks run: ComfyUI's compute device."""
    import comfy.model_management as mm

    return mm.get_torch_device()


def get_lpips(device=None):
    """LPIPS-VGG ``loss(images, targets) -> (B,)`` on ``device`` (default: ComfyUI's compute device), images in
    [-1, 1] of any float dtype, computed in float32 and differentiable w.r.t. ``images``. Loaded once per
    device: the trunk from ``models/lpips``, torch's hub cache, or a download, else a clear error
    (``perceptual.TrunkWeightsNotFound``) that names the file and the folders."""
    from . import perceptual

    return perceptual.load_lpips(lpips_search_paths(), perceptual_device() if device is None else device)


def get_style_features(device=None):
    """VGG19 style features for Intra-Style-L, found and cached like :func:`get_lpips`'s trunk."""
    from . import perceptual

    return perceptual.load_style_features(lpips_search_paths(), perceptual_device() if device is None else device)


_register_lpips_folder()
