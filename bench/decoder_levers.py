#!/usr/bin/env python3
"""Exact levers of the checkpointed loss decoder (issue 16): wide GroupNorms through ``decoders.GroupNormStats``
against the native kernel, and ``plain_stages`` (the cheap low-resolution stages not checkpointed).

One device call, the SD 2.0-base-sized random-weight models of ``gpu_bench.py``:

1. ``group_norm``: each GroupNorm shape of the SD VAE decoder at 2 windows of 512 px, forward + input gradient,
   ``F.group_norm`` against ``GroupNormStats`` (median of CUDA-event timings; largest output and gradient
   differences);
2. ``decoder``: the pack's ``vae_checkpointed`` loss decoder at 2 windows, forward + input gradient, under each of
   :data:`SETTINGS` (median ms, peak memory, the gradients' relative differences to the native setting's and to a
   float32 decoder's);
3. ``pack``: short runs with every step synchronized under each setting, then (budget allowing) the headline
   50-step run with 10 sync steps under ``--full-settings``, round-robin.

Writes ``decoder_levers.json`` to ``--out``. ``--tiny`` checks the script on the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the bench's modules as bench.<name>
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.options import script_path_fix

    script_path_fix(Path(__file__).parent)

from bench.options import add_run_options, apply_tiny, run_in_comfy  # noqa: E402

#: (channels, pixels of a side) of the SD VAE decoder's GroupNorms for a 64 x 64 latent (the tiny: 8 x 8).
NORM_SHAPES = [(512, 64), (512, 128), (512, 256), (256, 256), (256, 512), (128, 512)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short-repeats", type=int, default=2, help="short runs per setting")
    p.add_argument("--full-repeats", type=int, default=2, help="headline runs per setting, budget allowing")
    p.add_argument("--decoder-only", action="store_true", help="the GroupNorm and decoder sections, no pack runs")
    p.add_argument("--full-settings", default="native,wide+plain2",
                   help="the settings (names of SETTINGS, comma-separated) of the headline runs")
    args = apply_tiny(add_run_options(p).parse_args(argv))
    unknown = set(args.full_settings.split(",")) - set(SETTINGS)
    if unknown:
        p.error(f"--full-settings: unknown {sorted(unknown)}; the settings are {', '.join(SETTINGS)}")
    return args


def relative(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def group_norms(b, dtype):
    import torch
    import torch.nn.functional as F

    from bench.timing import timed
    from syncdiff_core.decoders import GroupNormStats

    res = b.results["group_norm"] = []
    scale = 8 if b.args.tiny else 1
    for c, side in NORM_SHAPES:
        side //= scale
        x = torch.randn(2, c, side, side, device=b.device, dtype=dtype) * 2 + 0.5
        w = torch.randn(c, device=b.device, dtype=dtype)
        bias = torch.randn(c, device=b.device, dtype=dtype)
        g = torch.randn_like(x)

        def grad_of(norm):
            def run():
                u = x.detach().requires_grad_(True)
                y = norm(u)
                return y.detach(), torch.autograd.grad(y, u, g)[0]
            return run

        native = grad_of(lambda u: F.group_norm(u, 32, w, bias, 1e-6))
        stats = grad_of(lambda u: GroupNormStats.apply(u, 32, w, bias, 1e-6))
        (y0, d0), (y1, d1) = native(), stats()
        u = x.float().requires_grad_(True)  # the float32 reference: how far each half-precision path is from it
        y = F.group_norm(u, 32, w.float(), bias.float(), 1e-6)
        dy = torch.autograd.grad(y, u, g.float())[0]
        y = y.detach()
        row = {"shape": [2, c, side, side], "native_ms": timed(b, native, 20)["median_ms"],
               "stats_ms": timed(b, stats, 20)["median_ms"],
               "out_max_diff": float((y0.float() - y1.float()).abs().max()), "grad_rel_diff": relative(d1, d0),
               "native_vs_fp32": {"out_max": float((y0.float() - y).abs().max()), "grad_rel": relative(d0, dy)},
               "stats_vs_fp32": {"out_max": float((y1.float() - y).abs().max()), "grad_rel": relative(d1, dy)}}
        res.append(row)
        print("group_norm", row, flush=True)
        b.save()


#: The loss-decoder settings compared: name -> (wide GroupNorms, plain stages of the checkpointed walk). "native"
#: (native GroupNorms, every block checkpointed) was the default until 2026-12-06; "wide+plain2" is the default now.
SETTINGS = {"native": (False, 0), "wide": (True, 0), "plain2": (False, 2), "plain3": (False, 3),
            "plain4": (False, 4), "wide+plain2": (True, 2), "wide+plain3": (True, 3)}


def use(setting: str):
    """The loss decoder's module defaults set to ``setting``."""
    from syncdiff_core.comfy import loss_decoders

    loss_decoders.WIDE_GROUP_NORM, loss_decoders.PLAIN_STAGES = SETTINGS[setting]


