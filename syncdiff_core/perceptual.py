"""Perceptual networks for SyncDiffusion: LPIPS (VGG16 trunk) for the synchronization loss, and the paper's
coherence metrics (Intra-LPIPS, Intra-Style-L). Plain torch; nothing here imports ComfyUI.

Trunk weights are torchvision's ImageNet VGG files. They are found offline first, in this order:

1. the folders (or files) in ``search_paths`` (in ComfyUI: ``models/lpips``), as torchvision's file name
   (``vgg16-397923af.pth``, ``vgg19-dcbb9e9d.pth``), the same stem with ``.safetensors``, or any
   ``vgg16*`` / ``vgg19*`` ``.safetensors`` / ``.pth`` file holding torchvision's key names
   (the whole model, or only its ``features.*`` part);
2. torch's hub cache, ``torch.hub.get_dir()/checkpoints/<torchvision file name>``;
3. a download of torchvision's file into that hub cache, when the machine is online;

and otherwise a :class:`TrunkWeightsNotFound` error says which file to put where.

LPIPS's linear heads ship with the ``lpips`` package and are loaded from it.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

__all__ = [
    "LPIPSLoss", "StyleFeatures", "TrunkWeightsNotFound", "TRUNKS",
    "build_lpips", "build_style_features", "clear_cache", "crop_grid", "find_trunk", "gram",
    "intra_lpips", "intra_style_l", "load_lpips", "load_style_features", "load_trunk_state_dict",
    "vgg_features",
]


# ----------------------------------------------------------------------------------------------------------------
# Trunk files


@dataclass(frozen=True)
class TrunkSpec:
    name: str  # "vgg16" / "vgg19"
    file_name: str  # torchvision's file name (its hash prefix is the sha256 prefix of the file)
    url: str
    cfg: tuple  # torchvision's layer configuration of the features part
    size_mb: int

    @property
    def hash_prefix(self) -> str:
        return self.file_name.rsplit("-", 1)[1].split(".")[0]


_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M")

TRUNKS = {
    "vgg16": TrunkSpec("vgg16", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
                       _VGG16_CFG, 528),
    "vgg19": TrunkSpec("vgg19", "vgg19-dcbb9e9d.pth", "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
                       _VGG19_CFG, 548),
}

_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin")

log = logging.getLogger("syncdiffusion")


class TrunkWeightsNotFound(FileNotFoundError):
    """No trunk file was found offline and it could not be downloaded."""


def vgg_features(name: str, upto: int | None = None) -> nn.Sequential:
    """The ``features`` part of torchvision's VGG (no batch norm), module indices as torchvision numbers them,
    so that ``features.<i>.weight`` keys load directly. ``upto`` keeps modules ``[0, upto)``.

    Weights are initialised as torchvision initialises them (Kaiming normal, fan-out, zero bias), so a seeded
    call gives a random trunk of the same statistics as ``torchvision.models.vgg16()``'s.
    """
    layers: list[nn.Module] = []
    channels = 3
    for v in TRUNKS[name].cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(channels, v, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=False)]
            channels = v
    return nn.Sequential(*layers[:upto])


def _candidates(folder: Path, spec: TrunkSpec) -> list[Path]:
    stem = spec.file_name.rsplit(".", 1)[0]
    first = [folder / spec.file_name, folder / f"{stem}.safetensors",
             folder / f"{spec.name}.safetensors", folder / f"{spec.name}.pth"]
    found = [p for p in first if p.is_file()]
    try:
        others = sorted(
            p for p in folder.iterdir()
            if p.is_file() and p.name.lower().startswith(spec.name) and p.suffix.lower() in _EXTENSIONS
            and "_bn" not in p.name.lower() and p not in found
        )
    except OSError:
        others = []
    return found + others


def hub_checkpoint_path(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / TRUNKS[name].file_name


def find_trunk(name: str, search_paths: Iterable[str | os.PathLike] | None) -> Path | None:
    """The first trunk file found offline: ``search_paths`` in order (a folder, or a file given directly), then
    torch's hub cache. None when there is none."""
    spec = TRUNKS[name]
    for entry in search_paths or ():
        p = Path(entry).expanduser()
        if p.is_file():
            if p.name.lower().startswith(spec.name) and p.suffix.lower() in _EXTENSIONS:
                return p
            continue
        if p.is_dir():
            found = _candidates(p, spec)
            if found:
                return found[0]
    hub = hub_checkpoint_path(name)
    return hub if hub.is_file() else None


