#!/usr/bin/env python3
"""SDXL and Flux.1 panoramas on the GPU (issue 12): 1024 x 4096 px, MultiDiffusion and 10 sync steps, time and peak
memory, with the one-window-at-a-time baseline in the same run and the FLOP floor.

Random weights of the real sizes, built through ComfyUI's own classes (``comfy.supported_models.SDXL`` / ``Flux``
with the configs ComfyUI detects for SDXL 1.0 and FLUX.1 [dev]) directly on the GPU (speed does not depend on weight
values): SDXL's UNet (2.6 B, fp16) with SD's KL VAE; Flux's transformer (11.9 B, bf16) with its 16-channel VAE.
Conditioning is random tensors of the encoders' shapes (CLIP-L + OpenCLIP-bigG for SDXL; T5-XXL and CLIP-L's pooled
output, guidance 3.5, cfg 1 for Flux).

Per family: a short warm-up, the pack's MultiDiffusion (``sync_weight`` 0) and SyncDiffusion (10 sync steps) at
the family's default window (1024 px) and stride (256 px: 13 windows) through ``sample_panorama``; then the baseline
(``window_batch`` 1, ``sync_batch`` 1: one window at a time through the same code) on a short run (4 steps, 2 of
them synchronized) whose per-step times are extrapolated to the full schedule (said so in the JSON). Flux's sync run
uses ``checkpoint_model`` (the blocks recomputed in the backward pass).

    python bench/families_bench.py --out OUT [--family sdxl --family flux] [--tiny]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from devtools.models import FLUX_DEV, SD_VAE, SDXL_UNET

ROOT = Path(__file__).resolve().parent.parent

FAMILIES = {
    "sdxl": {"cls": "SDXL", "unet": SDXL_UNET, "dtype": "float16", "tokens": 77, "ctx": 2048, "pooled": 1280,
             "cfg": 7.5, "steps": 30, "tiny": "sdxl"},
    "flux": {"cls": "Flux", "unet": FLUX_DEV, "dtype": "bfloat16", "tokens": 512, "ctx": 4096, "pooled": 768,
             "guidance": 3.5, "cfg": 1.0, "steps": 20, "checkpoint_model": True, "tiny": "flux"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--family", action="append", choices=list(FAMILIES))
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--sync-steps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="CPU, the test suite's tiny family models")
    return p.parse_args(argv)


def start(opts):
    from devtools import headless, models
    base = headless.bootstrap(Path(tempfile.mkdtemp(prefix="syncdiff-families-")), cpu=opts.tiny)
    models.install_random_trunk(base / "models", "vgg16", seed=3, file_name="vgg16.safetensors")
    return base


def build(name: str, opts):
    """(model patcher, VAE, positive, negative) of ``name`` at real size on the GPU (tiny on the CPU)."""
    import torch

    import comfy.sd
    spec = FAMILIES[name]
    if opts.tiny:
        from devtools import families as fm
        fam = fm.build(spec["tiny"])
        return fam.model, fam.vae, fam.positive, fam.negative
    from devtools.models import build_sized_model
    model = build_sized_model(spec["cls"], spec["unet"], getattr(torch, spec["dtype"]))
    dtype = model.model.get_dtype()
    if name == "flux":
        sd = {"decoder.conv_in.weight": torch.zeros(512, 16, 3, 3),
              "decoder.up.3.upsample.conv.weight": torch.zeros(512, 512, 3, 3)}
        vae = comfy.sd.VAE(sd=sd)  # ComfyUI's detection: the 16-channel engine at its real width
    else:
        from comfy.ldm.models.autoencoder import AutoencoderKL
        params = {"embed_dim": 4, "ddconfig": SD_VAE}
        vae = comfy.sd.VAE(sd=AutoencoderKL(**params).state_dict(), config={"params": params}, dtype=dtype)
    with torch.inference_mode():
        for pname, p in vae.first_stage_model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif pname.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    g = torch.Generator().manual_seed(1)

    def cond():
        extra = {"pooled_output": torch.randn(1, spec["pooled"], generator=g)}
        if "guidance" in spec:
            extra["guidance"] = spec["guidance"]
        return [[torch.randn(1, spec["tokens"], spec["ctx"], generator=g), extra]]

    return model, vae, cond(), cond()


def run(pack_sampling, pack_job, model, vae, pos, neg, latent, spec, *, steps, sync_steps, w, window_px=0,
        stride_px=0, **kw) -> dict:
    import torch
    from syncdiff_core.sync import SyncSettings
    job = pack_job.PanoramaJob(seed=1, steps=steps, cfg=spec["cfg"], window_px=window_px, stride_px=stride_px,
                               sync=SyncSettings(weight=w, steps=sync_steps), **kw)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = pack_sampling.sample_panorama(model, pos, neg, {"samples": latent}, job, vae=vae)["samples"]
    if cuda:
        torch.cuda.synchronize()
    return {"seconds": round(time.perf_counter() - t0, 3), "steps": steps, "sync_steps": sync_steps if w else 0,
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
            "finite": bool(torch.isfinite(out).all()), **{k: v for k, v in kw.items()}}


def guided_flops(pack_sampling, pack_job, model, vae, pos, neg, window_latent, spec) -> float:
    """FLOPs of one guided prediction of one window (with CFG when cfg != 1): a one-step MultiDiffusion run on a
    canvas of one window, under ``FlopCounterMode``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from syncdiff_core.sync import NO_SYNC
    job = pack_job.PanoramaJob(seed=1, steps=1, cfg=spec["cfg"], window_px=0, stride_px=0, sync=NO_SYNC)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        pack_sampling.sample_panorama(model, pos, neg, {"samples": window_latent}, job, vae=vae)
    return float(fc.get_total_flops())


