#!/usr/bin/env python3
"""GPU speed and memory benchmark of the pack against a one-window-at-a-time baseline (issue 6).

Builds random-weight models of SD 2.0-base's size through ComfyUI's own classes (UNet 865M parameters, fp16;
SD's KL VAE, fp16; LPIPS-VGG with a random VGG16 trunk, fp32; conditioning tensors (1, 77, 1024)); timing does
not depend on weight values. Then times a 512x3072 panorama (stride 128 px = 21 windows, 50 DDIM steps, CFG 7.5):

  (a) ``baseline``: DESIGN §1 one window at a time, in the style of the public reference code, calling the same
      ComfyUI UNet / VAE modules directly (per window: UNet with CFG as a batch of 2, DDIM step; on sync steps
      per window the gradient through UNet + VAE decoder + LPIPS, the anchor's gradient computed too);
  (b) the pack's ``sample_panorama`` with w = 0 (MultiDiffusion);
  (c) the pack with 10 sync steps (w = 20).

Plus: a per-step split UNet / VAE / LPIPS / other (synchronized timers in separate profiling runs), lever
variants, time and peak memory vs width and vs window_batch (short runs; per-step medians), the UNet's FLOPs
(``FlopCounterMode``) and the card's measured matmul throughput (the floor).

``--tiny`` runs every section on the CPU with tiny models in about a minute (a check of the script, not a
measurement). Results: a JSON file and a table at the end of the output. Run on the device through
``bench/run_on_device.sh``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY = Path(os.environ.get("COMFYUI_PATH", ROOT / ".comfyui" / "ComfyUI"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models, small canvas: checks the script")
    p.add_argument("--plan", default="explore", choices=["explore", "final", "compile"],
                   help="explore: every section incl. lever variants and sweeps; final: headline numbers; "
                        "compile: the headline with compile on and off, and the baseline, in one run")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="folder for results.json")
    p.add_argument("--budget-s", type=float, default=500.0, help="skip sections that would end after this")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of (b) and (c) after a warm-up")
    p.add_argument("--baseline-repeats", type=int, default=1, help="timed 50-step runs of the baseline per mode")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sync-steps", type=int, default=10)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--stride", type=int, default=128, help="pixels")
    p.add_argument("--window-px", type=int, default=0, help="0 = the model's native window")
    p.add_argument("--window-batch", type=int, default=8)
    p.add_argument("--sync-batch", type=int, default=0, help="0 = the pack's default")
    p.add_argument("--loss-decoder", default="", help="empty: the pack's default")
    p.add_argument("--widths", default="2048,3072,6144,12288")
    p.add_argument("--window-batches", default="1,2,4,8,16", help="empty: skip the window_batch sweep")
    p.add_argument("--sweep-steps", type=int, default=3, help="steps of the short runs (median of all but the first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="bench/probe.py: skip the torch.compile variants")
    p.add_argument("--lean", action="store_true",
                   help="plan compile: eager headline and baseline first, then compile warm-up as full-length runs "
                        "(what a user's first run costs), the compiled headline, then compiled sync_batch 3 and 4 "
                        "if the budget allows")
    a = p.parse_args(argv)
    if a.tiny:
        a.height, a.width, a.window_px, a.stride = 32, 128, 32, 16
        a.widths, a.window_batches = "96,160", "1,4"
        a.steps, a.sync_steps, a.repeats, a.sweep_steps = 3, 2, 1, 2
        a.budget_s = 1e9
    return a


ARGS = parse_args()
if ARGS.tiny:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(COMFY))
sys.path.insert(1, str(ROOT))

import torch  # noqa: E402

if ARGS.tiny:
    from comfy.cli_args import args as comfy_args  # noqa: E402

    comfy_args.cpu = True

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from syncdiff_core import comfy_bridge as bridge  # noqa: E402
from syncdiff_core import perceptual  # noqa: E402
from syncdiff_core.sync import Anchor, SyncSettings  # noqa: E402
from syncdiff_core.windows import plan_windows  # noqa: E402

log = logging.getLogger("bench")
DEVICE = mm.get_torch_device()
CUDA = DEVICE.type == "cuda"
DTYPE = torch.float16 if CUDA else torch.float32
T_START = time.monotonic()
RESULTS: dict = {"sections": {}, "errors": []}


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def sync():
    if CUDA:
        torch.cuda.synchronize()


def now():
    return time.perf_counter()


def elapsed():
    return time.monotonic() - T_START


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool)


def gib(b):
    return b / 2**30


def fresh_memory(empty=True):
    gc.collect()
    if CUDA:
        if empty:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory():
    if not CUDA:
        return {"peak_alloc_gib": None, "peak_reserved_gib": None}
    return {"peak_alloc_gib": round(gib(torch.cuda.max_memory_allocated()), 3),
            "peak_reserved_gib": round(gib(torch.cuda.max_memory_reserved()), 3)}


def save():
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))


class Budget:
    def allow(self, name, estimate_s):
        left = ARGS.budget_s - elapsed()
        if estimate_s > left:
            msg = f"skipped {name}: estimated {estimate_s:.0f} s, {left:.0f} s left"
            print(msg, flush=True)
            RESULTS.setdefault("skipped", []).append(msg)
            return False
        return True


BUDGET = Budget()


@contextlib.contextmanager
def section(name):
    t0 = elapsed()
    print(f"\n== {name} (t={t0:.0f} s)", flush=True)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a failing section must not lose the others
        if CUDA and isinstance(e, torch.cuda.OutOfMemoryError):
            fresh_memory()
        msg = f"{name}: {type(e).__name__}: {e}"
        print("ERROR", msg, flush=True)
        traceback.print_exc()
        RESULTS["errors"].append(msg[:2000])
    finally:
        RESULTS["sections"][name] = round(elapsed() - t0, 1)
        save()


# ----------------------------------------------------------------------------------------------------------------
# Models

SD2_BASE_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False, "context_dim": 1024,
    "use_linear_in_transformer": True, "adm_in_channels": None, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
TINY_UNET = {**SD2_BASE_UNET, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
             "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
TINY_VAE = {**SD_VAE, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}


@torch.no_grad()
def init_weights(module, seed, std=1.0):
    """Small random values: matrices and kernels N(0, std/sqrt(fan_in)), norm scales 1, biases 0."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            t = torch.randn(p.shape, generator=g) * (std / math.sqrt(p[0].numel()))
            p.copy_(t.to(p.dtype))
        elif p.ndim == 1 and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def build_models():
    t0 = now()
    mc = comfy.supported_models.SD20(TINY_UNET if ARGS.tiny else SD2_BASE_UNET)
    if ARGS.tiny:
        mc.unet_config["num_head_channels"] = 32
    mc.set_inference_dtype(DTYPE, None)
    base = mc.get_model({})
    init_weights(base.diffusion_model, ARGS.seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=DEVICE, offload_device=mm.unet_offload_device())
    from comfy.ldm.models.autoencoder import AutoencoderKL

    params = {"embed_dim": 4, "ddconfig": TINY_VAE if ARGS.tiny else SD_VAE}
    net = AutoencoderKL(**params)
    init_weights(net, ARGS.seed + 1)
    vae = comfy.sd.VAE(sd=net.state_dict(), config={"params": params}, dtype=DTYPE)
    del net
    g = torch.Generator().manual_seed(ARGS.seed + 2)
    cond = torch.randn(1, 77, 1024, generator=g)
    uncond = torch.randn(1, 77, 1024, generator=g)
    tmp = Path(tempfile.mkdtemp(prefix="syncdiff-bench-"))
    from safetensors.torch import save_file

    torch.manual_seed(ARGS.seed + 3)
    (tmp / "lpips").mkdir()
    feats = perceptual.vgg_features("vgg16")  # torchvision's VGG16 init (Kaiming normal), features only
    save_file({f"features.{k}": v.contiguous() for k, v in feats.state_dict().items()},
              str(tmp / "lpips" / "vgg16.safetensors"))
    folder_paths.add_model_folder_path("lpips", str(tmp / "lpips"))
    import comfy.taesd.taesd as taesd

    (tmp / "vae_approx").mkdir()
    dec = taesd.TAESD().taesd_decoder
    init_weights(dec, ARGS.seed + 4)
    save_file({k: v.contiguous() for k, v in dec.state_dict().items()}, str(tmp / "vae_approx" / "taesd_decoder.safetensors"))
    folder_paths.add_model_folder_path("vae_approx", str(tmp / "vae_approx"))
    with torch.inference_mode():  # as ComfyUI's executor does: the weights on the GPU are inference tensors
        mm.load_models_gpu([model, vae.patcher])
    loss = bridge.get_lpips(DEVICE)
    n_unet = sum(p.numel() for p in base.diffusion_model.parameters())
    n_vae = sum(p.numel() for p in vae.first_stage_model.parameters())
    RESULTS["models"] = {"unet_params": n_unet, "vae_params": n_vae, "dtype": str(DTYPE),
                         "vae_dtype": str(vae.vae_dtype), "build_s": round(now() - t0, 1),
                         "resident_gib": round(gib(torch.cuda.memory_allocated()), 3) if CUDA else None}
    print(f"UNet {n_unet / 1e6:.1f}M params, VAE {n_vae / 1e6:.1f}M, built in {now() - t0:.1f} s", flush=True)
    return model, vae, loss, cond, uncond


