"""Model-family facts the windowed sampler needs, read from ComfyUI's model and VAE objects (never assumed).

Every fact comes from the objects ComfyUI gives a node, so a family added to ComfyUI later works without code
changes when its latent is 2-D, or 3-D with one frame:

* **Layout**: latent channels and dimensions from ``model.model.latent_format`` (``latent_channels``,
  ``latent_dimensions``: 2 -> (B, C, H, W); 3 -> (B, C, T, H, W), e.g. Qwen-Image's Wan 2.1 latents).
  Windows always crop the last two dimensions.
* **Pixel scale**: the VAE's own ratio (``vae.spacial_compression_decode()``: 8 for SD/SDXL/SD3/Flux.1/Qwen, 16 for
  Flux.2, 32 for HunyuanImage 2.1); without a VAE, the latent format's ``spacial_downscale_ratio`` (ComfyUI 0.33 has
  it, 0.3.75 does not), else a table of the known exceptions; unknown formats without a VAE get a clear error.
* **Patch**: latent px per DiT token (``diffusion_model.patch_size``; 1 for UNets); windows and strides should be
  multiples of it (Flux pads a window to whole patches otherwise).
* **Native window**: the size each family was trained at (SD1.x 512; SD2.x 768 only for the SD2 v-prediction
  models ComfyUI's checkpoint detection recognises, i.e. ``model.model.model_type`` is V_PREDICTION on an SD20
  config -- an SD1.x v-prediction fine-tune stays at 512; SDXL/SD3/Flux.1/Flux.2/Qwen-Image/Lumina 2/Z-Image 1024;
  HunyuanImage 2.1 2048); unknown families: 512 px on SD1.x's latent format, else 1024. Default stride: a quarter
  of the native window (the paper's 16 latent px on SD's 64), rounded to whole patches.
* **Schedule**: ``"vp"`` for discrete variance-preserving models (EPS/V_PREDICTION prediction on ComfyUI's
  ``ModelSamplingDiscrete``; EDM subclasses EPS in ComfyUI, so prediction classes alone cannot tell): the reference
  DDIM (see :func:`sampling_sigmas`); ``"flow"`` (CONST prediction: SD3, Flux, Qwen, Lumina 2, HunyuanImage) and
  ``"edm"`` (continuous EDM: Playground 2.5, CosXL): ComfyUI's default scheduler ``simple``, from ``sigma_max`` to
  0; ``"other"`` for the rest (same as flow/EDM).
* **Support**: audio, 3-D and video models are refused before sampling with the family's name
  (:func:`check_supported`); a 5-D latent with more than one frame may run without sync.
"""
from __future__ import annotations

import dataclasses

import torch

import comfy.model_sampling as cms
import comfy.samplers

from ..decoders import decoder_input, images_for_loss  # noqa: F401  (decoder_input: re-exported)
from ..gradients import inference_tensors_usable

#: Pixels per latent pixel of latent formats whose ComfyUI (0.3.75) has no ``spacial_downscale_ratio``, where not 8.
_KNOWN_SCALE = {"Flux2": 16, "HunyuanImage21": 32, "HunyuanImage21Refiner": 16, "Wan22": 16, "HunyuanVideo15": 16,
                "LTXV": 32, "SC_Prior": 42, "SC_B": 4, "ChromaRadiance": 1, "SD_X4": 4}
_DEFAULT_SCALE_FORMATS = ("SD15", "SDXL", "SDXL_Playground_2_5", "SD3", "Flux", "Wan21", "HunyuanVideo", "Mochi")

#: Native square size in pixels by ComfyUI model-config class (``comfy.supported_models``), matched along the MRO.
NATIVE_PX = {"SD15": 512, "SD20": 512, "SDXLRefiner": 1024, "SDXL": 1024, "SD3": 1024, "Flux": 1024, "Flux2": 1024,
             "Chroma": 1024, "QwenImage": 1024, "Lumina2": 1024, "HunyuanImage21": 2048, "PixArtSigma": 1024,
             "AuraFlow": 1024, "HunyuanDiT": 1024, "HiDream": 1024, "Omnigen2": 1024}
SD2_V_NATIVE_PX = 768

#: Model-config classes that do not make still images (matched along the MRO), and what they make.
NOT_IMAGES = {"StableAudio": "audio", "ACEStep": "audio", "StableAudio3": "audio", "ACEStep15": "audio",
              "MiniMaxMusic3": "audio", "SVD_img2vid": "video", "Hunyuan3Dv2": "3-D shapes", "TripoSplat": "3-D shapes",
              "Trellis2": "3-D shapes", "SAM3": "segmentation", "RT_DETR_v4": "detection",
              "DepthAnything3": "depth maps"}


