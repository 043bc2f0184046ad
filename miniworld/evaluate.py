"""Coherence measured on the trained world: MultiDiffusion (sync_weight 0) against SyncDiffusion, per seed,
through the pack's SyncDiffusionSampler in a real headless ComfyUI graph, for the SD1.x UNet, the flow model, or
both on the same seeds.

    python -m miniworld.evaluate --seeds 100 --json bench/results/miniworld-coherence.json
    python -m miniworld.evaluate --model sd1,flow --seeds 100 --sweep 5,10,40,80 --sweep-seeds 16 --budget-s 300

Jobs run seed by seed (every model and weight of a seed before the next seed), so a run cut by ``--budget-s``
or killed keeps balanced results; the json (with its summary) is rewritten after every panorama.

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

The summary gives, per model and weight, the paired gain over MultiDiffusion on the same seeds (agreement, and
the relative drop of Intra-LPIPS), and for each model other than sd1 the weight at which its gains equal sd1's
at ``--match-weight`` (linear between the swept weights): the weight that gives that model SD1.x's effect.
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
    ap.add_argument("--model", default="sd1", help="sd1, flow, or both (sd1,flow): the world's denoisers")
    ap.add_argument("--assets", type=Path, default=None, help="weights folder (default: the committed assets)")
    ap.add_argument("--seeds", type=int, default=100, help="panorama seeds 0..n-1")
    ap.add_argument("--weights", default="0,20", help="sync_weight values for every seed (0 = MultiDiffusion)")
    ap.add_argument("--sweep", default="", help="more sync_weight values, on --sweep-seeds seeds")
    ap.add_argument("--sweep-seeds", type=int, default=8)
    ap.add_argument("--sweep-models", default="", help="models the sweep runs for (default: every --model)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sync-steps", type=int, default=5)
    ap.add_argument("--prompt", default="")
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--auc-scenes", type=int, default=40)
    ap.add_argument("--match-weight", type=float, default=20.0,
                    help="sd1's sync_weight whose effect the other models' matching weight is sought for")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no new panorama after this many seconds (0 = none); the summary covers what ran")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--gpu", action="store_true", help="run on the GPU (default: the CPU)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="same as --gpu for cuda")
    opts = ap.parse_args(argv)
    from miniworld.models import MODEL_FILES
    opts.models = [m.strip() for m in opts.model.split(",") if m.strip()]
    bad = [m for m in opts.models if m not in MODEL_FILES]
    if bad or not opts.models:
        ap.error(f"--model: unknown model(s) {bad} in {opts.model!r}; allowed: {', '.join(MODEL_FILES)}")
    opts.sweep_models = [m.strip() for m in opts.sweep_models.split(",") if m.strip()] or opts.models
    if any(m not in opts.models for m in opts.sweep_models):
        ap.error(f"--sweep-models {opts.sweep_models} must be among --model {opts.models}")
    try:
        opts.weight_list = [float(w) for w in opts.weights.split(",") if w.strip()]
        opts.sweep_list = [float(w) for w in opts.sweep.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--weights/--sweep must be comma-separated numbers, got {opts.weights!r} / {opts.sweep!r}")
    if any(w < 0 for w in opts.weight_list + opts.sweep_list):
        ap.error("--weights/--sweep: sync_weight values must be >= 0")
    if 0.0 not in opts.weight_list:
        ap.error("--weights must include 0 (MultiDiffusion), the baseline every gain is measured against")
    if opts.device:
        opts.gpu = opts.device == "cuda"
    return opts


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
def trunk_auc(lpips, classifier, n_scenes: int, window: int, device=None) -> dict:
    """Same-scene vs different-scene crop distances on held-out scenes (seeds 900000+)."""
    scenes = [world.render(900_000 + i, width=512, height=window) for i in range(n_scenes)]
    a = torch.stack([s.image[:, :, :window] for s in scenes]).to(device)
    b = torch.stack([s.image[:, :, 512 - window:] for s in scenes]).to(device)  # the far end of the same scene
    c = b.roll(1, dims=0)                                              # the far end of another scene
    out = {}
    d_same = lpips(a * 2 - 1, b * 2 - 1).view(-1)
    d_diff = lpips(a * 2 - 1, c * 2 - 1).view(-1)
    out["lpips_random_vgg16"] = auc(d_same, d_diff)
    fa, fb, fc = (classifier.features(x) for x in (a, b, c))
    out["world_trained_features"] = auc((fa - fb).norm(dim=1), (fa - fc).norm(dim=1))
    return out


def jobs_for(opts) -> list[tuple[int, str, float]]:
    """(seed, model, weight), seed by seed: every model's weights, plus the sweep on the first sweep seeds."""
    jobs = []
    for seed in range(opts.seeds):
        for m in opts.models:
            ws = list(opts.weight_list)
            if seed < opts.sweep_seeds and m in opts.sweep_models:
                ws += [w for w in opts.sweep_list if w not in ws]
            jobs += [(seed, m, w) for w in ws]
    return jobs


def crossing(curve: list[tuple[float, float]], target: float):
    """The weight where a gain curve [(weight, gain), ...] (weight 0 gain 0 included) first reaches ``target``,
    linear between points; None where it never does in the range."""
    pts = sorted(curve)
    for (w0, g0), (w1, g1) in zip(pts, pts[1:]):
        if (g0 - target) * (g1 - target) <= 0 and g0 != g1:
            return w0 + (target - g0) * (w1 - w0) / (g1 - g0)
    return None