def decoders(b, models):
    """The checkpointed loss decoder at 2 windows under each setting, round-robin (so drift hits all alike): median
    ms of forward + input gradient, peak memory; and each setting's gradients of two losses of the raw images
    (unclamped: random weights saturate the clamp) against the native setting's and a float32 decoder's."""
    import copy
    import functools

    import torch

    from bench.timing import timed
    from syncdiff_core.comfy.loss_decoders import decoder_for_gradients
    from syncdiff_core.comfy.model import gradient_section
    from syncdiff_core.decoders import checkpointed_decode, decoder_backends, decoder_input
    from syncdiff_core.weights import trainable_weights

    model, vae = models.model, models.vae
    first = vae.first_stage_model
    side = 8 if b.args.tiny else 64
    z = torch.randn(2, 4, side, side, device=b.device) * 0.8
    rows = b.results["decoder"] = {name: [] for name in SETTINGS}
    grads, images_seen = {}, {}
    g = None
    with trainable_weights(first), gradient_section():
        for name, (wide, plain) in [("fp32", (False, 0))] + list(SETTINGS.items()):
            backends = functools.partial(decoder_backends, True, wide)
            # "fp32": the native walk through a float32 copy of the decoder, the reference of every setting
            decoder = copy.deepcopy(first.decoder).float() if name == "fp32" else first.decoder
            grads[name] = []
            # two losses: a random linear one (its gradient sums cancelling terms: float16's rounding shows most)
            # and the images' mean square (its cotangent is the images themselves)
            for loss in ("linear", "square"):
                u = z.clone().requires_grad_(True)
                with backends():
                    h = decoder_input(first, u.to(vae.vae_dtype))
                    images = checkpointed_decode(decoder, h.float() if name == "fp32" else h,
                                                 lambda: (backends(), backends()), plain).float()
                if g is None:
                    g = torch.randn(images.shape, generator=torch.Generator().manual_seed(3)).to(images.device)
                value = (images * g).mean() if loss == "linear" else images.square().mean()
                grads[name].append(torch.autograd.grad(value, u)[0])
            images = images.detach()
            images_seen[name] = {"abs_max": float(images.abs().max()),
                                 "within_1": float((images.abs() <= 1).float().mean())}
            del images, decoder
        for _ in range(3):
            for name, (wide, plain) in SETTINGS.items():
                decode = decoder_for_gradients(vae, model, "vae_checkpointed", wide_norms=wide, plain_stages=plain)

                def run():
                    u = z.clone().requires_grad_(True)
                    return torch.autograd.grad(decode(u).square().mean(), u)[0]

                rows[name].append(timed(b, run, 5))
    summary = b.results["decoder_summary"] = {
        name: {"median_ms": statistics.median(r["median_ms"] for r in rows[name]),
               "peak_reserved_gib": max(r["peak_reserved_gib"] or 0 for r in rows[name]),
               "grad_rel_diff": relative(grads[name][0], grads["native"][0]),
               "grad_rel_vs_fp32": relative(grads[name][0], grads["fp32"][0]),
               "square_grad_rel_diff": relative(grads[name][1], grads["native"][1]),
               "square_grad_rel_vs_fp32": relative(grads[name][1], grads["fp32"][1]),
               "grad_finite": all(bool(torch.isfinite(t).all()) for t in grads[name]), "images": images_seen[name]}
        for name in SETTINGS}
    b.results["decoder_fp32_images"] = images_seen["fp32"]
    for name, row in summary.items():
        print("decoder", name, row, flush=True)
    b.save()


