"""The glue between ComfyUI's sampling and the core's windowed loop.

``WindowedSampler`` is a ``comfy.samplers.Sampler``: any guider (CFGGuider, BasicGuider, DualCFGGuider, ...) drives it,
through the sampler node's ``sample_panorama`` or through ComfyUI's SamplerCustomAdvanced (the SyncDiffusion SAMPLER
node). It runs ``syncdiff_core.sampler.sample`` over small callables: the guided x0 of a batch of windows (with
their conditioning cropped, and a latent noise mask applied as KSampler applies it), the loss decoder and LPIPS.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from .. import regions as core_regions
from .. import sampler as core_sampler
from ..job import PanoramaJob, Windowing, check_canvas_pixels
from ..gradients import saved_activation_copies
from ..lanes import Lane, Lanes
from ..weights import trainable_weights
from ..windows import crop_stack
from .assets import get_lpips
from .compile import check_compile_backend, compiled_patcher, is_compiled
from .conds import WindowConds, clone_skips_for_gradients, window_size_conditioning
from .layout import Bootstrap, prepare_layout
from .loss_decoders import decoder_for_gradients, taesd_path
from . import families, multigpu
from .autograd_patches import block_keys, with_block_checkpointing
from .model import gradient_ready_patcher, gradient_section, is_dynamic, oom_errors


def check_sigmas(sigmas: torch.Tensor) -> None:
    """A schedule the windowed sampler can follow: at least one step, strictly decreasing, first sigma > 0."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must hold at least two values (one step), got shape {tuple(sigmas.shape)}")
    if not bool(torch.all(sigmas[1:] < sigmas[:-1])) or float(sigmas[0]) <= 0:
        values = ", ".join(f"{float(s):.4g}" for s in sigmas[:6]) + (", ..." if sigmas.numel() > 6 else "")
        raise ValueError(f"sigmas must be strictly decreasing from a positive value, got [{values}]; use a "
                         "scheduler's output (flipped sigmas cannot be sampled)")


def check_latent_size(samples: torch.Tensor, scale: int) -> None:
    """The canvas a latent stands for must be within the pack's pixel limit (``job.MAX_CANVAS_PIXELS``)."""
    if samples.ndim < 3:
        raise ValueError(f"latent_image must be a LATENT (batch, channels, height, width), got shape "
                         f"{tuple(samples.shape)}")
    frames = samples.shape[0] * (samples.shape[2] if samples.ndim == 5 else 1)
    check_canvas_pixels(samples.shape[-1] * scale, samples.shape[-2] * scale, frames, "latent_image",
                        names=("batch", "width", "height"))


def check_inputs(windowing: Windowing, model, vae, latent: torch.Tensor) -> tuple[families.Facts, object]:
    """Every rule that needs the model, before any model call: the family can be sampled (and synchronized) on this
    latent, the canvas is within the pixel limit, the windows fit the canvas in the family's pixels, synchronization
    has its VAE (or TAESD file), canvas positions have the model's RoPE hook, the GPUs ComfyUI's MultiGPU prepared
    the model for are present. Returns the family's facts and the window plan."""
    multigpu.check_devices_present(multigpu.prepared_devices(model))
    sync = windowing.sync.active
    facts = families.check_supported(model, latent, sync=sync, vae=vae if sync else None)
    check_latent_size(latent, facts.pixel_scale)
    plan = windowing.plan(latent.shape[-2], latent.shape[-1], facts.pixel_scale, facts.native_latent,
                          facts.default_stride_px)
    if sync and windowing.loss_decoder == "taesd":
        taesd_path(model)  # a missing file fails here
    elif sync and vae is None:
        raise ValueError("vae is required when sync_weight > 0 and sync_steps > 0 (it decodes the windows for the "
                         "LPIPS loss)")
    if windowing.positions == "canvas" and not families.rope_shift_supported(model):
        raise ValueError(f"positions 'canvas' needs a model that reads ComfyUI's RoPE options (Flux.1, Flux.2, "
                         f"Lumina 2, Z-Image); {facts.family} does not: use positions 'window'")
    return facts, plan