# ----------------------------------------------------------------------------------------------------------------
# Profiling: synchronized timers around the UNet, the VAE decoder and LPIPS, forward and backward


class Profiler:
    """Wraps callables with synchronized timers. Backward time is split by hooks on each component's input:
    the gradient reaches LPIPS' input, then the decoder's input, then the UNet's input, in that order."""

    def __init__(self):
        self.t = defaultdict(float)
        self.enabled = False
        self.mark = None

    def _hook_input(self, name, tensor):
        def hook(grad):
            if self.mark is not None:
                sync()
                t = now()
                self.t[name + "_bwd"] += t - self.mark
                self.mark = t
        tensor.register_hook(hook)

    def wrap(self, fn, name):
        def wrapper(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            first = next((a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)), None)
            if first is not None and first.requires_grad and torch.is_grad_enabled():
                self._hook_input(name, first)
            sync()
            t0 = now()
            out = fn(*args, **kwargs)
            sync()
            self.t[name + "_fwd"] += now() - t0
            return out
        return wrapper

    def wrap_grad(self):
        orig = torch.autograd.grad

        def grad(*args, **kwargs):
            if not self.enabled:
                return orig(*args, **kwargs)
            sync()
            self.mark = t0 = now()
            out = orig(*args, **kwargs)
            sync()
            t1 = now()
            self.t["other_bwd"] += t1 - self.mark
            self.t["grad_total"] += t1 - t0
            self.mark = None
            return out
        torch.autograd.grad = grad

    def split(self, wall):
        """Seconds per component: unet, vae, lpips (forward + backward), other = wall - the rest."""
        t = self.t
        out = {k: t[k + "_fwd"] + t[k + "_bwd"] for k in ("unet", "vae", "lpips")}
        out["other"] = wall - sum(out.values())
        return out


PROF = Profiler()


def install_profiler(model, vae, loss):
    unet = model.model.diffusion_model
    unet.forward = PROF.wrap(unet.forward, "unet")
    first = vae.first_stage_model
    first.decode = PROF.wrap(first.decode, "vae")
    loss.features = PROF.wrap(loss.features, "lpips")
    loss.distance = PROF.wrap(loss.distance, "lpips")
    PROF.wrap_grad()


