"""Helpers for the per-family tests: run code inside ComfyUI's sampling context, a small LPIPS-like loss, and the
synchronization loss of one window as a function of its latent (what the sync step differentiates).

``in_sampler(fam, fn, ...)`` runs ``fn(ctx)`` inside ``CFGGuider.sample`` through a custom ``comfy.samplers.Sampler``
-- where the pack's windowed sampler runs -- so conds are processed and models loaded exactly as in a real run,
under ``torch.inference_mode()`` like a node. ``ctx`` is a :class:`SamplingContext`.
"""
import contextlib
import dataclasses

import torch

from syncdiff_core import gradients
from syncdiff_core.comfy import autograd_patches, families
from syncdiff_core.comfy.model import gradient_section
from syncdiff_core.weights import trainable_weights


@dataclasses.dataclass
class SamplingContext:
    fam: object
    guider: object  # comfy.samplers.CFGGuider (as the sampler sees it)
    sigmas: torch.Tensor
    extra_args: dict
    noise: torch.Tensor
    latent: torch.Tensor

    @property
    def model_sampling(self):
        return self.guider.inner_model.model_sampling

    @property
    def model_options(self) -> dict:
        return self.extra_args.get("model_options", {})

    def denoise(self, x, sigma, model_options=None):
        sig = sigma.reshape(-1)[:1].expand(x.shape[0])
        return self.guider(x, sig, model_options=self.model_options if model_options is None else model_options,
                           seed=self.extra_args.get("seed"))


def in_sampler(fam, fn, *, height_px=32, width_px=32, cfg=2.0, sigmas=None, seed=1):
    """``fn(ctx)`` inside ``CFGGuider.sample`` of the family's model (see the module doc); returns its result."""
    import comfy.sample
    import comfy.samplers

    result = {}

    class FnSampler(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            result["value"] = fn(SamplingContext(fam, model_wrap, sigmas, extra_args, noise, latent_image))
            return latent_image

    with torch.inference_mode():
        latent = comfy.sample.fix_empty_latent_channels(fam.model, fam.latent(height_px, width_px))
        noise = comfy.sample.prepare_noise(latent, seed)
        guider = comfy.samplers.CFGGuider(fam.model)
        guider.set_conds(fam.positive, fam.negative)
        guider.set_cfg(cfg)
        if sigmas is None:
            sigmas = comfy.samplers.calculate_sigmas(fam.model.get_model_object("model_sampling"), "simple", 4)
        guider.sample(noise, latent, FnSampler(), sigmas, seed=seed)
    return result["value"]


def lpips_like(seed: int = 0, dtype=torch.float32, device="cpu"):
    """``loss(images, targets) -> (B,)``: LPIPS's shape (unit-normalized features of two conv layers, squared
    distances averaged over pixels) with smooth activations (tanh), so finite differences are accurate."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False):
        w1 = (torch.randn(8, 3, 3, 3, generator=g) / 5).to(device=device, dtype=dtype)
        w2 = (torch.randn(8, 8, 3, 3, generator=g) / 8).to(device=device, dtype=dtype)

    def feats(x):
        f1 = torch.tanh(torch.nn.functional.conv2d(x, w1.to(x), padding=1))
        f2 = torch.tanh(torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(f1, 2), w2.to(x), padding=1))
        return [f / (f.pow(2).sum(1, keepdim=True) + 1e-6).sqrt() for f in (f1, f2)]

    def loss(a, b):
        return sum((fa - fb).pow(2).sum(1).mean((1, 2)) for fa, fb in zip(feats(a), feats(b)))

    return loss


@dataclasses.dataclass
class WindowLoss:
    """``L(x)``: the sync loss of one window as a function of its latent ``x`` (sampler space): x0 = D(x, σ) with
    CFG, ``process_latent_out``, the VAE decoder, images (B, 3, h, w), LPIPS-like distance to a fixed target."""

    ctx: SamplingContext
    sigma: torch.Tensor
    mechanism: str = "copies"  # "plain" | "copies" | "checkpoint"
    model_options: dict | None = None
    patches: list | None = None
    stats: gradients.CopyStats | None = None

    def __post_init__(self):
        fam = self.ctx.fam
        self.loss = lpips_like(1, dtype=fam.vae.vae_dtype)
        self.decoder = families.gradient_decoder(fam.vae, self.ctx.guider.inner_model)
        self.model_options = self.ctx.model_options
        if self.mechanism == "checkpoint":
            dm = self.ctx.guider.inner_model.diffusion_model
            self.model_options, self.patches = autograd_patches.with_block_checkpointing(self.model_options, dm)
        self.target = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scope = gradients.saved_activation_copies(self.stats) if self.mechanism == "copies" \
            else contextlib.nullcontext()
        with scope:
            x0 = self.ctx.denoise(x, self.sigma, self.model_options)
        img = self.decoder(x0)
        if self.target is None:
            g = torch.Generator().manual_seed(5)
            self.target = (torch.rand(img.shape, generator=g, dtype=torch.float64) * 1.6 - 0.8).to(img)
        return self.loss(img, self.target).sum()


def gradient_vs_finite_differences(ctx: SamplingContext, *, sigma_index=1, mechanism="copies", directions=2,
                                   eps=3e-3):
    """The gradient of :class:`WindowLoss` at the window's noised latent, and for ``directions`` random unit
    directions v: (⟨∇L, v⟩, central difference (L(x+εv) − L(x−εv)) / 2ε). Runs with the pack's gradient setup
    (trainable_weights on the model and the VAE, gradient_section)."""
    import comfy.model_management as mm

    fam = ctx.fam
    sigma = ctx.sigmas[sigma_index:sigma_index + 1]
    x = ctx.model_sampling.noise_scaling(sigma, ctx.noise, ctx.latent, max_denoise=False)
    mm.load_models_gpu([ctx.guider.model_patcher, fam.vae.patcher])
    stats = gradients.CopyStats()
    with trainable_weights(ctx.guider.inner_model, fam.vae.first_stage_model), gradient_section():
        L = WindowLoss(ctx, sigma, mechanism, stats=stats)
        u = x.detach().clone().requires_grad_(True)
        value = L(u)
        (grad,) = torch.autograd.grad(value, u)
        pairs = []
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for _ in range(directions):
                v = torch.randn(u.shape, generator=g, dtype=torch.float64).to(u)
                v = v / v.norm()
                fd = (L(u.detach() + eps * v) - L(u.detach() - eps * v)) / (2 * eps)
                pairs.append((float((grad * v).sum()), float(fd)))
    return {"grad": grad.detach(), "loss": float(value), "pairs": pairs, "stats": stats, "patches": L.patches,
            "x": x}