def main(argv=None) -> int:
    opts = parse_args(argv)
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start(opts)
    import torch
    from syncdiff_core import job as pack_job
    from syncdiff_core.comfy import families
    from syncdiff_core.comfy import sampling as pack_sampling
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "commit": (ROOT / "bench" / ".commit").read_text().strip()
              if (ROOT / "bench" / ".commit").exists() else "", "date": time.strftime("%Y-%m-%d"), "families": {}}
    if torch.cuda.is_available():
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
        report["bf16_matmul_tflops"] = round(2 * n**3 * 20 / (time.perf_counter() - t0) / 1e12, 1)
        del a
    for name in opts.family or list(FAMILIES):
        spec = FAMILIES[name]
        t0 = time.perf_counter()
        model, vae, pos, neg = build(name, opts)
        facts = families.facts(model, vae)
        scale = facts.pixel_scale
        h, w = (64, 256) if opts.tiny else (opts.height, opts.width)
        latent = torch.zeros(1, facts.latent_channels, h // scale, w // scale)
        if facts.latent_dims == 3:
            latent = latent.unsqueeze(2)
        kw = {"window_px": 32, "stride_px": 16} if opts.tiny else {}
        steps, sync = (3, 2) if opts.tiny else (spec["steps"], opts.sync_steps)
        params = sum(p.numel() for p in model.model.diffusion_model.parameters())
        res = {"params": params, "build_s": round(time.perf_counter() - t0, 1), "steps": steps, "facts": vars(facts),
               "canvas_px": [h, w]}
        print(f"== {name}: {params / 1e9:.2f} B parameters, built in {res['build_s']} s", flush=True)

        report["families"][name] = res

        def go(**k):
            out = run(pack_sampling, pack_job, model, vae, pos, neg, latent, spec, **{**kw, **k})
            print(k, out, flush=True)
            res.setdefault("runs", []).append(out)
            (out_dir / "families_bench.json").write_text(json.dumps(report, indent=1, default=str))
            return out

        ckpt = {"checkpoint_model": True} if spec.get("checkpoint_model") else {}
        try:
            res["warmup"] = go(steps=2, sync_steps=1, w=20.0, **ckpt)
            res["pack_md"] = go(steps=steps, sync_steps=0, w=0.0)
            res["pack_sync"] = go(steps=steps, sync_steps=sync, w=20.0, **ckpt)
            short = 2 if opts.tiny else 4
            plain = go(steps=short, sync_steps=0, w=0.0, window_batch=1)
            synced = go(steps=short, sync_steps=2, w=20.0, window_batch=1, sync_batch=1, **ckpt)
            per_plain = plain["seconds"] / short
            per_sync_extra = (synced["seconds"] - plain["seconds"]) / 2
            res["baseline_short"] = {"plain": plain, "synced": synced}
            res["baseline_extrapolated"] = {
                "md_s": round(per_plain * steps, 2), "sync_s": round(per_plain * steps + per_sync_extra * sync, 2),
                "note": f"one window at a time; per-step times of a {short}-step run, extrapolated to {steps} steps"}
            if torch.cuda.is_available():
                win = facts.native_latent
                window_latent = latent[..., :win, :win].clone()
                fl = guided_flops(pack_sampling, pack_job, model, vae, pos, neg, window_latent, spec)
                rate = report["bf16_matmul_tflops"] * 1e12
                windows = len(pack_job.plan_canvas(pack_job.Windowing(), latent.shape[-2], latent.shape[-1], scale,
                                                   win, facts.default_stride_px))
                evals = windows * steps
                res["floor"] = {"guided_flops_one_window": fl, "windows": windows,
                                "md_s": round(fl * evals / rate, 2),
                                "sync_s_model_only": round((fl * evals + 3 * fl * (windows - 1) * sync) / rate, 2),
                                                "note": "the guided diffusion model only, at the measured bf16 matmul rate; sync adds "
                                        "forward+backward (3x a forward) per moving window per sync step; the VAE "
                                        "and LPIPS are not counted"}
        except Exception as e:  # noqa: BLE001 - keep what was measured
            import traceback
            traceback.print_exc()
            res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        report["families"][name] = res
        (out_dir / "families_bench.json").write_text(json.dumps(report, indent=1, default=str))
        import comfy.model_management as mm
        mm.unload_all_models()
        mm.soft_empty_cache()
    print("\nfamily  params   pack MD s  pack sync s  peak alloc/res GiB   baseline MD s  baseline sync s  floor MD s")
    for name, r in report["families"].items():
        md, sy, b, f = r.get("pack_md", {}), r.get("pack_sync", {}), r.get("baseline_extrapolated", {}), \
            r.get("floor", {})
        print(f"{name:6} {r['params'] / 1e9:5.2f}B {md.get('seconds', float('nan')):10.2f} "
              f"{sy.get('seconds', float('nan')):12.2f}   {sy.get('peak_allocated_gib')}/{sy.get('peak_reserved_gib')}"
              f"   {b.get('md_s', float('nan')):12.2f} {b.get('sync_s', float('nan')):16.2f} "
              f"{f.get('md_s', float('nan')):10.2f}  {r.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
