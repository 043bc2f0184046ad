"""The only module of the pack that touches ComfyUI internals.

It turns ComfyUI objects (MODEL, VAE, CONDITIONING, LATENT) into the small callables the core's loop runs
on, through ComfyUI's sanctioned extension points: a ``CFGGuider`` whose ``sample`` prepares models and
conditioning as KSampler does, and a custom ``comfy.samplers.Sampler`` that runs the windowed loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging

import torch

import comfy.conds
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from . import regions as core_regions
from . import sampler as core_sampler
from .sync import Anchor, SyncSettings
from .windows import Window, WindowPlan, crop, plan_windows

log = logging.getLogger("syncdiffusion")


# --------------------------------------------------------------------------------------------------
# Model facts
# --------------------------------------------------------------------------------------------------

def latent_scale(model) -> int:
    """Pixels per latent pixel of the model's latent space (8 for SD1.x/2.x/SDXL)."""
    fmt = model.model.latent_format
    return int(getattr(fmt, "spacial_downscale_ratio", 8))


def native_window(model) -> int:
    """The model's native square size in latent px: 64 for SD1.x/2.x (512 px), 128 for SDXL and newer."""
    import comfy.latent_formats as lf

    fmt = model.model.latent_format
    if isinstance(fmt, lf.SD15):  # SD1.x and SD2.x share this latent format
        if isinstance(model.model.model_sampling, comfy.model_sampling.V_PREDICTION):
            return 96  # SD2.x 768-v
        return 64
    return 128


def reference_sigmas(model, steps: int) -> torch.Tensor:
    """The reference DDIM schedule: ComfyUI's ``ddim_uniform`` (timesteps 981, 961, …, 1 for 50 steps) whose
    last step lands on the sigma of timestep 0 instead of on 0, as diffusers' DDIM with ``set_alpha_to_one=False``.
    Models outside the discrete EPS/V family keep ComfyUI's schedule, ending at 0."""
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", steps).clone()
    if _is_vp_family(ms) and float(sigmas[-1]) == 0.0:
        sigmas[-1] = ms.sigmas[0]
    return sigmas


def _is_vp_family(ms) -> bool:
    return isinstance(ms, comfy.model_sampling.EPS) and hasattr(ms, "sigmas")


# --------------------------------------------------------------------------------------------------
# Conditioning cropped to windows
# --------------------------------------------------------------------------------------------------

def _crop_stack(t: torch.Tensor, windows, n: int) -> torch.Tensor:
    """Crops of a canvas-sized tensor (B, ..., H, W) for each window, each batch made ``n`` long, window-major."""
    parts = []
    for w in windows:
        part = crop(t, w)
        if part.shape[0] != n:
            part = part[:1].expand(n, *part.shape[1:]) if part.shape[0] == 1 else part[:n]
        parts.append(part)
    return torch.cat(parts)


def _scaled(win: Window, s: int) -> Window:
    return Window(win.top * s, win.left * s, win.height * s, win.width * s, win.canvas_width * s)


def _area_in_window(area, win: Window):
    """Intersect a 2-D cond area (h, w, y, x) in canvas latent px with a window: the pieces in window coords."""
    if len(area) != 4:
        raise ValueError(f"SyncDiffusion supports 2-D conditioning areas only, got area {tuple(area)}")
    h, w, y, x = area
    top, bottom = max(y, win.top), min(y + h, win.top + win.height)
    if bottom <= top:
        return []
    found = []
    for a, b, s in win.column_ranges():
        left, right = max(x, a), min(x + w, b)
        if right > left:
            piece = (bottom - top, right - left, top - win.top, left - a + s)
            if found and found[-1][3] + found[-1][1] == piece[3]:  # contiguous across the wrap seam: one area
                piece = (piece[0], found[-1][1] + piece[1], piece[2], found[-1][3])
                found.pop()
            found.append(piece)
    return found


def _is_spatial(cond_obj) -> bool:
    return isinstance(cond_obj, comfy.conds.CONDNoiseShape)


def _position_dependent(c: dict) -> bool:
    return "area" in c or "mask" in c or "control" in c or any(
        _is_spatial(v) for v in c.get("model_conds", {}).values())


def _control_chain(control):
    while control is not None:
        yield control
        control = getattr(control, "previous_controlnet", None)


