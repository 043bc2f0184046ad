#!/usr/bin/env python3
"""Wide GroupNorms in the loss decoder: the native kernel against ``decoders.GroupNormStats`` (issue 16).

One device call, the SD 2.0-base-sized random-weight models of ``gpu_bench.py``:

1. ``group_norm``: each GroupNorm shape of the SD VAE decoder at 2 windows of 512 px, forward + input gradient,
   ``F.group_norm`` against ``GroupNormStats`` (median of CUDA-event timings; largest output and gradient
   differences);
2. ``decoder``: the pack's loss decoder (``vae_checkpointed``, ``vae``) at 2 windows, forward + input gradient, with
   ``wide_norms`` off and on (median ms, peak memory, the gradient's relative difference);
3. ``pack``: short runs with every step synchronized, then (budget allowing) the headline 50-step run with 10 sync
   steps, ``loss_decoders.WIDE_GROUP_NORM`` off and on, alternated.

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
    return apply_tiny(add_run_options(p).parse_args(argv))


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
        row = {"shape": [2, c, side, side], "native_ms": timed(b, native, 20)["median_ms"],
               "stats_ms": timed(b, stats, 20)["median_ms"],
               "out_max_diff": float((y0.float() - y1.float()).abs().max()), "grad_rel_diff": relative(d1, d0)}
        res.append(row)
        print("group_norm", row, flush=True)
        b.save()


def decoders(b, models):
    import torch

    from bench.timing import timed
    from syncdiff_core.comfy.loss_decoders import decoder_for_gradients
    from syncdiff_core.comfy.model import gradient_section
    from syncdiff_core.weights import trainable_weights

    model, vae = models.model, models.vae
    side = 8 if b.args.tiny else 64
    z = torch.randn(2, 4, side, side, device=b.device) * 0.8
    res = b.results["decoder"] = []
    with trainable_weights(vae.first_stage_model), gradient_section():
        for mode in ("vae_checkpointed", "vae"):
            grads = {}
            for wide in (False, True):
                decode = decoder_for_gradients(vae, model, mode, wide_norms=wide)

                def run():
                    u = z.clone().requires_grad_(True)
                    return torch.autograd.grad(decode(u).square().mean(), u)[0]

                r = timed(b, run, 10)
                grads[wide] = run()
                row = {"mode": mode, "wide_norms": wide, **r}
                res.append(row)
                print("decoder", row, flush=True)
            res[-1]["grad_rel_diff"] = relative(grads[True], grads[False])
            print("decoder", mode, "gradient relative difference", res[-1]["grad_rel_diff"], flush=True)
            b.save()


def pack(b, models):
    from bench.runs import median_time, pack_run, per_step
    from syncdiff_core.comfy import loss_decoders

    a, res = b.args, b.results.setdefault("pack", {})
    ns = 2 if a.tiny else 4
    for k in range(a.short_repeats):
        for wide in (False, True):
            loss_decoders.WIDE_GROUP_NORM = wide
            rec = pack_run(b, models, steps=ns, w=20.0, sync_steps=ns, label=f"short wide={wide}", empty=k == 0)
            res.setdefault(f"short_wide_{wide}", []).append(rec)
            print("pack", rec["label"], rec["step_s"], rec["peak_reserved_gib"], flush=True)
            b.save()
    est = max(per_step(r) or 1.0 for r in res["short_wide_False"]) * a.sync_steps + 0.15 * (a.steps - a.sync_steps)
    for k in range(a.full_repeats):
        for wide in (False, True):
            if b.left() < est * 1.3 + 10:
                b.results["errors"].append(f"skipped full wide={wide}: {b.left():.0f} s left, wanted {est * 1.3:.0f}")
                continue
            loss_decoders.WIDE_GROUP_NORM = wide
            rec = pack_run(b, models, w=20.0, label=f"full wide={wide}", empty=k == 0)
            res.setdefault(f"full_wide_{wide}", []).append(rec)
            print("pack", rec["label"], rec["time_s"], rec["peak_reserved_gib"], flush=True)
            b.save()
    loss_decoders.WIDE_GROUP_NORM = False
    res["summary"] = {
        **{f"sync_step_s_wide_{w}": statistics.median(per_step(r) for r in res[f"short_wide_{w}"])
           for w in (False, True)},
        **{f"full_s_wide_{w}": median_time(res.get(f"full_wide_{w}", [])) for w in (False, True)}}
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
    guarded(b, "pack", lambda: pack(b, models))
    print("errors", b.results["errors"], "seconds", b.results.get("seconds"), flush=True)


if __name__ == "__main__":
    main()
