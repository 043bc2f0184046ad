"""The miniature world's models, built through ComfyUI's own classes, and their committed weights.

* VAE: ``comfy.ldm.models.autoencoder.AutoencoderKL`` (SD's KL autoencoder: 4 latent channels, 8 px per latent
  px, three downsamplings) at 32 base channels, wrapped as ``comfy.sd.VAE(sd=..., config=...)``. Its latents
  are rescaled after training so that SD1.x's latent format (scale 0.18215) brings them to unit variance.
* UNet: ``comfy.supported_models.SD15`` with a small ``unet_config`` (64 channels, two levels), so the model is
  ComfyUI's ``BaseModel`` with SD's eps prediction and SD's scaled-linear noise schedule.
* Flow model: ``comfy.supported_models.AuraFlow`` with a small ``unet_config`` (``comfy.ldm.aura.mmdit.MMDiT``:
  128 wide, two joint text/image blocks as in SD3's MMDiT, two single-stream blocks as in Flux, 2x2 patches),
  so the model is ComfyUI's flow ``BaseModel``: CONST (velocity) prediction on ``ModelSamplingDiscreteFlow`` with
  the family's shift 1.73. It is the one flow architecture in ComfyUI whose latent format has SD's 4 channels
  (SDXL's, scale 0.13025), so it shares the world's VAE and text encoder: :func:`comfy_vae` rescales the VAE's
  latent space exactly for that format, which makes the flow model's input space the same unit-variance space
  the SD1.x UNet sees -- the two models differ only in architecture and parameterisation.
* Text encoder: SD1.x's CLIP-L (``comfy.sd.CLIP`` on ``SD15.clip_target()``) with random weights drawn from a
  fixed seed: not stored, rebuilt bit-identically; both denoisers take its (77, 768) token embeddings and
  learned what its embeddings of the world's words mean ("dawn", "night", "snow", "lake", ...).

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
#: Which denoiser a loader builds, and its weight file.
MODEL_FILES = {"sd1": "unet.safetensors", "flow": "flow.safetensors"}
#: Every file the training writes (``flow.safetensors`` may be absent from a folder: only ``load(model="flow")``
#: needs it); the training stage that makes each.
ASSET_FILES = ("vae.safetensors", "unet.safetensors", "classifier.safetensors", "flow.safetensors")
CORE_FILES = ASSET_FILES[:3]
STAGE_OF = {"classifier.safetensors": "classifier", "vae.safetensors": "vae", "unet.safetensors": "unet",
            "flow.safetensors": "flow"}
REBUILD = "python -m miniworld.train --out miniworld/assets"  # run from the repository root


def rebuild_command(name: str) -> str:
    """The training command that remakes asset ``name`` (a new VAE changes the latent space: both denoisers too)."""
    stage = STAGE_OF.get(name)
    if stage is None or stage == "vae":
        return REBUILD
    return f"{REBUILD} --stages {stage}"

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


#: The flow model: AuraFlow's MMDiT at toy width (about 2.4 M parameters; the file is fp16). ``max_seq`` is the
#: learned position table, 8 x 8 patches = one 128 px window; larger inputs interpolate it (ComfyUI's own code).
FLOW_CONFIG = {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 128, "n_layers": 4,
               "n_double_layers": 2, "n_heads": 4, "global_conddim": 128, "cond_seq_dim": 768, "max_seq": 64}


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


def comfy_vae(state_dict: dict, gain: float = 1.0):
    """The trained autoencoder as a ComfyUI ``VAE`` (what a VAE loader returns), its latents times ``gain``
    (:func:`latent_gain` of the model it goes with)."""
    import comfy.sd
    sd = {k: v.clone() for k, v in state_dict.items()}
    if gain != 1.0:
        scale_latent_space_(sd, gain)
    return comfy.sd.VAE(sd=sd, config=VAE_CONFIG)


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


def flow_model_config():
    import comfy.supported_models as sm
    mc = sm.AuraFlow(dict(FLOW_CONFIG))
    mc.set_inference_dtype(torch.float32, None)
    return mc


@torch.no_grad()
def flow_model(seed: int = 0, device=None):
    """ComfyUI's AuraFlow ``BaseModel`` around the small MMDiT (velocity prediction, shifted flow schedule), with
    the DiT's usual start: modulations and the output layer zero (every block starts as the identity, the model
    predicts 0) and small position and register tokens."""
    model = flow_model_config().get_model({}, device=device)
    net = init_weights_(model.diffusion_model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in net.named_parameters():
        if name.startswith(("positional_encoding", "register_tokens")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        elif ".mod" in name or name.startswith(("modF.", "final_linear.")):
            p.zero_()
    return model


def denoiser(model_name: str, seed: int = 0, device=None):
    """A fresh ``BaseModel`` of ``model_name`` (``"sd1"`` or ``"flow"``)."""
    if model_name not in MODEL_FILES:
        raise ValueError(f"model must be one of {tuple(MODEL_FILES)}, got {model_name!r}")
    return base_model(seed, device) if model_name == "sd1" else flow_model(seed, device)


def latent_gain(model) -> float:
    """Factor from the stored VAE's latents (std 1 / SD_SCALE) to latents of ``model``'s latent format, so that
    the format's scale gives both models the same unit-variance input: 1 for SD1.x, 0.18215 / 0.13025 for the
    flow model's SDXL format."""
    return SD_SCALE / float(model.latent_format.scale_factor)