class WindowConds:
    """ComfyUI's processed conds (for the full canvas), served cropped to each batch of windows.

    After ``process_conds`` masks and spatial model conds (``c_concat``) have the canvas' size and areas are
    in canvas latent px; every one of them is cropped to the windows (wrap-aware), and ControlNet / T2I
    hints are set to each window's crop before each call (ComfyUI would otherwise reuse a cached hint).
    """

    def __init__(self, conds: dict, canvas_shape, n: int):
        self.conds, self.n = conds, n
        self.plain = not any(_position_dependent(c) for cs in conds.values() for c in cs)
        self.has_area = any("area" in c for cs in conds.values() for c in cs)
        self.hints = {}  # id(control) -> (control, original hint, hint at the canvas' pixel size)
        h, w = canvas_shape
        for cs in conds.values():
            for c in cs:
                for node in _control_chain(c.get("control")):
                    orig = getattr(node, "cond_hint_original", None)
                    if orig is None or id(node) in self.hints:
                        continue
                    s = int(getattr(node, "compression_ratio", 8))
                    if getattr(node, "vae", None) is not None:  # the hint is VAE-encoded: it is in pixels
                        s *= int(node.vae.spacial_compression_encode())
                    full = orig
                    if tuple(orig.shape[-2:]) != (h * s, w * s):
                        full = comfy.utils.common_upscale(
                            orig, w * s, h * s, getattr(node, "upscale_algorithm", "nearest-exact"), "center")
                    self.hints[id(node)] = (node, orig, full, s)

    def batches(self, windows):
        """Yield ``(rows of the window batch, conds)``; a single item when the windows can share one call."""
        rows = slice(0, len(windows) * self.n)
        if self.plain:
            yield rows, self.conds
        elif not self.has_area:
            self._set_hints(windows)
            yield rows, {k: [self._cond(c, windows) for c in cs] for k, cs in self.conds.items()}
        else:  # areas differ per window: one window at a time
            for j, w in enumerate(windows):
                self._set_hints([w])
                out = {}
                for k, cs in self.conds.items():
                    out[k] = []
                    for c in cs:
                        if "area" not in c:
                            out[k].append(self._cond(c, [w]))
                        else:  # an area that misses the window is skipped for it
                            out[k] += [self._cond(c, [w], a) for a in _area_in_window(c["area"], w)]
                yield slice(j * self.n, (j + 1) * self.n), out

    def region_calls(self, windows):
        """For bootstrapping steps: one call per positive cond (each its own prompt, its mask removed and
        returned as the fusion weight), sharing the cropped negatives. Yields ``(conds, mask, strength, region
        spec)``: the fusion weight is ``mask * strength``, as in ComfyUI's own fusion (mask_strength x strength)."""
        self._set_hints(windows)
        negatives = {k: [self._cond(c, windows) for c in cs] for k, cs in self.conds.items() if k != "positive"}
        for c in self.conds["positive"]:
            cc = self._cond(c, windows)
            mask = cc.pop("mask", None)
            strength = float(cc.get("strength", 1.0)) * (1.0 if mask is None else float(cc.pop("mask_strength", 1.0)))
            yield {"positive": [cc], **negatives}, None if mask is None else mask.unsqueeze(1), strength, \
                c.get(core_regions.REGION_KEY)

    def _cond(self, c: dict, windows, area=None) -> dict:
        c = c.copy()
        if area is not None:
            c["area"] = area
        if "mask" in c:
            c["mask"] = _crop_stack(c["mask"], windows, self.n)
        if "model_conds" in c:
            c["model_conds"] = {
                k: v._copy_with(_crop_stack(v.cond, windows, self.n)) if _is_spatial(v) else v
                for k, v in c["model_conds"].items()
            }
        return c

    def _set_hints(self, windows):
        for node, _, full, s in self.hints.values():
            node.cond_hint_original = _crop_stack(full, [_scaled(w, s) for w in windows], self.n)
            node.cond_hint = None  # drop ComfyUI's cached, resized hint

    def restore(self):
        for node, orig, _, _ in self.hints.values():
            node.cond_hint_original = orig
            node.cond_hint = None

    def control_modules(self) -> list:
        """The ControlNets' networks: synchronization differentiates through them, so their inference-mode
        weights need the same normal stand-ins as the UNet's (see ``trainable_weights``)."""
        found = {}
        for node, *_ in self.hints.values():
            net = getattr(node, "control_model", None)
            if isinstance(net, torch.nn.Module):
                found[id(net)] = net
        return list(found.values())


def clone_skips_for_gradients(model_options: dict) -> dict:
    """``model_options`` plus a UNet patch that makes ControlNet residuals differentiable: ComfyUI's UNet adds
    them to its stored skip connections in place (``hsp += ctrl``), after the next layer saved that tensor for
    backward, which autograd refuses. With gradients on, the next input block gets a clone instead (the sanctioned
    ``input_block_patch_after_skip`` hook); without, nothing changes."""
    def patch(h, transformer_options):
        return h.clone() if torch.is_grad_enabled() and h.requires_grad else h

    options = dict(model_options)
    to = dict(options.get("transformer_options", {}))
    patches = dict(to.get("patches", {}))
    patches["input_block_patch_after_skip"] = list(patches.get("input_block_patch_after_skip", [])) + [patch]
    to["patches"] = patches
    options["transformer_options"] = to
    return options


