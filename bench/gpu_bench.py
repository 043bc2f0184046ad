#!/usr/bin/env python3
"""GPU speed and memory benchmark of the pack against a one-window-at-a-time baseline (issue 6).

Builds random-weight models of SD 2.0-base's size through ComfyUI's own classes (UNet 865M parameters, fp16;
SD's KL VAE, fp16; LPIPS-VGG with a random VGG16 trunk, fp32; conditioning tensors (1, 77, 1024)); timing does
not depend on weight values. Then times a 512x3072 panorama (stride 128 px = 21 windows, 50 DDIM steps, CFG 7.5):

  (a) ``baseline``: the method one window at a time, in the style of the public reference code, calling the same
      ComfyUI UNet / VAE modules directly (per window: UNet with CFG as a batch of 2, DDIM step; on sync steps
      per window the gradient through UNet + VAE decoder + LPIPS, the anchor's gradient computed too);
  (b) the pack's ``sample_panorama`` with w = 0 (MultiDiffusion);
  (c) the pack with 10 sync steps (w = 20).

Plus: a per-step split UNet / VAE / LPIPS / other (synchronized timers in separate profiling runs), lever
variants, time and peak memory vs width and vs window_batch (short runs; per-step medians), the UNet's FLOPs
(``FlopCounterMode``) and the card's measured matmul throughput (the floor).

``--tiny`` runs every section on the CPU with tiny models in a minute or two (a check of the script, not a
measurement). Results: a JSON file and a table at the end of the output. Run on the device through
``bench/run_on_device.sh``.

The pieces: ``options`` (shared options, ComfyUI's start-up), ``state`` (the ``Bench`` object: options, device,
clock, budget, results), ``models`` (the random-weight models), ``timing`` (step clock, profiler, host syncs),
``floor`` (FLOPs and matmul throughput), ``runs`` (one timed run), ``plans`` (the sections of each ``--plan``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.options import add_run_options, apply_tiny, run_in_comfy


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default="explore", choices=["explore", "final", "compile"],
                   help="explore: every section incl. lever variants and sweeps; final: headline numbers; "
                        "compile: the headline with compile on and off, and the baseline, in one run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of (b) and (c) after a warm-up")
    p.add_argument("--baseline-repeats", type=int, default=1, help="timed 50-step runs of the baseline per mode")
    p.add_argument("--widths", default="2048,3072,6144,12288")
    p.add_argument("--window-batches", default="1,2,4,8,16", help="empty: skip the window_batch sweep")
    p.add_argument("--sweep-steps", type=int, default=3, help="steps of the short runs (median of all but the first)")
    p.add_argument("--lean", action="store_true",
                   help="plan compile: eager headline and baseline first, then compile warm-up as full-length runs "
                        "(what a user's first run costs), the compiled headline, then compiled sync_batch 3 and 4 "
                        "if the budget allows")
    p.add_argument("--compile-only", action="store_true",
                   help="plan compile --lean: only the compiled runs (first run and headline), for a second process "
                        "that finds the first one's compile cache")
    p.add_argument("--sync-only", action="store_true",
                   help="plan compile --lean: SyncDiffusion only (no MultiDiffusion runs, no baseline)")
    p.add_argument("--compiled-anchor", action="store_true",
                   help="compile the anchor's prediction as the pack did before 2026-12-06 (the pack runs it "
                        "eagerly: syncdiff_core.sync.eager), to measure what that costs")
    add_run_options(p)
    return apply_tiny(p.parse_args(argv))


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool)


def main(argv=None):
    run_in_comfy(parse_args(argv), "syncdiff-bench-", ("bench.floor", "bench.models", "bench.plans"), run)


def run(b, models_dir: Path):
    """The plan ``b.args.plan``: matmul throughput, the models, their FLOPs, the plan's sections, the summary."""
    from bench.floor import count_flops, matmul_tflops
    from bench.models import build_models
    from bench.plans import compile_plan, standard_plan

    R = b.results
    if b.args.compiled_anchor:
        import contextlib

        import syncdiff_core.sync

        syncdiff_core.sync.eager = contextlib.nullcontext  # the bench's switch back to the earlier behaviour
    R["env"] = b.env()
    print(json.dumps(R["env"], default=str), flush=True)
    with b.section("matmul"):
        R["matmul_tflops"] = matmul_tflops(b)
        print("matmul TFLOP/s", R["matmul_tflops"], flush=True)
    models = None
    with b.section("build"):
        models = build_models(b, models_dir)
    if models is None:
        return
    with b.section("flops"):
        R["flops"] = count_flops(b, models)
        print({k: (f"{v / 1e12:.3f} TFLOP" if is_count(v) else v) for k, v in R["flops"].items()}, flush=True)
    R["runs"] = {}
    if b.args.plan == "compile":
        compile_plan(b, models)
    else:
        standard_plan(b, models)
    summarize(b)


def summarize(b):
    from bench.floor import floors
    from bench.runs import median_time

    R, a = b.results, b.args
    runs = R.get("runs", {})
    env = R["env"]
    fl = R.get("flops")
    tf = (R.get("matmul_tflops") or {})
    rate = tf.get("float16") or tf.get("float32")
    windows = next((runs[k][0]["windows"] for k in ("b_md", "b_md_compiled", "c_sync") if runs.get(k)), None)
    floor = floors(fl, rate, windows, a.steps, a.sync_steps) if fl and rate and windows else {}
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
    b.save()
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
                                                "peak_alloc_gib", "peak_reserved_gib", "error")
                        if row.get(k) is not None})
    for row in R.get("attention_lever") or []:
        print("attention lever", {k: row.get(k) for k in ("avoid_efficient_attention", "loss_decoder", "sync_batch",
                                                             "median_ms", "first_s", "peak_alloc_gib")})
    for row in R.get("window_batch") or []:
        print("wb", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "notes"})
    for row in R.get("width") or []:
        print("width", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "notes"})
    if R.get("host_syncs"):
        print("host syncs", {k: v.get("total") for k, v in R["host_syncs"].items()})
    print("sections (s)", R["sections"], " total", round(b.elapsed()), "s")
    if R.get("skipped"):
        print("SKIPPED", R["skipped"])
    if R["errors"]:
        print("ERRORS", R["errors"])


if __name__ == "__main__":
    main()
