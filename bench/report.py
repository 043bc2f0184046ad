#!/usr/bin/env python3
"""Markdown tables from gpu_bench.py's results.json (for docs/dev/performance-history.md).

    python bench/report.py results.json [more.json ...]
"""
from __future__ import annotations

import json
import statistics
import sys

TARGETS = {"b_md": 4.0, "c_sync": 10.0}  # seconds, eager: issue 16 (one H200; issue 6 had 7 and 12 on one H100)
MEMORY_TARGET_GIB = 10.0


def fmt(v, d=2):
    return "-" if v is None else (f"{v:.{d}f}" if isinstance(v, (int, float)) else str(v))


def report(r: dict) -> str:
    env, runs = r["env"], r.get("runs", {})
    out = [f"### {env['device']}, {env['date_utc']} UTC, commit `{env['commit']}`, torch {env['torch']}", ""]
    tf = r.get("matmul_tflops", {})
    fl = r.get("flops", {})
    floor = r.get("floor_s", {})
    out.append(f"Measured matmul throughput (8192³): {', '.join(f'{k} {v} TFLOP/s' for k, v in tf.items())}.")
    if fl:
        out.append(
            f"FLOPs (FlopCounterMode): UNet with CFG (2 rows) per window {fl['unet_cfg_fwd'] / 1e12:.3f} TFLOP forward, "
            f"{fl['unet_cfg_fwd_bwd'] / 1e12:.3f} TFLOP forward+backward; VAE decoder {fl['vae_fwd'] / 1e12:.3f} / "
            f"{fl['vae_fwd_bwd'] / 1e12:.3f} TFLOP; LPIPS forward+backward {fl['lpips_fwd_bwd'] / 1e12:.3f} TFLOP.")
    if floor:
        out.append(f"Floor at the measured fp16 rate: (b) UNet only {floor['b_unet']:.2f} s; (c) UNet only "
                   f"{floor['c_unet']:.2f} s, UNet+VAE+LPIPS {floor['c_all']:.2f} s.")
    out += ["", "| mode | median s | timed runs | peak allocated GiB | peak reserved GiB | target | x floor | "
                "speed-up vs (a) |", "|---|---|---|---|---|---|---|---|"]
    med = {k: statistics.median(x["time_s"] for x in v) for k, v in runs.items() if v and not k.startswith("warm")}
    names = {"a_md": "(a) baseline, w = 0", "a_sync": "(a) baseline, 10 sync steps",
             "b_md": "(b) pack, w = 0 (MultiDiffusion)", "c_sync": "(c) pack, 10 sync steps (w = 20)"}
    base = {"b_md": "a_md", "c_sync": "a_sync"}
    fkey = {"a_md": "b_unet", "b_md": "b_unet", "a_sync": "c_all", "c_sync": "c_all"}
    for k, name in names.items():
        if k not in med:
            out.append(f"| {name} | not run | | | | | | |")
            continue
        recs = runs[k]
        t = med[k]
        tgt = TARGETS.get(k)
        tgt_s = f"≤ {tgt:g} s: {'met' if t <= tgt else f'missed by {t - tgt:.1f} s ({t / tgt:.2f}x)'}" if tgt else ""
        sp = f"{med[base[k]] / t:.1f}x" if k in base and base[k] in med else ""
        fs = floor.get(fkey[k])
        out.append(f"| {name} | {t:.2f} | {len(recs)} | {max(x['peak_alloc_gib'] or 0 for x in recs):.2f} | "
                   f"{max(x['peak_reserved_gib'] or 0 for x in recs):.2f} | {tgt_s} | "
                   f"{fmt(t / fs, 1) + 'x' if fs else '-'} | {sp} |")
    prof = r.get("profile", {})
    if prof:
        out += ["", "Per step, ms (synchronized timers, separate profiling runs; `other` = wall − the three):", "",
                "| run | UNet | VAE | LPIPS | other | step |", "|---|---|---|---|---|---|"]
        for k, p in prof.items():
            out.append(f"| {k} | {p['unet'] * 1e3:.0f} | {p['vae'] * 1e3:.0f} | {p['lpips'] * 1e3:.0f} | "
                       f"{p['other'] * 1e3:.0f} | {p['step_s'] * 1e3:.0f} |")
    lev = r.get("levers") or []
    if lev:
        out += ["", "Gradient-pass variants (short runs, every step synchronized; median step):", "",
                "| sync_batch | loss decoder | sync step s | peak alloc GiB | peak reserved GiB | note |",
                "|---|---|---|---|---|---|"]
        for x in lev:
            step = x.get("sync_step_s") or x.get("step_median_s")
            note = x.get("error") or "; ".join(x.get("notes") or [])
            out.append(f"| {x.get('sync_batch')} | {x.get('loss_decoder')} | {fmt(step, 3)} | "
                       f"{fmt(x.get('peak_alloc_gib'))} | {fmt(x.get('peak_reserved_gib'))} | {note[:120]} |")
    al = r.get("attention_lever") or []
    if al:
        out += ["", "The loss decoder's gradient pass alone (decode + input gradient, eager; median of repeated calls), "
                "with and without PyTorch's memory-efficient SDPA kernel:", "",
                "| avoid memory-efficient SDPA | loss decoder | windows | median ms | peak alloc GiB |",
                "|---|---|---|---|---|"]
        for x in al:
            out.append(f"| {x.get('avoid_efficient_attention')} | {x.get('loss_decoder')} | {x.get('sync_batch')} | "
                       f"{fmt(x.get('median_ms'), 1)} | {fmt(x.get('peak_alloc_gib'))} |")
    wb = r.get("window_batch") or []
    if wb:
        out += ["", "window_batch (sync_batch at its default, min(window_batch, auto)); estimated 50-step totals "
                "= 50·plain step (b), 10·sync step + 40·plain step (c):", "",
                "| window_batch | plain step s | (b) est. s | peak GiB (b) | sync_batch | sync step s | (c) est. s | "
                "peak GiB (c) | note |", "|---|---|---|---|---|---|---|---|---|"]
        for x in wb:
            note = x.get("sync_error") or "; ".join(x.get("notes") or [])
            out.append(f"| {x['window_batch']} | {fmt(x.get('plain_step_s'), 3)} | {fmt(x.get('est_b_s'), 1)} | "
                       f"{fmt(x.get('plain_peak_alloc_gib'))} / {fmt(x.get('plain_peak_reserved_gib'))} | "
                       f"{fmt(x.get('sync_batch'))} | {fmt(x.get('sync_step_s'), 3)} | {fmt(x.get('est_c_s'), 1)} | "
                       f"{fmt(x.get('sync_peak_alloc_gib'))} / {fmt(x.get('sync_peak_reserved_gib'))} | {note[:100]} |")
    wd = r.get("width") or []
    if wd:
        out += ["", "Width (default settings; peak allocated / reserved GiB):", "",
                "| size | windows | plain step s | (b) est. s | peak GiB (b) | sync step s | (c) est. s | peak GiB (c) |",
                "|---|---|---|---|---|---|---|---|"]
        for x in wd:
            out.append(f"| 512×{x['width']} | {fmt(x.get('windows'))} | {fmt(x.get('plain_step_s'), 3)} | "
                       f"{fmt(x.get('est_b_s'), 1)} | {fmt(x.get('plain_peak_alloc_gib'))} / "
                       f"{fmt(x.get('plain_peak_reserved_gib'))} | {fmt(x.get('sync_step_s'), 3)} | "
                       f"{fmt(x.get('est_c_s'), 1)} | {fmt(x.get('sync_peak_alloc_gib'))} / "
                       f"{fmt(x.get('sync_peak_reserved_gib'))} |")
    hs = r.get("host_syncs")
    if hs:
        out += ["", "Host synchronizations in one step (torch.cuda.set_sync_debug_mode): "
                + "; ".join(f"{k}: {v.get('total')} ({', '.join(f'{a} ×{b}' for a, b in v.items() if a != 'total')})"
                            for k, v in hs.items())]
    if r.get("skipped"):
        out += ["", "Skipped for time: " + "; ".join(r["skipped"])]
    if r.get("errors"):
        out += ["", "Errors: " + "; ".join(r["errors"])]
    return "\n".join(out)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(report(json.load(open(path))))
        print()
