"""Coherence measured on the trained world: MultiDiffusion (sync_weight 0) against SyncDiffusion, per seed,
through the pack's SyncDiffusionSampler in a real headless ComfyUI graph.

    python -m miniworld.evaluate --seeds 100 --json bench/results/miniworld-coherence.json

Per panorama (decoded, 0..1):

* window agreement: the attribute classifier (trained on the world) labels each sampler window; the share of
  windows whose (time of day, season) equal the anchor's (the centre window, the sampler's default anchor);
* Intra-LPIPS and Intra-Style-L over the non-overlapping window-size crops (the pack's metric functions), with
  random VGG trunks of other seeds than the one synchronization uses;
* the LPIPS-trunk question, on the world's own scenes: how often two crops of one scene are closer than crops
  of two scenes (an AUC) under LPIPS with the random VGG16 trunk and under the distance of the features of the
  network trained on the world (the attribute classifier).

The default prompt is empty at cfg 1: the model's unconditional world, where nothing but synchronization
makes the windows agree on one scene.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miniworld import world  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METRIC_VGG16_SEED, METRIC_VGG19_SEED = 1, 2


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Coherence of MultiDiffusion vs SyncDiffusion on the trained world.")
    ap.add_argument("--seeds", type=int, default=100, help="panorama seeds 0..n-1")
    ap.add_argument("--weights", default="0,20", help="sync_weight values for every seed (0 = MultiDiffusion)")
    ap.add_argument("--sweep", default="", help="more sync_weight values, on --sweep-seeds seeds")
    ap.add_argument("--sweep-seeds", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sync-steps", type=int, default=5)
    ap.add_argument("--prompt", default="")
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--auc-scenes", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--gpu", action="store_true", help="run on the GPU (default: --cpu)")
    return ap.parse_args(argv)


def window_positions(width: int, window: int, stride: int) -> list[int]:
    return list(range(0, width - window + 1, stride))


def agreement(image: torch.Tensor, classifier, window: int, stride: int) -> dict:
    """Share of windows (anchor excluded) whose predicted attributes equal the centre window's."""
    xs = window_positions(image.shape[-1], window, stride)
    crops = torch.stack([image[:, :window, x:x + window] for x in xs])
    pred = classifier.predict(crops)
    a = len(xs) // 2
    others = [i for i in range(len(xs)) if i != a]
    same_t = (pred[others, 0] == pred[a, 0]).float()
    same_s = (pred[others, 1] == pred[a, 1]).float()
    return {"agree": float((same_t * same_s).mean()), "agree_time": float(same_t.mean()),
            "agree_season": float(same_s.mean()),
            "anchor": [world.TIMES[int(pred[a, 0])], world.SEASONS[int(pred[a, 1])]]}


def metric_networks():
    from miniworld.graph import random_trunk
    from syncdiff_core.perceptual import networks
    lp = networks.build_lpips(random_trunk("vgg16", METRIC_VGG16_SEED))
    st = networks.build_style_features(random_trunk("vgg19", METRIC_VGG19_SEED))
    return lp, st


def auc(same: torch.Tensor, diff: torch.Tensor) -> float:
    """P(d_same < d_diff) over all pairs (ties count half)."""
    s, d = same.view(-1, 1), diff.view(1, -1)
    return float(((s < d).float() + 0.5 * (s == d).float()).mean())


@torch.no_grad()
def trunk_auc(lpips, classifier, n_scenes: int, window: int) -> dict:
    """Same-scene vs different-scene crop distances on held-out scenes (seeds 900000+)."""
    scenes = [world.render(900_000 + i, width=512, height=window) for i in range(n_scenes)]
    a = torch.stack([s.image[:, :, :window] for s in scenes])
    b = torch.stack([s.image[:, :, 512 - window:] for s in scenes])  # the far end of the same scene
    c = b.roll(1, dims=0)                                              # the far end of another scene
    out = {}
    d_same = lpips(a * 2 - 1, b * 2 - 1).view(-1)
    d_diff = lpips(a * 2 - 1, c * 2 - 1).view(-1)
    out["lpips_random_vgg16"] = auc(d_same, d_diff)
    fa, fb, fc = (classifier.features(x) for x in (a, b, c))
    out["world_trained_features"] = auc((fa - fb).norm(dim=1), (fa - fc).norm(dim=1))
    return out


def main(argv=None) -> int:
    opts = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    from miniworld import graph, models
    rt = graph.start(cpu=not opts.gpu)
    classifier = models.load_classifier()
    lp, st = metric_networks()
    from syncdiff_core.perceptual import metrics

    weights = [float(w) for w in opts.weights.split(",") if w != ""]
    sweep = [float(w) for w in opts.sweep.split(",") if w != ""]
    jobs = [(s, w) for s in range(opts.seeds) for w in weights]
    jobs += [(s, w) for s in range(min(opts.sweep_seeds, opts.seeds)) for w in sweep if w not in weights]
    rows = []
    t0 = time.time()
    for i, (seed, w) in enumerate(jobs):
        t = time.time()
        img = graph.run_panorama(rt, positive=opts.prompt, negative="", width=opts.width, height=opts.height,
                                 seed=seed, steps=opts.steps, cfg=opts.cfg, window=opts.window,
                                 stride=opts.stride, sync_weight=w, sync_steps=opts.sync_steps,
                                 prefix=f"eval_{seed}_{w:g}")
        row = {"seed": seed, "sync_weight": w, **agreement(img, classifier, opts.window, opts.stride)}
        x = img[None] * 2 - 1
        with torch.no_grad():
            row["intra_lpips"] = float(metrics.intra_lpips(x, opts.window, lp)[0])
            row["intra_style_l"] = float(metrics.intra_style_l(x, opts.window, st)[0])
        row["seconds"] = round(time.time() - t, 2)
        rows.append(row)
        if opts.json:  # what is done so far survives a run cut short
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps({"partial": True, "rows": rows}, indent=1) + "\n")
        print(f"[{i + 1}/{len(jobs)}] seed {seed} w {w:g}: agree {row['agree']:.2f} "
              f"(time {row['agree_time']:.2f} season {row['agree_season']:.2f}) "
              f"intra-LPIPS {row['intra_lpips']:.3f} style {row['intra_style_l']:.4f}  {row['seconds']} s")

    summary = {}
    for w in sorted({r["sync_weight"] for r in rows}):
        rs = [r for r in rows if r["sync_weight"] == w]
        summary[f"{w:g}"] = {"n": len(rs), **{k: sum(r[k] for r in rs) / len(rs)
                                             for k in ("agree", "agree_time", "agree_season", "intra_lpips",
                                                       "intra_style_l")}}
    # paired difference on the seeds every weight ran
    base = {r["seed"]: r for r in rows if r["sync_weight"] == 0.0}
    for w, s in summary.items():
        pairs = [(r["agree"] - base[r["seed"]]["agree"]) for r in rows
                 if r["sync_weight"] == float(w) and r["seed"] in base]
        if pairs and float(w) != 0.0:
            t = torch.tensor(pairs)
            s["agree_gain_vs_md"] = float(t.mean())
            s["agree_gain_se"] = float(t.std() / len(t) ** 0.5) if len(t) > 1 else None
            s["seeds_better_same_worse"] = [int((t > 0).sum()), int((t == 0).sum()), int((t < 0).sum())]
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
              "trunk_auc": trunk_auc(lp, classifier, opts.auc_scenes, opts.window),
              "summary": summary, "rows": rows, "wall_s": round(time.time() - t0, 1),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    print(json.dumps({"trunk_auc": result["trunk_auc"], "summary": summary}, indent=1))
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
