"""The one model and asset builder of the tests, the benches and the demo: random-weight models built through
ComfyUI's own classes (no downloads). Tiny SD1.x / SD2.x checkpoints and their parts, the micro UNet and ControlNet
of the layout tests, real-size models for the GPU benchmarks, the random LPIPS trunk; tiny models of every other
family are in ``devtools.families``. Call the functions after ``devtools.headless.bootstrap()`` (they import ComfyUI).
``python -m devtools.models CHECKPOINT --size sd2-base|tiny-sd20`` writes a checkpoint in a fresh process.

Why these shapes: ComfyUI's checkpoint detection only recognises real families, so the tiny UNet keeps SD's width
(model_channels 320; context 768 for SD1.x, 1024 with linear projections for SD2.x) on a single level with one res
block and one transformer block (25.8M parameters), which ``CheckpointLoaderSimple`` detects as ``SD15`` / ``SD20``.
Its VAE is a TAESD (2.4M parameters, scale 8, fast on a CPU, differentiable). The text encoder, when included, is the
real CLIP-L (123M; SD2.x's OpenCLIP-H is 354M, so SD2.x checkpoints leave it out and tests use ``make_conditioning``).
Every parameter is set from a seeded generator, so the same seed gives bit-identical weights.
"""
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
def init_weights_(module: torch.nn.Module, seed: int, std_scale: float = 1.0, skip: tuple = (),
                  on_device: bool = False) -> torch.nn.Module:
    """Deterministically initialise every parameter of ``module`` (ComfyUI creates them empty).

    Matrices and kernels: N(0, std_scale / sqrt(fan_in)), drawn in float32 on the CPU so every dtype gets the same
    weights (``on_device``: drawn on the weights' device: seconds, not minutes, for billions of parameters on a GPU);
    1-D weights, scales and gammas: 1; other 1-D parameters: 0. Scalar parameters (TAESD's ``vae_scale``) and buffers
    (the sigma schedule) have a meaning and are kept, except MMDiT's ``pos_embed`` table, a weight created empty.
    """
    device = next(module.parameters()).device if on_device else torch.device("cpu")
    g = torch.Generator(device).manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.numel() == 0 or name.startswith(skip):
            continue
        if p.ndim >= 2 and p[0].numel() > 1:
            std = std_scale / math.sqrt(p[0].numel())
            p.copy_(torch.empty(p.shape, dtype=p.dtype if on_device else torch.float32, device=device)
                    .normal_(0.0, std, generator=g))
        elif p.ndim >= 1 and leaf.endswith(("weight", "scale", "gamma")):
            p.fill_(1.0)
        elif p.ndim >= 1:
            p.zero_()
        elif not torch.isfinite(p).all():
            raise ValueError(f"scalar parameter {name} is not initialised ({p.item()})")
    for name, b in module.named_buffers():
        if name.endswith("pos_embed"):
            b.copy_(torch.empty(b.shape, dtype=torch.float32, device=device).normal_(0.0, 0.5, generator=g))
        elif b.is_floating_point() and not torch.isfinite(b).all():
            raise ValueError(f"buffer {name} is not initialised")
    return module


def build_model(family: str = "sd15", seed: int = 0, model_channels: int | None = None,
                num_heads: int | None = None, context_dim: int | None = None):
    """A tiny UNet as a ComfyUI ``ModelPatcher``, built directly (so ``model_channels`` may be below the 320 that
    checkpoint detection needs). On a CPU one wide attention head (``num_heads``) is several times faster than
    SD1.x's 8 narrow ones; ``context_dim`` is the prompt embedding width."""
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
    config = {"params": {"embed_dim": 4, "ddconfig": {**SD_VAE, "ch": ch, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}}}
    with torch.inference_mode(False):  # a plain module whatever the caller's mode: only its state dict is kept
        net = init_weights_(AutoencoderKL(**config["params"]), seed)
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


def _save(sd: dict, path: Path | str) -> Path:
    """``sd`` written to ``path`` atomically: safetensors for a ``.safetensors`` name, else ``torch.save``'s."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    sd = {k: v.contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(tmp))
    else:
        torch.save(sd, str(tmp))
    tmp.replace(path)
    return path


def _controlnet(unet: dict, seed: int):
    """A random ``comfy.cldm.cldm.ControlNet`` (3-channel hints) for a UNet of config ``unet``."""
    import comfy.cldm.cldm
    import comfy.ops

    cfg = {k: v for k, v in unet.items() if k != "out_channels"}
    return init_weights_(comfy.cldm.cldm.ControlNet(**cfg, hint_channels=3, dtype=torch.float32,
                                                    operations=comfy.ops.disable_weight_init), seed)


def write_checkpoint(path: Path | str, family: str = "sd15", seed: int = 0, with_clip: bool | None = None) -> Path:
    """A single-file checkpoint (UNet + TAESD VAE [+ text encoder, by default for sd15 only]) that
    ``CheckpointLoaderSimple`` loads as ``family``, written with ComfyUI's ``comfy.sd.save_checkpoint``."""
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
    """A random ControlNet for the tiny UNet of ``family`` that ``ControlNetLoader`` detects and loads."""
    return _save(_controlnet(unet_config(family), seed).state_dict(), path)


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
    """A random VGG trunk (torchvision's initialisation and ``features.*`` key names), global RNG untouched."""
    from syncdiff_core import perceptual  # plain torch; nothing ComfyUI

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        feats = perceptual.vgg_features(name)
    return {f"features.{k}": v.contiguous() for k, v in feats.state_dict().items()}