@contextlib.contextmanager
def profiling():
    PROF.t.clear()
    PROF.enabled = True
    try:
        yield PROF
    finally:
        PROF.enabled = False


# ----------------------------------------------------------------------------------------------------------------
# (b), (c): the pack


class StepClock:
    """Per-step times through ComfyUI's progress hook (the sampler reports once per step): CUDA events
    recorded on the stream, so timing adds no host synchronization (on the CPU: host time)."""

    active = False

    def __init__(self):
        self.marks = []
        self.t0 = None
        comfy.utils.set_progress_bar_global_hook(self)

    @staticmethod
    def mark():
        if CUDA:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return now()

    def __call__(self, value, total, preview=None, **kw):
        if self.active:
            self.marks.append(self.mark())

    def start(self):
        self.marks = []
        self.t0 = self.mark()
        self.active = True

    def stop(self):
        self.active = False
        return intervals(self.t0, self.marks)


def intervals(t0, marks):
    """Seconds between consecutive marks (events: after a synchronize)."""
    sync()
    pairs = zip([t0] + marks[:-1], marks)
    return [a.elapsed_time(b) / 1e3 for a, b in pairs] if CUDA else [b - a for a, b in pairs]


CLOCK = StepClock()
NOTES: list = []


class NoteHandler(logging.Handler):
    def emit(self, record):
        NOTES.append(record.getMessage())


logging.getLogger("syncdiffusion").addHandler(NoteHandler())


