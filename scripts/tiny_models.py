"""Tiny random-weight Stable Diffusion models built through ComfyUI's own classes (no downloads).

Shared by the test harness and the demo. Import only after ``comfy_headless.bootstrap()`` (or
``start()``): it imports ``comfy``.

Why these shapes (ComfyUI 0.3.75):

* ComfyUI's checkpoint detection only recognises real families, so the UNet keeps SD's width
  (model_channels 320; context_dim 768 for SD1.x, 1024 with linear projections for SD2.x) but has a
  single level with one res block and one transformer block: 25.8M parameters instead of 860M. It is
  written as a normal single-file checkpoint and detected as ``SD15`` / ``SD20`` by
  ``CheckpointLoaderSimple``.
* The checkpoint's VAE is a TAESD (ComfyUI detects ``taesd_decoder.*`` keys under
  ``first_stage_model.`` and builds ``comfy.taesd.taesd.TAESD``): 2.4M parameters, latent scale 8,
  4 latent channels, fast on a CPU. ``vae.first_stage_model.decode`` works with gradients.
* The text encoder, when included, is the real architecture at full size (CLIP-L for SD1.x: 123M
  parameters, stored fp16; OpenCLIP-H for SD2.x is 354M, so SD2.x checkpoints leave it out by default
  and tests use ``make_conditioning`` instead).
* ComfyUI's layers are created empty (``comfy.ops.disable_weight_init``): every parameter is set here,
  from a seeded generator, so the same seed gives bit-identical weights.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

FAMILIES = ("sd15", "sd20")

_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "model_channels": 320, "num_res_blocks": [1], "channel_mult": [1],
    "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def unet_config(family: str) -> dict:
    """A complete one-level UNet config that ComfyUI's detection maps back to ``family``."""
    if family == "sd15":
        return {**_UNET_COMMON, "context_dim": 768, "use_linear_in_transformer": False, "num_heads": 8}
    if family == "sd20":
        return {**_UNET_COMMON, "context_dim": 1024, "use_linear_in_transformer": True, "num_head_channels": 64}
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def context_dim(family: str) -> int:
    return unet_config(family)["context_dim"]


def model_config(family: str):
    import comfy.supported_models as sm
    cls = {"sd15": sm.SD15, "sd20": sm.SD20}[family]
    return cls(unet_config(family))


@torch.no_grad()
def init_weights_(module: torch.nn.Module, seed: int, std_scale: float = 1.0) -> torch.nn.Module:
    """Deterministically initialise every parameter of ``module`` (ComfyUI creates them empty).

    Matrices and kernels: N(0, std_scale / sqrt(fan_in)); 1-D weights (norm scales): 1; other 1-D
    parameters (biases): 0. Scalar (0-D) parameters are plain ``nn.Parameter(torch.tensor(v))`` with a
    meaning (TAESD's ``vae_scale`` = 1, ``vae_shift`` = 0), not empty ComfyUI layers: they are kept, and
    so are buffers (they hold computed things such as the sigma schedule).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            t = torch.randn(p.shape, generator=g, dtype=torch.float32) * (std_scale / math.sqrt(fan_in))
            p.copy_(t.to(p.dtype))
        elif p.ndim == 1 and name.endswith("weight"):
            p.fill_(1.0)
        elif p.ndim == 1:
            p.zero_()
        elif not torch.isfinite(p).all():
            raise ValueError(f"scalar parameter {name} is not initialised ({p.item()})")
    return module


def build_model(family: str = "sd15", seed: int = 0, model_channels: int | None = None,
                num_heads: int | None = None, context_dim: int | None = None):
    """A tiny UNet as a ComfyUI ``ModelPatcher`` (built directly, not through a checkpoint).

    ``model_channels`` below 320 gives a much cheaper UNet for tests that do not load it from a checkpoint
    (ComfyUI's detection only knows real families' widths). ``num_heads`` sets the attention heads (head
    width = channels / heads); on a CPU one wide head is several times faster than SD1.x's 8 narrow ones
    for 64x64-latent windows. ``context_dim`` sets the prompt embedding width (tests with random
    conditioning use narrow ones)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    mc = model_config(family)
    if model_channels is not None:
        mc.unet_config["model_channels"] = model_channels
    if num_heads is not None:
        mc.unet_config["num_heads"], mc.unet_config["num_head_channels"] = num_heads, -1
    if context_dim is not None:
        mc.unet_config["context_dim"] = context_dim
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    init_weights_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_taesd_vae(seed: int = 0):
    """A random TAESD as a ComfyUI ``VAE`` (what tiny checkpoints carry)."""
    import comfy.sd
    import comfy.taesd.taesd as taesd
    net = taesd.TAESD(latent_channels=4)
    init_weights_(net, seed)
    with torch.no_grad():
        # Calibrate the last conv on a fixed probe latent (std 2: sampled latents of a random model are
        # larger than unit) so decoded pictures sit mid-range (per channel
        # mean 0.5, std 0.2 before ComfyUI's clamp to 0..1) instead of being clamped to black or white.
        probe = 2.0 * torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed + 12345))
        last = net.taesd_decoder[-1]
        last.bias.zero_()
        out = net.taesd_decoder(probe)
        std = out.std(dim=(0, 2, 3)).clamp_min(1e-6)
        last.weight.mul_((0.2 / std).view(-1, 1, 1, 1))
        last.bias.copy_(0.5 - out.mean(dim=(0, 2, 3)) * 0.2 / std)
    return comfy.sd.VAE(sd=net.state_dict())