def _download(url: str, dst: Path, hash_prefix: str, timeout: float) -> None:
    """Download torchvision's file into the hub cache. Raises on any failure (offline, timeout, bad hash)."""
    # A quick reachability probe with a short timeout, so that an offline machine fails in seconds.
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dst), hash_prefix=hash_prefix, progress=False)


def _not_found_message(spec: TrunkSpec, search_paths, reason: str) -> str:
    folders = [str(Path(p).expanduser()) for p in (search_paths or ())]
    where = "\n".join(f"    {f}" for f in folders) or "    (no folder was given)"
    return (
        f"The {spec.name.upper()} trunk weights were not found. Put torchvision's ImageNet file "
        f"'{spec.file_name}' ({spec.size_mb} MB, from {spec.url}) into one of these folders:\n{where}\n"
        f"or into torch's hub cache folder {hub_checkpoint_path(spec.name).parent} "
        f"(a .safetensors with torchvision's {spec.name} key names, e.g. '{spec.name}.safetensors', works "
        f"too). {reason}"
    )


def resolve_trunk(name: str, search_paths=None, *, allow_download: bool = True, timeout: float = 10.0) -> Path:
    """The trunk file to load: found offline, else downloaded into the hub cache, else a clear error."""
    spec = TRUNKS[name]
    path = find_trunk(name, search_paths)
    if path is not None:
        return path
    if not allow_download:
        raise TrunkWeightsNotFound(_not_found_message(spec, search_paths, "Downloading was turned off."))
    dst = hub_checkpoint_path(name)
    log.info("SyncDiffusion: %s trunk not found offline; downloading %s (%d MB) to %s",
             spec.name.upper(), spec.url, spec.size_mb, dst)
    try:
        _download(spec.url, dst, spec.hash_prefix, timeout)
    except Exception as e:  # noqa: BLE001 - any network failure means "offline"
        raise TrunkWeightsNotFound(_not_found_message(
            spec, search_paths, f"Downloading it failed ({type(e).__name__}: {e})."
        )) from e
    if not dst.is_file():
        raise TrunkWeightsNotFound(_not_found_message(spec, search_paths, "The download left no file."))
    return dst


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():
                if k.startswith("features.") or k.split(".", 1)[0].isdigit():
                    out[k] = f.get_tensor(k)
        return out
    try:  # new zip format: memory-map, so the classifier's 470 MB are never read
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy format cannot be memory-mapped
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found a {type(sd).__name__}")
    return sd


def load_trunk_state_dict(name: str, path: str | os.PathLike, upto: int | None = None) -> dict[str, torch.Tensor]:
    """``features.*`` of a torchvision VGG file, as keys of :func:`vgg_features` (``"0.weight"``, ...), checked
    against the architecture: a wrong or truncated file gives an error that names it."""
    path = Path(path)
    raw = _read_state_dict(path)
    feats = {}
    for k, v in raw.items():
        key = k[len("module."):] if k.startswith("module.") else k
        if key.startswith("features."):
            feats[key[len("features."):]] = v
        elif key.split(".", 1)[0].isdigit():
            feats[key] = v
    expected = {k: tuple(v.shape) for k, v in _meta_features(name, upto).state_dict().items()}
    missing = [k for k in expected if k not in feats]
    wrong = [f"features.{k} {tuple(feats[k].shape)} (expected {s})" for k, s in expected.items()
             if k in feats and tuple(feats[k].shape) != s]
    if missing or wrong:
        detail = (f"missing features.{missing[0]} and {len(missing) - 1} more keys" if missing
                  else "wrong shapes: " + ", ".join(wrong[:3]))
        raise ValueError(
            f"{path} is not torchvision's {name.upper()} ({detail}). Use '{TRUNKS[name].file_name}' from "
            f"{TRUNKS[name].url}, or a .safetensors with the same key names."
        )
    return {k: feats[k].float() for k in expected}