def pack_run(models, *, width=None, steps=None, w=0.0, sync_steps=None, window_batch=None, sync_batch=None,
             loss_decoder=None, empty=True, label="", loss=None, compile=""):
    model, vae, default_loss, cond, uncond = models
    loss = loss or default_loss
    width = width or ARGS.width
    steps = steps or ARGS.steps
    dec = loss_decoder or ARGS.loss_decoder
    settings = SyncSettings(weight=w, decay=0.95, steps=ARGS.sync_steps if sync_steps is None else sync_steps)
    job = bridge.PanoramaJob(seed=ARGS.seed, steps=steps, cfg=7.5, window_px=ARGS.window_px, stride_px=ARGS.stride,
                             sync=settings, anchor=Anchor(), window_batch=window_batch or ARGS.window_batch,
                             sync_batch=ARGS.sync_batch if sync_batch is None else sync_batch,
                             compile=compile, **({"loss_decoder": dec} if dec else {}))
    latent = {"samples": torch.zeros(1, 4, ARGS.height // 8, width // 8)}
    positive, negative = [[cond, {}]], [[uncond, {}]]
    fresh_memory(empty)
    NOTES.clear()
    sync()
    t0 = now()
    CLOCK.start()
    try:
        with torch.inference_mode():
            out = bridge.sample_panorama(model, positive, negative, latent, job, vae=vae, loss=loss)["samples"]
        sync()
        t1 = now()
    finally:
        steps_s = CLOCK.stop()
    finite = bool(torch.isfinite(out).all())
    rec = {"label": label, "width": width, "steps": steps, "w": w, "sync_steps": settings.steps,
           "window_batch": job.window_batch, "sync_batch": job.gradient_batch(), "loss_decoder": job.loss_decoder,
           "windows": len(plan_windows(ARGS.height // 8, width // 8, 64 if not ARGS.window_px else ARGS.window_px // 8,
                                       ARGS.stride // 8)),
           "compile": compile, "time_s": round(t1 - t0, 4), "step_s": [round(s, 4) for s in steps_s], "finite": finite,
           "notes": list(NOTES), **memory()}
    if not finite:
        RESULTS["errors"].append(f"non-finite output: {label}")
    return rec



def per_step(rec, skip_first=True):
    s = rec["step_s"][1:] if skip_first and len(rec["step_s"]) > 1 else rec["step_s"]
    return statistics.median(s) if s else None


# ----------------------------------------------------------------------------------------------------------------
# (a): one window at a time, in the style of the reference code, through the same ComfyUI modules


def baseline_run(models, *, width=None, steps=None, w=0.0, sync_steps=None, label="", max_steps=None):
    """DESIGN §1 read literally: per window the UNet with CFG as a batch of 2 and a DDIM step (VP space,
    diffusers' schedule); on sync steps first the anchor's image (no grad), then every window's gradient
    (UNet + VAE decoder + LPIPS, the anchor's too) and the step x <- x - w_i dL/dx; MultiDiffusion fusion."""
    model, vae, loss, cond, uncond = models
    width = width or ARGS.width
    steps = steps or ARGS.steps
    sync_steps = ARGS.sync_steps if sync_steps is None else sync_steps
    unet = model.model.diffusion_model
    first = vae.first_stage_model
    ms = model.model.model_sampling
    scale_factor = model.model.latent_format.scale_factor
    ac = (1.0 / (1.0 + ms.sigmas.double() ** 2)).float().to(DEVICE)
    ratio = 1000 // steps
    ts = [t * ratio + 1 for t in range(steps)][::-1]  # 981, 961, ..., 1 for 50 steps
    h, wl = ARGS.height // 8, width // 8
    win = 64 if not ARGS.window_px else ARGS.window_px // 8
    stride = ARGS.stride // 8
    views = [(r, c) for r in range(0, h - win + 1, stride) for c in range(0, wl - win + 1, stride)]
    anchor = len(views) // 2
    ctx = torch.cat([uncond, cond]).to(DEVICE, DTYPE)
    g = torch.Generator().manual_seed(ARGS.seed)
    x = torch.randn(1, 4, h, wl, generator=g).to(DEVICE)

    def eps_cfg(lat, t):
        e = unet(torch.cat([lat, lat]).to(DTYPE), timesteps=torch.full((2,), float(t), device=DEVICE), context=ctx)
        e_u, e_c = e.float().chunk(2)
        return e_u + 7.5 * (e_c - e_u)

    def decode(x0):
        return first.decode((x0 / scale_factor).to(DTYPE)).float().clamp(-1, 1)

    fresh_memory()
    marks = []
    sync()
    t0 = now()
    e0 = StepClock.mark()
    grad_ctx = bridge.trainable_weights(unet, first) if w > 0 else contextlib.nullcontext()
    with grad_ctx:
        for i, t in enumerate(ts[:max_steps]):
            a = ac[t]
            a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
            value = torch.zeros_like(x)
            count = torch.zeros_like(x)
            syncing = w > 0 and i < sync_steps
            if syncing:
                with torch.no_grad():
                    r, c = views[anchor]
                    lat = x[..., r:r + win, c:c + win]
                    img_a = decode((lat - (1 - a).sqrt() * eps_cfg(lat, t)) / a.sqrt())
            for r, c in views:
                lat = x[..., r:r + win, c:c + win].clone()
                if syncing:
                    with torch.enable_grad():
                        lat.requires_grad_(True)
                        x0 = (lat - (1 - a).sqrt() * eps_cfg(lat, t)) / a.sqrt()
                        lp = loss(decode(x0), img_a).sum()
                        (grad,) = torch.autograd.grad(lp, lat)
                    lat = (lat - w * 0.95**i * grad).detach()
                with torch.no_grad():
                    e = eps_cfg(lat, t)
                    x0 = (lat - (1 - a).sqrt() * e) / a.sqrt()
                    value[..., r:r + win, c:c + win] += a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
                    count[..., r:r + win, c:c + win] += 1
            x = torch.where(count > 0, value / count, x)
            marks.append(StepClock.mark())
    sync()
    t1 = now()
    finite = bool(torch.isfinite(x).all())
    steps_s = intervals(e0, marks)
    rec = {"label": label, "width": width, "steps": len(steps_s), "w": w, "sync_steps": sync_steps,
           "windows": len(views), "time_s": round(t1 - t0, 4), "step_s": [round(s, 4) for s in steps_s],
           "finite": finite, **memory()}
    if not finite:
        RESULTS["errors"].append(f"non-finite output: {label}")
    return rec


# ----------------------------------------------------------------------------------------------------------------
# The floor: FLOPs and the card's matmul throughput


def matmul_tflops():
    n = 8192 if CUDA else 512
    out = {}
    for dt in ((torch.float16, torch.bfloat16) if CUDA else (torch.float32,)):
        a = torch.randn(n, n, device=DEVICE, dtype=dt)
        b = torch.randn(n, n, device=DEVICE, dtype=dt)
        for _ in range(3):
            a @ b
        sync()
        reps = 30 if CUDA else 3
        times = []
        for _ in range(5):
            t0 = now()
            for _ in range(reps):
                a @ b
            sync()
            times.append((now() - t0) / reps)
        out[str(dt).replace("torch.", "")] = round(2 * n**3 / statistics.median(times) / 1e12, 1)
        del a, b
    return out


def count_flops(models):
    """FLOPs of one UNet call with CFG (batch 2) on one window, forward; and per synchronized window the
    forward + backward (input gradient only) of the UNet, the VAE decoder and LPIPS."""
    from torch.utils.flop_counter import FlopCounterMode

    model, vae, loss, cond, uncond = models
    unet, first = model.model.diffusion_model, vae.first_stage_model
    win = 64 if not ARGS.window_px else ARGS.window_px // 8
    ctx = torch.cat([uncond, cond]).to(DEVICE, DTYPE)
    t = torch.full((2,), 501.0, device=DEVICE)
    out = {}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        e = unet(torch.randn(2, 4, win, win, device=DEVICE, dtype=DTYPE), timesteps=t, context=ctx)
    out["unet_cfg_fwd"] = fc.get_total_flops()
    out["unet_out_std"] = float(e.float().std())
    out["unet_finite"] = bool(torch.isfinite(e).all())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        img = first.decode(torch.randn(1, 4, win, win, device=DEVICE, dtype=DTYPE))
    out["vae_fwd"] = fc.get_total_flops()
    out["vae_out_std"] = float(img.float().std())
    out["vae_finite"] = bool(torch.isfinite(img).all())
    with bridge.trainable_weights(unet, first), torch.inference_mode(False):
        lat = torch.randn(1, 4, win, win, device=DEVICE, requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            e = unet(torch.cat([lat, lat]).to(DTYPE), timesteps=t, context=ctx)
            torch.autograd.grad(e.float().square().sum(), lat)
        out["unet_cfg_fwd_bwd"] = fc.get_total_flops()
        # non-leaf inputs: FlopCounterMode's module hooks cannot watch a leaf under autograd.grad
        z = torch.randn(1, 4, win, win, device=DEVICE, dtype=DTYPE, requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            img = first.decode(z * 1)
            torch.autograd.grad(img.float().square().sum(), z)
        out["vae_fwd_bwd"] = fc.get_total_flops()
        im = (torch.rand(1, 3, win * 8, win * 8, device=DEVICE) * 2 - 1).requires_grad_(True)
        tgt = torch.rand(1, 3, win * 8, win * 8, device=DEVICE) * 2 - 1
        with FlopCounterMode(display=False) as fc:
            d = loss(im * 1, tgt)
            torch.autograd.grad(d.sum(), im)
        out["lpips_fwd_bwd"] = fc.get_total_flops()
        out["lpips_finite"] = bool(torch.isfinite(d).all())
    return out


def floors(flops, tflops, windows, steps, sync_steps):
    """Seconds at the measured fp16 matmul rate: UNet only (the issue's definition) and all components."""
    rate = tflops * 1e12
    evals = windows * steps
    unet_b = flops["unet_cfg_fwd"] * evals / rate
    movers = windows - 1
    sync_unet = sync_steps * (flops["unet_cfg_fwd"] + movers * flops["unet_cfg_fwd_bwd"])
    sync_other = sync_steps * (flops["vae_fwd"] + movers * (flops["vae_fwd_bwd"] + flops["lpips_fwd_bwd"]))
    return {"b_unet": unet_b, "c_unet": unet_b + sync_unet / rate, "c_all": unet_b + (sync_unet + sync_other) / rate}


# ----------------------------------------------------------------------------------------------------------------
# Host syncs


def count_syncs(fn):
    if not CUDA:
        return {}
    counts = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for wr in caught:
        if "synchroniz" in str(wr.message):
            counts[f"{Path(wr.filename).name}:{wr.lineno}"] += 1
    return dict(counts.most_common(12)) | {"total": sum(counts.values())}


# ----------------------------------------------------------------------------------------------------------------
# Sections


def median_time(recs):
    return round(statistics.median(r["time_s"] for r in recs), 3) if recs else None


def main():
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    commit_file = ROOT / "bench" / ".commit"  # written by run_on_device.sh's caller: .git may not travel
    commit = os.environ.get("BENCH_COMMIT") or (commit_file.read_text().strip() if commit_file.exists() else "unknown")
    RESULTS["env"] = {
        "device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "commit": commit,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "args": vars(ARGS), "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    print(json.dumps(RESULTS["env"], default=str), flush=True)
    R = RESULTS
    with section("matmul"):
        R["matmul_tflops"] = matmul_tflops()
        print("matmul TFLOP/s", R["matmul_tflops"], flush=True)
    models = None
    with section("build"):
        models = build_models()
    if models is None:
        return
    install_profiler(*models[:3])
    with section("flops"):
        R["flops"] = count_flops(models)
        print({k: (f"{v / 1e12:.3f} TFLOP" if is_count(v) else v) for k, v in R["flops"].items()}, flush=True)

    ns = ARGS.sweep_steps
    W = 20.0
    R["runs"] = runs = defaultdict(list)

    def add(key, rec):
        runs[key].append(rec)
        extra = f" steps {[round(s, 3) for s in rec['step_s'][:4]]}" if rec.get("step_s") else ""
        print(f"{key}: {rec['time_s']:.3f} s, peak {rec['peak_alloc_gib']} / {rec['peak_reserved_gib']} GiB"
              f"{extra} {rec.get('notes') or ''}", flush=True)
        save()
        return rec

    if ARGS.plan == "compile":
        compile_plan(models, add, runs)
        summarize()
        return

    # warm-up: kernels, allocator, cuDNN heuristics; also gives the per-step estimates for the budget
    with section("warmup"):
        add("warm_pack_sync", pack_run(models, steps=ns, w=W, sync_steps=ns, label="warm"))
        add("warm_pack_plain", pack_run(models, steps=ns, label="warm"))
        add("warm_base", baseline_run(models, steps=ARGS.steps, w=W, max_steps=2, sync_steps=1, label="warm"))
    est = {
        "pack_plain": per_step(runs["warm_pack_plain"][-1]) or 1.0,
        "pack_sync": per_step(runs["warm_pack_sync"][-1]) or 1.0,
        "base_sync": runs["warm_base"][-1]["step_s"][0] if runs.get("warm_base") else 5.0,
        "base_plain": runs["warm_base"][-1]["step_s"][-1] if runs.get("warm_base") else 2.0,
    }
    S, K = ARGS.steps, ARGS.sync_steps
    t_b = S * est["pack_plain"]
    t_c = K * est["pack_sync"] + (S - K) * est["pack_plain"]
    t_ab = S * est["base_plain"]
    t_ac = K * est["base_sync"] + (S - K) * est["base_plain"]
    R["estimates_s"] = {"b": t_b, "c": t_c, "a_md": t_ab, "a_sync": t_ac, **est}
    print("estimates", {k: round(v, 2) for k, v in R["estimates_s"].items()}, flush=True)

    with section("b_md"):
        for k in range(ARGS.repeats):
            if BUDGET.allow("b repeat", t_b * 1.3):
                add("b_md", pack_run(models, label="b", empty=k == 0))
    with section("c_sync"):
        for k in range(ARGS.repeats):
            if BUDGET.allow("c repeat", t_c * 1.3):
                add("c_sync", pack_run(models, w=W, label="c", empty=k == 0))

    with section("baseline"):
        for k in range(ARGS.baseline_repeats):
            if BUDGET.allow("a md", t_ab * 1.2):
                add("a_md", baseline_run(models, label="a md"))
            if BUDGET.allow("a sync", t_ac * 1.2):
                add("a_sync", baseline_run(models, w=W, label="a sync"))

    with section("profile"):
        prof = R["profile"] = {}
        for name, fn in [
            ("pack_plain", lambda: pack_run(models, steps=ns, label="prof")),
            ("pack_sync", lambda: pack_run(models, steps=ns, w=W, sync_steps=ns, label="prof")),
            ("base_plain", lambda: baseline_run(models, steps=S, max_steps=ns, label="prof")),
            ("base_sync", lambda: baseline_run(models, steps=S, w=W, sync_steps=S, max_steps=ns, label="prof")),
        ]:
            with profiling() as p:
                rec = fn()
            n = rec["steps"] if name.startswith("pack") else len(rec["step_s"])
            split = p.split(rec["time_s"])
            prof[name] = {k: round(v / n, 4) for k, v in split.items()} | {
                "step_s": round(rec["time_s"] / n, 4), "raw": {k: round(v, 4) for k, v in p.t.items()}}
            print("profile", name, prof[name], flush=True)

    def levers():
        with section("levers"):
            lev = R["levers"] = []
            if ARGS.plan == "explore":
                variants = [(sb, "vae") for sb in (1, 2, 4, 8)] + [(sb, "vae_checkpointed") for sb in (2, 4, 8, 16)] \
                    + [(4, "vae_half"), (8, "taesd"), (20, "taesd")]
                variants.append((4, "vae", "lpips_repeat"))  # the anchor's LPIPS features per window, as before
            else:
                variants = [(1, "vae"), (2, "vae"), (1, "vae_checkpointed"), (4, "vae_checkpointed"),
                            (2, "vae_half"), (2, "taesd")]
            if ARGS.tiny:
                variants = [(2, "vae"), (4, "vae_checkpointed"), (4, "vae_half"), (4, "taesd")]
            for sb, dec, *flag in variants:
                if not BUDGET.allow(f"lever {sb} {dec}", ns * est["pack_sync"] * 3 + 5):
                    continue
                try:
                    plain_loss = (lambda a, b, _l=models[2]: _l(a, b)) if flag else None  # no .features
                    rec = pack_run(models, steps=ns, w=W, sync_steps=ns, window_batch=max(8, sb), sync_batch=sb,
                                   loss_decoder=dec, label=f"lever sb={sb} {dec} {flag}", loss=plain_loss)
                    if flag:
                        rec["loss_decoder"] = f"{dec} {flag[0]}"
                    rec["sync_step_s"] = per_step(rec)
                except Exception as e:  # noqa: BLE001
                    rec = {"sync_batch": sb, "loss_decoder": dec, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    fresh_memory()
                lev.append(rec)
                print("lever", {k: rec.get(k) for k in ("sync_batch", "loss_decoder", "sync_step_s", "peak_alloc_gib",
                                                          "peak_reserved_gib", "notes", "error")}, flush=True)
                save()
            if CUDA and BUDGET.allow("cudnn.benchmark", 2 * ns * (est["pack_sync"] + est["pack_plain"]) + 20):
                torch.backends.cudnn.benchmark = True  # what ComfyUI's --fast autotune sets
                try:
                    for tag, kw in (("plain", {}), ("sync", {"w": W, "sync_steps": ns + 1})):
                        rec = pack_run(models, steps=ns + 1, label=f"cudnn.benchmark {tag}", **kw)
                        rec["step_median_s"] = statistics.median(rec["step_s"][2:])  # 2 steps to autotune
                        lev.append(rec | {"loss_decoder": f"{rec['loss_decoder']} cudnn.benchmark {tag}"})
                        print("lever cudnn.benchmark", tag, rec["step_median_s"], rec["peak_alloc_gib"], flush=True)
                finally:
                    torch.backends.cudnn.benchmark = False
                    save()
            if CUDA and ARGS.plan == "explore" and BUDGET.allow("channels_last", 4 * ns * est["pack_sync"] + 10):
                unet, first = models[0].model.diffusion_model, models[1].first_stage_model
                try:
                    with torch.inference_mode():
                        unet.to(memory_format=torch.channels_last)
                        first.to(memory_format=torch.channels_last)
                    for tag, kw in (("plain", {}), ("sync", {"w": W, "sync_steps": ns})):
                        rec = pack_run(models, steps=ns, label=f"channels_last {tag}", **kw)
                        rec["step_median_s"] = per_step(rec)
                        lev.append(rec | {"loss_decoder": f"channels_last {tag}"})
                        print("lever channels_last", tag, rec["step_median_s"], rec["peak_alloc_gib"], flush=True)
                finally:
                    with torch.inference_mode():
                        unet.to(memory_format=torch.contiguous_format)
                        first.to(memory_format=torch.contiguous_format)
                    save()

    if ARGS.plan == "explore":
        levers()

    with section("window_batch"):
        wbs = [int(v) for v in ARGS.window_batches.split(",") if v]
        R["window_batch"] = wb_rows = []
        for wb in wbs:
            row = {"window_batch": wb}
            if BUDGET.allow(f"wb {wb} plain", ns * est["pack_plain"] * max(1, 8 / wb) + 3):
                rec = pack_run(models, steps=ns, window_batch=wb, label=f"wb {wb}")
                row.update(plain_step_s=per_step(rec), plain_peak_alloc_gib=rec["peak_alloc_gib"],
                           plain_peak_reserved_gib=rec["peak_reserved_gib"])
            eff = ARGS.sync_batch or min(wb, bridge.SYNC_BATCH_AUTO)
            same = next((r for r in wb_rows if r.get("sync_batch") == eff and "sync_step_s" in r), None)
            if same is not None:  # the gradient pass is the same configuration as a row above
                row.update({k: same[k] for k in same if k.startswith("sync_")}, notes=["sync: same as above"])
            elif BUDGET.allow(f"wb {wb} sync", ns * est["pack_sync"] * max(1, 4 / wb) + 5):
                try:
                    rec = pack_run(models, steps=ns, w=W, sync_steps=ns, window_batch=wb, sync_batch=0,
                                   label=f"wb {wb} sync")
                    row.update(sync_batch=rec["sync_batch"], sync_step_s=per_step(rec),
                               sync_peak_alloc_gib=rec["peak_alloc_gib"], sync_peak_reserved_gib=rec["peak_reserved_gib"],
                               notes=rec["notes"])
                except Exception as e:  # noqa: BLE001
                    row["sync_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    fresh_memory()
            if row.get("plain_step_s") is not None and row.get("sync_step_s") is not None:
                row["est_b_s"] = S * row["plain_step_s"]
                row["est_c_s"] = K * row["sync_step_s"] + (S - K) * row["plain_step_s"]
            wb_rows.append(row)
            print("window_batch", row, flush=True)
            save()

    with section("width"):
        R["width"] = w_rows = []
        for width in [int(v) for v in ARGS.widths.split(",")]:
            f = width / ARGS.width
            row = {"width": width}
            if BUDGET.allow(f"width {width}", ns * (est["pack_plain"] + est["pack_sync"]) * f * 1.5 + 5):
                rec = pack_run(models, width=width, steps=ns, label=f"width {width}")
                row.update(windows=rec["windows"], plain_step_s=per_step(rec), plain_peak_alloc_gib=rec["peak_alloc_gib"],
                           plain_peak_reserved_gib=rec["peak_reserved_gib"])
                rec = pack_run(models, width=width, steps=ns, w=W, sync_steps=ns, label=f"width {width} sync")
                row.update(sync_step_s=per_step(rec), sync_peak_alloc_gib=rec["peak_alloc_gib"],
                           sync_peak_reserved_gib=rec["peak_reserved_gib"], notes=rec["notes"])
                row["est_b_s"] = S * row["plain_step_s"]
                row["est_c_s"] = K * row["sync_step_s"] + (S - K) * row["plain_step_s"]
            w_rows.append(row)
            print("width", row, flush=True)
            save()

    with section("syncs"):
        R["host_syncs"] = {
            "pack_plain_1step": count_syncs(lambda: pack_run(models, steps=1, label="syncs")),
            "pack_sync_1step": count_syncs(lambda: pack_run(models, steps=1, w=W, sync_steps=1, label="syncs")),
        }
        print("host syncs", R["host_syncs"], flush=True)

    if ARGS.plan == "final":
        levers()
    summarize()


def compile_plan(models, add, runs):
    """Headline numbers with ``compile`` off (eager, the default) and on (torch.compile, inductor), and the
    baseline, in one run. Compiling happens in the warm-up runs (timed apart: what a user's first run costs)."""
    R = RESULTS
    ns, W, S, K = ARGS.sweep_steps, 20.0, ARGS.steps, ARGS.sync_steps
    C = "aot_eager" if ARGS.tiny else "inductor"  # tiny: dynamo + AOTAutograd without inductor's compile time
    with section("warmup"):
        add("warm_pack_sync", pack_run(models, steps=ns, w=W, sync_steps=ns, label="warm"))
        add("warm_pack_plain", pack_run(models, steps=ns, label="warm"))
    if not (runs.get("warm_pack_plain") and runs.get("warm_pack_sync")):
        print("warm-up failed: see the errors above", flush=True)
        return
    est = {"pack_plain": per_step(runs["warm_pack_plain"][-1]) or 1.0,
           "pack_sync": per_step(runs["warm_pack_sync"][-1]) or 1.0}
    if ARGS.lean:
        return lean_compile_plan(add, models, C, W)
    with section("attention_lever"):  # the loss decoder's SDPA backends, eager, default settings
        lev = R["levers"] = []
        for flag in (False, True):
            bridge.LOSS_ATTENTION_AVOIDS_EFFICIENT = flag
            try:
                rec = pack_run(models, steps=ns, w=W, sync_steps=ns, label=f"loss attention avoids efficient={flag}")
            finally:
                bridge.LOSS_ATTENTION_AVOIDS_EFFICIENT = True
            rec["sync_step_s"] = per_step(rec)
            rec["loss_decoder"] = f"{rec['loss_decoder']} avoid-efficient-sdpa={flag}"
            lev.append(rec)
            print("lever", rec["loss_decoder"], rec["sync_step_s"], rec["peak_alloc_gib"], flush=True)
    with section("compile_warmup"):  # every graph the headline runs need: plain batches, anchor, gradient
        t0 = now()
        add("warm_compiled_plain", pack_run(models, steps=ns, label="compile warm", compile=C))
        add("warm_compiled_sync", pack_run(models, steps=ns, w=W, sync_steps=ns, label="compile warm", compile=C))
        R["compile_warmup_s"] = round(now() - t0, 1)
        add("warm_compiled_sync2", pack_run(models, steps=ns, w=W, sync_steps=ns, label="compiled short", compile=C))
        add("warm_compiled_plain2", pack_run(models, steps=ns, label="compiled short", compile=C))
    cest = {"plain": per_step(runs["warm_compiled_plain2"][-1]) or 1.0,
            "sync": per_step(runs["warm_compiled_sync2"][-1]) or 1.0}
    t_b, t_c = S * cest["plain"], K * cest["sync"] + (S - K) * cest["plain"]
    with section("compiled_headline"):
        for k in range(ARGS.repeats):
            if BUDGET.allow("compiled b", t_b * 1.3 + 2):
                add("b_md_compiled", pack_run(models, label="b compiled", empty=k == 0, compile=C))
            if BUDGET.allow("compiled c", t_c * 1.3 + 2):
                add("c_sync_compiled", pack_run(models, w=W, label="c compiled", empty=k == 0, compile=C))
    with section("baseline"):
        for k in range(ARGS.baseline_repeats):
            if BUDGET.allow("a md", 50 * 0.9):
                add("a_md", baseline_run(models, label="a md"))
            if BUDGET.allow("a sync", 90):
                add("a_sync", baseline_run(models, w=W, label="a sync"))
    with section("eager_headline"):
        for k in range(max(1, ARGS.repeats - 1)):
            if BUDGET.allow("b", S * est["pack_plain"] * 1.3 + 2):
                add("b_md", pack_run(models, label="b", empty=k == 0))
            if BUDGET.allow("c", (K * est["pack_sync"] + (S - K) * est["pack_plain"]) * 1.3 + 2):
                add("c_sync", pack_run(models, w=W, label="c", empty=k == 0))
    compiled_levers(models, C, W, ((2, "vae"), (3, "vae_checkpointed")))


def compiled_levers(models, C, W, variants):
    """Short compiled runs, every step synchronized, one per (sync_batch, loss_decoder): sync step time (the
    first step, which compiles, left out) and peak memory, appended to RESULTS["levers"]."""
    ns = ARGS.sweep_steps
    levers = RESULTS.setdefault("levers", [])
    with section("compiled_levers"):
        for sb, dec in variants:
            if not BUDGET.allow(f"compiled lever {sb} {dec}", 60):
                continue
            try:
                rec = pack_run(models, steps=ns + 1, w=W, sync_steps=ns + 1, sync_batch=sb, loss_decoder=dec,
                               label=f"compiled lever sb={sb} {dec}", compile=C)
                rec["sync_step_s"] = statistics.median(rec["step_s"][2:])  # the first step compiles
            except Exception as e:  # noqa: BLE001
                rec = {"sync_batch": sb, "loss_decoder": dec, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                fresh_memory()
            rec["loss_decoder"] = f"{dec} compiled"
            levers.append(rec)
            print("lever", rec.get("loss_decoder"), rec.get("sync_batch"), rec.get("sync_step_s"),
                  rec.get("peak_alloc_gib"), rec.get("error", ""), flush=True)
            save()


def lean_compile_plan(add, models, C, W):
    """Eager headline, baseline, then compiled: one full-length warm-up run per mode (compiles every graph
    for this schedule; its time is what a user's first run costs) and ``--repeats`` timed runs."""
    R = RESULTS
    with section("eager_headline"):
        for k in range(ARGS.repeats):
            add("b_md", pack_run(models, label="b", empty=k == 0))
            add("c_sync", pack_run(models, w=W, label="c", empty=k == 0))
    with section("baseline"):
        for k in range(ARGS.baseline_repeats):
            add("a_md", baseline_run(models, label="a md"))
            add("a_sync", baseline_run(models, w=W, label="a sync"))
    with section("compile_warmup"):
        add("warm_compiled_b", pack_run(models, label="b compiled, first run", compile=C))
        add("warm_compiled_c", pack_run(models, w=W, label="c compiled, first run", compile=C))
        R["compile_warmup_s"] = round(R["runs"]["warm_compiled_b"][-1]["time_s"]
                                      + R["runs"]["warm_compiled_c"][-1]["time_s"], 1)
    with section("compiled_headline"):
        for k in range(ARGS.repeats):
            add("b_md_compiled", pack_run(models, label="b compiled", empty=k == 0, compile=C))
            add("c_sync_compiled", pack_run(models, w=W, label="c compiled", empty=k == 0, compile=C))
    # with the gradient pass's weight copies gone (1ed6f51): does a larger gradient batch fit 10 GiB, and pay?
    compiled_levers(models, C, W, ((3, "vae_checkpointed"), (4, "vae_checkpointed")))


def summarize():
    R = RESULTS
    runs = R.get("runs", {})
    env = R["env"]
    fl = R.get("flops")
    tf = (R.get("matmul_tflops") or {})
    rate = tf.get("float16") or tf.get("float32")
    windows = next((runs[k][0]["windows"] for k in ("b_md", "b_md_compiled", "c_sync") if runs.get(k)), None)
    floor = floors(fl, rate, windows, ARGS.steps, ARGS.sync_steps) if fl and rate and windows else {}
    R["floor_s"] = floor
    rows = []
    for key, name, fkey in (("a_md", "(a) baseline, w=0", "b_unet"), ("a_sync", "(a) baseline, 10 sync", "c_all"),
                            ("b_md", "(b) pack, w=0", "b_unet"), ("c_sync", "(c) pack, 10 sync", "c_all"),
                            ("b_md_compiled", "(b) pack, w=0, compile", "b_unet"),
                            ("c_sync_compiled", "(c) pack, 10 sync, compile", "c_all")):
        if key.endswith("_compiled") and not runs.get(key):
            continue
        recs = runs.get(key) or []
        if not recs:
            rows.append((name, "-", "-", "-", "-", "-"))
            continue
        t = median_time(recs)
        fs = floor.get(fkey)
        rows.append((name, f"{t:.2f}", str(len(recs)), f"{max(r['peak_alloc_gib'] or 0 for r in recs):.2f}",
                     f"{max(r['peak_reserved_gib'] or 0 for r in recs):.2f}", f"{t / fs:.1f}x" if fs else "-"))
    R["table"] = rows
    save()
    print("\n" + "=" * 100)
    print(f"{env['device']}  {env['date_utc']} UTC  commit {env['commit']}  torch {env['torch']}")
    print(f"matmul TFLOP/s {tf}   floor (s) " + ", ".join(f"{k} {v:.2f}" for k, v in floor.items()))
    if R.get("compile_warmup_s") is not None:
        print(f"compile warm-up (first plain + first sync run): {R['compile_warmup_s']} s")
    if fl:
        print("TFLOP: " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in fl.items() if is_count(v)))
    print(f"{'mode':28s} {'median s':>9s} {'runs':>5s} {'alloc GiB':>10s} {'resv GiB':>9s} {'x floor':>8s}")
    for r in rows:
        print(f"{r[0]:28s} {r[1]:>9s} {r[2]:>5s} {r[3]:>10s} {r[4]:>9s} {r[5]:>8s}")
    for name, p in (R.get("profile") or {}).items():
        print(f"per step {name:10s} " + " ".join(f"{k} {v * 1e3:.0f}ms" for k, v in p.items() if k != "raw"))
    for row in R.get("levers") or []:
        print("lever", {k: row.get(k) for k in ("sync_batch", "loss_decoder", "sync_step_s", "step_median_s",
                                                   "peak_alloc_gib", "peak_reserved_gib", "error") if row.get(k) is not None})
    for row in R.get("window_batch") or []:
        print("wb", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "notes"})
    for row in R.get("width") or []:
        print("width", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "notes"})
    if R.get("host_syncs"):
        print("host syncs", {k: v.get("total") for k, v in R["host_syncs"].items()})
    print("sections (s)", R["sections"], " total", round(elapsed()), "s")
    if R.get("skipped"):
        print("SKIPPED", R["skipped"])
    if R["errors"]:
        print("ERRORS", R["errors"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    try:
        main()
    finally:
        save()
