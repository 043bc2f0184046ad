"""Random-weight models of real sizes, built through ComfyUI's own classes (timing does not depend on weight values).

SD 2.0-base's UNet (865M parameters) and SD's KL VAE in fp16 on a GPU, LPIPS-VGG with a random VGG16 trunk (fp32),
a random TAESD decoder for the ``taesd`` loss decoder, and conditioning tensors (1, 77, 1024). ``--tiny``: the same
classes, narrow, in fp32 on the CPU. Import after ``bench.options.start_comfy``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import folder_paths
from tiny_models import init_weights_, write_random_trunk

from syncdiff_core.comfy.assets import get_lpips, register_lpips_folder

from .sizes import SD2_BASE_UNET, SD_VAE
from .state import Bench, gib, now

TINY_UNET = {**SD2_BASE_UNET, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
             "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1}
TINY_VAE = {**SD_VAE, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}


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
    mc = comfy.supported_models.SD20(TINY_UNET if tiny else SD2_BASE_UNET)
    if tiny:
        mc.unet_config["num_head_channels"] = 32
    mc.set_inference_dtype(b.dtype, None)
    base = mc.get_model({})
    init_weights_(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=b.device, offload_device=mm.unet_offload_device())
    from comfy.ldm.models.autoencoder import AutoencoderKL

    params = {"embed_dim": 4, "ddconfig": TINY_VAE if tiny else SD_VAE}
    net = AutoencoderKL(**params)
    init_weights_(net, seed + 1)
    vae = comfy.sd.VAE(sd=net.state_dict(), config={"params": params}, dtype=b.dtype)
    del net
    g = torch.Generator().manual_seed(seed + 2)
    cond = torch.randn(1, 77, 1024, generator=g)
    uncond = torch.randn(1, 77, 1024, generator=g)

    models_dir = Path(models_dir)
    write_random_trunk(models_dir / "lpips" / "vgg16.safetensors", "vgg16", seed + 3)  # torchvision's VGG16 init
    write_taesd_decoder(models_dir / "vae_approx" / "taesd_decoder.safetensors", seed + 4)
    register_lpips_folder()  # what the extension's entry point does
    for kind in ("lpips", "vae_approx"):  # the pack's folder for trunks, ComfyUI's for TAESD: found there
        if str(models_dir / kind) not in folder_paths.get_folder_paths(kind):
            folder_paths.add_model_folder_path(kind, str(models_dir / kind))

    with torch.inference_mode():  # as ComfyUI's executor does: the weights on the GPU are inference tensors
        mm.load_models_gpu([model, vae.patcher])
    loss = get_lpips(b.device)
    n_unet = sum(p.numel() for p in base.diffusion_model.parameters())
    n_vae = sum(p.numel() for p in vae.first_stage_model.parameters())
    b.results["models"] = {"unet_params": n_unet, "vae_params": n_vae, "dtype": str(b.dtype),
                           "vae_dtype": str(vae.vae_dtype), "build_s": round(now() - t0, 1),
                           "resident_gib": round(gib(torch.cuda.memory_allocated()), 3) if b.cuda else None}
    print(f"UNet {n_unet / 1e6:.1f}M params, VAE {n_vae / 1e6:.1f}M, built in {now() - t0:.1f} s", flush=True)
    return Models(model, vae, loss, cond, uncond)


def write_taesd_decoder(path: Path, seed: int) -> Path:
    """A random TAESD decoder (ComfyUI's class) as the ``taesd_decoder`` file of ``models/vae_approx``."""
    import comfy.taesd.taesd as taesd
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    dec = taesd.TAESD().taesd_decoder
    init_weights_(dec, seed)
    save_file({k: v.contiguous() for k, v in dec.state_dict().items()}, str(path))
    return path