def write_random_trunk(path: Path | str, name: str = "vgg16", seed: int = 0) -> Path:
    """:func:`random_trunk_state_dict` written to ``path``, so the pack's LPIPS / style networks load offline."""
    return _save(random_trunk_state_dict(name, seed), path)


# ----------------------------------------------------------------------------- the micro UNet (layout tests)

MICRO_CTX = 64  # context_dim of the micro UNet (the prompts' embedding width)
#: The tiny SD1.x one-level config at 32 channels and a MICRO_CTX-wide context: the same architecture as the tiny
#: checkpoint's UNet, about 100x cheaper, for tests that build models directly (checkpoint detection needs 320).
MICRO_UNET = {**unet_config("sd15"), "model_channels": 32, "context_dim": MICRO_CTX}


def build_micro_model(seed: int = 0):
    return build_model("sd15", seed, model_channels=MICRO_UNET["model_channels"], context_dim=MICRO_CTX)


def build_micro_controlnet(seed: int = 1):
    """A random ControlNet for the micro UNet (its zero convs random too, so the hint changes the result)."""
    import comfy.controlnet
    import comfy.model_management as mm

    return comfy.controlnet.ControlNet(_controlnet(MICRO_UNET, seed), load_device=mm.get_torch_device())


# ----------------------------------------------------------------------------- real sizes (GPU benchmarks)

#: SD 2.0-base's UNet (865 M parameters), as ``comfy.supported_models.SD20`` takes it.
SD2_BASE_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False, "context_dim": 1024,
    "use_linear_in_transformer": True, "num_head_channels": 64, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
#: SDXL's UNet (2.57 B parameters).
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
#: Flux.1 [dev] (11.9 B parameters).
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
            "txt_ids_dims": []}
#: SD 1.5's UNet (860 M parameters), as ``comfy.supported_models.SD15`` takes it.
SD15_UNET = {**SD2_BASE_UNET, "context_dim": 768, "use_linear_in_transformer": False, "num_heads": 8,
             "num_head_channels": -1}
#: Qwen-Image's transformer (20.4 B parameters): the keys ComfyUI's detection sets (its class's defaults are the
#: real size).
QWEN_IMAGE = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60}
#: SD's KL VAE (4 latent channels), the ``ddconfig`` of ``AutoencoderKL``.
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
#: A narrow SD KL VAE for the benchmarks' CPU checks (``--tiny``).
TINY_SD_VAE = {**SD_VAE, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}


