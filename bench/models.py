"""The GPU benchmarks' models: SD 2.0-base's UNet and SD's KL VAE at real size (``devtools.models``) on the bench's
device, LPIPS-VGG on a random VGG16 trunk, a random TAESD decoder for the ``taesd`` loss decoder, and conditioning
tensors (1, 77, 1024). ``--tiny``: the same classes, narrow, in fp32 on the CPU. Import after ComfyUI started.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

import comfy.model_management as mm
import folder_paths
from devtools import models as dm
from syncdiff_core.comfy.assets import get_lpips

from .state import Bench, gib, now


class Models(NamedTuple):
    model: Any  # comfy.model_patcher.ModelPatcher (the UNet)
    vae: Any  # comfy.sd.VAE (KL)
    loss: Any  # the pack's LPIPS-VGG
    cond: torch.Tensor
    uncond: torch.Tensor


def build_models(b: Bench, models_dir: Path | str) -> Models:
    """The models, loaded on the device as ComfyUI's executor loads them. The random VGG16 trunk and TAESD decoder
    files are written into ``models_dir`` (ComfyUI's models folder of this process: ``lpips/``, ``vae_approx/``),
    where the pack looks for them. Records sizes and build time in ``b.results["models"]``."""
    t0 = now()
    tiny, seed = b.args.tiny, b.args.seed
    model = dm.build_sd2_unet(b.dtype, seed, tiny=tiny, load_device=b.device)
    vae = dm.build_sd_vae(b.dtype, seed + 1, tiny=tiny)
    g = torch.Generator().manual_seed(seed + 2)
    cond = torch.randn(1, 77, 1024, generator=g)
    uncond = torch.randn(1, 77, 1024, generator=g)

    models_dir = Path(models_dir)
    dm.install_random_trunk(models_dir, "vgg16", seed + 3, file_name="vgg16.safetensors")  # torchvision's init
    dm.write_taesd_decoder(models_dir / "vae_approx" / "taesd_decoder.safetensors", seed + 4)
    if str(models_dir / "vae_approx") not in folder_paths.get_folder_paths("vae_approx"):
        folder_paths.add_model_folder_path("vae_approx", str(models_dir / "vae_approx"))

    with torch.inference_mode():  # as ComfyUI's executor does: the weights on the GPU are inference tensors
        mm.load_models_gpu([model, vae.patcher])
    loss = get_lpips(b.device)
    n_unet = sum(p.numel() for p in model.model.diffusion_model.parameters())
    n_vae = sum(p.numel() for p in vae.first_stage_model.parameters())
    b.results["models"] = {"unet_params": n_unet, "vae_params": n_vae, "dtype": str(b.dtype),
                           "vae_dtype": str(vae.vae_dtype), "build_s": round(now() - t0, 1),
                           "resident_gib": round(gib(torch.cuda.memory_allocated()), 3) if b.cuda else None}
    print(f"UNet {n_unet / 1e6:.1f}M params, VAE {n_vae / 1e6:.1f}M, built in {now() - t0:.1f} s", flush=True)
    return Models(model, vae, loss, cond, uncond)
