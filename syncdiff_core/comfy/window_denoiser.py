"""The guided x0 prediction of a batch of windows, as the core's loop calls it: ``denoise(x, sigma, windows, step)``.

One object per lane (device): the lane's view of the guider, the conditioning cropped to the windows, the model
options of the plain and the gradient pass, and a latent noise mask applied through ComfyUI's own inpaint step
(``comfy.samplers.KSamplerX0Inpaint``) on the windows' crops, so that everything that step honours -- the model's
``scale_latent_inpaint`` and ``model_options["denoise_mask_function"]`` (Differential Diffusion) -- applies per
window as it does in KSampler.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

import comfy.samplers

from ..gradients import saved_activation_copies
from ..windows import crop_stack
from .conds import WindowConds
from .families import with_canvas_positions


@dataclasses.dataclass(frozen=True)
class NoiseMask:
    """A latent noise mask over the canvas (ComfyUI's processed ``denoise_mask``, 1 = generate), with what its kept
    part is made of: the input latent and the run's noise, and the run's sigmas (for ``denoise_mask_function``)."""

    mask: torch.Tensor
    latent: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor

    def keep(self, x: torch.Tensor, guider, model_options: dict) -> torch.Tensor:
        """The final latent ``x`` with its kept part the input latent. KSampler's inpaint step blends each x0
        prediction; on a schedule that ends at sigma 0 its last x is that prediction, so the kept part is the input
        exactly. The reference DDIM schedule ends above 0, so the blend is made once more on the last x, with the
        mask as ``denoise_mask_function`` gives it at the last sigma."""
        mask = self.mask
        function = model_options.get("denoise_mask_function")
        if function is not None:
            sigma = self.sigmas[-1:].expand(x.shape[0]).to(x.device)
            mask = function(sigma, mask, extra_options={"model": guider, "sigmas": self.sigmas})
        return x * mask + self.latent * (1.0 - mask)


@dataclasses.dataclass
class WindowDenoiser:
    """``denoise(x, sigma, windows, step) -> x0`` for the windows' crops ``x`` (window-major, ``n`` rows each).

    ``guider``: this lane's view of the guider (its ``conds`` are set per call); ``plain_options`` /
    ``grad_options``: the model options without and with gradients; ``patch``: latent px per token when each
    window's RoPE positions follow its place on the canvas, else None; ``saved_copies``: the gradient forward
    keeps private copies of saved activations (diffusion transformers add into them in place); ``bootstrap``:
    layout regions' bootstrapping, or None; ``noise_mask``: :class:`NoiseMask`, or None."""

    guider: object
    conds: WindowConds
    plain_options: dict
    grad_options: dict
    seed: int | None
    steps: int
    n: int
    patch: int | None = None
    saved_copies: bool = False
    bootstrap: object | None = None
    noise_mask: NoiseMask | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, windows, step: int) -> torch.Tensor:
        # 1. the pass's model options
        options = self.grad_options if torch.is_grad_enabled() else self.plain_options
        model = _WindowsModel(self, windows, step)
        if self.noise_mask is None:
            return model(x, sigma, model_options=options, seed=self.seed)
        # 2. a noise mask: ComfyUI's inpaint step on the windows' crops of the mask, the latent and the noise
        m = self.noise_mask
        inpaint = comfy.samplers.KSamplerX0Inpaint(model, m.sigmas)
        inpaint.latent_image = crop_stack(m.latent, windows, self.n)
        inpaint.noise = crop_stack(m.noise, windows, self.n)
        return inpaint(x, sigma, denoise_mask=crop_stack(m.mask, windows, self.n), model_options=options,
                       seed=self.seed)

    def predict(self, x, sigma, windows, step: int, options: dict) -> torch.Tensor:
        """The guided x0 of the windows: bootstrapped regions, or one guider call per batch of conds."""
        copies = self.saved_copies and torch.is_grad_enabled()
        with saved_activation_copies() if copies else contextlib.nullcontext():
            if self.bootstrap is not None and self.bootstrap.active(step, self.steps):
                return self.bootstrap.denoise(self.guider, self.conds, x, sigma, windows, step, self.steps, options,
                                              self.seed)
            parts = []
            for rows, batch, conds in self.conds.batches(windows):
                self.guider.conds = conds
                parts.append(self._call(x[rows], sigma[rows], batch, options))
            return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _call(self, x, sigma, windows, options: dict) -> torch.Tensor:
        if self.patch is None:
            return self.guider(x, sigma, model_options=options, seed=self.seed)
        rows = x.shape[0] // len(windows)  # canvas positions: one call per window offset
        return torch.cat([self.guider(x[k * rows:(k + 1) * rows], sigma[k * rows:(k + 1) * rows],
                                      model_options=with_canvas_positions(options, w.top, w.left, self.patch),
                                      seed=self.seed) for k, w in enumerate(windows)])


class _WindowsModel:
    """What ComfyUI's inpaint step calls as its model: the windows' guided prediction, with the guider's inner
    model beside it (the inpaint step and ``denoise_mask_function`` read ``model.inner_model``)."""

    def __init__(self, denoiser: WindowDenoiser, windows, step: int):
        self.denoiser, self.windows, self.step = denoiser, windows, step

    @property
    def inner_model(self):
        return self.denoiser.guider.inner_model

    def __call__(self, x, sigma, model_options: dict, seed=None) -> torch.Tensor:
        return self.denoiser.predict(x, sigma, self.windows, self.step, model_options)
