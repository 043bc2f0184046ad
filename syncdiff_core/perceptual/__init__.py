"""Perceptual networks for SyncDiffusion: LPIPS (VGG16 trunk) for the synchronization loss, and the paper's
coherence metrics (Intra-LPIPS, Intra-Style-L). Plain torch; nothing here imports ComfyUI.

- ``trunks``: where torchvision's VGG files are found (folders, hub cache, download) and how they are read;
- ``networks``: the LPIPS loss and the VGG19 style features built from a trunk;
- ``cache``: loading them once per (trunk file, device);
- ``metrics``: Intra-LPIPS and Intra-Style-L over a panorama's non-overlapping crops.

LPIPS's linear heads ship with the ``lpips`` package and are loaded from it.
"""
from .cache import clear_cache, load_lpips, load_style_features
from .metrics import crop_counts, crop_grid, intra_lpips, intra_style_l
from .networks import STYLE_LAYERS, LPIPSLoss, StyleFeatures, build_lpips, build_style_features, gram
from .trunks import (TRUNKS, TrunkFileError, TrunkSpec, TrunkWeightsNotFound, find_trunk, hub_checkpoint_path,
                     load_trunk_state_dict, resolve_trunk, vgg_features)

__all__ = [
    "LPIPSLoss", "STYLE_LAYERS", "StyleFeatures", "TRUNKS", "TrunkFileError", "TrunkSpec", "TrunkWeightsNotFound",
    "build_lpips", "build_style_features", "clear_cache", "crop_counts", "crop_grid", "find_trunk", "gram",
    "hub_checkpoint_path", "intra_lpips", "intra_style_l", "load_lpips", "load_style_features", "load_trunk_state_dict",
    "resolve_trunk", "vgg_features",
]