def _meta_features(name: str, upto: int | None) -> nn.Sequential:
    with torch.device("meta"):
        return vgg_features(name, upto)


# ----------------------------------------------------------------------------------------------------------------
# LPIPS


def _lpips_heads_path() -> Path:
    import lpips

    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / "vgg.pth"


def _freeze(module: nn.Module, device) -> nn.Module:
    module = module.to(device=device, dtype=torch.float32).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class LPIPSLoss(nn.Module):
    """LPIPS (v0.1, VGG16 trunk, the ``lpips`` package's linear heads) as ``loss(images, targets) -> (B,)``.

    ``images`` and ``targets``: (B, 3, h, w) in [-1, 1] (``targets`` may have batch 1, broadcast); any float
    dtype. The distance is computed in float32 (autocast is turned off inside), differentiable w.r.t. both
    inputs; the module's own parameters never require grad. ``features`` / ``distance`` split the computation
    so that many pairs of few images need one trunk pass per image.
    """

    def __init__(self, inner: nn.Module, source: str = ""):
        super().__init__()
        self.inner = inner
        self.source = source

    @property
    def device(self) -> torch.device:
        return self.inner.scaling_layer.shift.device

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects images (batch, 3, height, width) in [-1, 1], got {tuple(x.shape)}")
        if x.is_inference() and not torch.is_inference_mode_enabled():
            x = x.clone()  # an inference tensor cannot be saved for backward
        return x.to(device=self.device, dtype=torch.float32)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised (over channels) trunk features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
        import lpips

        x = self._prep(images)
        with torch.autocast(device_type=x.device.type, enabled=False):
            outs = self.inner.net(self.inner.scaling_layer(x))
            return [lpips.normalize_tensor(o) for o in outs]

    def distance(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
        """LPIPS between two lists of :meth:`features` (same batch, or one side batch 1): shape (B,)."""
        with torch.autocast(device_type=feats_a[0].device.type, enabled=False):
            total = 0
            for lin, fa, fb in zip(self.inner.lins, feats_a, feats_b):
                total = total + lin((fa - fb) ** 2).mean(dim=(2, 3))
            return total.reshape(-1)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] != targets.shape[1:] or targets.shape[0] not in (1, images.shape[0]):
            raise ValueError(
                f"LPIPS: images {tuple(images.shape)} and targets {tuple(targets.shape)} must have the same "
                "channels and size, and targets batch 1 or the images' batch"
            )
        return self.distance(self.features(images), self.features(targets))


