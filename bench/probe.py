#!/usr/bin/env python3
"""Where a step's GPU time goes, and what ``torch.compile`` buys (issue 6, the levers after run 3).

One device call: builds the same SD 2.0-base-sized random-weight models as ``gpu_bench.py``, then

1. ``kernels``: ``torch.profiler`` over a plain step and a sync step of the pack at its defaults: the summed
   kernel time by kind (matmul, convolution, attention, normalization, elementwise, copies/layout, other) against
   the wall time, i.e. how busy the GPU is and with what;
2. ``micro``: the pieces of a step alone, eager and compiled (``torch.compile``, inductor, default mode): UNet
   forward at 16 rows (8 windows with CFG), UNet forward+input-gradient at 4 rows (2 windows), the VAE decoder
   forward+input-gradient at batch 2 (plain and block-checkpointed), LPIPS forward+input-gradient at batch 2;
   median of CUDA-event timings, first-call (compile) time and peak memory of each;
3. ``pack_compiled``: the pack end to end with the UNet compiled through ComfyUI's own
   ``set_torch_compile_wrapper`` (what the TorchCompileModel node does; static shapes): short plain and sync
   runs at ``window_batch`` 7 (21 windows = 3 equal batches), and the eager pack at the same setting.

Prints a table at the end; writes ``probe.json`` to ``--out``. ``--tiny`` checks the script on the CPU. Takes the
options of one pack run that ``gpu_bench.py`` takes (``bench.options``); shares its models, runs and clocks.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the bench's modules as bench.<name>
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.options import script_path_fix

    script_path_fix(Path(__file__).parent)

from bench.options import add_run_options, apply_tiny, run_in_comfy  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    return apply_tiny(add_run_options(p).parse_args(argv))


def guarded(b, name, fn, need_s=0.0):
    """``fn()``, its seconds in ``seconds``; an exception or a short budget is recorded in ``errors``."""
    if b.left() < need_s:
        b.results["errors"].append(f"skipped {name}: {b.left():.0f} s left, wanted {need_s:.0f}")
        print("SKIP", name, flush=True)
        return None
    t0 = b.elapsed()
    print(f"\n== {name} (t={t0:.0f} s)", flush=True)
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing probe must not lose the others
        traceback.print_exc()
        b.results["errors"].append(f"{name}: {type(e).__name__}: {str(e)[:800]}")
        if b.cuda:
            import torch

            torch.cuda.empty_cache()
        return None
    finally:
        b.results.setdefault("seconds", {})[name] = round(b.elapsed() - t0, 1)
        b.save()


# ------------------------------------------------------------------------------------------------------------
# 1. kernel time by kind

KINDS = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("norm", ("norm",)),
    ("conv", ("conv", "implicit_gemm", "fprop", "dgrad", "wgrad", "winograd", "cudnn")),
    ("matmul", ("gemm", "cutlass", "cublas", "nvjet", "xmma", "sm90_")),
    ("copy/layout", ("copy", "transpose", "nchwtonhwc", "nhwctonchw", "cat_", "catarray", "memcpy", "memset")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "upsample", "silu", "gelu", "softmax", "triton")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def kernel_profile(b, fn):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    b.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        rec = fn()
        b.synchronize()
    wall = time.perf_counter() - t0
    by_kind, by_name = {}, {}
    for e in prof.key_averages():
        if b.cuda and e.device_type != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if not b.cuda:
            us = e.self_cpu_time_total
        if us <= 0:
            continue
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + us / 1e6
        by_name[e.key[:120]] = (by_name.get(e.key[:120], (0.0, 0))[0] + us / 1e6, e.count)
    busy = sum(by_kind.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {"wall_s": round(wall, 4), "run_s": rec["time_s"], "steps": rec["steps"], "kernel_s": round(busy, 4),
            "busy_fraction": round(busy / wall, 3),
            "by_kind_s": {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [[n, round(s, 4), c] for n, (s, c) in top]}


def kernels(b, models):
    from bench.runs import pack_run

    res = b.results["kernels"] = {}
    pack_run(b, models, steps=2, label="warm plain")
    pack_run(b, models, steps=2, w=20.0, sync_steps=2, label="warm sync")
    for name, kw in [("plain_2steps", {}), ("sync_2steps", {"w": 20.0, "sync_steps": 2})]:
        res[name] = r = kernel_profile(b, lambda: pack_run(b, models, steps=2, label=name, **kw))
        print(name, {k: v for k, v in r.items() if k != "top"}, flush=True)
        for n, s, c in r["top"][:8]:
            print(f"   {s:8.4f} s  x{c:<5d} {n}", flush=True)


# ------------------------------------------------------------------------------------------------------------
# 2. the pieces alone, eager and compiled


def micro(b, models):
    import torch

    from bench.timing import timed
    from syncdiff_core.comfy.model import gradient_section
    from syncdiff_core.decoders import checkpointed_decode, decoder_input
    from syncdiff_core.weights import trainable_weights

    model, vae, loss, cond, uncond = models
    unet, first = model.model.diffusion_model, vae.first_stage_model
    dev, dt = b.device, b.dtype
    win = 8 if b.args.tiny else 64
    reps = 3 if b.args.tiny else 10
    res = b.results["micro"] = {}

    def ctx(rows):
        return torch.cat([uncond, cond]).to(dev, dt).repeat(rows // 2, 1, 1)

    def unet_fwd(net, rows):
        x = torch.randn(rows, 4, win, win, device=dev, dtype=dt)
        t = torch.full((rows,), 501.0, device=dev)
        c = ctx(rows)

        def run():
            with torch.no_grad():
                return net(x, timesteps=t, context=c)
        return run

    def unet_grad(net, rows):
        x = torch.randn(rows // 2, 4, win, win, device=dev)
        t = torch.full((rows,), 501.0, device=dev)
        c = ctx(rows)

        def run():
            u = x.clone().requires_grad_(True)
            e = net(torch.cat([u, u]).to(dt), timesteps=t, context=c)
            return torch.autograd.grad(e.float().square().mean(), u)[0]
        return run

    def vae_grad(decode, batch):
        z = torch.randn(batch, 4, win, win, device=dev)

        def run():
            u = z.clone().requires_grad_(True)
            img = decode(u.to(dt))
            return torch.autograd.grad(img.float().square().mean(), u)[0]
        return run

    def lpips_grad(batch):
        im = torch.rand(batch, 3, win * 8, win * 8, device=dev) * 2 - 1
        tgt = torch.rand(1, 3, win * 8, win * 8, device=dev) * 2 - 1
        with torch.no_grad():
            feats = [f.detach() for f in loss.features(tgt)]

        def run():
            u = im.clone().requires_grad_(True)
            d = loss.distance(loss.features(u), feats)
            return torch.autograd.grad(d.sum(), u)[0]
        return run

    plain_decode = first.decode
    ckpt_decode = lambda z: checkpointed_decode(first.decoder, decoder_input(first, z))  # noqa: E731

    def record(name, fn):
        r = guarded(b, name, lambda: timed(b, fn, reps))
        if r is not None:
            res[name] = r
            print(name, r, flush=True)

    # eager first: it is what ships today
    record("unet_fwd16_eager", unet_fwd(unet, 16))
    record("unet_fwd10_eager", unet_fwd(unet, 10))
    with trainable_weights(unet, first), gradient_section():
        record("unet_grad4_eager", unet_grad(unet, 4))
        record("unet_grad8_eager", unet_grad(unet, 8))
        record("vae_grad2_eager", vae_grad(plain_decode, 2))
        record("vae_grad2_ckpt_eager", vae_grad(ckpt_decode, 2))
        record("lpips_grad2_eager", lpips_grad(2))
    if b.args.no_compile:
        return
    torch._dynamo.reset()
    cu = torch.compile(unet)
    record("unet_fwd16_compiled", unet_fwd(cu, 16))
    with trainable_weights(unet, first), gradient_section():
        if b.left() > 150:
            record("vae_grad2_compiled", vae_grad(torch.compile(plain_decode), 2))
        if b.left() > 200:
            record("unet_grad4_compiled", unet_grad(cu, 4))
        if b.left() > 330:
            record("vae_grad2_ckpt_compiled", vae_grad(torch.compile(ckpt_decode), 2))


# ------------------------------------------------------------------------------------------------------------
# 3. the pack with ComfyUI's own compile wrapper on the UNet


WB = 7  # 21 windows = 3 batches of 7: one input shape, one compile


def pack_compiled(b, models):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from bench.runs import pack_run

    model = models.model.clone()
    set_torch_compile_wrapper(model, backend="inductor", dynamic=False)
    cm = models._replace(model=model)
    res = b.results["pack_compiled"] = {}
    for name, kw in [("plain_first", {}), ("plain", {}), ("sync_first", {"w": 20.0, "sync_steps": 3}),
                     ("sync", {"w": 20.0, "sync_steps": 3})]:
        if b.left() < 60:
            b.results["errors"].append(f"pack_compiled {name}: out of budget")
            break
        rec = pack_run(b, cm, steps=3, label=name, window_batch=WB, **kw)
        res[name] = {"time_s": rec["time_s"], "step_s": rec["step_s"], "peak_alloc_gib": rec["peak_alloc_gib"],
                     "peak_reserved_gib": rec["peak_reserved_gib"], "finite": rec["finite"], "notes": rec["notes"]}
        print("compiled pack", name, res[name], flush=True)
        b.save()
    eager = {}
    for name, kw in [("plain", {}), ("sync", {"w": 20.0, "sync_steps": 3})]:
        rec = pack_run(b, models, steps=3, label=name, window_batch=WB, **kw)
        eager[name] = {"time_s": rec["time_s"], "step_s": rec["step_s"], "peak_alloc_gib": rec["peak_alloc_gib"]}
    res["eager_same_run"] = eager
    print("eager pack", eager, flush=True)


def main(argv=None):
    run_in_comfy(parse_args(argv), "syncdiff-probe-", ("bench.models", "bench.runs", "bench.timing"), run,
                 file_name="probe.json", results={"errors": []})


def run(b, models_dir: Path):
    from bench.models import build_models

    P = b.results
    P["env"] = b.env()
    print(P["env"], flush=True)
    models = guarded(b, "build", lambda: build_models(b, models_dir))
    if models is None:
        return
    guarded(b, "kernels", lambda: kernels(b, models))
    guarded(b, "micro", lambda: micro(b, models))
    if not b.args.no_compile:
        guarded(b, "pack_compiled", lambda: pack_compiled(b, models), need_s=120)
    print("\n==== summary")
    for name, r in (P.get("kernels") or {}).items():
        print(name, "wall", r["wall_s"], "kernels", r["kernel_s"], "busy", r["busy_fraction"], r["by_kind_s"])
    for name, r in (P.get("micro") or {}).items():
        print(f"{name:28s} {r['median_ms']:9.2f} ms  first {r['first_s']:7.2f} s  peak {r['peak_alloc_gib']}")
    for name, r in (P.get("pack_compiled") or {}).items():
        print("pack_compiled", name, r)
    print("seconds", P.get("seconds"), "errors", P["errors"])


if __name__ == "__main__":
    main()
