"""x0 (the model's latent space) -> image in [-1, 1], differentiable, for the synchronization loss.

The decoders are the job's ``loss_decoder`` choices (``job.LOSS_DECODERS``): the full VAE (as the paper), the
full VAE with its blocks checkpointed (same gradients, less memory), the VAE on a half-size latent, or TAESD.
"""
from __future__ import annotations

import functools
import os

import torch

import comfy.model_management
import comfy.taesd.taesd

from ..decoders import (checkpointed_decode, compiled, decoder_backends, decoder_input, images_for_loss,
                        is_walkable)
from .families import latent_out

_TAESD_CACHE: dict = {}
#: The default of ``decoder_for_gradients(wide_norms=...)``: wide GroupNorms through :class:`decoders.GroupNormStats`
#: on CUDA devices (the native kernel's one thread block per group is CUDA's; on the CPU the native op is faster).
WIDE_GROUP_NORM = True
#: The default of ``decoder_for_gradients(plain_stages=...)``: see :func:`decoders.checkpointed_decode`.
PLAIN_STAGES = 2


def decoder_for_gradients(vae, model, mode: str, compile_backend: str = "", avoid_efficient_attention: bool = True,
                          wide_norms: bool | None = None, plain_stages: int | None = None):
    """The loss decoder ``mode`` (one of ``job.LOSS_DECODERS``) for ``model``'s latents through ``vae``.

    ``compile_backend`` (e.g. "inductor"): the decoder's gradient pass runs through ``torch.compile`` (static shapes;
    compiled once per process and shape); the anchor's decode without gradient stays eager.
    ``avoid_efficient_attention``: see :func:`decoders.attention_backends`. ``wide_norms`` (default
    :data:`WIDE_GROUP_NORM` for a VAE on a CUDA device; off when compiling): see :func:`decoders.wide_group_norm`.
    ``plain_stages`` (default :data:`PLAIN_STAGES`): see :func:`decoders.checkpointed_decode`."""
    if mode == "taesd":
        return taesd_decoder_for_gradients(model)
    first_stage = vae.first_stage_model
    inner = model.model
    checkpointed = mode == "vae_checkpointed" and is_walkable(first_stage)  # else (3-D decoders) a plain decode
    walk = compiled(checkpointed_decode, compile_backend) if compile_backend else checkpointed_decode
    plain = compiled(_decode, compile_backend) if compile_backend else _decode
    on_cuda = torch.device(vae.device).type == "cuda"
    wide = (WIDE_GROUP_NORM and on_cuda if wide_norms is None else wide_norms) and not compile_backend
    plain_stages = PLAIN_STAGES if plain_stages is None else plain_stages
    backends = functools.partial(decoder_backends, avoid_efficient_attention, wide)

    def decode(x0: torch.Tensor) -> torch.Tensor:
        if mode == "vae_half":
            x0 = torch.nn.functional.interpolate(x0, scale_factor=0.5, mode="bilinear", antialias=True)
        z = latent_out(inner, x0).to(device=vae.device, dtype=vae.vae_dtype)
        grad = torch.is_grad_enabled()
        with backends():
            if not grad:  # the anchor's decode: eager
                images = first_stage.decode(z)
            elif checkpointed:
                # eager checkpointing recomputes the blocks during backward, outside this context: the recompute must
                # pick the same attention kernels as the forward (else autograd finds other saved tensors)
                context = None if compile_backend else (lambda: (backends(), backends()))
                images = walk(first_stage.decoder, decoder_input(first_stage, z), context, plain_stages)
            else:
                images = plain(first_stage, z)
        return images_for_loss(images).float().clamp(-1.0, 1.0)

    return decode


def _decode(first_stage, z: torch.Tensor) -> torch.Tensor:
    return first_stage.decode(z)


def taesd_path(model) -> str:
    """The TAESD decoder file for the model's latent format in ``models/vae_approx``, or a clear error."""
    import folder_paths

    name = getattr(model.model.latent_format, "taesd_decoder_name", None)
    if not name:
        raise ValueError("loss_decoder 'taesd': this model's latent format has no TAESD decoder; use 'vae'")
    found = [f for f in folder_paths.get_filename_list("vae_approx") if f.startswith(name + ".")]
    if not found:
        folders = ", ".join(folder_paths.get_folder_paths("vae_approx"))
        raise ValueError(f"loss_decoder 'taesd' needs {name}.safetensors (or .pth) in models/vae_approx "
                         f"({folders}); put it there or use loss_decoder 'vae'")
    return folder_paths.get_full_path("vae_approx", found[0])


def taesd_decoder_for_gradients(model):
    """``x0`` (model latent space) → image in [-1, 1] through TAESD's decoder (loaded once per file and device)."""
    path = taesd_path(model)
    device = model.load_device
    key = (path, os.path.getmtime(path), str(device))
    net = _TAESD_CACHE.get(key)
    if net is None:
        dtype = comfy.model_management.vae_dtype(device, [torch.float16, torch.float32])
        with torch.inference_mode(False):  # normal tensors: backward needs them
            net = comfy.taesd.taesd.TAESD(None, path, latent_channels=model.model.latent_format.latent_channels)
            net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
        _TAESD_CACHE.clear()
        _TAESD_CACHE[key] = net

    def decode(x0: torch.Tensor) -> torch.Tensor:
        return net.decode(x0.to(device=device, dtype=net.vae_scale.dtype)).float().clamp(-1.0, 1.0)

    return decode