# --------------------------------------------------------------------------------------------------
# Gradients through inference-mode weights
# --------------------------------------------------------------------------------------------------

def _normal_alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor over ``t``'s storage (no copy): autograd can save it, which it refuses for inference
    tensors, and it stays the same memory, pinned or not."""
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


@contextlib.contextmanager
def trainable_weights(*modules: torch.nn.Module):
    """Within the block every inference-mode parameter and buffer of ``modules`` is replaced in its module by
    a normal tensor over the same storage, so autograd can save it for backward; the original objects are put
    back afterwards, so the models loaded in ComfyUI are left exactly as they were. Nothing is copied (copies
    cost 1.9 GiB for SD 2 in fp16), tied weights stay tied, and no restore needs memory. Tensor subclasses
    (quantized weights), whose storage may not be their values, get a normal clone instead."""
    swapped = []  # (store, name, original)
    stand_ins = {}  # id(original) -> its stand-in (the originals are alive in ``swapped``)
    try:
        with torch.inference_mode(False):
            for module in modules:
                for owner in module.modules():
                    for store in (owner._parameters, owner._buffers):
                        for name, t in list(store.items()):
                            if t is None or not t.is_inference():
                                continue
                            stand_in = stand_ins.get(id(t))
                            if stand_in is None:
                                plain = type(t) in (torch.Tensor, torch.nn.Parameter)
                                data = _normal_alias(t) if plain else t.detach().clone()
                                is_param = isinstance(t, torch.nn.Parameter)
                                stand_in = torch.nn.Parameter(data, requires_grad=False) if is_param else data
                                stand_ins[id(t)] = stand_in
                            store[name] = stand_in
                            swapped.append((store, name, t))
        yield
    finally:
        for store, name, original in reversed(swapped):
            store[name] = original


@contextlib.contextmanager
def gradient_section():
    """ComfyUI switches that must be set while computing gradients, where this ComfyUI has them."""
    mm = comfy.model_management
    saved = []
    if hasattr(mm, "in_training"):
        saved.append((mm, "in_training", mm.in_training))
        mm.in_training = True
    try:
        from comfy.cli_args import args as cli_args

        if hasattr(cli_args, "disable_comfy_compiler"):
            saved.append((cli_args, "disable_comfy_compiler", cli_args.disable_comfy_compiler))
            cli_args.disable_comfy_compiler = True
    except ImportError:  # pragma: no cover
        pass
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def gradient_ready_patcher(model):
    """A patcher whose weights are real module parameters (newer ComfyUI's dynamic VRAM makes them per call)."""
    clone = model.clone
    if "disable_dynamic" in inspect.signature(clone).parameters:
        return clone(disable_dynamic=True)
    return model


def check_compile_backend(backend: str, device) -> None:
    """A clear error, before any model work, when ``torch.compile`` with ``backend`` cannot run here."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"compile backend {backend!r} is not available in this torch; "
                         f"choose one of {sorted(torch._dynamo.list_backends())}")
    if backend == "inductor" and torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("compile needs Triton for the GPU (pip install triton; on Windows: triton-windows); "
                             "turn compile off to sample without it")


def compiled_patcher(model, backend: str):
    """``model`` itself when ``backend`` is empty and nothing compiled it; else a clone of ``model`` whose
    diffusion model runs through ``torch.compile`` (static shapes), set with ComfyUI's own
    ``set_torch_compile_wrapper`` (what its TorchCompileModel node does); a model that already carries a
    compile wrapper (e.g. from TorchCompileModel) keeps it. Either way the clone's diffusion model no longer
    sees the schedule's length (``_without_schedule``), so one compile serves every step count."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_api.torch_helpers.torch_compile import TORCH_COMPILE_KWARGS

    compiled_already = TORCH_COMPILE_KWARGS in model.model_options
    if not (backend or compiled_already):
        return model
    model = model.clone()
    if not compiled_already:
        set_torch_compile_wrapper(model, backend=backend, dynamic=False)
    diffusion_model = model.get_model_object("diffusion_model")
    if not type(diffusion_model).__module__.startswith(_READS_SAMPLE_SIGMAS):
        from comfy.patcher_extension import WrappersMP

        model.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, SCHEDULE_FREE_KEY)
        model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, SCHEDULE_FREE_KEY, _without_schedule)
    return model


#: The key of our APPLY_MODEL wrapper that keeps the whole schedule out of the compiled diffusion model.
SCHEDULE_FREE_KEY = "syncdiffusion.schedule_free"
#: Diffusion models that read ``transformer_options["sample_sigmas"]`` themselves keep it.
_READS_SAMPLE_SIGMAS = ("comfy.ldm.hunyuan_video.",)


