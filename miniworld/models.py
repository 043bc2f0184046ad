"""The miniature world's models, built through ComfyUI's own classes, and their committed weights.

* VAE: ``comfy.ldm.models.autoencoder.AutoencoderKL`` (SD's KL autoencoder: 4 latent channels, 8 px per latent
  px, three downsamplings) at 32 base channels, wrapped as ``comfy.sd.VAE(sd=..., config=...)``. Its latents
  are rescaled after training so that SD1.x's latent format (scale 0.18215) brings them to unit variance.
* UNet: ``comfy.supported_models.SD15`` with a small ``unet_config`` (64 channels, two levels), so the model is
  ComfyUI's ``BaseModel`` with SD's eps prediction and SD's scaled-linear noise schedule.
* Text encoder: SD1.x's CLIP-L (``comfy.sd.CLIP`` on ``SD15.clip_target()``) with random weights drawn from a
  fixed seed: not stored, rebuilt bit-identically. The UNet learned what its embeddings of the world's words
  mean ("dawn", "night", "snow", "lake", ...).

ComfyUI's checkpoint and VAE detection recognises only real families' widths (a 320-channel UNet, a 128-channel
VAE), so these narrower models cannot go through CheckpointLoaderSimple; :func:`load` builds them with the same
classes those loaders use and ``miniworld.comfy_nodes`` offers them to a graph as one loader node.

Import only after ComfyUI is importable (``comfy_headless.bootstrap`` / ``start``, or ComfyUI on ``sys.path``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

#: The committed weights (``$MINIWORLD_ASSETS`` points elsewhere, e.g. at a fresh training run's output).
ASSETS = Path(os.environ.get("MINIWORLD_ASSETS") or Path(__file__).resolve().parent / "assets")
CHECKSUMS = ASSETS / "checksums.json"
ASSET_FILES = ("vae.safetensors", "unet.safetensors", "classifier.safetensors")
REBUILD = "python -m miniworld.train --out miniworld/assets"  # run from the repository root

CLIP_SEED = 30
#: SD1.x latent format's scale factor: the VAE's latents are trained/rescaled to std 1 / this.
SD_SCALE = 0.18215

VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                "dropout": 0.0}
VAE_CONFIG = {"params": {"embed_dim": 4, "ddconfig": VAE_DDCONFIG}}

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 16, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "model_channels": 64, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "context_dim": 768, "use_linear_in_transformer": False, "num_heads": 2, "num_head_channels": -1,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


class AssetError(RuntimeError):
    """A committed weight file is missing or does not match its checksum."""


@torch.no_grad()
def init_weights_(module: torch.nn.Module, seed: int, std_scale: float = 1.0) -> torch.nn.Module:
    """Seeded initialisation of every parameter (ComfyUI creates its layers empty): matrices and kernels
    N(0, std_scale / sqrt(fan_in)), 1-D weights (norm scales) 1, biases 0; scalars and buffers are kept."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            t = torch.randn(p.shape, generator=g, dtype=torch.float32) * (std_scale / math.sqrt(p[0].numel()))
            p.copy_(t.to(p.dtype))
        elif p.ndim == 1 and name.endswith("weight"):
            p.fill_(1.0)
        elif p.ndim == 1:
            p.zero_()
    return module


# ---------------------------------------------------------------------------------------------------------------
# Building (training and loading use the same constructors)


def vae_net(seed: int = 0):
    """A fresh ``AutoencoderKL`` of the world's shape (for training)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    return init_weights_(AutoencoderKL(**VAE_CONFIG["params"]), seed)


def comfy_vae(state_dict: dict):
    """The trained autoencoder as a ComfyUI ``VAE`` (what a VAE loader returns)."""
    import comfy.sd
    return comfy.sd.VAE(sd=dict(state_dict), config=VAE_CONFIG)


def model_config():
    import comfy.supported_models as sm
    mc = sm.SD15(dict(UNET_CONFIG))
    mc.set_inference_dtype(torch.float32, None)
    return mc


def base_model(seed: int = 0, device=None):
    """ComfyUI's SD1.x ``BaseModel`` around the small UNet (eps prediction, SD's schedule)."""
    model = model_config().get_model({}, device=device)
    init_weights_(model.diffusion_model, seed)
    return model


def patcher(model):
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def clip(seed: int = CLIP_SEED):
    """SD1.x's text encoder, random weights from ``seed`` (bit-identical on every build) as a ComfyUI ``CLIP``."""
    import comfy.sd
    c = comfy.sd.CLIP(target=model_config().clip_target(), embedding_directory=None)
    init_weights_(c.cond_stage_model, seed, std_scale=0.5)
    return c


def encode_prompts(text_encoder, prompts: list[str]) -> torch.Tensor:
    """(n, 77, 768) cross-attention embeddings as CLIPTextEncode makes them."""
    out = []
    for p in prompts:
        tokens = text_encoder.tokenize(p)
        cond = text_encoder.encode_from_tokens(tokens)
        out.append(cond[:, :77].float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# Committed assets


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_assets(folder: Path | str = ASSETS) -> dict[str, Path]:
    """Every asset file present and matching ``checksums.json``; else :class:`AssetError` naming the file and the
    command that rebuilds it."""
    folder = Path(folder)
    sums_file = folder / CHECKSUMS.name
    if not sums_file.is_file():
        raise AssetError(f"{sums_file} is missing; rebuild the world's weights with `{REBUILD}`")
    sums = json.loads(sums_file.read_text())
    out = {}
    for name in ASSET_FILES:
        path = folder / name
        if not path.is_file():
            raise AssetError(f"miniworld asset {path} is missing; rebuild it with `{REBUILD}`")
        if name not in sums:
            raise AssetError(f"{sums_file} has no checksum for {name}; rebuild the assets with `{REBUILD}`")
        got = sha256(path)
        if got != sums[name]:
            raise AssetError(f"miniworld asset {path} is corrupted (sha256 {got[:12]}..., expected "
                             f"{sums[name][:12]}...); rebuild it with `{REBUILD}`")
        out[name] = path
    return out


def write_checksums(folder: Path | str) -> Path:
    folder = Path(folder)
    sums = {name: sha256(folder / name) for name in ASSET_FILES if (folder / name).is_file()}
    path = folder / CHECKSUMS.name
    path.write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")
    return path


def _load_sd(path: Path) -> dict:
    from safetensors.torch import load_file
    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as e:  # a file that passed the checksum but is not a safetensors file
        raise AssetError(f"miniworld asset {path} cannot be read ({e}); rebuild it with `{REBUILD}`") from e


def load(folder: Path | str = ASSETS, with_clip: bool = True):
    """(model: ModelPatcher, clip: CLIP | None, vae: VAE) of the trained world, checked against the checksums."""
    files = check_assets(folder)
    model = base_model()
    missing, unexpected = model.diffusion_model.load_state_dict(_load_sd(files["unet.safetensors"]), strict=False)
    if missing or unexpected:
        raise AssetError(f"{files['unet.safetensors']} does not fit the UNet (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); rebuild it with `{REBUILD}`")
    model.eval()
    vae = comfy_vae(_load_sd(files["vae.safetensors"]))
    return patcher(model), (clip() if with_clip else None), vae


def load_classifier(folder: Path | str = ASSETS):
    from miniworld.classifier import AttributeNet
    files = check_assets(folder)
    net = AttributeNet()
    net.load_state_dict(_load_sd(files["classifier.safetensors"]))
    return net.eval()