class UnsupportedModelError(ValueError):
    """The model cannot be sampled in windows (or not synchronized); raised before any sampling."""


@dataclasses.dataclass(frozen=True)
class Facts:
    family: str  # ComfyUI's model-config class (comfy.supported_models), e.g. "SDXL", "Flux", "QwenImage"
    latent_channels: int
    latent_dims: int  # 2: (B, C, H, W); 3: (B, C, T, H, W)
    pixel_scale: int  # pixels per latent pixel
    patch: int  # latent px per token (1 for UNets)
    native_px: int
    default_stride_px: int
    schedule: str  # "vp" | "flow" | "edm" | "other"

    @property
    def native_latent(self) -> int:
        return self.native_px // self.pixel_scale


def family_name(model) -> str:
    """ComfyUI's model-config class name of a MODEL (``ModelPatcher``), e.g. ``"Flux"``."""
    cfg = getattr(model.model, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(model.model).__name__


def _config_mro(model) -> list[str]:
    cfg = getattr(model.model, "model_config", None)
    return [c.__name__ for c in type(cfg).__mro__] if cfg is not None else [type(model.model).__name__]


def latent_layout(model) -> tuple[int, int]:
    """``(channels, dims)`` of the model's latents (dims 2: 4-D tensors; 3: 5-D with a frame axis)."""
    fmt = model.model.latent_format
    return int(fmt.latent_channels), int(getattr(fmt, "latent_dimensions", 2))


def vae_scale(vae) -> int:
    """Pixels per latent pixel of a VAE's decoder (8 for SD1.x/2.x/SDXL/SD3/Flux.1, 16 or 32 for some newer VAEs)."""
    if hasattr(vae, "spacial_compression_decode"):
        return int(vae.spacial_compression_decode())
    ratio = getattr(vae, "upscale_ratio", 8)
    return int(ratio[-1] if isinstance(ratio, (tuple, list)) else ratio)


def pixel_scale(model, vae=None) -> int:
    """Pixels per latent pixel: the VAE's decode ratio when given, else the latent format's (see module doc)."""
    if vae is not None:
        return vae_scale(vae)
    fmt = model.model.latent_format
    if hasattr(fmt, "spacial_downscale_ratio"):
        return int(fmt.spacial_downscale_ratio)
    name = type(fmt).__name__
    if name in _KNOWN_SCALE:
        return _KNOWN_SCALE[name]
    if name in _DEFAULT_SCALE_FORMATS:
        return 8
    raise UnsupportedModelError(f"{family_name(model)}: the pixel size of its latent format {name} is unknown to "
                                "this ComfyUI; connect its VAE so the pack can read the VAE's own scale")


def patch_size(model) -> int:
    """Latent pixels per DiT token (``diffusion_model.patch_size``, last spatial entry); 1 for UNets."""
    p = getattr(model.model.diffusion_model, "patch_size", 1)
    if isinstance(p, (tuple, list)):
        p = p[-1]
    return int(p) if isinstance(p, int) and p > 0 else 1


def schedule_kind(model_sampling) -> str:
    """``"vp"``, ``"flow"``, ``"edm"`` or ``"other"`` for a ``model_sampling`` object (see module doc)."""
    if isinstance(model_sampling, cms.CONST):
        return "flow"
    excluded = tuple(getattr(cms, n) for n in ("ModelSamplingDiscreteEDM", "StableCascadeSampling") if hasattr(cms, n))
    odd_predictions = tuple(getattr(cms, n) for n in ("X0", "EDM") if hasattr(cms, n))
    if isinstance(model_sampling, cms.ModelSamplingDiscrete) and not isinstance(model_sampling, excluded) \
            and isinstance(model_sampling, cms.EPS) and not isinstance(model_sampling, odd_predictions):
        return "vp"
    if isinstance(model_sampling, cms.ModelSamplingContinuousEDM):
        return "edm"
    return "other"


def native_px(model) -> int:
    """The family's native window in pixels (see module doc)."""
    mro = _config_mro(model)
    if "SD20" in mro and getattr(model.model, "model_type", None) == _model_type("V_PREDICTION"):
        return SD2_V_NATIVE_PX
    for name in mro:
        if name in NATIVE_PX:
            return NATIVE_PX[name]
    return 512 if type(model.model.latent_format).__name__ == "SD15" else 1024


def _model_type(name: str):
    import comfy.model_base
    return getattr(comfy.model_base.ModelType, name, None)


def facts(model, vae=None) -> Facts:
    """Everything above for a MODEL (and its VAE when there is one)."""
    channels, dims = latent_layout(model)
    scale, patch = pixel_scale(model, vae), patch_size(model)
    native = native_px(model)
    quantum = scale * patch
    stride = max(quantum, (native // 4) // quantum * quantum)
    return Facts(family_name(model), channels, dims, scale, patch, native, stride,
                 schedule_kind(model.get_model_object("model_sampling")))


def check_supported(model, latent: torch.Tensor, *, sync: bool, vae=None) -> Facts:
    """The model's :class:`Facts`, or :class:`UnsupportedModelError` naming the family when its outputs are not
    still images (audio, 3-D, ...), when ``latent`` does not have its layout, when a VAE for the sync loss does not
    match it, or when ``sync`` is asked for a video latent (more than one frame)."""
    name = family_name(model)
    for cls in _config_mro(model):
        if cls in NOT_IMAGES:
            raise UnsupportedModelError(f"{name} makes {NOT_IMAGES[cls]}, not images: SyncDiffusion panoramas need "
                                        "an image model (SD1.x/2.x, SDXL, SD3, Flux, Qwen-Image, ...)")
    channels, dims = latent_layout(model)
    if dims not in (2, 3):
        raise UnsupportedModelError(f"{name} has {dims}-D latents; SyncDiffusion needs 2-D image latents")
    if latent.ndim != dims + 2 or latent.shape[1] != channels:
        raise UnsupportedModelError(f"{name} expects latents of shape (batch, {channels}, "
                                    f"{'frames, ' if dims == 3 else ''}height, width), got {tuple(latent.shape)}")
    if dims == 3 and latent.shape[2] > 1 and sync:
        raise UnsupportedModelError(f"{name}: this latent has {latent.shape[2]} frames (a video); SyncDiffusion "
                                    "synchronizes single images only -- use one frame, or sync_weight 0")
    if vae is not None and sync:
        vc = getattr(vae, "latent_channels", channels)
        if vc != channels:
            raise UnsupportedModelError(f"the VAE has {vc} latent channels but {name} has {channels}: connect the "
                                        f"VAE that belongs to {name}")
        if getattr(vae, "output_channels", 3) != 3:
            raise UnsupportedModelError(f"the VAE decodes to {vae.output_channels} channels, not an RGB image")
    return facts(model, vae)


def prepare_latent(model, latent: dict) -> torch.Tensor:
    """A LATENT's samples in the model's layout, as KSampler prepares them: ``comfy.sample.fix_empty_latent_channels``
    (an empty latent gets the model's channels, and a frame axis for 3-D formats). An empty latent made for another
    pixel scale (``downscale_ratio_spacial``: 8 from EmptyLatentImage or Panorama Latent) is resized to the model's
    grid, so a 2048 px canvas stays 2048 px for Flux.2 (16 px) or HunyuanImage 2.1 (32 px): by ComfyUI where its
    function takes the ratio (0.33), else here (0.3.75). The caller drops the ratio keys from its output LATENT,
    as KSampler does."""
    import inspect

    import comfy.sample
    fix = comfy.sample.fix_empty_latent_channels
    params = inspect.signature(fix).parameters
    extra = [latent.get(k) for k in ("downscale_ratio_spacial", "downscale_ratio_temporal") if k in params]
    samples = fix(model, latent["samples"], *extra)
    made_at = latent.get("downscale_ratio_spacial")
    if made_at and "downscale_ratio_spacial" not in params and not bool(torch.count_nonzero(samples)):
        scale = pixel_scale(model)
        if scale != made_at:
            h, w = (round(n * made_at / scale) for n in samples.shape[-2:])
            samples = torch.zeros(*samples.shape[:-2], h, w, dtype=samples.dtype, device=samples.device)
    return samples


# ------------------------------------------------------------------------------------------- schedule

def sampling_sigmas(model, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The schedule of ``steps`` steps (``steps + 1`` sigmas) for the family (see module doc).

    ``vp``: the reference DDIM -- timesteps ``k * (T // steps) + 1`` for k < steps (50 steps: 981, 961, ..., 1; the
    same as ComfyUI's ``ddim_uniform`` where that yields ``steps`` values, while it yields 31 for 30), ending on
    sigma(t=0) (``set_alpha_to_one=False``), not 0. Others: ComfyUI's ``simple`` scheduler (sigma_max ... 0).
    With ``denoise`` below 1: the last ``steps`` steps of the schedule of ``int(steps / denoise)`` steps, as
    KSampler takes them."""
    ms = model.get_model_object("model_sampling")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    total = steps if denoise > 0.9999 else int(steps / denoise)
    if schedule_kind(ms) != "vp":
        return comfy.samplers.calculate_sigmas(ms, "simple", total).float()[-(steps + 1):]
    table = ms.sigmas.float()
    ratio = len(table) // total
    if ratio < 1:
        raise ValueError(f"steps ({total}) must not exceed the model's {len(table)} training timesteps")
    timesteps = [k * ratio + 1 for k in range(total)][::-1]
    return torch.stack([table[t] for t in timesteps] + [table[0]]).cpu()[-(steps + 1):]


def start_state(model_sampling, sigmas: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                at_max: bool) -> torch.Tensor:
    """The first sampler state, as KSampler makes it (``at_max``: ComfyUI's "the schedule starts at the model's
    largest sigma"): ``noise_scaling`` (VP at full strength: noise·sqrt(1+σ0²); flow: σ0·noise + (1−σ0)·latent;
    img2img: latent + σ0·noise). An empty latent of a ``vp`` model starts from the reference's unit-variance noise at
    t0 (noise·sqrt(1+σ0²)) whatever the schedule's first sigma: there is no image to keep."""
    empty = not bool(torch.count_nonzero(latent))
    at_max = at_max or (empty and schedule_kind(model_sampling) == "vp")
    return model_sampling.noise_scaling(sigmas[0], noise, latent, max_denoise=at_max)


def final_latent(model_sampling, sigmas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The LATENT after the last step: for ``vp`` schedules ending at σ > 0, the reference's x_VP (x / sqrt(1+σ²));
    otherwise ComfyUI's ``inverse_noise_scaling`` at the last sigma (what KSampler does; identity at σ = 0)."""
    last = sigmas[-1]
    if schedule_kind(model_sampling) == "vp" and float(last) > 0:
        return model_sampling.calculate_input(last, x)
    return model_sampling.inverse_noise_scaling(last, x)


def input_scale(model_sampling, sigma) -> float:
    """The factor from the sampler's space to the model's input space at ``sigma`` (``calculate_input`` on ones):
    1/sqrt(1+σ²) for VP, 1 for flow, 1/sqrt(σ²+σ_data²) for EDM. The sync step is taken in the model's input space,
    so ``sync_weight`` means the same step size in every family's (unit-variance) model input (see FAMILIES.md)."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(1)
    return float(model_sampling.calculate_input(s, torch.ones(1, device=s.device))[0])


# ------------------------------------------------------------------------------------------- the loss path

def latent_out(inner_model, x0: torch.Tensor) -> torch.Tensor:
    """``process_latent_out`` (model latent -> VAE latent), differentiable even when the latent format's mean/std
    were made under inference mode (Wan 2.1, Playground/EDM SDXL): see ``inference_tensors_usable``."""
    with inference_tensors_usable():
        return inner_model.process_latent_out(x0)


def gradient_decoder(vae, inner_model):
    """Reference loss decoder: x0 (model latent) -> images (N, 3, h, w) in the decoder's range, differentiable
    through ``process_latent_out`` and ``vae.first_stage_model.decode`` for every family (the bridge's loss-decoder
    module adds checkpointing, clamping, dtype and device handling)."""
    first_stage = vae.first_stage_model

    def decode(x0: torch.Tensor) -> torch.Tensor:
        z = latent_out(inner_model, x0).to(device=vae.device, dtype=vae.vae_dtype)
        with inference_tensors_usable():
            return images_for_loss(first_stage.decode(z))

    return decode


# ------------------------------------------------------------------------------------------- positions

def rope_shift_supported(model) -> bool:
    """Whether the diffusion model reads ``transformer_options["rope_options"]`` (ComfyUI's RoPE hook: Flux.1,
    Flux.2, Lumina 2 / Z-Image, Wan in 0.3.75 and 0.33; not Chroma, Qwen-Image, HunyuanImage, SD3 or UNets).

    Feature detection by the source of the modules that define the model's classes (0.33 moved Lumina's use of the
    hook from the class into a module-level function, so class sources are not enough). A heuristic: the tests
    check it against the model's actual output for every family; a caller that must be sure can compare one
    window's prediction with and without a shift."""
    import inspect
    import sys
    seen = set()
    for cls in type(model.model.diffusion_model).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is None or module in seen or not cls.__module__.startswith("comfy."):
            continue
        seen.add(module)
        try:
            if "rope_options" in inspect.getsource(module):
                return True
        except (OSError, TypeError):
            continue
    return False


def with_canvas_positions(model_options: dict, top: float, left: float, patch: int) -> dict:
    """A copy of ``model_options`` whose RoPE positions are shifted by a window's place on the canvas (``top``,
    ``left`` in latent px; the hook counts tokens, so they are divided by ``patch``), added to any shift the user
    set (``ModelPatcher.set_model_rope_options``). One call serves windows with one offset only."""
    options = dict(model_options)
    to = dict(options.get("transformer_options", {}))
    rope = dict(to.get("rope_options", {}) or {})
    rope["shift_y"] = float(rope.get("shift_y", 0.0)) + top / patch
    rope["shift_x"] = float(rope.get("shift_x", 0.0)) + left / patch
    to["rope_options"] = rope
    options["transformer_options"] = to
    return options