@torch.no_grad()
def scale_latent_space_(sd: dict, c: float) -> dict:
    """Multiply a KL VAE's latent space by ``c``, exactly, in place: the mean rows of ``quant_conv`` times c, the
    log-variance + 2 log c, ``post_quant_conv``'s input / c (decoded images are unchanged)."""
    w, b = sd["quant_conv.weight"], sd["quant_conv.bias"]
    half = w.shape[0] // 2
    w[:half] *= c
    b[:half] *= c
    b[half:] += 2 * math.log(c)
    sd["post_quant_conv.weight"] /= c
    return sd


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


def check_assets(folder: Path | str = ASSETS, names=CORE_FILES) -> dict[str, Path]:
    """The asset files ``names`` present and matching ``checksums.json``; else :class:`AssetError` naming the file
    and the command that rebuilds it."""
    folder = Path(folder)
    sums_file = folder / CHECKSUMS.name
    if not sums_file.is_file():
        raise AssetError(f"{sums_file} is missing; rebuild the world's weights with `{REBUILD}`")
    sums = json.loads(sums_file.read_text())
    out = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise AssetError(f"miniworld asset {path} is missing; rebuild it with `{rebuild_command(name)}`")
        if name not in sums:
            raise AssetError(f"{sums_file} has no checksum for {name}; rebuild it with `{rebuild_command(name)}`")
        got = sha256(path)
        if got != sums[name]:
            raise AssetError(f"miniworld asset {path} is corrupted (sha256 {got[:12]}..., expected "
                             f"{sums[name][:12]}...); rebuild it with `{rebuild_command(name)}`")
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


def load(folder: Path | str = ASSETS, with_clip: bool = True, model: str = "sd1"):
    """(model: ModelPatcher, clip: CLIP | None, vae: VAE) of the trained world, checked against the checksums.
    ``model``: ``"sd1"`` (the UNet) or ``"flow"`` (the MMDiT; its VAE is the same one, latents rescaled to its
    latent format)."""
    if model not in MODEL_FILES:
        raise ValueError(f"model must be one of {tuple(MODEL_FILES)}, got {model!r}")
    name = MODEL_FILES[model]
    files = check_assets(folder, ("vae.safetensors", name))
    net = denoiser(model)
    missing, unexpected = net.diffusion_model.load_state_dict(_load_sd(files[name]), strict=False)
    if missing or unexpected:
        raise AssetError(f"{files[name]} does not fit the {model} model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); rebuild it with `{rebuild_command(name)}`")
    net.eval()
    vae = comfy_vae(_load_sd(files["vae.safetensors"]), latent_gain(net))
    return patcher(net), (clip() if with_clip else None), vae


def load_classifier(folder: Path | str = ASSETS):
    from miniworld.classifier import AttributeNet
    files = check_assets(folder, ("classifier.safetensors",))
    net = AttributeNet()
    net.load_state_dict(_load_sd(files["classifier.safetensors"]))
    return net.eval()
