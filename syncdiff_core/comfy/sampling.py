"""The glue between ComfyUI's sampling and the core's windowed loop.

A ``CFGGuider`` prepares models and conditioning as KSampler does, and drives ``WindowedSampler`` (a custom
``comfy.samplers.Sampler``), which runs ``syncdiff_core.sampler.sample`` over small callables: the guided x0 of
a batch of windows, the loss decoder and LPIPS. ``sample_panorama`` is the sampler node's entry point.
"""
from __future__ import annotations

import dataclasses

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from .. import sampler as core_sampler
from ..job import PanoramaJob
from ..weights import trainable_weights
from ..windows import WindowPlan
from .assets import get_lpips
from .compile import check_compile_backend, compiled_patcher
from .conds import WindowConds, clone_skips_for_gradients, window_size_conditioning
from .layout import Bootstrap, prepare_layout
from .loss_decoders import decoder_for_gradients, taesd_path
from .model import (final_latent, gradient_ready_patcher, gradient_section, input_scale, latent_scale,
                    native_window, oom_errors, reference_sigmas)


class WindowedSampler(comfy.samplers.Sampler):
    """A ComfyUI sampler object that runs the core's windowed loop; ``CFGGuider.sample`` drives it."""

    def __init__(self, job: PanoramaJob, plan: WindowPlan, vae=None, loss=None, bootstrap=None):
        self.job, self.plan, self.vae, self.loss = job, plan, vae, loss
        self.bootstrap = bootstrap  # Bootstrap backgrounds for layout regions, or None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        guider, job = model_wrap, self.job
        ms = guider.inner_model.model_sampling
        model_options, seed = extra_args.get("model_options", {}), extra_args.get("seed")
        window_conds = WindowConds(guider.conds, noise.shape[-2:], noise.shape[0])
        full_conds = guider.conds

        def denoise(x, sigma, windows, step):
            if self.bootstrap is not None and self.bootstrap.active(step, job.steps):
                return self.bootstrap.denoise(guider, window_conds, x, sigma, windows, step, job.steps,
                                              model_options, seed)
            parts = []
            for rows, conds in window_conds.batches(windows):
                guider.conds = conds
                parts.append(guider(x[rows], sigma[rows], model_options=model_options, seed=seed))
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        def report(i, x, x0):
            if callback is not None:
                callback(i, x0, x, len(sigmas) - 1)

        x = ms.noise_scaling(sigmas[0], noise, latent_image, max_denoise=True)
        decode, grad_modules = None, []
        if job.sync.active:
            uses_vae = job.loss_decoder != "taesd"
            comfy.model_management.load_models_gpu([guider.model_patcher] + ([self.vae.patcher] if uses_vae else []))
            grad_modules = [guider.inner_model] + ([self.vae.first_stage_model] if uses_vae else [])
            grad_modules += window_conds.control_modules()
            if window_conds.hints:
                model_options = clone_skips_for_gradients(model_options)
            decode = decoder_for_gradients(self.vae, guider.model_patcher, job.loss_decoder, job.compile)
        try:
            with trainable_weights(*grad_modules), gradient_section():
                x = core_sampler.sample(
                    denoise, x.clone(), sigmas, self.plan,
                    sync=job.sync, decode=decode, loss=self.loss, anchor=job.anchor,
                    input_scale=input_scale(ms),
                    batching=job.batching(oom_errors(), comfy.model_management.soft_empty_cache),
                    callback=report,
                    interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                )
        finally:
            guider.conds = full_conds
            window_conds.restore()
        return final_latent(ms, sigmas[-1], x)


def sample_panorama(model, positive, negative, latent: dict, job: PanoramaJob, vae=None, loss=None) -> dict:
    """Run SyncDiffusion (MultiDiffusion when sync is off) on a LATENT; returns a new LATENT dict."""
    # 1. check every input against the model, before any model is loaded
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    scale = latent_scale(model)
    plan = job.plan(latent_image.shape[-2], latent_image.shape[-1], scale, native_window(model))
    job.anchor.window_index(plan)  # an index anchor must be on the grid
    positive, region_specs = prepare_layout(positive, latent_image, negative)
    bootstrapping = any(spec.bootstrap_fraction > 0 for spec in region_specs)
    if bootstrapping and vae is None:
        raise ValueError("vae is required to bootstrap layout regions (it encodes the flat-colour backgrounds)")
    if job.compile:
        check_compile_backend(job.compile, model.load_device)
    if job.sync.active:
        if job.loss_decoder == "taesd":
            taesd_path(model)  # a missing file fails here
        elif vae is None:
            raise ValueError("vae is required when sync_weight > 0 and sync_steps > 0")

    # 2. the models: the perceptual loss, weights that can carry gradients, compile
    height_px, width_px = plan.window_height * scale, plan.window_width * scale
    if job.sync.active:
        job = dataclasses.replace(job, anchor=job.anchor.fitted(height_px, width_px))
        loss = loss if loss is not None else get_lpips(model.load_device)
        model = gradient_ready_patcher(model)
    model = compiled_patcher(model, job.compile)

    # 3. conditioning, noise and schedule, as KSampler prepares them
    positive, negative = (window_size_conditioning(c, height_px, width_px) for c in (positive, negative))
    noise = comfy.sample.prepare_noise(latent_image, job.seed, latent.get("batch_index"))
    sigmas = reference_sigmas(model, job.steps)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(job.cfg)
    bootstrap = Bootstrap(model, vae, region_specs, plan, latent_image.shape[0], job.seed, scale) if bootstrapping \
        else None

    # 4. the windowed loop, driven by the guider
    samples = guider.sample(noise, latent_image, WindowedSampler(job, plan, vae=vae, loss=loss, bootstrap=bootstrap),
                            sigmas, callback=latent_preview.prepare_callback(model, job.steps),
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=job.seed)

    # 5. the LATENT
    out = latent.copy()
    out.pop("noise_mask", None)
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out