def build_sd2_unet(dtype=torch.float16, seed: int = 0, load_device=None):
    """SD 2.0-base's UNet with random weights as a ``ModelPatcher``."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    mc = comfy.supported_models.SD20(dict(SD2_BASE_UNET))
    mc.set_inference_dtype(dtype, None)
    base = mc.get_model({})
    init_weights_(base.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(base, load_device=load_device or mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_sized_model(cls_name: str, config: dict, weight_dtype, seed: int = 0, device=None):
    """A random-weight ``comfy.supported_models.<cls_name>`` as a ``ModelPatcher``, made on ``device`` (the load
    device by default), stored in ``weight_dtype`` and computed in the dtype ComfyUI's loader picks for it
    (``unet_manual_cast``: fp8 weights are cast per layer, as UNETLoader's fp8_e4m3fn). Tensors are drawn on the
    device (2-byte or wider, then cast), so 20 B parameters take seconds and never pass through host memory;
    :func:`init_weights_`'s distributions, another generator."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    from devtools.families import config_for_this_comfyui

    device = torch.device(device) if device is not None else mm.get_torch_device()
    mc = getattr(sm, cls_name)(config_for_this_comfyui(config))
    mc.set_inference_dtype(weight_dtype, mm.unet_manual_cast(weight_dtype, device, mc.supported_inference_dtypes))
    with torch.inference_mode():
        base = mc.get_model({}, device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        for name, p in base.diffusion_model.named_parameters():
            if p.ndim >= 2 and p[0].numel() > 1:
                draw = p.dtype if p.dtype.itemsize >= 2 else torch.bfloat16
                p.copy_(torch.empty(p.shape, dtype=draw, device=p.device).normal_(
                    0.0, 1.0 / math.sqrt(p[0].numel()), generator=g))
            elif p.ndim >= 1 and name.endswith(("weight", "scale", "gamma")):
                p.fill_(1.0)
            else:
                p.zero_()
    base.diffusion_model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_sd_vae(dtype=None, seed: int = 0, tiny: bool = False):
    """SD's KL VAE (``tiny``: :data:`TINY_SD_VAE`) with random weights as a ComfyUI ``VAE``."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    params = {"embed_dim": 4, "ddconfig": TINY_SD_VAE if tiny else SD_VAE}
    net = init_weights_(AutoencoderKL(**params), seed)
    return comfy.sd.VAE(sd=net.state_dict(), config={"params": params}, dtype=dtype)


#: The diffusion transformers and UNets of ``build_real_size`` beyond SD 2: (class in ``comfy.supported_models``,
#: config, dtype, prompt tokens, text embedding width, pooled width, guidance).
REAL_SIZES = {"sdxl": ("SDXL", SDXL_UNET, torch.float16, 77, 2048, 1280, None),
              "flux": ("Flux", FLUX_DEV, torch.bfloat16, 512, 4096, 768, 3.5)}


def build_real_size(name: str, seed: int = 0, tiny: bool = False):
    """(model patcher, VAE, positive, negative) of ``name`` (``sd2``, ``sdxl``, ``flux``) at its real size with
    random weights (speed and memory do not depend on them) and conditioning of its text encoders' shapes; SD 2 and
    SDXL with SD's KL VAE, Flux with its 16-channel one. ``tiny``: the test suite's tiny model of the family."""
    from devtools import families

    if tiny:
        fam = families.build({"sd2": "sd20"}.get(name, name))
        return fam.model, fam.vae, fam.positive, fam.negative
    if name == "sd2":
        model, vae = build_sd2_unet(torch.float16, seed), build_sd_vae(torch.float16, seed + 1)
        tokens, ctx, pooled, guidance = 77, 1024, None, None
    else:
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models as sm

        cls, config, dtype, tokens, ctx, pooled, guidance = REAL_SIZES[name]
        mc = getattr(sm, cls)(families.unet_config_for(families.FamilySpec(name, cls, config, "")))
        mc.set_inference_dtype(dtype, None)
        device = mm.get_torch_device()
        with torch.inference_mode():
            base = mc.get_model({}, device=device)
            init_weights_(base.diffusion_model, seed, on_device=True)
        base.diffusion_model.requires_grad_(False)
        model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=mm.unet_offload_device())
        vae = build_sd_vae(dtype, seed + 1) if name == "sdxl" else families.build_vae("kl16", seed + 1)
    g = torch.Generator().manual_seed(seed + 2)

    def cond():
        extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=g)}
        return [[torch.randn(1, tokens, ctx, generator=g), extra | ({} if guidance is None else {"guidance": guidance})]]

    return model, vae, cond(), cond()


def write_sd2_base_checkpoint(path: Path | str, seed: int = 0) -> Path:
    """A random-weight checkpoint of SD 2.0-base's size (fp16 UNet, KL VAE) for ``CheckpointLoaderSimple``."""
    import comfy.sd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_sd2_unet(torch.float16, seed, load_device=torch.device("cpu"))
    vae = build_sd_vae(seed=seed + 1)
    comfy.sd.save_checkpoint(str(path), model, vae=vae, metadata={"syncdiffusion": "random SD2-base-size"})
    return path


def write_taesd_decoder(path: Path | str, seed: int) -> Path:
    """A random TAESD decoder (ComfyUI's class) as the ``taesd_decoder`` file of ``models/vae_approx``."""
    import comfy.taesd.taesd as taesd

    return _save(init_weights_(taesd.TAESD().taesd_decoder, seed).state_dict(), path)


def install_random_trunk(models_dir: Path | str, name: str = "vgg16", seed: int = 0,
                         file_name: str | None = None) -> Path:
    """A random ``name`` trunk written into ``models_dir/lpips`` (once), that folder registered as the pack's
    ``lpips`` model folder."""
    import folder_paths

    from syncdiff_core.comfy.assets import register_lpips_folder

    folder = Path(models_dir) / "lpips"
    path = folder / (file_name or f"{name}-random.safetensors")
    if not path.exists():
        write_random_trunk(path, name, seed)
    register_lpips_folder()  # what the pack's entry point does
    if str(folder) not in folder_paths.get_folder_paths("lpips"):
        folder_paths.add_model_folder_path("lpips", str(folder))
    return path


def main(argv=None) -> int:
    """Write a random checkpoint in this process (a bench's parent writes it with a lane's ComfyUI)."""
    import argparse

    from devtools import headless

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("path", type=Path)
    p.add_argument("--size", choices=("sd2-base", "tiny-sd20"), default="sd2-base")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    headless.bootstrap(None, cpu=a.size != "sd2-base")
    if a.size == "sd2-base":
        write_sd2_base_checkpoint(a.path, a.seed)
    else:
        write_checkpoint(a.path, family="sd20", seed=a.seed)
    print("checkpoint written", a.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
