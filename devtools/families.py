"""Tiny random-weight models of every still-image family in ``comfy.supported_models``, built through ComfyUI's
own classes, with matching VAEs and conditioning (no downloads). Import after ``devtools.headless.bootstrap()``.
``available()`` names the families this ComfyUI has; ``build(name)`` (cached) gives ``.model``, ``.vae``,
``.positive``, ``.negative`` and ``.latent(height_px, width_px)`` in the family's layout (4-D or 5-D).

The diffusion model gets a complete tiny config (what ``model_detection`` would produce; keys only some ComfyUI
versions have are dropped where the parameter class lacks them) and the state-dict keys ``model_type`` reads, so
v-prediction and EDM follow ComfyUI's own rules. Each VAE but SD's small KL one is made by ComfyUI's detection from
the few keys it reads, so compression, latent dims and module types are ComfyUI's (where detection fixes the widths
the decoder is real-width: use small latents). The decoder's last convolution is calibrated to mid-range images (no
clamping, so gradients flow); ``inference=True`` builds under ``torch.inference_mode()`` as ComfyUI's loaders do.
"""
import dataclasses
import functools

import torch

from devtools.models import init_weights_

SEED = 4321
CTX = 64  # text embedding width of every tiny family
POOLED = 64  # pooled text embedding width where a family takes one
TOKENS = 8


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """How to build one family. ``cls``: the name in ``comfy.supported_models``; ``hints``: state-dict keys that
    ComfyUI's ``model_type`` reads; ``vae``: a key of ``VAE_KINDS``; ``pooled``/``guidance``: what the
    conditioning carries; ``tokens``: prompt length (Flux.2 pads to 512 itself)."""

    name: str
    cls: str
    unet_config: dict
    vae: str
    hints: tuple = ()
    pooled: int | None = None
    guidance: float | None = None
    tokens: int = TOKENS
    note: str = ""


def _unet(**kw) -> dict:
    base = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
            "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
            "model_channels": 32, "num_res_blocks": [1], "channel_mult": [1], "num_heads": 1, "num_head_channels": -1,
            "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
            "use_temporal_attention": False, "use_temporal_resblock": False, "context_dim": CTX,
            "use_linear_in_transformer": True}
    base.update(kw)
    return base


_SDXL = dict(adm_in_channels=POOLED + 6 * 256, num_classes="sequential", model_channels=64)  # pooled + 6 size embeddings

_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": POOLED, "context_in_dim": CTX,
         "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
         "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
         "txt_ids_dims": []}

_FLUX2 = {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": CTX,
          "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
          "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
          "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
          "ref_index_scale": 10.0, "txt_ids_dims": [3]}

_CHROMA = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": CTX,
           "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
           "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
           "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 1, "txt_ids_dims": [], "vec_in_dim": None}

_SD3 = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
        "adm_in_channels": POOLED, "pos_embed_max_size": 64, "num_patches": 64 * 64, "pos_embed_scaling_factor": None,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": CTX, "out_features": 128}},
        "x_block_self_attn_layers": []}

_LUMINA = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": CTX,
           "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2,
           "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 2.0}

_QWEN = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1, "attention_head_dim": 32,
         "num_attention_heads": 2, "joint_attention_dim": CTX, "axes_dims_rope": (8, 12, 12)}

