"""The floor: the UNet's, the VAE decoder's and LPIPS' FLOPs (``FlopCounterMode``), the card's measured matmul
throughput, and the seconds a panorama would take at that rate. Import after ``bench.options.start_comfy``."""
from __future__ import annotations

import statistics

import torch

from syncdiff_core.weights import trainable_weights

from .state import Bench, now


def matmul_tflops(b: Bench) -> dict:
    n = 8192 if b.cuda else 512
    out = {}
    for dt in ((torch.float16, torch.bfloat16) if b.cuda else (torch.float32,)):
        x = torch.randn(n, n, device=b.device, dtype=dt)
        y = torch.randn(n, n, device=b.device, dtype=dt)
        for _ in range(3):
            x @ y
        b.synchronize()
        reps = 30 if b.cuda else 3
        times = []
        for _ in range(5):
            t0 = now()
            for _ in range(reps):
                x @ y
            b.synchronize()
            times.append((now() - t0) / reps)
        out[str(dt).replace("torch.", "")] = round(2 * n**3 / statistics.median(times) / 1e12, 1)
        del x, y
    return out


def count_flops(b: Bench, models) -> dict:
    """FLOPs of one UNet call with CFG (batch 2) on one window, forward; and per synchronized window the
    forward + backward (input gradient only) of the UNet, the VAE decoder and LPIPS."""
    from torch.utils.flop_counter import FlopCounterMode

    dev, dt = b.device, b.dtype
    unet, first, loss = models.model.model.diffusion_model, models.vae.first_stage_model, models.loss
    win = b.window_latent
    ctx = torch.cat([models.uncond, models.cond]).to(dev, dt)
    t = torch.full((2,), 501.0, device=dev)
    out = {}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        e = unet(torch.randn(2, 4, win, win, device=dev, dtype=dt), timesteps=t, context=ctx)
    out["unet_cfg_fwd"] = fc.get_total_flops()
    out["unet_out_std"] = float(e.float().std())
    out["unet_finite"] = bool(torch.isfinite(e).all())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        img = first.decode(torch.randn(1, 4, win, win, device=dev, dtype=dt))
    out["vae_fwd"] = fc.get_total_flops()
    out["vae_out_std"] = float(img.float().std())
    out["vae_finite"] = bool(torch.isfinite(img).all())
    with trainable_weights(unet, first), torch.inference_mode(False):
        lat = torch.randn(1, 4, win, win, device=dev, requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            e = unet(torch.cat([lat, lat]).to(dt), timesteps=t, context=ctx)
            torch.autograd.grad(e.float().square().sum(), lat)
        out["unet_cfg_fwd_bwd"] = fc.get_total_flops()
        # non-leaf inputs: FlopCounterMode's module hooks cannot watch a leaf under autograd.grad
        z = torch.randn(1, 4, win, win, device=dev, dtype=dt, requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            img = first.decode(z * 1)
            torch.autograd.grad(img.float().square().sum(), z)
        out["vae_fwd_bwd"] = fc.get_total_flops()
        im = (torch.rand(1, 3, win * 8, win * 8, device=dev) * 2 - 1).requires_grad_(True)
        tgt = torch.rand(1, 3, win * 8, win * 8, device=dev) * 2 - 1
        with FlopCounterMode(display=False) as fc:
            d = loss(im * 1, tgt)
            torch.autograd.grad(d.sum(), im)
        out["lpips_fwd_bwd"] = fc.get_total_flops()
        out["lpips_finite"] = bool(torch.isfinite(d).all())
    return out


def floors(flops, tflops, windows, steps, sync_steps) -> dict:
    """Seconds at the measured fp16 matmul rate: UNet only (the issue's definition) and all components."""
    rate = tflops * 1e12
    evals = windows * steps
    unet_b = flops["unet_cfg_fwd"] * evals / rate
    movers = windows - 1
    sync_unet = sync_steps * (flops["unet_cfg_fwd"] + movers * flops["unet_cfg_fwd_bwd"])
    sync_other = sync_steps * (flops["vae_fwd"] + movers * (flops["vae_fwd_bwd"] + flops["lpips_fwd_bwd"]))
    return {"b_unet": unet_b, "c_unet": unet_b + sync_unet / rate, "c_all": unet_b + (sync_unet + sync_other) / rate}
