"""One timed run: (b)/(c) the pack's ``sample_panorama``; (a) one window at a time in the style of the reference
code through the same ComfyUI modules; and the loss decoder's gradient pass alone. Each returns a record (a dict)
of times, per-step times and peak memory. Import after ``bench.options.start_comfy``."""
from __future__ import annotations

import contextlib
import statistics

import torch

from syncdiff_core.comfy.loss_decoders import decoder_for_gradients
from syncdiff_core.comfy.model import gradient_section
from syncdiff_core.comfy.sampling import sample_panorama
from syncdiff_core.job import LOSS_DECODERS, SYNC_BATCH_AUTO, PanoramaJob
from syncdiff_core.sync import Anchor, SyncSettings
from syncdiff_core.weights import trainable_weights
from syncdiff_core.windows import plan_windows

from .state import Bench, now
from .timing import StepClock, captured_notes, intervals, mark, timed


def pack_run(b: Bench, models, *, width=None, steps=None, w=0.0, sync_steps=None, window_batch=None,
             sync_batch=None, loss_decoder=None, empty=True, label="", loss=None, compile="") -> dict:
    """The pack's ``sample_panorama`` at the bench's settings, with these overrides; per-step times through
    ComfyUI's progress hook. ``w`` 0: MultiDiffusion; ``loss``: another perceptual loss than ``models.loss``."""
    a = b.args
    loss = loss or models.loss
    width = width or a.width
    steps = steps or a.steps
    dec = loss_decoder or a.loss_decoder
    settings = SyncSettings(weight=w, decay=0.95, steps=a.sync_steps if sync_steps is None else sync_steps)
    job = PanoramaJob(seed=a.seed, steps=steps, cfg=7.5, window_px=a.window_px, stride_px=a.stride,
                      sync=settings, anchor=Anchor(), window_batch=window_batch or a.window_batch,
                      sync_batch=a.sync_batch if sync_batch is None else sync_batch,
                      compile=compile, **({"loss_decoder": dec} if dec else {}))
    latent = {"samples": torch.zeros(1, 4, a.height // 8, width // 8)}
    positive, negative = [[models.cond, {}]], [[models.uncond, {}]]
    b.fresh_memory(empty)
    b.synchronize()
    with captured_notes() as notes:
        t0 = now()
        with StepClock(b) as clock, torch.inference_mode():
            out = sample_panorama(models.model, positive, negative, latent, job, vae=models.vae, loss=loss)["samples"]
            b.synchronize()
            t1 = now()
    finite = bool(torch.isfinite(out).all())
    rec = {"label": label, "width": width, "steps": steps, "w": w, "sync_steps": settings.steps,
           "window_batch": job.window_batch, "sync_batch": job.sync_batch or job.gradient_batch(), "loss_decoder": job.loss_decoder,
           "windows": len(plan_windows(a.height // 8, width // 8, b.window_latent, a.stride // 8)),
           "compile": compile, "time_s": round(t1 - t0, 4), "step_s": [round(s, 4) for s in clock.step_s],
           "finite": finite, "notes": list(notes), **b.memory()}
    if not finite:
        b.results["errors"].append(f"non-finite output: {label}")
    return rec


def per_step(rec, skip_first=True):
    s = rec["step_s"][1:] if skip_first and len(rec["step_s"]) > 1 else rec["step_s"]
    return statistics.median(s) if s else None


def median_time(recs):
    return round(statistics.median(r["time_s"] for r in recs), 3) if recs else None


def baseline_run(b: Bench, models, *, width=None, steps=None, w=0.0, sync_steps=None, label="",
                 max_steps=None) -> dict:
    """The method read literally: per window the UNet with CFG as a batch of 2 and a DDIM step (VP space,
    diffusers' schedule); on sync steps first the anchor's image (no grad), then every window's gradient
    (UNet + VAE decoder + LPIPS, the anchor's too) and the step x <- x - w_i dL/dx; MultiDiffusion fusion."""
    a = b.args
    dev, dt = b.device, b.dtype
    model, vae, loss, cond, uncond = models
    width = width or a.width
    steps = steps or a.steps
    sync_steps = a.sync_steps if sync_steps is None else sync_steps
    unet = model.model.diffusion_model
    first = vae.first_stage_model
    ms = model.model.model_sampling
    scale_factor = model.model.latent_format.scale_factor
    ac = (1.0 / (1.0 + ms.sigmas.double() ** 2)).float().to(dev)
    ratio = 1000 // steps
    ts = [t * ratio + 1 for t in range(steps)][::-1]  # 981, 961, ..., 1 for 50 steps
    h, wl = a.height // 8, width // 8
    win = b.window_latent
    stride = a.stride // 8
    views = [(r, c) for r in range(0, h - win + 1, stride) for c in range(0, wl - win + 1, stride)]
    anchor = len(views) // 2
    ctx = torch.cat([uncond, cond]).to(dev, dt)
    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(1, 4, h, wl, generator=g).to(dev)

    def eps_cfg(lat, t):
        e = unet(torch.cat([lat, lat]).to(dt), timesteps=torch.full((2,), float(t), device=dev), context=ctx)
        e_u, e_c = e.float().chunk(2)
        return e_u + 7.5 * (e_c - e_u)

    def decode(x0):
        return first.decode((x0 / scale_factor).to(dt)).float().clamp(-1, 1)

    b.fresh_memory()
    marks = []
    b.synchronize()
    t0 = now()
    e0 = mark(b.cuda)
    grad_ctx = trainable_weights(unet, first) if w > 0 else contextlib.nullcontext()
    with grad_ctx:
        for i, t in enumerate(ts[:max_steps]):
            at = ac[t]
            a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
            value = torch.zeros_like(x)
            count = torch.zeros_like(x)
            syncing = w > 0 and i < sync_steps
            if syncing:
                with torch.no_grad():
                    r, c = views[anchor]
                    lat = x[..., r:r + win, c:c + win]
                    img_a = decode((lat - (1 - at).sqrt() * eps_cfg(lat, t)) / at.sqrt())
            for r, c in views:
                lat = x[..., r:r + win, c:c + win].clone()
                if syncing:
                    with torch.enable_grad():
                        lat.requires_grad_(True)
                        x0 = (lat - (1 - at).sqrt() * eps_cfg(lat, t)) / at.sqrt()
                        lp = loss(decode(x0), img_a).sum()
                        (grad,) = torch.autograd.grad(lp, lat)
                    lat = (lat - w * 0.95**i * grad).detach()
                with torch.no_grad():
                    e = eps_cfg(lat, t)
                    x0 = (lat - (1 - at).sqrt() * e) / at.sqrt()
                    value[..., r:r + win, c:c + win] += a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
                    count[..., r:r + win, c:c + win] += 1
            x = torch.where(count > 0, value / count, x)
            marks.append(mark(b.cuda))
    b.synchronize()
    t1 = now()
    finite = bool(torch.isfinite(x).all())
    steps_s = intervals(b, e0, marks)
    rec = {"label": label, "width": width, "steps": len(steps_s), "w": w, "sync_steps": sync_steps,
           "windows": len(views), "time_s": round(t1 - t0, 4), "step_s": [round(s, 4) for s in steps_s],
           "finite": finite, **b.memory()}
    if not finite:
        b.results["errors"].append(f"non-finite output: {label}")
    return rec


def loss_decoder_grad(b: Bench, models, *, avoid_efficient_attention: bool, loss_decoder=None, batch=None,
                      reps=None) -> dict:
    """The loss decoder's gradient pass alone (decode + input gradient of ``batch`` windows, eager), built by the
    pack's ``decoder_for_gradients`` with ``avoid_efficient_attention`` as given: the part of a sync step that
    the attention lever changes. ``timed``'s record plus the settings."""
    dec = loss_decoder or b.args.loss_decoder or LOSS_DECODERS[0]
    batch = batch or b.args.sync_batch or min(b.args.window_batch, SYNC_BATCH_AUTO)  # the job's gradient batch
    reps = reps or (3 if b.args.tiny else 10)
    decode = decoder_for_gradients(models.vae, models.model, dec, avoid_efficient_attention=avoid_efficient_attention)
    win = b.window_latent
    z = torch.randn(batch, 4, win, win, generator=torch.Generator().manual_seed(b.args.seed)).to(b.device)

    def run():
        u = z.clone().requires_grad_(True)
        return torch.autograd.grad(decode(u).square().mean(), u)[0]

    with trainable_weights(models.vae.first_stage_model), gradient_section():
        rec = timed(b, run, reps)
    return {"loss_decoder": dec, "sync_batch": batch, "avoid_efficient_attention": avoid_efficient_attention} | rec
