"""Offline benchmark of what synchronization buys: Intra-LPIPS and Intra-Style-L of panoramas made by the pack's
core loop (``syncdiff_core.sample``) with w = 0 (MultiDiffusion) and w > 0 (SyncDiffusion), over many seeds.

No trained model is needed: for data {y_k} (equal weights) under k-diffusion's variance-exploding noise
x = y + σ·ε the optimal x0 prediction is the posterior mean, a softmax of -||x - y_k||² / (2σ²) over the data:

    D(x, σ) = Σ_k softmax_k(-||x - y_k||² / (2σ²)) · y_k.

On crops of the photographs and textures scikit-image ships in its wheel this is a real (memorising) diffusion model,
in pixel space (the "latent" is the RGB image in [-1, 1], decode is the identity). Synchronization uses LPIPS on one
random-weight VGG16 trunk, the metrics other random weights (a VGG16 of another seed, a VGG19), so the measure is not
the loss optimised. Run: ``python -m bench.coherence`` (see ``--help``); docs/COHERENCE.md reports a run.
"""
import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from devtools.models import random_trunk_state_dict as random_trunk
from syncdiff_core import NO_SYNC, Anchor, BatchPolicy, Lanes, SyncSettings, plan_windows, sample
from syncdiff_core.batching import BatchSize
from syncdiff_core import perceptual
from syncdiff_core.sync import synchronize
from syncdiff_core.windows import crop

ROOT = Path(__file__).resolve().parents[1]


def vp_input_scale(sigma) -> float:
    """SD's variance-preserving model input scale 1/sqrt(1 + sigma^2) (from the sampler's x = x0 + sigma * eps)."""
    return 1.0 / math.sqrt(1.0 + float(sigma) ** 2)

#: scikit-image images that ship in the wheel (checked: they load with no network). Photos, then textures.
DEFAULT_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "brick", "grass", "gravel")

#: seeds of the random VGG trunks: one for synchronization, others for measuring.
SYNC_TRUNK_SEED, METRIC_VGG16_SEED, METRIC_VGG19_SEED = 0, 1, 2


# --------------------------------------------------------------------------------------- Data and the ideal denoiser

def load_crops(window: int = 32, short_side: int = 64, crop_stride: int = 4,
               names: tuple[str, ...] = DEFAULT_IMAGES) -> torch.Tensor:
    """Square ``window`` crops, every ``crop_stride`` px, of scikit-image's bundled images downscaled (with
    anti-aliasing) so that their shorter side is ``short_side`` px. Grey images become grey RGB.
    Returns (K, 3, window, window) float32 in [-1, 1]."""
    import skimage.data
    from skimage.transform import resize

    crops = []
    for name in names:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
        if img.max() > 1.0:
            img = img / 255.0
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = img[..., :3]
        h, w = img.shape[:2]
        scale = short_side / min(h, w)
        img = resize(img, (round(h * scale), round(w * scale)), anti_aliasing=True)
        t = torch.from_numpy(img).permute(2, 0, 1).float() * 2 - 1
        patches = t.unfold(1, window, crop_stride).unfold(2, window, crop_stride)  # 3, r, c, win, win
        crops.append(patches.permute(1, 2, 0, 3, 4).reshape(-1, 3, window, window))
    return torch.cat(crops).clamp(-1, 1).contiguous()