def build_lpips(trunk_state_dict: dict[str, torch.Tensor], device="cpu", source: str = "") -> LPIPSLoss:
    """An :class:`LPIPSLoss` from a VGG16 ``features`` state dict (keys ``"0.weight"`` ... as
    :func:`load_trunk_state_dict` returns them, or with the ``features.`` prefix) and the package's heads.

    The module is built with the package's random-trunk option (nothing is downloaded) on the meta device
    (nothing is initialised twice), then every parameter and buffer is loaded strictly.
    """
    import lpips

    sd16 = {k[len("features."):] if k.startswith("features.") else k: v for k, v in trunk_state_dict.items()}
    with torch.inference_mode(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained` deprecation; no-op copies into meta tensors
        with torch.device("meta"):
            inner = lpips.LPIPS(net="vgg", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
        inner = inner.to_empty(device="cpu")
        state = {}
        for key in inner.state_dict():
            head, _, rest = key.partition(".")
            if head == "net":  # net.slice<k>.<torchvision index>.<param>
                _, index, param = rest.split(".")
                state[key] = sd16[f"{index}.{param}"]
        heads = torch.load(str(_lpips_heads_path()), map_location="cpu", weights_only=True)
        for key, value in heads.items():  # lin<k>.model.1.weight, also reachable as lins.<k>.model.1.weight
            state[key] = value
            state[f"lins.{key[3]}{key[4:]}"] = value
        scaling = lpips.ScalingLayer()  # the package's input normalisation constants
        state["scaling_layer.shift"] = scaling.shift
        state["scaling_layer.scale"] = scaling.scale
        inner.load_state_dict(state, strict=True)
        return _freeze(LPIPSLoss(inner, source), device)


# ----------------------------------------------------------------------------------------------------------------
# Style features (VGG19) and Gram matrices

#: torchvision indices of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 in VGG19's ``features``.
STYLE_LAYERS = (1, 6, 11, 20, 29)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class StyleFeatures(nn.Module):
    """VGG19 activations at relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 (Gatys et al.'s style layers).

    Input: (B, 3, h, w) in [-1, 1], mapped to [0, 1] and normalised with ImageNet's mean and std (torchvision's
    convention for its VGG weights); computed in float32.
    """

    def __init__(self, features: nn.Sequential, source: str = ""):
        super().__init__()
        self.features = features
        self.source = source
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).reshape(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (batch, 3, height, width) in [-1, 1], got {tuple(images.shape)}")
        x = images.to(device=self.mean.device, dtype=torch.float32)
        if x.is_inference() and not torch.is_inference_mode_enabled():
            x = x.clone()
        out = []
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = ((x + 1) / 2 - self.mean) / self.std
            for i, layer in enumerate(self.features):
                h = layer(h)
                if i in STYLE_LAYERS:
                    out.append(h)
        return out


def build_style_features(trunk_state_dict: dict[str, torch.Tensor], device="cpu", source: str = "") -> StyleFeatures:
    """:class:`StyleFeatures` from a VGG19 ``features`` state dict (as :func:`load_trunk_state_dict` returns)."""
    upto = STYLE_LAYERS[-1] + 1
    sd = {k[len("features."):] if k.startswith("features.") else k: v for k, v in trunk_state_dict.items()}
    with torch.inference_mode(False):
        with torch.device("meta"):
            feats = vgg_features("vgg19", upto)
        feats = feats.to_empty(device="cpu")
        feats.load_state_dict({k: sd[k] for k in feats.state_dict()}, strict=True)
        module = StyleFeatures(feats, source)
        return _freeze(module, device)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of (B, C, h, w) features, normalised by C·h·w: (B, C, C)."""
    b, c, h, w = features.shape
    f = features.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


# ----------------------------------------------------------------------------------------------------------------
# Loading with a per-device cache

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


# ----------------------------------------------------------------------------------------------------------------
# The paper's coherence metrics


def crop_grid(image: torch.Tensor, window_px: int) -> torch.Tensor:
    """Non-overlapping ``window_px`` crops of (N, 3, H, W) images (or one (3, H, W) image), on a grid from the
    top-left corner (the rightmost / bottom remainder narrower than a window is left out), in raster order:
    (N, rows·cols, 3, window_px, window_px)."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"expected an image (N, 3, H, W), got {tuple(image.shape)}")
    if window_px < 1:
        raise ValueError(f"window size must be positive, got {window_px}")
    n, c, h, w = image.shape
    rows, cols = h // window_px, w // window_px
    if rows * cols < 2:
        raise ValueError(
            f"the image ({w}x{h} px) holds {rows * cols} non-overlapping {window_px}x{window_px} crop(s); the "
            f"coherence metrics compare pairs of crops, so it must hold at least two (lower the window size)"
        )
    x = image[:, :, : rows * window_px, : cols * window_px]
    x = x.reshape(n, c, rows, window_px, cols, window_px).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, rows * cols, c, window_px, window_px)


def _pairs(m: int) -> tuple[list[int], list[int]]:
    ij = list(itertools.combinations(range(m), 2))
    return [i for i, _ in ij], [j for _, j in ij]


def _chunked(fn, items: torch.Tensor, chunk: int) -> list:
    return [fn(items[s : s + chunk]) for s in range(0, items.shape[0], chunk)]


def intra_lpips(panorama_image: torch.Tensor, window_px: int, lpips_fn: Callable, *, chunk: int = 16) -> torch.Tensor:
    """Intra-LPIPS (SyncDiffusion, Lee et al. 2023): the mean LPIPS over all unordered pairs of the panorama's
    non-overlapping window-size crops (:func:`crop_grid`). Lower is more coherent.

    ``panorama_image``: (N, 3, H, W) or (3, H, W) in [-1, 1]. ``lpips_fn(a, b) -> (B,)``; when it also has
    ``features`` and ``distance`` (as :class:`LPIPSLoss`), each crop goes through the trunk once.
    Returns one value per image: (N,), float32.
    """
    crops = crop_grid(panorama_image, window_px)
    n, m = crops.shape[:2]
    ii, jj = _pairs(m)
    out = []
    for b in range(n):
        if hasattr(lpips_fn, "features") and hasattr(lpips_fn, "distance"):
            per_crop = _chunked(lpips_fn.features, crops[b], chunk)
            feats = [torch.cat(layer) for layer in zip(*per_crop)]
            d = []
            for s in range(0, len(ii), chunk):
                a, c = ii[s : s + chunk], jj[s : s + chunk]
                d.append(lpips_fn.distance([f[a] for f in feats], [f[c] for f in feats]))
            d = torch.cat(d)
        else:
            d = torch.cat([lpips_fn(crops[b, ii[s : s + chunk]], crops[b, jj[s : s + chunk]]).reshape(-1)
                           for s in range(0, len(ii), chunk)])
        out.append(d.float().mean())
    return torch.stack(out)


def intra_style_l(panorama_image: torch.Tensor, window_px: int, vgg19_features: Callable, *,
                  chunk: int = 16, per_layer: bool = False) -> torch.Tensor:
    """Intra-Style-L: the Gram-matrix style loss between every unordered pair of the panorama's non-overlapping
    window-size crops (:func:`crop_grid`), averaged over pairs. Lower is more coherent.

    The style loss follows Gatys et al. (2016) as commonly implemented:

    - features: VGG19 (torchvision's weights) activations after ReLU at relu1_1, relu2_1, relu3_1, relu4_1,
      relu5_1 (:class:`StyleFeatures`), input [-1, 1] mapped to [0, 1] and normalised by ImageNet's mean/std;
    - Gram matrix per layer ``G = F Fᵀ / (C·h·w)`` (F: C × h·w);
    - loss between crops a and b: ``Σ_layers mean((G_a − G_b)²)`` (mean over the C×C entries), layers weighted
      equally.

    ``vgg19_features(images) -> list of (B, C, h, w)`` (as :class:`StyleFeatures`). Returns (N,), float32;
    with ``per_layer`` the layers' terms (N, layers), whose sum over layers is the metric.
    """
    crops = crop_grid(panorama_image, window_px)
    n, m = crops.shape[:2]
    ii, jj = _pairs(m)
    out = []
    for b in range(n):
        per_crop = _chunked(lambda x: [gram(f.float()) for f in vgg19_features(x)], crops[b], chunk)
        grams = [torch.cat(layer) for layer in zip(*per_crop)]
        terms = torch.stack([((g[ii] - g[jj]) ** 2).mean(dim=(1, 2)).mean() for g in grams])
        out.append(terms if per_layer else terms.sum())
    return torch.stack(out)