def _without_schedule(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                      **kwargs):
    """ComfyUI hands the diffusion model the whole sigma schedule (``transformer_options["sample_sigmas"]``,
    steps + 1 long). Dynamo guards on its length, so a compiled UNet recompiled for every new step count (a
    minute or more each with inductor, and after 8 recompiles dynamo silently runs it eagerly). UNets do not
    read it; hooks and context windows read it before ``apply_model``, where it stays."""
    options = {k: v for k, v in (transformer_options or {}).items() if k != "sample_sigmas"}
    return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


#: What decodes x0 for the synchronization loss: the full VAE (as the paper), the full VAE with gradient
#: checkpointing of its blocks (less memory, one more decoder forward), the full VAE on the latent downscaled
#: 2x (a 4x smaller image for the loss), or TAESD from models/vae_approx (much cheaper, approximate).
LOSS_DECODERS = ("vae", "vae_checkpointed", "vae_half", "taesd")


def decoder_for_gradients(vae, model, mode: str = "vae", compile_backend: str | None = None):
    """``x0`` (model latent space) → image in [-1, 1] through the VAE decoder, differentiable (see LOSS_DECODERS).

    With ``compile_backend`` (e.g. "inductor") the decoder's gradient pass runs through ``torch.compile``
    (static shapes; compiled once per process and shape); the anchor's decode without gradient stays eager."""
    if mode == "taesd":
        return taesd_decoder_for_gradients(model)
    if mode not in LOSS_DECODERS:
        raise ValueError(f"loss_decoder must be one of {LOSS_DECODERS}, got {mode!r}")
    first_stage = vae.first_stage_model
    inner = model.model
    checkpointed = mode == "vae_checkpointed" and _walkable(first_stage)
    compiled = _compiled_kl_decode(compile_backend) if compile_backend else None

    def decode(x0: torch.Tensor) -> torch.Tensor:
        if mode == "vae_half":
            x0 = torch.nn.functional.interpolate(x0, scale_factor=0.5, mode="bilinear", antialias=True)
        z = inner.process_latent_out(x0).to(device=vae.device, dtype=vae.vae_dtype)
        grad = torch.is_grad_enabled()
        with loss_attention_backends():
            if compiled is not None and grad:
                return compiled(first_stage, z, checkpointed).float().clamp(-1.0, 1.0)
            # eager checkpointing recomputes the blocks during backward, outside this context: the recompute must
            # pick the same attention kernels as the forward (else autograd finds other saved tensors)
            recompute = (lambda: (loss_attention_backends(), loss_attention_backends())) if checkpointed else None
            return _kl_decode(first_stage, z, checkpointed and grad, recompute).float().clamp(-1.0, 1.0)

    return decode


def _kl_decode(first_stage, z: torch.Tensor, checkpointed: bool, context_fn=None) -> torch.Tensor:
    return _checkpointed_decode(first_stage, z, context_fn) if checkpointed else first_stage.decode(z)


_COMPILED_DECODERS: dict = {}


def _compiled_kl_decode(backend: str):
    """``_kl_decode`` through ``torch.compile`` with ``backend``, one compiled function per backend (dynamo
    caches its graphs per code object and guards, so later runs and new weight copies reuse them)."""
    fn = _COMPILED_DECODERS.get(backend)
    if fn is None:
        fn = _COMPILED_DECODERS[backend] = torch.compile(_kl_decode, backend=backend, dynamic=False)
    return fn


#: Whether the loss decoder's attention avoids PyTorch's memory-efficient SDPA kernel. The SD VAE's mid-block
#: attention is one head of 512 channels over 4096 positions (64x64 latent): too wide for the flash kernels, so
#: SDPA falls back to the memory-efficient kernel, whose backward took 9.5 ms per call of 2 windows on an H100
#: (bench/probe.py, 2026-11-25); the math path's 4096x4096 score matrix is 32 MiB a window.
LOSS_ATTENTION_AVOIDS_EFFICIENT = True