class IdealDenoiser:
    """The closed-form optimal x0 prediction for a finite data set under VE noise (module docstring).

    Called as the core loop's ``denoise(x, sigma, windows, step)``: ``x`` (B, C, h, w), ``sigma`` a scalar or
    one entry per row. Computed in float64 (log-sum-exp softmax), differentiable w.r.t. ``x``.
    """

    def __init__(self, data: torch.Tensor):
        self.shape = tuple(data.shape[1:])
        self.y = data.reshape(data.shape[0], -1).double()
        self.half_sq = 0.5 * (self.y**2).sum(dim=1)

    def posterior(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """p(k | x) for every row of x: (B, K)."""
        flat = x.reshape(x.shape[0], -1).double()
        s = torch.as_tensor(sigma, dtype=torch.float64, device=flat.device).reshape(-1, 1)
        # -||x - y||²/(2σ²) up to the per-row constant -||x||²/(2σ²), which the softmax ignores.
        logits = (flat @ self.y.T - self.half_sq) / s.clamp_min(1e-12) ** 2
        return torch.softmax(logits, dim=1)

    def __call__(self, x, sigma, windows=None, step=None) -> torch.Tensor:
        return (self.posterior(x, sigma) @ self.y).reshape(x.shape[0], *self.shape).to(x.dtype)


def ddim_sigmas(steps: int = 50) -> torch.Tensor:
    """DDIM's timesteps (diffusers, ``steps_offset=1``: 981, 961, ..., 1 for 50 steps) on SD's scaled-linear
    β schedule (0.00085 to 0.012, 1000 steps), as VE sigmas σ_t = sqrt((1 - ᾱ_t)/ᾱ_t), then a last step to
    σ = 0 so the result is a clean image. ``steps`` + 1 values."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    ratio = 1000 // steps
    timesteps = (torch.arange(steps) * ratio).flip(0) + 1
    sig = ((1 - alphas_cumprod[timesteps]) / alphas_cumprod[timesteps]).sqrt()
    return torch.cat([sig, sig.new_zeros(1)]).float()


def initial_noise(seeds, shape) -> torch.Tensor:
    """One unit-variance noise image per seed (each from its own generator, so a seed means the same in any
    batch): (len(seeds), *shape)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


# ----------------------------------------------------------------------------------------------------- The benchmark

@dataclass
class Setup:
    height: int = 32
    width: int = 128
    window: int = 32
    stride: int = 8
    steps: int = 50
    decay: float = 0.95


def generate(denoiser, seeds, setup: Setup, sync: SyncSettings, sync_loss) -> torch.Tensor:
    """Panoramas (len(seeds), 3, H, W) in [-1, 1] from the core loop; the anchor is the centre window."""
    plan = plan_windows(setup.height, setup.width, setup.window, setup.stride)
    sigmas = ddim_sigmas(setup.steps)
    x = initial_noise(seeds, (3, setup.height, setup.width)) * math.sqrt(1 + float(sigmas[0]) ** 2)
    out = sample(Lanes.single(denoiser, lambda x0: x0, sync_loss), x, sigmas, plan, sync=sync,
                 anchor=Anchor("center"), input_scale=vp_input_scale, batching=BatchPolicy(len(plan)))
    return out.clamp(-1, 1)


def measure(images: torch.Tensor, window: int, lpips_fn, style_fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intra-LPIPS (N,), Intra-Style-L (N,) and its per-layer terms (N, 5: relu1_1 ... relu5_1)."""
    with torch.no_grad():
        layers = perceptual.intra_style_l(images, window, style_fn, per_layer=True).numpy()
        return perceptual.intra_lpips(images, window, lpips_fn).numpy(), layers.sum(axis=1), layers


def step_size_report(denoiser, seeds, setup: Setup, weight: float, sync_loss, at_steps=(0, 4, 9, 19)) -> list[dict]:
    """What w means here: at a few steps of the MultiDiffusion trajectory, the RMS per pixel of the sync move
    of the windows' x (VE space), of the same move in the VP space the step is taken in, and of the change it
    causes in the windows' x0 prediction."""
    plan = plan_windows(setup.height, setup.width, setup.window, setup.stride)
    sigmas = ddim_sigmas(setup.steps)
    x = initial_noise(seeds, (3, setup.height, setup.width)) * math.sqrt(1 + float(sigmas[0]) ** 2)
    rows = []
    wanted = {s for s in at_steps if s < setup.steps}
    states = {0: x}

    def keep(i, xi, x0i):
        states[i + 1] = xi.clone()

    sample(Lanes.single(denoiser), x, sigmas, plan, batching=BatchPolicy(len(plan)), callback=keep)
    for i in sorted(wanted):
        xi, sigma = states[i], sigmas[i]
        w_i = weight * setup.decay**i
        views = [crop(xi, win) for win in plan]
        moved = synchronize(Lanes.single(denoiser, lambda x0: x0, sync_loss), views, sigma, i, plan,
                            anchor=Anchor("center"), weight=w_i, input_scale=vp_input_scale(sigma),
                            batches=[BatchSize(len(plan))])
        a = plan.center_index
        dx = torch.cat([moved[j] - views[j] for j in range(len(plan)) if j != a])
        before = torch.cat([views[j] for j in range(len(plan)) if j != a])
        sig = sigma.reshape(1).expand(dx.shape[0])
        with torch.no_grad():
            dx0 = denoiser(before + dx, sig) - denoiser(before, sig)
        rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
        rows.append({"step": i, "sigma": float(sigma), "w_i": w_i, "rms_dx_ve": rms(dx),
                     "rms_dx_vp": rms(dx) * vp_input_scale(sigma), "rms_x_ve": rms(before),
                     "rms_dx0": rms(dx0)})
    return rows


def run_benchmark(seeds, sync_steps_list=(5, 10, 20, 50), weight: float = 20.0, setup: Setup = Setup(),
                  data: torch.Tensor | None = None, log=print) -> dict:
    """Generate with w = 0 and with w = ``weight`` at each of ``sync_steps_list``; measure every panorama."""
    data = load_crops(setup.window) if data is None else data
    denoiser = IdealDenoiser(data)
    sync_loss = perceptual.build_lpips(random_trunk("vgg16", SYNC_TRUNK_SEED), "cpu", "random vgg16 seed 0")
    metric_lpips = perceptual.build_lpips(random_trunk("vgg16", METRIC_VGG16_SEED), "cpu", "random vgg16 seed 1")
    metric_style = perceptual.build_style_features(random_trunk("vgg19", METRIC_VGG19_SEED), "cpu",
                                                   "random vgg19 seed 2")
    settings = [("MultiDiffusion (w = 0)", NO_SYNC)]
    for k in sync_steps_list:
        k = min(k, setup.steps)
        settings.append((f"SyncDiffusion (w = {weight:g}, sync_steps = {k})",
                         SyncSettings(weight=weight, steps=k, decay=setup.decay)))
    results = {"seeds": list(map(int, seeds)), "setup": setup.__dict__, "data_crops": int(data.shape[0]),
               "weight": weight, "settings": [], "images": {}}
    for label, sync in settings:
        t = time.perf_counter()
        images = generate(denoiser, seeds, setup, sync, sync_loss)
        lp, st, layers = measure(images, setup.window, metric_lpips, metric_style)
        elapsed = time.perf_counter() - t
        results["settings"].append({"label": label, "weight": sync.weight, "sync_steps": sync.steps,
                                    "intra_lpips": lp.tolist(), "intra_style_l": st.tolist(),
                                    "intra_style_l_layers": layers.tolist(), "seconds": elapsed})
        colour, contrast = crop_spreads(images, setup.window)
        results["settings"][-1].update(colour_spread=colour.tolist(), contrast_spread=contrast.tolist())
        results["images"][label] = images
        log(f"{label}: Intra-LPIPS {lp.mean():.4f} ± {lp.std(ddof=1) if len(lp) > 1 else 0:.4f}, "
            f"Intra-Style-L {st.mean():.4g} ± {st.std(ddof=1) if len(st) > 1 else 0:.3g} ({elapsed:.0f} s)")
    return results


def markdown_table(results: dict) -> str:
    base = results["settings"][0]
    b_lp, b_st = np.array(base["intra_lpips"]), np.array(base["intra_style_l"])
    n = len(b_lp)
    lines = [
        "| setting | Intra-LPIPS ↓ (mean ± std) | Intra-Style-L ↓ (mean ± std) | Δ LPIPS vs w=0 (paired mean ± s.e.) "
        "| seeds with lower LPIPS | Δ Style-L vs w=0 (paired mean ± s.e.) | seeds with lower Style-L |",
        "|---|---|---|---|---|---|---|",
    ]
    sd = lambda a: a.std(ddof=1) if len(a) > 1 else 0.0  # noqa: E731
    for s in results["settings"]:
        lp, st = np.array(s["intra_lpips"]), np.array(s["intra_style_l"])
        if s is base:
            d = "—", "—", "—", "—"
        else:
            dl, ds = lp - b_lp, st - b_st
            d = (f"{dl.mean():+.4f} ± {sd(dl) / math.sqrt(n):.4f}", f"{int((dl < 0).sum())}/{n}",
                 f"{ds.mean():+.3g} ± {sd(ds) / math.sqrt(n):.2g}", f"{int((ds < 0).sum())}/{n}")
        lines.append(f"| {s['label']} | {lp.mean():.4f} ± {sd(lp):.4f} | {st.mean():.4g} ± {sd(st):.3g} | "
                     f"{d[0]} | {d[1]} | {d[2]} | {d[3]} |")
    return "\n".join(lines)


def crop_spreads(images: torch.Tensor, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Per panorama, over all pairs of its non-overlapping crops: the mean squared difference of the crops'
    mean RGB, and of their RGB standard deviations (colour and contrast spread). Two (N,) arrays."""
    crops = perceptual.crop_grid(images.double(), window)  # N, M, 3, w, w
    mean, std = crops.mean(dim=(3, 4)), crops.std(dim=(3, 4), unbiased=False)  # N, M, 3
    m = crops.shape[1]
    ii, jj = zip(*[(i, j) for i in range(m) for j in range(i + 1, m)])
    spread = lambda t: ((t[:, list(ii)] - t[:, list(jj)]) ** 2).sum(-1).mean(-1).numpy()  # noqa: E731
    return spread(mean), spread(std)


def layer_table(results: dict) -> str:
    """Intra-Style-L's per-layer terms, mean over seeds, per setting."""
    names = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    lines = ["| setting | " + " | ".join(names) + " | colour spread | contrast spread | corr(Style-L, colour) "
             "| corr(Style-L, contrast) | corr(Style-L, Intra-LPIPS) |",
             "|---|" + "---|" * (len(names) + 5)]
    for s in results["settings"]:
        m = np.array(s["intra_style_l_layers"]).mean(axis=0)
        st, lp = np.array(s["intra_style_l"]), np.array(s["intra_lpips"])
        colour, contrast = np.array(s["colour_spread"]), np.array(s["contrast_spread"])
        corr = lambda a, b: float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 else float("nan")  # noqa: E731
        lines.append(f"| {s['label']} | " + " | ".join(f"{v:.3g}" for v in m) + f" | {colour.mean():.3f} | "
                     f"{contrast.mean():.3f} | {corr(st, colour):.2f} | {corr(st, contrast):.2f} | "
                     f"{corr(st, lp):.2f} |")
    return "\n".join(lines)


def save_strip(results: dict, path: Path, seeds_shown: int = 4, zoom: int = 3) -> None:
    """A PNG: for each of the first seeds, one panorama per setting (same seed, top to bottom), labelled."""
    from PIL import Image, ImageDraw

    labels = list(results["images"])
    imgs = results["images"]
    n, _, h, w = imgs[labels[0]].shape
    seeds_shown = min(seeds_shown, n)
    label_w, gap = 260, 10
    H = seeds_shown * (len(labels) * (h * zoom + 2) + gap)
    canvas = Image.new("RGB", (label_w + w * zoom, H), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for s in range(seeds_shown):
        for label in labels:
            arr = ((imgs[label][s].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
            tile = Image.fromarray(arr).resize((w * zoom, h * zoom), Image.NEAREST)
            canvas.paste(tile, (label_w, y))
            draw.text((4, y + h * zoom // 2 - 6), f"seed {results['seeds'][s]}: {label}", fill="black")
            y += h * zoom + 2
        y += gap
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def machine_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20, help="number of seeds (0 .. n-1)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--sync-steps", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--weight", type=float, default=20.0, help="sync weight w")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNG strip and the JSON")
    p.add_argument("--save-images", action="store_true",
                   help="also write every panorama (uint8, N x H x W x 3 per setting) to coherence_panoramas.npz")
    p.add_argument("--no-scale-report", action="store_true", help="skip the report of what w means here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(steps=args.steps)
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    results = run_benchmark(seeds, args.sync_steps, args.weight, setup)
    scale = []
    if not args.no_scale_report:
        sync_loss = perceptual.build_lpips(random_trunk("vgg16", SYNC_TRUNK_SEED), "cpu")
        scale = step_size_report(IdealDenoiser(load_crops(setup.window)), seeds[:4], setup, args.weight, sync_loss)
    total = time.perf_counter() - t0
    save_strip(results, args.out / "coherence_examples.png")
    if args.save_images:
        np.savez_compressed(args.out / "coherence_panoramas.npz", **{
            f"setting{i}": ((img.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            for i, img in enumerate(results["images"].values())})
    record = {k: v for k, v in results.items() if k != "images"}
    record.update(step_scale=scale, total_seconds=total, date=time.strftime("%Y-%m-%d"),
                  machine=f"{machine_name()}, {torch.get_num_threads()} torch threads",
                  torch=torch.__version__, command="python -m bench.coherence " + " ".join(argv or sys.argv[1:]))
    (args.out / "coherence_results.json").write_text(json.dumps(record, indent=1))
    print()
    print(markdown_table(results))
    print()
    print(layer_table(results))
    if scale:
        print()
        print("| step | σ | w_i | RMS move of x (VE) | same in VP | RMS of x (VE) | RMS change of x0 |")
        print("|---|---|---|---|---|---|---|")
        for r in scale:
            print(f"| {r['step']} | {r['sigma']:.3f} | {r['w_i']:.2f} | {r['rms_dx_ve']:.3g} | {r['rms_dx_vp']:.3g} | "
                  f"{r['rms_x_ve']:.3g} | {r['rms_dx0']:.3g} |")
    print(f"\ntotal {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