_HUNYUAN_IMAGE = {"image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "patch_size": [1, 1],
                  "vec_in_dim": None, "axes_dim": [16, 16], "meanflow": False, "context_in_dim": CTX,
                  "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                  "theta": 256, "qkv_bias": True, "byt5": False, "guidance_embed": False,
                  "use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False}

SPECS = [
    FamilySpec("sd15", "SD15", _unet(use_linear_in_transformer=False), "kl4"),
    FamilySpec("sd15_inpaint", "SD15", _unet(in_channels=9, use_linear_in_transformer=False), "kl4",
               note="9-channel inpaint UNet (set_inpaint: c_concat of mask + masked latent)"),
    FamilySpec("sd20", "SD20", _unet(model_channels=64), "kl4"),  # SD20 forces 64-channel heads
    FamilySpec("sd20_v", "SD20", _unet(model_channels=64), "kl4", hints=(("output_blocks.11.1.transformer_blocks.0.norm1.bias", 1.0),),
               note="768-v: SD20.model_type picks V_PREDICTION from that bias' spread"),
    FamilySpec("sdxl", "SDXL", _unet(**_SDXL), "kl4", pooled=POOLED),
    FamilySpec("sdxl_v", "SDXL", _unet(**_SDXL), "kl4", pooled=POOLED, hints=(("v_pred", 0.0),)),
    FamilySpec("sdxl_edm", "SDXL", _unet(**_SDXL), "kl4", pooled=POOLED, hints=(("edm_mean", 0.0), ("edm_std", 1.0)),
               note="Playground 2.5 style: EDM sampling, latent mean/std"),
    FamilySpec("sd3", "SD3", _SD3, "kl16", pooled=POOLED),
    FamilySpec("sd35", "SD3", {**_SD3, "qk_norm": "rms", "x_block_self_attn_layers": [0]}, "kl16", pooled=POOLED,
               note="SD3.5 medium style: RMS q/k norm, MMDiT-X self-attention"),
    FamilySpec("flux", "Flux", _FLUX, "kl16", pooled=POOLED, guidance=3.5),
    FamilySpec("flux_fill", "Flux", {**_FLUX, "in_channels": 96}, "kl16", pooled=POOLED, guidance=30.0,
               note="Flux.1 Fill: 16 latent + 16 masked-image + 64 mask channels (the mask's 8x8 pixels) concatenated"),
    FamilySpec("flux_schnell", "FluxSchnell", {**_FLUX, "guidance_embed": False}, "kl16", pooled=POOLED),
    FamilySpec("chroma", "Chroma", _CHROMA, "kl16"),
    FamilySpec("flux2", "Flux2", _FLUX2, "flux2", guidance=4.0, tokens=512),
    FamilySpec("qwen_image", "QwenImage", _QWEN, "wan21"),
    FamilySpec("lumina2", "Lumina2", _LUMINA, "kl16"),
    FamilySpec("zimage", "ZImage", {**_LUMINA, "dim": 256, "n_heads": 8, "n_kv_heads": 8, "rope_theta": 256.0,
                                    "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0},
               "kl16", note="Z-Image's modulation is 256 wide: dim >= 256"),
    FamilySpec("hunyuan_image", "HunyuanImage21", _HUNYUAN_IMAGE, "hunyuan32"),
]
FAMILIES = {s.name: s for s in SPECS}


def _params_class_fields(config: dict) -> set | None:
    """Field names of the diffusion model's parameter dataclass (FluxParams, ChromaParams, HunyuanVideoParams)
    in this ComfyUI, or None for models that take keyword arguments directly."""
    import comfy.ldm.chroma.model as chroma
    import comfy.ldm.flux.model as flux
    import comfy.ldm.hunyuan_video.model as hv
    params = {"flux": flux.FluxParams, "flux2": flux.FluxParams, "chroma": getattr(chroma, "ChromaParams", None),
              "hunyuan_video": hv.HunyuanVideoParams}.get(config.get("image_model"))
    return None if params is None else {f.name for f in dataclasses.fields(params)}


def config_for_this_comfyui(config: dict) -> dict:
    """A diffusion model's config, less the keys this ComfyUI's parameter class does not have (feature
    detection: 0.33's ``FluxParams`` has ``txt_ids_dims``, older ones do not)."""
    cfg = dict(config)
    fields = _params_class_fields(cfg)
    if fields is not None:
        cfg = {k: v for k, v in cfg.items() if k in fields or k == "image_model"}
    return cfg


def unet_config_for(spec: FamilySpec) -> dict:
    """The spec's config for this ComfyUI (:func:`config_for_this_comfyui`)."""
    return config_for_this_comfyui(spec.unet_config)


def available() -> list[str]:
    """The families whose supported-model class exists in this ComfyUI."""
    import comfy.supported_models as sm
    return [s.name for s in SPECS if hasattr(sm, s.cls)]


# --------------------------------------------------------------------------------------------- VAEs

def _kl_detect_keys(z: int) -> dict:
    """The keys ComfyUI's VAE detection reads for its default-width KL VAE (ch 128, ch_mult 1, 2, 4, 4)."""
    return {"decoder.conv_in.weight": torch.zeros(512, z, 3, 3),
            "decoder.up.3.upsample.conv.weight": torch.zeros(512, 512, 3, 3)}


def _vae_kl4(seed):
    """SD's 4-channel KL VAE, small (``devtools.models.build_kl_vae``)."""
    from devtools.models import build_kl_vae
    return build_kl_vae(seed)


def _vae_kl16(seed):
    """SD3/Flux/Lumina VAE: 16-channel KL without post_quant_conv (ComfyUI builds an AutoencodingEngine)."""
    import comfy.sd
    return comfy.sd.VAE(sd=_kl_detect_keys(16))


def _vae_flux2(seed):
    """Flux.2's VAE: 32-channel KL with post_quant_conv and a batch-norm latent over 2x2 patches (128 ch, 16 px)."""
    import comfy.sd
    sd = _kl_detect_keys(32)
    sd.update({"bn.running_mean": torch.zeros(128), "bn.running_var": torch.ones(128),
               "post_quant_conv.weight": torch.zeros(32, 32, 1, 1)})
    return comfy.sd.VAE(sd=sd)


def _vae_wan21(seed, dim: int = 16):
    """The Wan 2.1 VAE (Qwen-Image), its width from the state dict: 5-D latents (B, 16, T, H, W), 8 px."""
    import comfy.sd
    sd = {"decoder.middle.0.residual.0.gamma": torch.zeros(dim * 4, 1, 1, 1),
          "decoder.head.0.gamma": torch.zeros(dim, 1, 1, 1),
          "encoder.conv1.weight": torch.zeros(dim, 3, 3, 3, 3),  # 0.33 reads image channels from these two
          "decoder.head.2.weight": torch.zeros(3, dim, 3, 3, 3)}
    return comfy.sd.VAE(sd=sd)


def _vae_hunyuan32(seed):
    """HunyuanImage 2.1's VAE: 64 channels, 32 px per latent px."""
    import comfy.sd
    return comfy.sd.VAE(sd={"decoder.conv_in.weight": torch.zeros(1024, 64, 3, 3)})


VAE_KINDS = {"kl4": _vae_kl4, "kl16": _vae_kl16, "flux2": _vae_flux2, "wan21": _vae_wan21, "hunyuan32": _vae_hunyuan32,
             "wan21-real": functools.partial(_vae_wan21, dim=96)}  # Qwen-Image's VAE at its real width (benchmarks)


@torch.no_grad()
def _calibrate_decoder(vae, seed: int) -> None:
    """Scale the decoder's last convolution so a probe latent decodes to images of std ~0.3 around 0 (in [-1, 1]
    before ComfyUI's clamp): random decoders otherwise saturate, and a saturated clamp has no gradient."""
    fsm = vae.first_stage_model
    convs = [m for m in fsm.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    last = convs[-1]
    c = vae.latent_channels
    n = 2 if vae.spacial_compression_decode() > 16 else 4
    shape = (1, c, 1, n, n) if vae.latent_dim == 3 else (1, c, n, n)
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(vae.vae_dtype)
    if last.bias is not None:
        last.bias.zero_()
    out = fsm.decode(probe).float()
    std = out.std().clamp_min(1e-6)
    last.weight.mul_(0.3 / std)
    if last.bias is not None:
        last.bias.sub_(out.mean() * 0.3 / std)


@functools.lru_cache(maxsize=None)
def build_vae(kind: str, seed: int = SEED, dtype=None, inference: bool = True, encoder: bool = False):
    """A tiny (or, where ComfyUI fixes the widths, real-width) random VAE of ``kind`` as ``comfy.sd.VAE``, cached per
    arguments. ``inference``: build under ``torch.inference_mode()`` like ComfyUI's loaders. ``encoder``: random
    encoder weights too, where what an image encodes to matters (else a real-width encoder gives constant latents)."""
    with torch.inference_mode(inference):
        return _build_vae(kind, seed, dtype, encoder)


def _build_vae(kind: str, seed: int, dtype, encoder: bool = False):
    import logging
    log = logging.getLogger()
    level = log.level
    log.setLevel(logging.ERROR)  # "Missing VAE keys": the weights are set below
    try:
        vae = VAE_KINDS[kind](seed)
    finally:
        log.setLevel(level)
    if kind != "kl4":
        fsm = vae.first_stage_model
        init_weights_(fsm, seed, skip=() if encoder else ("encoder.",))
        for name, p in fsm.named_parameters():  # unless asked for, the encoder (half of a real-width VAE) is cheap
            if name.startswith("encoder.") and not encoder:  # and deterministic: encode works, to constant latents
                p.data.fill_(1.0 if name.endswith(("norm.weight", "gamma")) else 0.0)
        for name, b in fsm.named_buffers():
            if name.endswith("running_var"):
                b.fill_(1.0)
            elif name.endswith("running_mean"):
                b.zero_()
    if dtype is not None and dtype != vae.vae_dtype:
        vae.first_stage_model.to(dtype)
        vae.vae_dtype = dtype
    _calibrate_decoder(vae, seed + 1)
    vae.first_stage_model.requires_grad_(False)
    return vae


# --------------------------------------------------------------------------------------------- models

def build_model(spec: FamilySpec, seed: int = SEED, dtype=torch.float32):
    """The family's diffusion model as a ``ModelPatcher`` (through ``comfy.supported_models``)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    mc = getattr(sm, spec.cls)(unet_config_for(spec))
    mc.set_inference_dtype(dtype, None)
    hints = {k: torch.full((4,), v) if k.endswith("bias") else torch.tensor(v) for k, v in spec.hints}
    if spec.name == "sd20_v":  # SD20.model_type: std of this bias above 0.09 means v-prediction
        hints = {k: torch.linspace(-1, 1, 8) for k in hints}
    model = mc.get_model(hints)
    init_weights_(model.diffusion_model, seed)
    model.diffusion_model.requires_grad_(False)  # as loaded models are (weights made under inference mode never are)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def make_conditioning(spec: FamilySpec, seed: int, batch: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, spec.tokens, CTX, generator=g)
    extra = {"pooled_output": None}  # text encoders without a pooled output still set the key (Flux.encode_adm reads it)
    if spec.pooled:
        extra["pooled_output"] = torch.randn(batch, spec.pooled, generator=g)
    if spec.guidance is not None:
        extra["guidance"] = spec.guidance
    return [[cond, extra]]


@dataclasses.dataclass
class Family:
    spec: FamilySpec
    model: object  # comfy.model_patcher.ModelPatcher
    vae: object  # comfy.sd.VAE
    positive: list
    negative: list

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def latent_format(self):
        return self.model.model.latent_format

    def latent(self, height_px: int, width_px: int, batch: int = 1) -> torch.Tensor:
        """An empty LATENT tensor for an image of that size, in this family's layout (as EmptyLatentImage and
        its per-family variants make them: 4-D, or 5-D with one frame)."""
        s = int(self.vae.spacial_compression_decode())
        c = self.latent_format.latent_channels
        dims = getattr(self.latent_format, "latent_dimensions", 2)
        shape = (batch, c, height_px // s, width_px // s)
        if dims == 3:
            shape = (batch, c, 1) + shape[2:]
        return torch.zeros(shape)


@functools.lru_cache(maxsize=None)
def build(name: str, dtype: torch.dtype = torch.float32, inference: bool = True, seed: int = SEED) -> Family:
    """Model, VAE and conditioning of family ``name`` (cached per process). ``inference``: build under
    ``torch.inference_mode()`` like ComfyUI's loaders (then weights and constants are inference tensors)."""
    import comfy.supported_models as sm
    spec = FAMILIES[name]
    if not hasattr(sm, spec.cls):
        raise LookupError(f"this ComfyUI has no comfy.supported_models.{spec.cls} (family {name!r})")
    ctx = torch.inference_mode() if inference else torch.inference_mode(False)
    with ctx:
        model = build_model(spec, seed, dtype)
        vae = build_vae(spec.vae, SEED + 1, dtype=dtype if dtype == torch.float64 else None, inference=inference)
        pos, neg = make_conditioning(spec, seed + 2), make_conditioning(spec, seed + 3)
        pos = [[c.to(dtype), {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in d.items()}] for c, d in pos]
        neg = [[c.to(dtype), {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in d.items()}] for c, d in neg]
    return Family(spec, model, vae, pos, neg)
