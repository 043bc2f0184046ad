"""The glue between ComfyUI's sampling and the core's windowed loop.

``WindowedSampler`` is a ``comfy.samplers.Sampler``: any guider (CFGGuider, BasicGuider, DualCFGGuider, ...) drives it,
through the sampler node's ``sample_panorama`` or through ComfyUI's SamplerCustomAdvanced (the SyncDiffusion SAMPLER
node). It runs ``syncdiff_core.sampler.sample`` over lanes (one per device) of a :class:`WindowDenoiser`, the loss
decoder and LPIPS, from a run prepared once (:func:`run_plan.prepare_run`).
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from .. import regions as core_regions
from .. import sampler as core_sampler
from ..job import PanoramaJob, Windowing
from ..lanes import Lane, Lanes
from ..memory import MemoryPlan
from ..sync import GradientWay
from ..weights import trainable_weights
from .assets import get_lpips
from .compile import compiled_patcher, is_compiled
from .conds import WindowConds, clone_skips_for_gradients, window_size_conditioning
from .layout import Bootstrap, prepare_layout
from .loss_decoders import decoder_for_gradients
from . import families, memory_plan, multigpu
from .autograd_patches import block_keys, with_block_checkpointing
from .model import gradient_ready_patcher, gradient_section, is_dynamic, oom_errors
from .run_plan import RunPlan, check_latent_size, check_sigmas, prepare_run
from .window_denoiser import NoiseMask, WindowDenoiser


#: Guider rows a window takes in the sampler node's CFGGuider (positive and negative).
CFG_ROWS = 2


class WindowedSampler(comfy.samplers.Sampler):
    """A ComfyUI sampler that runs the core's windowed loop over whatever sigmas, noise and guider it is given.

    ``run``: the prepared run (the sampler node's); None prepares it from ``windowing`` when sampling starts.
    ``bootstrap``: layout regions' bootstrapping (the sampler node resolves the regions first), or None."""

    def __init__(self, windowing: Windowing, vae=None, loss=None, *, run: RunPlan | None = None, bootstrap=None):
        self.windowing, self.vae, self.loss, self.run, self.bootstrap = windowing, vae, loss, run, bootstrap

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        guider, ms = model_wrap, model_wrap.inner_model.model_sampling
        # 1. the run, prepared once and checked before any model call
        check_sigmas(sigmas)
        run = self.run or prepare_run(self.windowing, guider.model_patcher, self.vae, noise, len(sigmas) - 1,
                                      self.loss, rows=memory_plan.guider_rows(guider), noise_mask=denoise_mask)
        if self.run is None and any(core_regions.REGION_KEY in c for cs in guider.conds.values() for c in cs):
            raise ValueError("Layout Mask Region conditioning needs the SyncDiffusion Sampler node (it resolves the "
                             "regions' masks and bootstraps them); use that node for layout-guided panoramas")
        latent_image = torch.zeros_like(noise) if latent_image is None else latent_image
        mask = None if denoise_mask is None else NoiseMask(denoise_mask, latent_image, noise, sigmas)
        window_conds = WindowConds(guider.conds, noise.shape[-2:], noise.shape[0])
        full_conds, full_model = guider.conds, guider.inner_model
        try:
            # 2. the gradient path's models loaded, the memory plan, the gradient path, the lanes
            if run.sync:
                self._load_gradient_models(run, guider)
            memory = memory_plan.decide(run, guider)
            options, decode, grad_modules = self._gradient_path(run, guider, window_conds,
                                                                extra_args.get("model_options", {}), memory)
            denoiser = functools.partial(
                WindowDenoiser, conds=window_conds, seed=extra_args.get("seed"), steps=run.steps, n=noise.shape[0],
                patch=run.facts.patch if run.windowing.positions == "canvas" else None, bootstrap=self.bootstrap,
                saved_copies=not _is_unet(guider.inner_model.diffusion_model), noise_mask=mask)
            lanes = self._lanes(run, guider, options, denoiser, decode, grad_modules, bool(window_conds.hints))

            # 3. the windowed loop, from the state KSampler starts from to the LATENT it returns
            x = families.start_state(ms, sigmas, noise, latent_image, self.max_denoise(model_wrap, sigmas))
            with trainable_weights(*grad_modules), gradient_section():
                x = core_sampler.sample(
                    lanes, x, sigmas, run.plan, sync=run.windowing.sync, anchor=run.windowing.anchor,
                    input_scale=lambda sigma: families.input_scale(ms, sigma),
                    batching=run.windowing.batching(memory, oom_errors(), comfy.model_management.soft_empty_cache),
                    way=GradientWay(two_stage=memory.two_stage, offload=memory.offload),
                    callback=None if callback is None else lambda i, x, x0: callback(i, x0, x, run.steps),
                    interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                )
        finally:
            guider.conds, guider.inner_model = full_conds, full_model
            window_conds.restore()
        x = families.final_latent(ms, sigmas, x)
        if mask is not None and float(sigmas[-1]) > 0:
            x = mask.keep(x, guider, extra_args.get("model_options", {}))
        return x

    def _load_gradient_models(self, run: RunPlan, guider) -> None:
        """The gradient patcher and the VAE loaded (before the memory plan reads what is free); the guider predicts
        with the gradient patcher's model (the static delegate's under dynamic VRAM; else the same)."""
        uses_vae = run.windowing.loss_decoder != "taesd"
        comfy.model_management.load_models_gpu([run.patcher] + ([self.vae.patcher] if uses_vae else []))
        guider.inner_model = run.patcher.model

    def _gradient_path(self, run: RunPlan, guider, window_conds: WindowConds, model_options: dict,
                       memory: MemoryPlan):
        """``(model options, loss decoder, modules needing stand-in weights)``."""
        if not run.sync:
            # Weights loaded under inference mode are inference tensors, and a synchronized run swaps in normal
            # tensors over the same storage (``trainable_weights``). Dynamo guards on that kind, so a compiled
            # plain run takes the same stand-ins: its graph then serves both runs (else each compiles its own).
            # Under dynamic VRAM the synchronized run uses another module, the static delegate's, anyway.
            patcher = guider.model_patcher
            shared = is_compiled(patcher) and not is_dynamic(patcher)
            return model_options, None, [guider.inner_model] if shared else []
        uses_vae = run.windowing.loss_decoder != "taesd"
        modules = [guider.inner_model] + ([self.vae.first_stage_model] if uses_vae else [])
        modules += window_conds.control_modules()
        if window_conds.hints:
            model_options = clone_skips_for_gradients(model_options)
        if memory.checkpoint_model and block_keys(guider.inner_model.diffusion_model):
            model_options = with_block_checkpointing(model_options, guider.inner_model.diffusion_model)[0]
        decode = decoder_for_gradients(self.vae, run.patcher, run.windowing.loss_decoder, run.windowing.compile)
        return model_options, decode, modules

    def _lanes(self, run: RunPlan, guider, model_options: dict, denoiser, decode, grad_modules: list,
               hints: bool) -> Lanes:
        """One lane per GPU that ComfyUI's MultiGPU prepared (see ``multigpu``), else the model's own device.
        ControlNet hints and layout bootstrapping set state shared by every call: one lane; with hints on the main
        GPU alone (the window crops are set on the main GPU's ControlNet, not on ComfyUI's per-GPU clones of it).
        A lane on another GPU has its own view of the guider, ComfyUI's MultiGPU path on its device for the plain
        pass, the single-device path on its model for the gradient pass, its own loss decoder and LPIPS; its
        gradient modules are added to ``grad_modules``."""
        main, single = run.patcher.load_device, multigpu.without_multigpu(model_options)
        devices = multigpu.device_patchers(model_options)
        if not devices or hints or self.bootstrap is not None:
            plain = single if hints else model_options
            return Lanes([Lane(main, denoiser(guider=guider, plain_options=plain, grad_options=single), decode,
                               run.loss)])
        loaded, lanes = [], []
        for device, patcher in devices.items():
            grad, lane_decode, lane_loss = None, None, None
            if device == main:
                patcher, grad, lane_decode, lane_loss = run.patcher, single, decode, run.loss
            elif run.sync:
                grad_patcher = gradient_ready_patcher(patcher)
                if grad_patcher is not patcher:
                    loaded.append(grad_patcher)
                patcher = grad_patcher
                grad = multigpu.gradient_options(model_options, device, patcher.model)
                vae = multigpu.vae_on(self.vae, device) if run.windowing.loss_decoder != "taesd" else None
                lane_decode = decoder_for_gradients(vae, patcher, run.windowing.loss_decoder, run.windowing.compile)
                lane_loss = get_lpips(device)
                grad_modules += [patcher.model] + ([vae.first_stage_model] if vae is not None else [])
            plain = multigpu.plain_options(model_options, device, patcher)
            view = copy.copy(guider)  # its own conds attribute
            lanes.append(Lane(device, denoiser(guider=view, plain_options=plain, grad_options=grad), lane_decode,
                              lane_loss))
        if loaded:
            comfy.model_management.load_models_gpu(loaded)
        return Lanes(lanes, multigpu.pool_runner(model_options.get("multigpu_thread_pool")))


def sample_panorama(model, positive, negative, latent: dict, job: PanoramaJob, vae=None, loss=None) -> dict:
    """Run SyncDiffusion (MultiDiffusion when sync is off) on a LATENT; returns a new LATENT dict. ``loss`` replaces
    LPIPS (tests)."""
    # 1. the run, prepared once: every input checked against the model before any model is loaded. The latent's
    # own pixel size is checked before the latent is made in the model's layout (which allocates)
    check_latent_size(latent["samples"], int(latent.get("downscale_ratio_spacial", 8)))
    latent_image = families.prepare_latent(model, latent)
    run = prepare_run(job, model, vae, latent_image, job.steps, loss, rows=CFG_ROWS,
                      noise_mask=latent.get("noise_mask"))
    positive, region_specs = prepare_layout(positive, latent_image, negative)
    bootstrapping = any(spec.bootstrap_fraction > 0 for spec in region_specs)
    if bootstrapping and vae is None:
        raise ValueError("vae is required to bootstrap layout regions (it encodes the flat-colour backgrounds)")

    # 2. the model: the gradient-ready patcher when synchronizing (the plain pass then uses it too), compiled
    model = compiled_patcher(run.patcher, job.compile)
    run = dataclasses.replace(run, patcher=model)

    # 3. conditioning, noise and schedule, as KSampler prepares them
    scale, plan = run.facts.pixel_scale, run.plan
    positive, negative = (window_size_conditioning(c, plan.window_height * scale, plan.window_width * scale)
                          for c in (positive, negative))
    noise = comfy.sample.prepare_noise(latent_image, job.seed, latent.get("batch_index"))
    sigmas = families.sampling_sigmas(model, job.steps, job.denoise)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(job.cfg)
    bootstrap = Bootstrap(model, vae, region_specs, plan, latent_image.shape[0], job.seed, scale) if bootstrapping \
        else None
    sampler = WindowedSampler(run.windowing, vae=vae, run=run, bootstrap=bootstrap)

    # 4. the windowed loop, driven by the guider
    samples = guider.sample(noise, latent_image, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                            callback=latent_preview.prepare_callback(model, job.steps),
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=job.seed)

    # 5. the LATENT
    out = {k: v for k, v in latent.items() if k not in ("downscale_ratio_spacial", "downscale_ratio_temporal")}
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out


def _is_unet(diffusion_model) -> bool:
    """SD's UNets (SD1.x/2.x/SDXL) add into no saved activation in the gradient pass (ControlNet residuals are
    handled by ``clone_skips_for_gradients``), so they need no saved copies."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return isinstance(diffusion_model, UNetModel)