def summarize(rows: list[dict], match_weight: float) -> dict:
    """Per model and weight: means, paired gains over the same model's MultiDiffusion on the same seeds; and the
    weight at which each other model matches sd1's gains at ``match_weight``."""
    out = {}
    for m in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == m]
        base = {r["seed"]: r for r in mrows if r["sync_weight"] == 0.0}
        summary = {}
        for w in sorted({r["sync_weight"] for r in mrows}):
            rs = [r for r in mrows if r["sync_weight"] == w]
            s = summary[f"{w:g}"] = {"n": len(rs), **{k: sum(r[k] for r in rs) / len(rs) for k in (
                "agree", "agree_time", "agree_season", "intra_lpips", "intra_style_l")}}
            paired = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
            if w == 0.0 or not paired:
                continue
            gain = torch.tensor([r["agree"] - b["agree"] for r, b in paired])
            drop = torch.tensor([(b["intra_lpips"] - r["intra_lpips"]) / max(b["intra_lpips"], 1e-8)
                                 for r, b in paired])
            se = (lambda t: float(t.std() / len(t) ** 0.5) if len(t) > 1 else None)
            s.update({"paired_seeds": len(paired), "agree_gain_vs_md": float(gain.mean()), "agree_gain_se": se(gain),
                      "seeds_better_same_worse": [int((gain > 0).sum()), int((gain == 0).sum()),
                                                  int((gain < 0).sum())],
                      "intra_lpips_drop_vs_md": float(drop.mean()), "intra_lpips_drop_se": se(drop)})
        out[m] = summary
    ref = out.get("sd1", {}).get(f"{match_weight:g}")
    if ref and "agree_gain_vs_md" in ref:
        matches = {}
        for m, summary in out.items():
            if m == "sd1":
                continue
            res = {"sd1_weight": match_weight}
            for key in ("agree_gain_vs_md", "intra_lpips_drop_vs_md"):
                curve = [(0.0, 0.0)] + [(float(w), s[key]) for w, s in summary.items() if key in s]
                w = crossing(curve, ref[key]) if len(curve) > 1 else None
                res[key] = {"sd1_value": ref[key], f"{m}_weight": w,
                            "swept": [c[0] for c in sorted(curve)],
                            **({} if w is not None or len(curve) < 2 else {"note": "not reached in the swept range"})}
            matches[m] = res
        out["matching_weight"] = matches
    return out


def main(argv=None) -> int:
    opts = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    from miniworld import graph, models
    # every weight file the run needs, checked before ComfyUI starts
    models.check_assets(opts.assets or models.ASSETS, ("classifier.safetensors", "vae.safetensors",
                                                       *(models.MODEL_FILES[m] for m in opts.models)))
    rt = graph.start(cpu=not opts.gpu, assets=opts.assets)
    device = torch.device("cuda" if opts.gpu else "cpu")
    classifier = models.load_classifier(opts.assets or models.ASSETS).to(device)
    lp, st = metric_networks()
    lp, st = lp.to(device), st.to(device)
    from syncdiff_core.perceptual import metrics

    jobs = jobs_for(opts)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}
    rows = []
    t0 = time.time()

    def write(final: bool, extra: dict | None = None):
        result = {"partial": not final, "settings": settings, **(extra or {}),
                  "summary": summarize(rows, opts.match_weight), "rows": rows, "wall_s": round(time.time() - t0, 1),
                  "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "device": torch.cuda.get_device_name(0) if opts.gpu else "cpu"}
        if opts.json:  # what is done so far survives a run cut short
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps(result, indent=1) + "\n")
        return result

    stopped = None
    for i, (seed, m, w) in enumerate(jobs):
        if opts.budget_s and time.time() - t0 > opts.budget_s:
            stopped = f"time budget of {opts.budget_s:g} s reached after {i} of {len(jobs)} panoramas"
            print(stopped)
            break
        t = time.time()
        img = graph.run_panorama(rt, positive=opts.prompt, negative="", width=opts.width, height=opts.height,
                                 seed=seed, steps=opts.steps, cfg=opts.cfg, window=opts.window,
                                 stride=opts.stride, sync_weight=w, sync_steps=opts.sync_steps,
                                 prefix=f"eval_{m}_{seed}_{w:g}", model=m).to(device)
        row = {"model": m, "seed": seed, "sync_weight": w, **agreement(img, classifier, opts.window, opts.stride)}
        x = img[None] * 2 - 1
        with torch.no_grad():
            row["intra_lpips"] = float(metrics.intra_lpips(x, opts.window, lp)[0])
            row["intra_style_l"] = float(metrics.intra_style_l(x, opts.window, st)[0])
        row["seconds"] = round(time.time() - t, 2)
        rows.append(row)
        write(False)
        print(f"[{i + 1}/{len(jobs)}] {m} seed {seed} w {w:g}: agree {row['agree']:.2f} "
              f"(time {row['agree_time']:.2f} season {row['agree_season']:.2f}) "
              f"intra-LPIPS {row['intra_lpips']:.3f} style {row['intra_style_l']:.4f}  {row['seconds']} s")

    extra = {"trunk_auc": trunk_auc(lp, classifier, opts.auc_scenes, opts.window, device)}
    if stopped:
        extra["stopped"] = stopped
    result = write(True, extra)
    print(json.dumps({"trunk_auc": result["trunk_auc"], "summary": result["summary"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
