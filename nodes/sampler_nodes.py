"""Panorama latent, the SyncDiffusion sampler, and its anchor option."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from .inputs import expect, expect_option
from ..syncdiff_core.job import (COMPILE_BACKEND, LOSS_DECODERS, MAX_MEMORY_CAP_GB, MAX_PX, MAX_WINDOW_BATCH,
                                 POSITIONS, PanoramaJob, Windowing, check_canvas_pixels, require_multiple)
from ..syncdiff_core.sync import Anchor, SyncSettings
from .common import CATEGORY

AnchorOption = io.Custom("SYNCDIFF_ANCHOR")

#: The Anchor Selector's modes, the core's "image" and "kept_region" anchors under their display names; new modes
#: are appended (saved workflows store the mode's name).
ANCHOR_OPTIONS = ["center", "index", "reference image", "kept region"]

#: Pixels per latent pixel of the empty canvas PanoramaLatent makes (as ComfyUI's EmptyLatentImage).
LATENT_PX = 8


def window_inputs() -> list:
    """The windowing and synchronization widgets, shared by the sampler node and the SAMPLER node (in this order:
    saved workflows list widget values by position)."""
    return [
        io.Int.Input("window_size", default=0, min=0, max=MAX_PX, step=8,
                     tooltip="Window side in pixels; 0 = the model's native size (512 for SD1.x/2.x base, 768 for "
                             "SD2.x-768-v, 1024 for SDXL/SD3/Flux/Qwen-Image, 2048 for HunyuanImage 2.1)."),
        io.Int.Input("stride", default=0, min=0, max=MAX_PX, step=8,
                     tooltip="Distance between neighbouring windows in pixels (a multiple of the model's pixels per "
                             "latent pixel, at most the window size); 0 = the model's default, a quarter of its "
                             "window (128 for SD1.x, 256 for SDXL/SD3/Flux). Smaller = more windows, smoother, "
                             "slower. Paper: 128."),
        io.Float.Input("sync_weight", default=20.0, min=0.0, max=10000.0, step=0.5,
                       tooltip="Gradient step size w of the LPIPS synchronization; 0 = plain MultiDiffusion. "
                               "Paper: 20."),
        io.Float.Input("sync_decay", default=0.95, min=0.01, max=1.0, step=0.01,
                       tooltip="The weight at step i is sync_weight * sync_decay^i. Paper: 0.95."),
        io.Int.Input("sync_steps", default=10, min=0, max=10000,
                     tooltip="Synchronize during the first this many steps; 0 = off. Values above steps are "
                             "clamped to steps. Paper: 10."),
        io.Int.Input("sync_every", default=1, min=1, max=10000,
                     tooltip="Synchronize on every n-th step of those (1 = every step)."),
        io.Boolean.Input("wrap", default=False,
                         tooltip="Close the loop horizontally for 360° panoramas: windows continue across the "
                                 "right/left border. The width must be a multiple of the stride and at least two "
                                 "windows."),
        io.Int.Input("window_batch", default=0, min=0, max=MAX_WINDOW_BATCH,
                     tooltip="Windows sent through the model together; 0 = automatic: as many as the free GPU "
                             "memory holds, up to all of them (the plan is in the log). Results do not depend on "
                             "it."),
        io.Combo.Input("loss_decoder", options=list(LOSS_DECODERS), default=LOSS_DECODERS[0], optional=True,
                       tooltip="What decodes each window for the LPIPS loss. vae_checkpointed: the full VAE as in "
                               "the paper, recomputing its larger blocks in the backward pass (same gradients as "
                               "'vae', much less memory per window, somewhat slower). vae: the full VAE, fastest, "
                               "most memory. vae_half: the VAE on a half-size latent (approximate, less memory). taesd: "
                               "TAESD from models/vae_approx (approximate, much cheaper)."),
        io.Int.Input("sync_batch", default=0, min=0, max=MAX_WINDOW_BATCH, optional=True,
                     tooltip="Windows per gradient pass while synchronizing; 0 = automatic: up to 2 for 512 px "
                             "windows (scaled by window area: 1 for 1024 px), fewer and exact memory savings "
                             "(recomputed blocks, a two-stage gradient, host memory) where the GPU's free memory "
                             "needs them. Each window in a pass holds its own model and decoder activations."),
    ]


def dit_inputs() -> list:
    """Options for diffusion transformers (Flux, SD3, Qwen-Image, ...); appended after every older widget."""
    return [
        io.Boolean.Input("checkpoint_model", default=False, optional=True,
                         tooltip="Always recompute the diffusion transformer's blocks in the synchronization's "
                                 "backward pass: much less memory, one more forward pass per window. Off: the memory "
                                 "plan turns it on when the GPU needs it. DiT models only; no effect on SD's UNets."),
        io.Combo.Input("positions", options=list(POSITIONS), default=POSITIONS[0], optional=True,
                       tooltip="Rotary positions of a window in a DiT that has ComfyUI's RoPE hook (Flux.1, Flux.2, "
                               "Lumina 2, Z-Image). window: each window is an image at the origin, as the model was "
                               "trained. canvas: its place on the panorama (untrained offsets; one model call per "
                               "window)."),
    ]


def anchor_input() -> list:
    return [AnchorOption.Input("anchor", optional=True,
                               tooltip="What windows synchronize toward (SyncDiffusion Anchor node); default: the "
                                       "center window.")]


def memory_input() -> list:
    """The memory cap; appended after every older input (saved workflows list widget values by position)."""
    return [io.Float.Input("memory_cap_gb", default=0.0, min=0.0, max=MAX_MEMORY_CAP_GB, step=0.5, optional=True,
                           tooltip="The most GPU memory, in GB (GiB, as ComfyUI's --reserve-vram counts), that the "
                                   "memory plan gives the sampler's own work beyond the loaded models, for running "
                                   "other models beside it; 0 = no cap (what the GPU has free). The plan then picks "
                                   "smaller batches and exact memory savings; the result does not change. A cap "
                                   "below what one window needs stops the run before it starts and says how much "
                                   "it needs.")]


def windowing_args(window_size, stride, sync_weight, sync_decay, sync_steps, sync_every, wrap, window_batch,
                   loss_decoder=LOSS_DECODERS[0], sync_batch=0, anchor=None, checkpoint_model=False,
                   positions=POSITIONS[0], memory_cap_gb=0.0) -> dict:
    """The keyword arguments of ``Windowing`` (and ``PanoramaJob``) from those widgets' values."""
    return dict(window_px=window_size, stride_px=stride, wrap=wrap, window_batch=window_batch,
                sync=SyncSettings(weight=sync_weight, decay=sync_decay, steps=sync_steps, every=sync_every),
                anchor=anchor if anchor is not None else Anchor(), loss_decoder=loss_decoder, sync_batch=sync_batch,
                checkpoint_model=checkpoint_model, positions=positions, memory_cap_gb=memory_cap_gb)


class PanoramaLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PanoramaLatent",
            display_name="Panorama Latent",
            category=CATEGORY,
            description="An empty latent canvas for a panorama, wider (or taller) than the model's native size.",
            inputs=[
                io.Int.Input("width", default=2048, min=64, max=MAX_PX, step=8,
                             tooltip="Panorama width in pixels (a multiple of 8)."),
                io.Int.Input("height", default=512, min=64, max=MAX_PX, step=8,
                             tooltip="Panorama height in pixels (a multiple of 8)."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="How many panoramas to sample at once, each from its own noise."),
            ],
            outputs=[io.Latent.Output(tooltip="Zeros of shape (batch, 4, height/8, width/8); the sampler adapts the "
                                              "channels and, for models with other pixel scales (Flux.2, "
                                              "HunyuanImage 2.1), the grid to the model.")],
        )

    @classmethod
    def execute(cls, width: int, height: int, batch_size: int) -> io.NodeOutput:
        require_multiple("width", width, LATENT_PX)
        require_multiple("height", height, LATENT_PX)
        check_canvas_pixels(width, height, batch_size, "PanoramaLatent")
        samples = torch.zeros([batch_size, 4, height // LATENT_PX, width // LATENT_PX])
        # the sampler resizes an empty canvas to its model's grid (16 px for Flux.2, 32 for HunyuanImage 2.1)
        return io.NodeOutput({"samples": samples, "downscale_ratio_spacial": LATENT_PX})


class AnchorSelector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnchorSelector",
            display_name="SyncDiffusion Anchor Selector",
            category=CATEGORY,
            description="Chooses what the other windows are synchronized toward.",
            inputs=[
                io.Combo.Input("mode", options=ANCHOR_OPTIONS, default="center",
                               tooltip="center: the middle window (the reference code). index: the window of "
                                       "that number in raster order (0 = top-left, the paper's algorithm). "
                                       "reference image: pull every window toward the given image instead. "
                                       "kept region: the window that the kept part of the mask covers most (a "
                                       "photo being outpainted; the mask input, else the latent's noise mask)."),
                io.Int.Input("index", default=0, min=0, max=4096,
                             tooltip="Window number for mode 'index' (raster order, starting at 0)."),
                io.Image.Input("image", optional=True,
                               tooltip="Target look for mode 'reference image'; fitted (resized and "
                                       "center-cropped) to the window size."),
                io.Mask.Input("mask", optional=True,
                              tooltip="For mode 'kept region': 1 = generate, 0 = keep (Panorama From Photo's mask), "
                                      "any size. Unconnected: the noise mask of the latent being sampled."),
            ],
            outputs=[AnchorOption.Output(display_name="anchor",
                                         tooltip="Connect to the sampler's anchor input.")],
        )

    @classmethod
    def execute(cls, mode: str, index: int, image: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> io.NodeOutput:
        expect(image=(image, "IMAGE?"), mask=(mask, "MASK?"))
        expect_option("mode", mode, ANCHOR_OPTIONS)
        if mode == "kept region":
            return io.NodeOutput(Anchor(mode="kept_region", mask=mask))
        if mode == "reference image":
            if image is None:
                raise ValueError("mode 'reference image' needs an image connected to the image input")
            return io.NodeOutput(Anchor(mode="image", image=image.movedim(-1, 1) * 2.0 - 1.0))
        return io.NodeOutput(Anchor(mode=mode, index=index))


class SyncDiffusionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SyncDiffusionSampler",
            display_name="SyncDiffusion Sampler",
            category=CATEGORY,
            description="Samples a panorama from overlapping windows fused by MultiDiffusion, synchronized by "
                        "LPIPS gradients toward an anchor window (SyncDiffusion, NeurIPS 2023). DDIM, eta 0.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x, SDXL, ...)."),
                io.Conditioning.Input("positive", tooltip="What the panorama shows. Area, mask and ControlNet "
                                                          "conditioning is cropped to each window."),
                io.Conditioning.Input("negative", tooltip="What to avoid (classifier-free guidance)."),
                io.Vae.Input("vae", tooltip="Decodes window predictions for the LPIPS loss during "
                                            "synchronization (unused when sync is off)."),
                io.Latent.Input("latent_image", tooltip="The canvas, e.g. from Panorama Latent."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; the same seed gives the same noise as KSampler."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="DDIM steps (the paper: 50)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the paper: 7.5)."),
                *window_inputs(),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="Run the UNet and the loss decoder through torch.compile (needs "
                                         "Triton). The first run at a new canvas size or batch shape compiles "
                                         "and can take minutes (less after a restart, from torch's disk "
                                         "cache); later runs at that size, at any step count, are faster. "
                                         "Results match within float rounding."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                               tooltip="1 = from pure noise. Below 1: refine the connected latent (an upscaled or "
                                       "encoded panorama), starting from it partially noised as KSampler does at "
                                       "the same denoise; a latent noise mask limits the change to its area."),
                *dit_inputs(),
                *anchor_input(),
                *memory_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled panorama latent.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, latent_image, seed, steps, cfg, window_size, stride,
                sync_weight, sync_decay, sync_steps, sync_every, wrap, window_batch,
                loss_decoder=LOSS_DECODERS[0], sync_batch=0, compile=False, denoise=1.0, checkpoint_model=False,
                positions=POSITIONS[0], anchor=None, memory_cap_gb=0.0) -> io.NodeOutput:
        from ..syncdiff_core.comfy.sampling import sample_panorama

        expect(model=(model, "MODEL"), positive=(positive, "CONDITIONING"), negative=(negative, "CONDITIONING"),
               vae=(vae, "VAE"), latent_image=(latent_image, "LATENT"), anchor=(anchor, "SYNCDIFF_ANCHOR?"))

        job = PanoramaJob(
            seed=seed, steps=steps, cfg=cfg, denoise=denoise, compile=COMPILE_BACKEND if compile else "",
            **windowing_args(window_size, stride, sync_weight, sync_decay, sync_steps, sync_every, wrap, window_batch,
                             loss_decoder, sync_batch, anchor, checkpoint_model, positions, memory_cap_gb),
        )
        return io.NodeOutput(sample_panorama(model, positive, negative, latent_image, job, vae=vae))


class SyncDiffusionCustomSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SyncDiffusionCustomSampler",
            display_name="SyncDiffusion Sampler (SAMPLER)",
            category=CATEGORY,
            description="SyncDiffusion as a SAMPLER for SamplerCustomAdvanced / SamplerCustom: windows fused by "
                        "MultiDiffusion and synchronized by LPIPS gradients, over whatever guider (CFGGuider, "
                        "BasicGuider with FluxGuidance, DualCFGGuider, ...), sigmas and noise the graph gives. "
                        "Each step is the windowed Euler (DDIM, eta 0) update.",
            inputs=[
                *window_inputs(),
                io.Vae.Input("vae", optional=True,
                             tooltip="Decodes window predictions for the LPIPS loss; needed when sync_weight > 0 "
                                     "and sync_steps > 0 (unless loss_decoder is taesd)."),
                *dit_inputs(),
                *anchor_input(),
                *memory_input(),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustomAdvanced's (or SamplerCustom's) sampler.")],
        )

    @classmethod
    def execute(cls, window_size, stride, sync_weight, sync_decay, sync_steps, sync_every, wrap, window_batch,
                loss_decoder=LOSS_DECODERS[0], sync_batch=0, vae=None, checkpoint_model=False, positions=POSITIONS[0],
                anchor=None, memory_cap_gb=0.0) -> io.NodeOutput:
        from ..syncdiff_core.comfy.sampling import WindowedSampler

        expect(vae=(vae, "VAE?"), anchor=(anchor, "SYNCDIFF_ANCHOR?"))

        windowing = Windowing(**windowing_args(window_size, stride, sync_weight, sync_decay, sync_steps, sync_every,
                                               wrap, window_batch, loss_decoder, sync_batch, anchor, checkpoint_model,
                                               positions, memory_cap_gb))
        return io.NodeOutput(WindowedSampler(windowing, vae=vae))


NODES = [PanoramaLatent, SyncDiffusionSampler, SyncDiffusionCustomSampler, AnchorSelector]