def pack(b, models):
    """Short runs (every step synchronized) under each setting, round-robin, the allocator emptied before each so
    that each peak is its own; then full runs of ``--full-settings``, round-robin. The pack's own defaults are put
    back afterwards, also when a run fails."""
    from syncdiff_core.comfy import loss_decoders

    defaults = loss_decoders.WIDE_GROUP_NORM, loss_decoders.PLAIN_STAGES
    try:
        pack_settings(b, models)
    finally:
        loss_decoders.WIDE_GROUP_NORM, loss_decoders.PLAIN_STAGES = defaults


def pack_settings(b, models):
    from bench.runs import median_time, pack_run, per_step

    a, res = b.args, b.results.setdefault("pack", {})
    ns = 2 if a.tiny else 4
    for _ in range(a.short_repeats):
        for name in SETTINGS:
            use(name)
            rec = pack_run(b, models, steps=ns, w=20.0, sync_steps=ns, label=f"short {name}")
            res.setdefault(f"short {name}", []).append(rec)
            print("pack", rec["label"], rec["step_s"], rec["peak_reserved_gib"], flush=True)
            b.save()
    short = {name: {"sync_step_s": statistics.median(per_step(r) for r in res[f"short {name}"]),
                    "peak_reserved_gib": max(r["peak_reserved_gib"] or 0 for r in res[f"short {name}"])}
             for name in SETTINGS}
    full = a.full_settings.split(",")
    est = short["native"]["sync_step_s"] * a.sync_steps + 0.15 * (a.steps - a.sync_steps)
    for _ in range(a.full_repeats):
        for name in full:
            if b.left() < est * 1.3 + 10:
                b.results["errors"].append(f"skipped full {name}: {b.left():.0f} s left, wanted {est * 1.3:.0f}")
                continue
            use(name)
            rec = pack_run(b, models, w=20.0, label=f"full {name}")
            res.setdefault(f"full {name}", []).append(rec)
            print("pack", rec["label"], rec["time_s"], rec["peak_reserved_gib"], flush=True)
            b.save()
    res["summary"] = {"short": short, "full_s": {n: median_time(res.get(f"full {n}", [])) for n in full}}
    print("pack summary", res["summary"], flush=True)


def main(argv=None):
    run_in_comfy(parse_args(argv), "syncdiff-decoder-levers-", ("bench.models", "bench.runs", "bench.timing"), run,
                 file_name="decoder_levers.json", results={"errors": []})


def run(b, models_dir: Path):
    from bench.models import build_models
    from bench.probe import guarded

    b.results["env"] = b.env()
    print(b.results["env"], flush=True)
    models = guarded(b, "build", lambda: build_models(b, models_dir))
    if models is None:
        return
    if b.args.tiny:  # the tiny decoder's groups are small: let them through GroupNormStats too
        import syncdiff_core.decoders

        syncdiff_core.decoders.WIDE_GROUP = 1 << 10
    b.results["env"]["vae_dtype"] = str(models.vae.vae_dtype)
    guarded(b, "group_norm", lambda: group_norms(b, models.vae.vae_dtype))
    guarded(b, "decoder", lambda: decoders(b, models))
    if not b.args.decoder_only:
        guarded(b, "pack", lambda: pack(b, models))
    print("errors", b.results["errors"], "seconds", b.results.get("seconds"), flush=True)


if __name__ == "__main__":
    main()
