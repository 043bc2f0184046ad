"""Loading the perceptual networks from their trunk files, once per (file, device)."""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

import torch
import torch.nn as nn

from .networks import STYLE_LAYERS, LPIPSLoss, StyleFeatures, build_lpips, build_style_features
from .trunks import load_trunk_state_dict, resolve_trunk

log = logging.getLogger("syncdiffusion")

_CACHE: dict[tuple, nn.Module] = {}
_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every loaded module (the next load reads its file again)."""
    with _LOCK:
        _CACHE.clear()


def _device_key(device) -> str:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


def _load_cached(kind: str, trunk: str, build: Callable, search_paths, device, allow_download, timeout):
    path = resolve_trunk(trunk, search_paths, allow_download=allow_download, timeout=timeout)
    st = path.stat()
    log.debug("SyncDiffusion: %s trunk from %s", trunk.upper(), path)
    key = (kind, str(path.resolve()), st.st_mtime_ns, st.st_size, _device_key(device))
    with _LOCK:
        module = _CACHE.get(key)
        if module is None:
            with torch.inference_mode(False):
                upto = STYLE_LAYERS[-1] + 1 if kind == "style" else None
                module = build(load_trunk_state_dict(trunk, path, upto), device, str(path))
            _CACHE[key] = module
    return module


def load_lpips(search_paths: list[str | os.PathLike] | None = None, device="cpu", *,
               allow_download: bool = True, timeout: float = 10.0) -> LPIPSLoss:
    """LPIPS-VGG as ``loss(images, targets) -> (B,)``, its VGG16 trunk found as the module docstring says.

    Cached per (trunk file, device): repeated calls return the same module without reading the file again.
    Built outside inference mode, so its parameters are normal tensors and backward works under ComfyUI.
    Raises :class:`TrunkWeightsNotFound` (a FileNotFoundError) with the file name, folders and URL.
    """
    return _load_cached("lpips", "vgg16", build_lpips, search_paths, device, allow_download, timeout)


def load_style_features(search_paths: list[str | os.PathLike] | None = None, device="cpu", *,
                        allow_download: bool = True, timeout: float = 10.0) -> StyleFeatures:
    """VGG19 style features (see :class:`StyleFeatures`), its trunk found and cached like :func:`load_lpips`'s."""
    return _load_cached("style", "vgg19", build_style_features, search_paths, device, allow_download, timeout)