class WindowedSampler(comfy.samplers.Sampler):
    """A ComfyUI sampler that runs the core's windowed loop over whatever sigmas, noise and guider it is given."""

    def __init__(self, windowing: Windowing, vae=None, loss=None, bootstrap=None, layout_resolved: bool = False):
        self.windowing, self.vae, self.loss = windowing, vae, loss
        self.bootstrap = bootstrap  # Bootstrap backgrounds for layout regions, or None
        self.layout_resolved = layout_resolved  # sample_panorama resolved LayoutMaskRegion conds

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        guider, patcher = model_wrap, model_wrap.model_patcher
        ms = guider.inner_model.model_sampling
        # 1. check the inputs against the model and the canvas, before any model call
        check_sigmas(sigmas)
        steps = len(sigmas) - 1
        windowing = self.windowing.for_steps(steps)
        facts, plan = check_inputs(windowing, patcher, self.vae, noise)
        if not self.layout_resolved and any(core_regions.REGION_KEY in c for cs in guider.conds.values() for c in cs):
            raise ValueError("Layout Mask Region conditioning needs the SyncDiffusion Sampler node (it resolves the "
                             "regions' masks and bootstraps them); use that node for layout-guided panoramas")
        if windowing.sync.active:
            scale = facts.pixel_scale
            windowing = dataclasses.replace(windowing, anchor=windowing.anchor.fitted(plan.window_height * scale,
                                                                                     plan.window_width * scale))
        if latent_image is None:
            latent_image = torch.zeros_like(noise)

        # 2. the guided x0 of a batch of windows: conditioning cropped, the noise mask applied as KSampler does
        model_options, seed = extra_args.get("model_options", {}), extra_args.get("seed")
        window_conds = WindowConds(guider.conds, noise.shape[-2:], noise.shape[0])
        full_conds, n = guider.conds, noise.shape[0]

        canvas_positions = windowing.positions == "canvas"
        # DiTs may add into saved activations in place (Flux's blocks): their gradient forward saves private copies
        copies = not _is_unet(guider.inner_model.diffusion_model)

        def denoiser(g, plain_options, grad_options):
            """``denoise(x, sigma, windows, step)`` through the guider ``g`` (a lane has its own view of the guider:
            the conds are set per batch), with ``grad_options`` as the model options when gradients are on."""
            def call(x, sigma, windows, options):
                if not canvas_positions:
                    return g(x, sigma, model_options=options, seed=seed)
                rows = x.shape[0] // len(windows)
                return torch.cat([g(x[k * rows:(k + 1) * rows], sigma[k * rows:(k + 1) * rows],
                                    model_options=families.with_canvas_positions(options, w.top, w.left, facts.patch),
                                    seed=seed) for k, w in enumerate(windows)])

            def predict(x, sigma, windows, step):
                options = grad_options if torch.is_grad_enabled() else plain_options
                if self.bootstrap is not None and self.bootstrap.active(step, steps):
                    return self.bootstrap.denoise(g, window_conds, x, sigma, windows, step, steps, options, seed)
                parts = []
                for rows, conds in window_conds.batches(windows):
                    g.conds = conds
                    parts.append(call(x[rows], sigma[rows], windows if rows.stop - rows.start == x.shape[0] else
                                      [windows[rows.start // n]], options))
                return parts[0] if len(parts) == 1 else torch.cat(parts)

            def guided(x, sigma, windows, step):
                if copies and torch.is_grad_enabled():
                    with saved_activation_copies():
                        return predict(x, sigma, windows, step)
                return predict(x, sigma, windows, step)

            def denoise(x, sigma, windows, step):
                if denoise_mask is None:
                    return guided(x, sigma, windows, step)
                mask, kept = crop_stack(denoise_mask, windows, n), crop_stack(latent_image, windows, n)
                noised = g.inner_model.scale_latent_inpaint(x=x, sigma=sigma, noise=crop_stack(noise, windows, n),
                                                            latent_image=kept)
                x0 = guided(x * mask + noised * (1 - mask), sigma, windows, step)
                return x0 * mask + kept * (1 - mask)

            return denoise

        def report(i, x, x0):
            if callback is not None:
                callback(i, x0, x, steps)

        # 3. the gradient path: trainable weights, the loss decoder, LPIPS
        decode, loss, grad_modules, swap, grad_patcher = None, self.loss, [], None, patcher
        if windowing.sync.active:
            uses_vae = windowing.loss_decoder != "taesd"
            grad_patcher = gradient_ready_patcher(patcher)
            comfy.model_management.load_models_gpu([grad_patcher] + ([self.vae.patcher] if uses_vae else []))
            if grad_patcher is not patcher:  # dynamic VRAM: the guider predicts with the static delegate's model
                swap = guider.inner_model
                guider.inner_model = grad_patcher.model
            grad_modules = [guider.inner_model] + ([self.vae.first_stage_model] if uses_vae else [])
            grad_modules += window_conds.control_modules()
            if window_conds.hints:
                model_options = clone_skips_for_gradients(model_options)
            if windowing.checkpoint_model and block_keys(guider.inner_model.diffusion_model):
                model_options = with_block_checkpointing(model_options, guider.inner_model.diffusion_model)[0]
            decode = decoder_for_gradients(self.vae, grad_patcher, windowing.loss_decoder, windowing.compile)
            loss = loss if loss is not None else get_lpips(patcher.load_device)
        elif is_compiled(patcher) and not is_dynamic(patcher):
            # Weights loaded under inference mode are inference tensors, and a synchronized run swaps in normal
            # tensors over the same storage (``trainable_weights``). Dynamo guards on that kind, so a compiled
            # plain run takes the same stand-ins: its graph then serves both runs (else each compiles its own).
            # (Under dynamic VRAM the synchronized run uses another module, the static delegate's, anyway.)
            grad_modules = [guider.inner_model]

        # 4. the lanes: one per GPU that ComfyUI's MultiGPU prepared, else the model's own device. ControlNet hints
        # and layout bootstrapping set state shared by every call: one lane; with hints on the main GPU alone (the
        # window crops are set on the main GPU's ControlNet, not on ComfyUI's per-GPU clones of it)
        devices = multigpu.device_patchers(model_options)
        if devices and not window_conds.hints and self.bootstrap is None:  # devices checked in check_inputs
            lanes = self._lanes(guider, devices, patcher, grad_patcher, model_options, denoiser, decode, loss,
                                grad_modules)
        else:
            plain = multigpu.without_multigpu(model_options) if window_conds.hints else model_options
            lanes = Lanes([Lane(patcher.load_device, denoiser(guider, plain, multigpu.without_multigpu(model_options)),
                                decode, loss)])

        # 5. the windowed loop
        x = families.start_state(ms, sigmas, noise, latent_image, self.max_denoise(model_wrap, sigmas))
        try:
            with trainable_weights(*grad_modules), gradient_section():
                x = core_sampler.sample(
                    None, x, sigmas, plan, lanes=lanes,
                    sync=windowing.sync, anchor=windowing.anchor,
                    input_scale=lambda sigma: families.input_scale(ms, sigma),
                    batching=windowing.batching(oom_errors(), comfy.model_management.soft_empty_cache,
                                                plan.window_height * plan.window_width * facts.pixel_scale ** 2),
                    callback=report,
                    interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                )
        finally:
            guider.conds = full_conds
            window_conds.restore()
            if swap is not None:
                guider.inner_model = swap
        return families.final_latent(ms, sigmas, x)

    def _lanes(self, guider, devices, patcher, grad_patcher, model_options, denoiser, decode, loss, grad_modules):
        """A lane per GPU of ComfyUI's MultiGPU (see ``multigpu``): its own view of the guider, ComfyUI's MultiGPU
        path on its device for the plain pass, the single-device path on its model for the gradient pass, its own
        loss decoder and LPIPS. Adds the lanes' gradient modules to ``grad_modules``."""
        windowing, sync = self.windowing, self.windowing.sync.active
        main = patcher.load_device
        runner = multigpu.pool_runner(model_options.get("multigpu_thread_pool"))
        loaded, lanes = [], []
        for device, device_patcher in devices.items():
            if device == main:
                lane_patcher, lane_grad, lane_decode, lane_loss = grad_patcher, \
                    multigpu.without_multigpu(model_options), decode, loss
            elif sync:
                lane_patcher = gradient_ready_patcher(device_patcher)
                lane_grad = multigpu.gradient_options(model_options, device, lane_patcher.model)
                vae = multigpu.vae_on(self.vae, device) if windowing.loss_decoder != "taesd" else None
                lane_decode = decoder_for_gradients(vae, lane_patcher, windowing.loss_decoder, windowing.compile)
                lane_loss = get_lpips(device)
                grad_modules += [lane_patcher.model] + ([vae.first_stage_model] if vae is not None else [])
                if lane_patcher is not device_patcher:
                    loaded.append(lane_patcher)
            else:
                lane_patcher, lane_grad, lane_decode, lane_loss = device_patcher, None, None, None
            view = copy.copy(guider)  # its own conds attribute
            lanes.append(Lane(device, denoiser(view, multigpu.plain_options(model_options, device, lane_patcher),
                                               lane_grad), lane_decode, lane_loss))
        if loaded:
            comfy.model_management.load_models_gpu(loaded)
        return Lanes(lanes, runner)


def sample_panorama(model, positive, negative, latent: dict, job: PanoramaJob, vae=None, loss=None) -> dict:
    """Run SyncDiffusion (MultiDiffusion when sync is off) on a LATENT; returns a new LATENT dict."""
    # 1. check every input against the model, before any model is loaded
    check_latent_size(latent["samples"], int(latent.get("downscale_ratio_spacial", 8)))  # before any allocation
    latent_image = families.prepare_latent(model, latent)
    facts, plan = check_inputs(job, model, vae, latent_image)
    positive, region_specs = prepare_layout(positive, latent_image, negative)
    bootstrapping = any(spec.bootstrap_fraction > 0 for spec in region_specs)
    if bootstrapping and vae is None:
        raise ValueError("vae is required to bootstrap layout regions (it encodes the flat-colour backgrounds)")
    if job.compile:
        check_compile_backend(job.compile, model.load_device)

    # 2. the models: the perceptual loss, weights that can carry gradients, compile
    scale = facts.pixel_scale
    height_px, width_px = plan.window_height * scale, plan.window_width * scale
    if job.sync.active:
        loss = loss if loss is not None else get_lpips(model.load_device)
        model = gradient_ready_patcher(model)
    model = compiled_patcher(model, job.compile)

    # 3. conditioning, noise and schedule, as KSampler prepares them
    positive, negative = (window_size_conditioning(c, height_px, width_px) for c in (positive, negative))
    noise = comfy.sample.prepare_noise(latent_image, job.seed, latent.get("batch_index"))
    sigmas = families.sampling_sigmas(model, job.steps, job.denoise)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(job.cfg)
    bootstrap = Bootstrap(model, vae, region_specs, plan, latent_image.shape[0], job.seed, scale) if bootstrapping \
        else None
    sampler = WindowedSampler(job, vae=vae, loss=loss, bootstrap=bootstrap, layout_resolved=True)

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