def build_kl_vae(seed: int = 0, ch: int = 32):
    """A small KL autoencoder (SD's VAE architecture, 4 levels so the scale stays 8, ``ch`` channels)
    as a ComfyUI ``VAE``, through ``comfy.sd.VAE(sd=..., config=...)``."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": ch, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                "dropout": 0.0}
    config = {"params": {"embed_dim": 4, "ddconfig": ddconfig}}
    net = AutoencoderKL(**config["params"])
    init_weights_(net, seed)
    return comfy.sd.VAE(sd=net.state_dict(), config=config)


def build_clip(family: str = "sd15", seed: int = 0):
    """The family's real text encoder, full size, random weights, as a ComfyUI ``CLIP``."""
    import comfy.sd
    mc = model_config(family)
    clip = comfy.sd.CLIP(target=mc.clip_target(), embedding_directory=None)
    init_weights_(clip.cond_stage_model, seed, std_scale=0.5)
    return clip


def make_conditioning(family: str = "sd15", seed: int = 0, batch: int = 1, tokens: int = 77,
                      scale: float = 1.0) -> list:
    """A CONDITIONING value as ComfyUI nodes pass it: ``[[cond (B,tokens,ctx), {"pooled_output": (B,ctx)}]]``."""
    g = torch.Generator().manual_seed(seed)
    d = context_dim(family)
    cond = torch.randn(batch, tokens, d, generator=g) * scale
    pooled = torch.randn(batch, d, generator=g) * scale
    return [[cond, {"pooled_output": pooled}]]


def write_checkpoint(path: Path | str, family: str = "sd15", seed: int = 0, with_clip: bool | None = None) -> Path:
    """Write a single-file checkpoint (UNet + TAESD VAE [+ text encoder]) that ``CheckpointLoaderSimple``
    loads as ``family``. ``with_clip`` defaults to True for sd15 and False for sd20 (see module doc).
    Uses ComfyUI's own ``comfy.sd.save_checkpoint`` (what the CheckpointSave node does)."""
    import comfy.sd
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if with_clip is None:
        with_clip = family == "sd15"
    model = build_model(family, seed)
    vae = build_taesd_vae(seed + 1)
    clip = build_clip(family, seed + 2) if with_clip else None
    tmp = path.with_name(path.name + ".partial")
    comfy.sd.save_checkpoint(str(tmp), model, clip=clip, vae=vae,
                             metadata={"syncdiffusion_tiny": f"{family} seed={seed} random weights"})
    tmp.replace(path)
    return path


def write_controlnet(path: Path | str, family: str = "sd15", seed: int = 0) -> Path:
    """Write a random ControlNet for the tiny UNet of ``family`` (``comfy.cldm.cldm.ControlNet``, 3-channel
    hints) that ``ControlNetLoader`` / ``comfy.controlnet.load_controlnet`` detect and load. The format follows
    the file name: ``.safetensors``, else a ``torch.save`` state dict (what ``.pth`` files hold)."""
    import comfy.cldm.cldm
    import comfy.ops
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in unet_config(family).items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(**cfg, hint_channels=3, dtype=torch.float32,
                                     operations=comfy.ops.disable_weight_init)
    init_weights_(net, seed)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_name(path.name + ".partial")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(tmp))
    else:
        torch.save(sd, str(tmp))
    tmp.replace(path)
    return path


@dataclasses.dataclass
class TinyModels:
    """What ``CheckpointLoaderSimple`` gave for a tiny checkpoint, plus ready conditioning."""
    family: str
    ckpt_name: str
    ckpt_path: Path
    model: object          # comfy.model_patcher.ModelPatcher
    clip: object | None    # comfy.sd.CLIP, or None when the checkpoint has no text encoder
    vae: object            # comfy.sd.VAE (TAESD)
    positive: list
    negative: list


def load_checkpoint(path: Path | str):
    """(model, clip, vae) through ComfyUI's loader, as ``CheckpointLoaderSimple`` does."""
    import comfy.sd
    out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                embedding_directory=None)
    return out[0], out[1], out[2]


def random_trunk_state_dict(name: str = "vgg16", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random VGG trunk (torchvision's initialisation, ``features.*`` key names as in torchvision's file), drawn
    from ``seed`` without touching the global random state."""
    from syncdiff_core import perceptual  # plain torch; nothing ComfyUI

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        feats = perceptual.vgg_features(name)
    return {f"features.{k}": v.contiguous() for k, v in feats.state_dict().items()}


def write_random_trunk(path: Path | str, name: str = "vgg16", seed: int = 0) -> Path:
    """:func:`random_trunk_state_dict` written to ``path`` (safetensors, or torch's format for other suffixes), so
    the pack's LPIPS / style networks load offline (tests, the demo, benchmarks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = random_trunk_state_dict(name, seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path
