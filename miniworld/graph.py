"""Run the world's models in a real headless ComfyUI graph with this pack's nodes (demo, evaluation, tests).

The trained models reach the graph through one loader node, ``MiniWorldLoader`` (MODEL, CLIP, VAE; its ``model``
choice picks the SD1.x UNet or the flow MMDiT, which share the text encoder and the VAE), registered
into ComfyUI's node registry at run time: ComfyUI's checkpoint detection only knows real families' widths
(see ``miniworld.models``), so a file loader cannot build these narrow models. Everything after the loader --
CLIPTextEncode, PanoramaLatent, SyncDiffusionSampler, VAEDecode, SaveImage -- is the normal graph.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
LOADER = "MiniWorldLoader"
_CACHE: dict = {}


def headless_module():
    """The repository's headless-ComfyUI start (``devtools.headless``)."""
    from devtools import headless
    return headless


def start(cpu: bool = True, base: Path | None = None, assets: Path | None = None):
    """ComfyUI headless with the pack loaded, the world's loader registered (weights from ``assets``, default
    the committed ones) and an LPIPS trunk available."""
    ch = headless_module()
    rt = ch.start(base or Path(tempfile.mkdtemp(prefix="miniworld-")), cpu=cpu)
    register_loader(rt, assets)
    ensure_trunk(rt)
    return rt


def loaded(folder: Path | None = None, model: str = "sd1"):
    """The world's (model, clip, vae) of denoiser ``model``, built once per process, folder and model."""
    from miniworld import models
    key = (str(folder or models.ASSETS), model)
    if key not in _CACHE:
        _CACHE[key] = models.load(folder or models.ASSETS, model=model)
    return _CACHE[key]


def register_loader(rt, folder: Path | None = None) -> None:
    class MiniWorldLoader:
        CATEGORY = "_for_testing/syncdiffusion"
        RETURN_TYPES = ("MODEL", "CLIP", "VAE")
        FUNCTION = "load"
        DESCRIPTION = ("The miniature trained world's denoiser (an SD1.x-architecture UNet or an AuraFlow-"
                       "architecture flow model), its text encoder and KL VAE.")

        @classmethod
        def INPUT_TYPES(cls):
            from miniworld import models
            return {"required": {}, "optional": {"model": (list(models.MODEL_FILES), {
                "default": "sd1", "tooltip": "sd1: eps-prediction UNet on SD's schedule; flow: MMDiT with "
                                             "velocity prediction on a shifted flow schedule"})}}

        def load(self, model="sd1"):
            return loaded(folder, model)

    rt.register_nodes({LOADER: MiniWorldLoader}, {LOADER: "Mini world model"})


def has_trunk(rt, name: str = "vgg16") -> bool:
    fp = rt.folder_paths
    if "lpips" not in fp.folder_names_and_paths:
        return False
    return any(Path(f).is_dir() and any(p.name.startswith(name) for p in Path(f).iterdir())
               for f in fp.get_folder_paths("lpips"))


def random_trunk(name: str = "vgg16", seed: int = 0) -> dict:
    """A random VGG trunk (torchvision's initialisation, ``features.*`` keys), from ``seed``."""
    from syncdiff_core import perceptual
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        feats = perceptual.vgg_features(name)
    return {f"features.{k}": v.contiguous() for k, v in feats.state_dict().items()}


def ensure_trunk(rt) -> None:
    """Use ComfyUI's models/lpips trunk when there is one, else write a random VGG16 trunk there (offline)."""
    real = Path(rt.comfy_dir) / "models" / "lpips"
    if real.is_dir():
        rt.add_model_folder("lpips", real)
    if not has_trunk(rt):
        from safetensors.torch import save_file
        folder = Path(rt.models_dir) / "lpips"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(random_trunk("vgg16", 0), str(folder / "vgg16-random.safetensors"))
        rt.add_model_folder("lpips", folder)


def panorama_prompt(positive: str, negative: str, width: int, height: int, seed: int, steps: int, cfg: float,
                    window: int, stride: int, sync_weight: float, sync_steps: int, prefix: str,
                    sync_decay: float = 0.95, model: str = "sd1") -> dict:
    """An API prompt: loader -> two CLIPTextEncode -> PanoramaLatent -> SyncDiffusionSampler -> VAEDecode -> SaveImage."""
    return {
        "1": {"class_type": LOADER, "inputs": {"model": model}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "PanoramaLatent", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "SyncDiffusionSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2],
            "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg, "window_size": window,
            "stride": stride, "sync_weight": sync_weight, "sync_decay": sync_decay, "sync_steps": sync_steps,
            "sync_every": 1, "wrap": False, "window_batch": 8}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def run_panorama(rt, **kw) -> torch.Tensor:
    """Run :func:`panorama_prompt` and return the saved image as (3, H, W) float in 0..1."""
    from PIL import Image
    result = rt.run_prompt(panorama_prompt(**kw))
    files = result.image_files()
    if not files:
        raise RuntimeError("the panorama graph saved no image")
    with Image.open(files[-1]) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
