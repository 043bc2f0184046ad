"""VGG trunk files for the perceptual networks: torchvision's ImageNet VGG16 / VGG19 weights, found offline,
downloaded when online, or a clear error that says which file to put where. Plain torch.

Search order: the folders (or files) in ``search_paths`` (in ComfyUI: ``models/lpips``), as torchvision's file name
(``vgg16-397923af.pth``, ``vgg19-dcbb9e9d.pth``), the same stem with ``.safetensors``, or any ``vgg16*`` /
``vgg19*`` ``.safetensors`` / ``.pth`` file holding torchvision's key names (the whole model, or only its
``features.*`` part); then torch's hub cache; then a download of torchvision's file into that hub cache.
"""
from __future__ import annotations

import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

log = logging.getLogger("syncdiffusion")

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


class TrunkFileError(ValueError):
    """A trunk file that exists but is not a usable torchvision VGG file (truncated, another format, another
    network, non-finite values). The message names the file and what was expected."""


def _expected(spec: TrunkSpec) -> str:
    return (f"Expected torchvision's ImageNet {spec.name.upper()} weights: '{spec.file_name}' ({spec.size_mb} MB, from "
            f"{spec.url}), or a .safetensors with the same key names (features.0.weight, ...)")


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size / 2**20:.1f} MB"
    except OSError:
        return "size unknown"


def _unreadable(spec: TrunkSpec, path: Path, kind: str, error: BaseException) -> TrunkFileError:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    reason = f"{type(error).__name__}: {text.split('. ')[0]}"[:300]  # the first sentence
    return TrunkFileError(
        f"{path} ({_size(path)}) cannot be read as a {kind} file ({reason}); it may be truncated (an interrupted "
        f"download or copy) or another kind of file. {_expected(spec)}. Replace the file.")


def _read_state_dict(path: Path, spec: TrunkSpec) -> dict[str, torch.Tensor]:
    """The tensors of a trunk file, through safetensors or ``torch.load(weights_only=True)`` only (a file's pickled
    code never runs); any failure to read it becomes a :class:`TrunkFileError` that names it."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        out = {}
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in f.keys():
                    if k.startswith("features.") or k.split(".", 1)[0].isdigit():
                        out[k] = f.get_tensor(k)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type (and OSError, ...)
            raise _unreadable(spec, path, "safetensors", e) from e
        return out
    try:
        try:  # new zip format: memory-map, so the classifier's 470 MB are never read
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # a damaged zip file: the legacy reader would only obscure the reason
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format cannot be mapped
    except Exception as e:  # noqa: BLE001 - zip, unpickling (weights_only refusals too), EOF, OS errors
        raise _unreadable(spec, path, "PyTorch (torch.save, weights only)", e) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise TrunkFileError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors. {_expected(spec)}.")
    return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def load_trunk_state_dict(name: str, path: str | os.PathLike, upto: int | None = None) -> dict[str, torch.Tensor]:
    """``features.*`` of a torchvision VGG file, as keys of :func:`vgg_features` (``"0.weight"``, ...), checked
    against the architecture: a wrong or truncated file gives a :class:`TrunkFileError` that names it and says
    what was expected."""
    path = Path(path)
    spec = TRUNKS[name]
    raw = _read_state_dict(path, spec)
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
        raise TrunkFileError(f"{path} is not torchvision's {name.upper()} ({detail}). {_expected(spec)}.")
    bad = [f"features.{k}" for k in expected if not feats[k].is_floating_point() or not torch.isfinite(feats[k]).all()]
    if bad:
        raise TrunkFileError(f"{path} has non-float or non-finite (NaN/Inf) values in {', '.join(bad[:3])}"
                             f"{' and more' if len(bad) > 3 else ''}; it is damaged. {_expected(spec)}.")
    return {k: feats[k].float() for k in expected}


def _meta_features(name: str, upto: int | None) -> nn.Sequential:
    with torch.device("meta"):
        return vgg_features(name, upto)