def loss_attention_backends():
    """A context selecting SDPA backends for the loss decoder (see ``LOSS_ATTENTION_AVOIDS_EFFICIENT``); a
    no-op on a torch without ``torch.nn.attention`` or when the flag is off."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    if not LOSS_ATTENTION_AVOIDS_EFFICIENT:
        return contextlib.nullcontext()
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends.insert(1, SDPBackend.CUDNN_ATTENTION)
    return sdpa_kernel(backends)


def _walkable(first_stage) -> bool:
    """Whether the decoder has the SD/KL layout that ``_checkpointed_decode`` walks (else: plain decode)."""
    dec = getattr(first_stage, "decoder", None)
    return (type(dec).__name__ == "Decoder" and hasattr(first_stage, "post_quant_conv")
            and getattr(first_stage, "bn", None) is None and getattr(first_stage, "max_batch_size", None) is None
            and not getattr(dec, "give_pre_end", False) and not getattr(dec, "tanh_out", False)
            and all(hasattr(dec, a) for a in ("conv_in", "mid", "up", "norm_out", "conv_out", "num_resolutions")))


def _checkpointed_decode(first_stage, z: torch.Tensor, context_fn=None) -> torch.Tensor:
    """The KL decoder's forward, block by block, each block under ``torch.utils.checkpoint``: backward keeps
    only block inputs and recomputes the rest (same gradients, about 2 GiB less per 512 px window). The
    modules are only called, never modified. ``context_fn``: checkpoint's (forward, recompute) contexts."""
    from torch.utils.checkpoint import checkpoint

    dec = first_stage.decoder
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    run = lambda block, *a: checkpoint(block, *a, use_reentrant=False, **extra)  # noqa: E731
    h = dec.conv_in(first_stage.post_quant_conv(z))
    h = run(dec.mid.block_1, h, None)
    h = run(dec.mid.attn_1, h)
    h = run(dec.mid.block_2, h, None)
    for level in reversed(range(dec.num_resolutions)):
        up = dec.up[level]
        for i, block in enumerate(up.block):
            h = run(block, h, None)
            if len(up.attn) > 0:
                h = run(up.attn[i], h)
        if level != 0:
            h = run(up.upsample, h)
    h = dec.norm_out(h)
    return dec.conv_out(torch.nn.functional.silu(h))


_TAESD_CACHE: dict = {}


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
    import os

    import comfy.taesd.taesd

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


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PanoramaJob:
    """Everything the windowed sampler needs besides ComfyUI's objects; validated before any model work."""

    seed: int
    steps: int
    cfg: float
    window_px: int  # 0 = native
    stride_px: int
    sync: SyncSettings
    anchor: Anchor
    wrap: bool = False
    window_batch: int = 8
    sync_batch: int = 0  # windows per gradient batch; 0 = min(window_batch, SYNC_BATCH_AUTO)
    loss_decoder: str = "vae_checkpointed"  # one of LOSS_DECODERS; the same gradients as "vae", less memory
    compile: str = ""  # "" = eager; else a torch.compile backend ("inductor") for the UNet and the loss decoder

    def gradient_batch(self) -> int:
        return self.sync_batch if self.sync_batch > 0 else min(self.window_batch, SYNC_BATCH_AUTO)


#: Windows per gradient batch when ``sync_batch`` is 0. Measured on an H100 (SD2-base size, 512 px windows,
#: docs/PERFORMANCE.md): each window in the gradient batch needs about 4.9 GiB with "vae" and 2.8 GiB with
#: "vae_checkpointed"; 2 windows with checkpointing keep the peak under 10 GiB and are faster than 1 without.
SYNC_BATCH_AUTO = 2


def _oom_errors() -> tuple:
    """The exception types that mean "out of device memory" (never a catch-all)."""
    oom = getattr(comfy.model_management, "OOM_EXCEPTION", None)
    if isinstance(oom, type) and oom not in (Exception, BaseException):
        return (oom, torch.cuda.OutOfMemoryError) if oom is not torch.cuda.OutOfMemoryError else (oom,)
    return (torch.cuda.OutOfMemoryError,)


def plan_for(model, latent: torch.Tensor, window_px: int, stride_px: int, wrap: bool) -> WindowPlan:
    scale = latent_scale(model)
    _multiple("stride", stride_px, scale)
    if window_px:
        _multiple("window_size", window_px, scale)
    window = window_px // scale if window_px else native_window(model)
    return plan_windows(latent.shape[-2], latent.shape[-1], window, stride_px // scale, wrap=wrap)


def _multiple(name: str, value: int, scale: int) -> None:
    if value <= 0 or value % scale:
        raise ValueError(f"{name} must be a positive multiple of {scale} pixels, got {value}")


class WindowedSampler(comfy.samplers.Sampler):
    """A ComfyUI sampler object that runs the core's windowed loop; ``CFGGuider.sample`` drives it."""

    def __init__(self, job: PanoramaJob, plan: WindowPlan, vae=None, loss=None, bootstrap=None):
        self.job, self.plan, self.vae, self.loss = job, plan, vae, loss
        self.bootstrap = bootstrap  # Bootstrap backgrounds for layout regions, or None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        guider = model_wrap
        ms = guider.inner_model.model_sampling
        model_options, seed = extra_args.get("model_options", {}), extra_args.get("seed")
        window_conds = WindowConds(guider.conds, noise.shape[-2:], noise.shape[0])
        full_conds = guider.conds

        def denoise(x, sigma, windows, step):
            if self.bootstrap is not None and self.bootstrap.active(step, self.job.steps):
                return self.bootstrap.denoise(guider, window_conds, x, sigma, windows, step, self.job.steps,
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
        job = self.job
        grad_modules = []
        if job.sync.active:
            uses_vae = job.loss_decoder != "taesd"
            comfy.model_management.load_models_gpu([guider.model_patcher] + ([self.vae.patcher] if uses_vae else []))
            grad_modules = [guider.inner_model] + ([self.vae.first_stage_model] if uses_vae else [])
            grad_modules += window_conds.control_modules()
            if window_conds.hints:
                model_options = clone_skips_for_gradients(model_options)
        try:
            with trainable_weights(*grad_modules), gradient_section():
                x = core_sampler.sample(
                    denoise, x.clone(), sigmas, self.plan,
                    sync=job.sync,
                    decode=(decoder_for_gradients(self.vae, guider.model_patcher, job.loss_decoder,
                                                  compile_backend=job.compile or None)
                            if job.sync.active else None),
                    loss=self.loss,
                    anchor=job.anchor,
                    input_scale=lambda s: float(ms.calculate_input(s.reshape(1), torch.ones(1, device=s.device))[0]),
                    window_batch=job.window_batch,
                    sync_batch=job.gradient_batch(),
                    sync_batch_setting="sync_batch" if job.sync_batch > 0 else "window_batch",
                    oom_errors=_oom_errors(),
                    release_memory=comfy.model_management.soft_empty_cache,
                    oom_advice=("use loss_decoder 'vae_checkpointed' or 'taesd'" if job.sync.active else ""),
                    callback=report,
                    interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                )
        finally:
            guider.conds = full_conds
            window_conds.restore()
        if _is_vp_family(ms) and float(sigmas[-1]) > 0:
            x = ms.calculate_input(sigmas[-1], x)  # the reference's final x_VP at timestep 0
        return x


def _native_size(conditioning: list, height: int, width: int) -> list:
    """Size conditioning (SDXL's ``width``/``height``) describes one window, not the whole canvas, unless the
    user set it (e.g. with CLIPTextEncodeSDXL)."""
    return [[emb, {"width": width, "height": height, **d}] for emb, d in conditioning]


# --------------------------------------------------------------------------------------------------
# Layout-guided generation
# --------------------------------------------------------------------------------------------------

def prepare_layout(positive: list, latent: torch.Tensor, negative: list = ()) -> tuple[list, list]:
    """Resolve LayoutMaskRegion conds before sampling: their masks at latent size (binarized unless soft),
    empty ones dropped, and the background prompt(s) given the mask ``clip(1 - Σ m_fg, 0)``. Bootstrapping
    calls each prompt on whole windows, so it refuses area conditioning (positive or negative: ComfyUI copies
    an area to the other side).

    Returns the new positive conditioning and the region specs of the kept foreground regions."""
    regions = [i for i, (_, d) in enumerate(positive) if core_regions.REGION_KEY in d]
    if not regions:
        return positive, []
    n, (h, w) = latent.shape[0], latent.shape[-2:]
    masks = []
    for k, i in enumerate(regions):
        spec = positive[i][1][core_regions.REGION_KEY]
        masks.append(core_regions.mask_to_canvas(positive[i][1]["mask"], h, w, spec.soft, f"region {k + 1}'s mask"))
    backgrounds = [i for i, (_, d) in enumerate(positive) if i not in regions and "mask" not in d and "area" not in d]
    keep, bg_mask = core_regions.layout_masks(masks, n, has_background=bool(backgrounds))
    if any(positive[regions[k]][1][core_regions.REGION_KEY].bootstrap_fraction > 0 for k in keep) and any(
            "area" in d for _, d in list(positive) + list(negative or [])):
        raise ValueError("area conditioning (ConditioningSetArea, in a region, the positive or the negative "
                         "prompt) cannot be combined with bootstrapping layout regions; set the regions' "
                         "bootstrap_fraction to 0 or use masks (ConditioningSetMask)")
    out, specs = [], []
    for i, (emb, d) in enumerate(positive):
        if i in regions:
            k = regions.index(i)
            if k not in keep:
                continue
            d = {**d, "mask": masks[k], "set_area_to_bounds": False, "mask_strength": 1.0}
            specs.append(d[core_regions.REGION_KEY])
        elif i in backgrounds:
            d = {**d, "mask": bg_mask, "set_area_to_bounds": False, "mask_strength": 1.0}
        out.append([emb, d])
    return out, specs


class Bootstrap:
    """MultiDiffusion's bootstrapping: during a foreground region's first steps, its input outside its mask
    is a noised latent of a random flat-colour image. The colour latents are VAE-encoded once per run."""

    def __init__(self, model, vae, specs, plan: WindowPlan, n: int, seed: int, count: int = 8):
        g = torch.Generator().manual_seed(seed + 1)
        s = latent_scale(model)
        images = core_regions.flat_colour_images(count, plan.window_height * s, plan.window_width * s, g)
        self.latents = model.model.process_latent_in(vae.encode(images)).to(torch.float32)
        self.noise = torch.randn((n, self.latents.shape[1], plan.canvas_height, plan.canvas_width), generator=g)
        self.longest = max(spec.bootstrap_fraction for spec in specs)
        self.generator = torch.Generator().manual_seed(seed + 2)
        self.n = n

    def active(self, step: int, steps: int) -> bool:
        return step < int(round(self.longest * steps))

    def denoise(self, guider, window_conds, x, sigma, windows, step, steps, model_options, seed):
        """Per-region predictions (bootstrapped inputs for foreground regions still bootstrapping), fused with
        the regions' masks as weights."""
        pick = torch.randint(len(self.latents), (x.shape[0],), generator=self.generator)
        sig = sigma.reshape(-1, 1, 1, 1)
        background = self.latents[pick].to(x) + sig * _crop_stack(self.noise, windows, self.n).to(x)
        total = torch.zeros_like(x)
        weight = torch.zeros_like(x[:, :1])
        for conds, mask, strength, spec in window_conds.region_calls(windows):
            inp = x
            if mask is not None and spec is not None and step < spec.bootstrap_steps(steps):
                inp = core_regions.bootstrap_input(x, mask, background)
            guider.conds = conds
            x0 = guider(inp, sigma, model_options=model_options, seed=seed)
            m = (torch.ones_like(weight) if mask is None else mask.to(x)) * strength
            total = total + m * x0
            weight = weight + m
        return total / weight.clamp_min(1e-8)


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (B, C, h, w) to cover ``height`` x ``width`` keeping its aspect, then center-crop to it."""
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    image = torch.nn.functional.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return image[..., top:top + height, left:left + width]


def sample_panorama(model, positive, negative, latent: dict, job: PanoramaJob, vae=None, loss=None) -> dict:
    """Run SyncDiffusion (MultiDiffusion when sync is off) on a LATENT; returns a new LATENT dict.

    Every check on the inputs happens here, before any model is loaded."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    plan = plan_for(model, latent_image, job.window_px, job.stride_px, job.wrap)
    s = latent_scale(model)
    job.anchor.window_index(plan)  # validates an index anchor
    positive, region_specs = prepare_layout(positive, latent_image, negative)
    bootstrapping = any(spec.bootstrap_fraction > 0 for spec in region_specs)
    if bootstrapping and vae is None:
        raise ValueError("vae is required to bootstrap layout regions (it encodes the flat-colour backgrounds)")
    if job.compile:
        check_compile_backend(job.compile, model.load_device)
    if job.window_batch < 1 or job.sync_batch < 0:
        raise ValueError(f"window_batch must be >= 1 and sync_batch >= 0, got {job.window_batch}, {job.sync_batch}")
    if job.sync.active:
        if job.loss_decoder not in LOSS_DECODERS:
            raise ValueError(f"loss_decoder must be one of {LOSS_DECODERS}, got {job.loss_decoder!r}")
        if job.loss_decoder == "taesd":
            taesd_path(model)  # a missing file fails here, before any model work
        elif vae is None:
            raise ValueError("vae is required when sync_weight > 0 and sync_steps > 0")
        if job.anchor.mode == "image":
            fitted = fit_image(job.anchor.image, plan.window_height * s, plan.window_width * s)
            job = dataclasses.replace(job, anchor=Anchor(mode="image", image=fitted.clamp(-1, 1)))
        if loss is None:
            loss = get_lpips(model.load_device)
        model = gradient_ready_patcher(model)
    model = compiled_patcher(model, job.compile)
    positive, negative = (_native_size(c, plan.window_height * s, plan.window_width * s) for c in (positive, negative))
    noise = comfy.sample.prepare_noise(latent_image, job.seed, latent.get("batch_index"))
    sigmas = reference_sigmas(model, job.steps)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(job.cfg)
    callback = latent_preview.prepare_callback(model, job.steps)
    bootstrap = Bootstrap(model, vae, region_specs, plan, latent_image.shape[0], job.seed) if bootstrapping else None
    sampler = WindowedSampler(job, plan, vae=vae, loss=loss, bootstrap=bootstrap)
    samples = guider.sample(noise, latent_image, sampler, sigmas, callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=job.seed)
    out = latent.copy()
    out.pop("noise_mask", None)
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out


# --- perceptual (owned by metrics) ---
# LPIPS / VGG trunk loading for the synchronization loss and the coherence metrics. The trunk files live in a
# ``lpips`` folder of ComfyUI's models directory (``models/lpips``), registered through folder_paths so that
# extra_model_paths.yaml can add more folders under the name ``lpips``.

LPIPS_FOLDER_NAME = "lpips"


def _register_lpips_folder() -> None:
    import os

    import folder_paths

    default = os.path.join(folder_paths.models_dir, LPIPS_FOLDER_NAME)
    if LPIPS_FOLDER_NAME not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[LPIPS_FOLDER_NAME] = ([default], {".pth", ".safetensors"})
    else:  # already declared (extra_model_paths.yaml): keep its folders, add the default one
        folder_paths.add_model_folder_path(LPIPS_FOLDER_NAME, default)


def lpips_search_paths() -> list[str]:
    """The folders searched for VGG trunk files, in order (``models/lpips`` and any extra ``lpips`` paths)."""
    import folder_paths

    _register_lpips_folder()
    return folder_paths.get_folder_paths(LPIPS_FOLDER_NAME)


def perceptual_device():
    """Where the perceptual networks run: ComfyUI's compute device."""
    import comfy.model_management as mm

    return mm.get_torch_device()


def get_lpips(device=None):
    """LPIPS-VGG ``loss(images, targets) -> (B,)`` on ``device`` (default: ComfyUI's compute device), images in
    [-1, 1] of any float dtype, computed in float32 and differentiable w.r.t. ``images``. Loaded once per
    device: the trunk from ``models/lpips``, torch's hub cache, or a download, else a clear error
    (``perceptual.TrunkWeightsNotFound``) that names the file and the folders."""
    from . import perceptual

    return perceptual.load_lpips(lpips_search_paths(), perceptual_device() if device is None else device)


def get_style_features(device=None):
    """VGG19 style features for Intra-Style-L, found and cached like :func:`get_lpips`'s trunk."""
    from . import perceptual

    return perceptual.load_style_features(lpips_search_paths(), perceptual_device() if device is None else device)


_register_lpips_folder()


# --- panorama decode (owned by decode) ---
# A seam-free VAE decode of 360° panoramas: the latent is padded circularly in width (or decoded in tiles that
# take their context around the loop) through ComfyUI's public ``VAE.decode``; see syncdiff_core/panorama_decode.py.

def vae_spatial_scale(vae) -> int:
    """Pixels per latent pixel of the VAE's decoder (8 for SD1.x/2.x/SDXL, 16 or 32 for some newer VAEs)."""
    if hasattr(vae, "spacial_compression_decode"):
        return int(vae.spacial_compression_decode())
    ratio = getattr(vae, "upscale_ratio", 8)
    return int(ratio[-1] if isinstance(ratio, (tuple, list)) else ratio)


def decode_panorama_image(vae, samples: torch.Tensor, *, wrap: bool = True, padding: int = 16,
                          tile_width_px: int = 0, tile_overlap_px: int = 0) -> torch.Tensor:
    """Decode a LATENT's ``samples`` (B, C, H, W) to an IMAGE (B, H·s, W·s, 3) in [0, 1], s = the VAE's scale.

    ``wrap``: circular context in width so the left and right edges meet (360° panoramas). ``padding``: latent px
    of that context on each side (of the canvas, or of each tile). ``tile_width_px`` (0 = whole canvas at once) and
    ``tile_overlap_px`` are in pixels; they are rounded to whole latent px (the width down, the overlap up).
    """
    from .panorama_decode import decode_panorama, plan_tiles

    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    if getattr(samples, "is_nested", False):
        raise ValueError("PanoramaDecode does not support nested latents (several images in one latent)")
    if samples.ndim not in (4, 5):
        raise ValueError(f"PanoramaDecode needs an image latent (batch, channels, height, width), got shape "
                         f"{tuple(samples.shape)}")
    scale = vae_spatial_scale(vae)
    tile = tile_width_px // scale if tile_width_px > 0 else 0
    overlap = -(-tile_overlap_px // scale) if tile else 0
    if tile_width_px > 0 and tile == 0:
        raise ValueError(f"tile_width ({tile_width_px} px) is smaller than one latent pixel of this VAE "
                         f"({scale} px); use 0 for no tiling or at least {scale * 2} px")
    if tile and overlap >= tile:
        raise ValueError(f"tile_overlap ({tile_overlap_px} px = {overlap} latent px) must be smaller than tile_width "
                         f"({tile_width_px} px = {tile} latent px at this VAE's scale of {scale})")
    total = len(plan_tiles(samples.shape[-1], tile, overlap, padding, wrap))
    pbar = comfy.utils.ProgressBar(total)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z)  # (B, H, W, C) or (B, T, H, W, C) in [0, 1] on ComfyUI's intermediate device

    with torch.no_grad():
        image = decode_panorama(
            decode, samples, scale, wrap=wrap, padding=padding, tile_width=tile, tile_overlap=overlap,
            width_dim=-2, progress=lambda done, n: pbar.update_absolute(done, n),
            interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
        )
    if image.ndim == 5:  # video VAEs: frames become images, as ComfyUI's VAEDecode does
        image = image.reshape(-1, *image.shape[-3:])
    return image.clamp(0.0, 1.0)
