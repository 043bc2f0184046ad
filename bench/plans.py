"""The plans: which runs, in which sections, in what order, within the budget.

``standard_plan`` (``--plan explore`` and ``final``): warm-up, the headline (b) and (c), the baseline (a), the
per-step profile, lever variants, the window_batch and width sweeps, host syncs. ``compile_plan`` (``--plan
compile``, with ``--lean`` :func:`lean_compile_plan`): the headline with compile off and on, and the baseline.
Every run's record lands in ``b.results``. Import after ``bench.options.start_comfy``.
"""
from __future__ import annotations

import statistics

import torch

from syncdiff_core.job import SYNC_BATCH_AUTO

from .runs import baseline_run, loss_decoder_grad, pack_run, per_step
from .state import Bench, now
from .timing import count_syncs, profiling

W = 20.0  # the synchronization weight of every sync run


def warm_estimates(b: Bench, models, baseline=False) -> dict | None:
    """Short warm-up runs (kernels, allocator, cuDNN heuristics) of the pack and, with ``baseline``, of (a): their
    step times, the estimates for the budget; None when the pack's warm-up failed."""
    ns = b.args.sweep_steps
    with b.section("warmup"):
        b.add_run("warm_pack_sync", pack_run(b, models, steps=ns, w=W, sync_steps=ns, label="warm"))
        b.add_run("warm_pack_plain", pack_run(b, models, steps=ns, label="warm"))
        if baseline:
            b.add_run("warm_base", baseline_run(b, models, steps=b.args.steps, w=W, max_steps=2, sync_steps=1,
                                                label="warm"))
    if not (b.runs("warm_pack_plain") and b.runs("warm_pack_sync")):
        print("warm-up failed: see the errors above", flush=True)
        return None
    est = {"pack_plain": per_step(b.runs("warm_pack_plain")[-1]) or 1.0,
           "pack_sync": per_step(b.runs("warm_pack_sync")[-1]) or 1.0}
    if baseline:
        base = b.runs("warm_base")
        est["base_sync"] = base[-1]["step_s"][0] if base else 5.0
        est["base_plain"] = base[-1]["step_s"][-1] if base else 2.0
    return est


def standard_plan(b: Bench, models):
    a, R = b.args, b.results
    ns, S, K = a.sweep_steps, a.steps, a.sync_steps
    est = warm_estimates(b, models, baseline=True)
    if est is None:
        return
    t_b = S * est["pack_plain"]
    t_c = K * est["pack_sync"] + (S - K) * est["pack_plain"]
    t_ab = S * est["base_plain"]
    t_ac = K * est["base_sync"] + (S - K) * est["base_plain"]
    R["estimates_s"] = {"b": t_b, "c": t_c, "a_md": t_ab, "a_sync": t_ac, **est}
    print("estimates", {k: round(v, 2) for k, v in R["estimates_s"].items()}, flush=True)

    with b.section("b_md"):
        for k in range(a.repeats):
            if b.allow("b repeat", t_b * 1.3):
                b.add_run("b_md", pack_run(b, models, label="b", empty=k == 0))
    with b.section("c_sync"):
        for k in range(a.repeats):
            if b.allow("c repeat", t_c * 1.3):
                b.add_run("c_sync", pack_run(b, models, w=W, label="c", empty=k == 0))
    with b.section("baseline"):
        for k in range(a.baseline_repeats):
            if b.allow("a md", t_ab * 1.2):
                b.add_run("a_md", baseline_run(b, models, label="a md"))
            if b.allow("a sync", t_ac * 1.2):
                b.add_run("a_sync", baseline_run(b, models, w=W, label="a sync"))

    with b.section("profile"):
        prof = R["profile"] = {}
        for name, fn in [
            ("pack_plain", lambda: pack_run(b, models, steps=ns, label="prof")),
            ("pack_sync", lambda: pack_run(b, models, steps=ns, w=W, sync_steps=ns, label="prof")),
            ("base_plain", lambda: baseline_run(b, models, steps=S, max_steps=ns, label="prof")),
            ("base_sync", lambda: baseline_run(b, models, steps=S, w=W, sync_steps=S, max_steps=ns, label="prof")),
        ]:
            with profiling(b, models) as p:
                rec = fn()
            n = rec["steps"] if name.startswith("pack") else len(rec["step_s"])
            split = p.split(rec["time_s"])
            prof[name] = {k: round(v / n, 4) for k, v in split.items()} | {
                "step_s": round(rec["time_s"] / n, 4), "raw": {k: round(v, 4) for k, v in p.t.items()}}
            print("profile", name, prof[name], flush=True)

    if a.plan == "explore":
        levers(b, models, est)
    window_batch_sweep(b, models, est)
    width_sweep(b, models, est)
    with b.section("syncs"):
        R["host_syncs"] = {
            "pack_plain_1step": count_syncs(b, lambda: pack_run(b, models, steps=1, label="syncs")),
            "pack_sync_1step": count_syncs(b, lambda: pack_run(b, models, steps=1, w=W, sync_steps=1, label="syncs")),
        }
        print("host syncs", R["host_syncs"], flush=True)
    if a.plan == "final":
        levers(b, models, est)


def levers(b: Bench, models, est):
    """Gradient-pass variants (sync_batch x loss decoder), then cudnn.benchmark and (explore) channels_last."""
    a, ns = b.args, b.args.sweep_steps
    with b.section("levers"):
        lev = b.results["levers"] = []
        if a.plan == "explore":
            variants = [(sb, "vae") for sb in (1, 2, 4, 8)] + [(sb, "vae_checkpointed") for sb in (2, 4, 8, 16)] \
                + [(4, "vae_half"), (8, "taesd"), (20, "taesd")]
            variants.append((4, "vae", "lpips_repeat"))  # the anchor's LPIPS features per window, as before
        else:
            variants = [(1, "vae"), (2, "vae"), (1, "vae_checkpointed"), (4, "vae_checkpointed"),
                        (2, "vae_half"), (2, "taesd")]
        if a.tiny:
            variants = [(2, "vae"), (4, "vae_checkpointed"), (4, "vae_half"), (4, "taesd")]
        for sb, dec, *flag in variants:
            if not b.allow(f"lever {sb} {dec}", ns * est["pack_sync"] * 3 + 5):
                continue
            try:
                plain_loss = (lambda x, y, _l=models.loss: _l(x, y)) if flag else None  # no .features
                rec = pack_run(b, models, steps=ns, w=W, sync_steps=ns, window_batch=max(8, sb), sync_batch=sb,
                               loss_decoder=dec, label=f"lever sb={sb} {dec} {flag}", loss=plain_loss)
                if flag:
                    rec["loss_decoder"] = f"{dec} {flag[0]}"
                rec["sync_step_s"] = per_step(rec)
            except Exception as e:  # noqa: BLE001
                rec = {"sync_batch": sb, "loss_decoder": dec, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                b.fresh_memory()
            lev.append(rec)
            print("lever", {k: rec.get(k) for k in ("sync_batch", "loss_decoder", "sync_step_s", "peak_alloc_gib",
                                                      "peak_reserved_gib", "notes", "error")}, flush=True)
            b.save()
        if b.cuda and b.allow("cudnn.benchmark", 2 * ns * (est["pack_sync"] + est["pack_plain"]) + 20):
            before = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True  # what ComfyUI's --fast autotune sets
            try:
                for tag, kw in (("plain", {}), ("sync", {"w": W, "sync_steps": ns + 1})):
                    rec = pack_run(b, models, steps=ns + 1, label=f"cudnn.benchmark {tag}", **kw)
                    rec["step_median_s"] = statistics.median(rec["step_s"][2:])  # 2 steps to autotune
                    lev.append(rec | {"loss_decoder": f"{rec['loss_decoder']} cudnn.benchmark {tag}"})
                    print("lever cudnn.benchmark", tag, rec["step_median_s"], rec["peak_alloc_gib"], flush=True)
            finally:
                torch.backends.cudnn.benchmark = before
                b.save()
        if b.cuda and a.plan == "explore" and b.allow("channels_last", 4 * ns * est["pack_sync"] + 10):
            unet, first = models.model.model.diffusion_model, models.vae.first_stage_model
            try:
                with torch.inference_mode():
                    unet.to(memory_format=torch.channels_last)
                    first.to(memory_format=torch.channels_last)
                for tag, kw in (("plain", {}), ("sync", {"w": W, "sync_steps": ns})):
                    rec = pack_run(b, models, steps=ns, label=f"channels_last {tag}", **kw)
                    rec["step_median_s"] = per_step(rec)
                    lev.append(rec | {"loss_decoder": f"channels_last {tag}"})
                    print("lever channels_last", tag, rec["step_median_s"], rec["peak_alloc_gib"], flush=True)
            finally:
                with torch.inference_mode():
                    unet.to(memory_format=torch.contiguous_format)
                    first.to(memory_format=torch.contiguous_format)
                b.save()


def window_batch_sweep(b: Bench, models, est):
    a, ns, S, K = b.args, b.args.sweep_steps, b.args.steps, b.args.sync_steps
    with b.section("window_batch"):
        wb_rows = b.results["window_batch"] = []
        for wb in [int(v) for v in a.window_batches.split(",") if v]:
            row = {"window_batch": wb}
            if b.allow(f"wb {wb} plain", ns * est["pack_plain"] * max(1, 8 / wb) + 3):
                rec = pack_run(b, models, steps=ns, window_batch=wb, label=f"wb {wb}")
                row.update(plain_step_s=per_step(rec), plain_peak_alloc_gib=rec["peak_alloc_gib"],
                           plain_peak_reserved_gib=rec["peak_reserved_gib"])
            eff = a.sync_batch or min(wb, SYNC_BATCH_AUTO)
            same = next((r for r in wb_rows if r.get("sync_batch") == eff and "sync_step_s" in r), None)
            if same is not None:  # the gradient pass is the same configuration as a row above
                row.update({k: same[k] for k in same if k.startswith("sync_")}, notes=["sync: same as above"])
            elif b.allow(f"wb {wb} sync", ns * est["pack_sync"] * max(1, 4 / wb) + 5):
                try:
                    rec = pack_run(b, models, steps=ns, w=W, sync_steps=ns, window_batch=wb, sync_batch=0,
                                   label=f"wb {wb} sync")
                    row.update(sync_batch=rec["sync_batch"], sync_step_s=per_step(rec),
                               sync_peak_alloc_gib=rec["peak_alloc_gib"],
                               sync_peak_reserved_gib=rec["peak_reserved_gib"], notes=rec["notes"])
                except Exception as e:  # noqa: BLE001
                    row["sync_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    b.fresh_memory()
            if row.get("plain_step_s") is not None and row.get("sync_step_s") is not None:
                row["est_b_s"] = S * row["plain_step_s"]
                row["est_c_s"] = K * row["sync_step_s"] + (S - K) * row["plain_step_s"]
            wb_rows.append(row)
            print("window_batch", row, flush=True)
            b.save()


def width_sweep(b: Bench, models, est):
    a, ns, S, K = b.args, b.args.sweep_steps, b.args.steps, b.args.sync_steps
    with b.section("width"):
        w_rows = b.results["width"] = []
        for width in [int(v) for v in a.widths.split(",")]:
            f = width / a.width
            row = {"width": width}
            if b.allow(f"width {width}", ns * (est["pack_plain"] + est["pack_sync"]) * f * 1.5 + 5):
                rec = pack_run(b, models, width=width, steps=ns, label=f"width {width}")
                row.update(windows=rec["windows"], plain_step_s=per_step(rec),
                           plain_peak_alloc_gib=rec["peak_alloc_gib"], plain_peak_reserved_gib=rec["peak_reserved_gib"])
                rec = pack_run(b, models, width=width, steps=ns, w=W, sync_steps=ns, label=f"width {width} sync")
                row.update(sync_step_s=per_step(rec), sync_peak_alloc_gib=rec["peak_alloc_gib"],
                           sync_peak_reserved_gib=rec["peak_reserved_gib"], notes=rec["notes"])
                row["est_b_s"] = S * row["plain_step_s"]
                row["est_c_s"] = K * row["sync_step_s"] + (S - K) * row["plain_step_s"]
            w_rows.append(row)
            print("width", row, flush=True)
            b.save()


def compile_plan(b: Bench, models):
    """Headline numbers with ``compile`` off (eager, the default) and on (torch.compile, inductor), and the
    baseline, in one run. Compiling happens in the warm-up runs (timed apart: what a user's first run costs)."""
    a, R = b.args, b.results
    ns, S, K = a.sweep_steps, a.steps, a.sync_steps
    C = "aot_eager" if a.tiny else "inductor"  # tiny: dynamo + AOTAutograd without inductor's compile time
    est = warm_estimates(b, models)
    if est is None:
        return
    if a.lean:
        return lean_compile_plan(b, models, C)
    with b.section("attention_lever"):  # the loss decoder's SDPA backends, eager, default settings
        rows = R["attention_lever"] = []
        for flag in (False, True):
            rec = loss_decoder_grad(b, models, avoid_efficient_attention=flag)
            rows.append(rec)
            print("lever", rec, flush=True)
            b.save()
    with b.section("compile_warmup"):  # every graph the headline runs need: plain batches, anchor, gradient
        t0 = now()
        b.add_run("warm_compiled_plain", pack_run(b, models, steps=ns, label="compile warm", compile=C))
        b.add_run("warm_compiled_sync", pack_run(b, models, steps=ns, w=W, sync_steps=ns, label="compile warm",
                                                 compile=C))
        R["compile_warmup_s"] = round(now() - t0, 1)
        b.add_run("warm_compiled_sync2", pack_run(b, models, steps=ns, w=W, sync_steps=ns, label="compiled short",
                                                  compile=C))
        b.add_run("warm_compiled_plain2", pack_run(b, models, steps=ns, label="compiled short", compile=C))
    cest = {"plain": per_step(b.runs("warm_compiled_plain2")[-1]) or 1.0,
            "sync": per_step(b.runs("warm_compiled_sync2")[-1]) or 1.0}
    t_b, t_c = S * cest["plain"], K * cest["sync"] + (S - K) * cest["plain"]
    with b.section("compiled_headline"):
        for k in range(a.repeats):
            if b.allow("compiled b", t_b * 1.3 + 2):
                b.add_run("b_md_compiled", pack_run(b, models, label="b compiled", empty=k == 0, compile=C))
            if b.allow("compiled c", t_c * 1.3 + 2):
                b.add_run("c_sync_compiled", pack_run(b, models, w=W, label="c compiled", empty=k == 0, compile=C))
    with b.section("baseline"):
        for k in range(a.baseline_repeats):
            if b.allow("a md", 50 * 0.9):
                b.add_run("a_md", baseline_run(b, models, label="a md"))
            if b.allow("a sync", 90):
                b.add_run("a_sync", baseline_run(b, models, w=W, label="a sync"))
    with b.section("eager_headline"):
        for k in range(max(1, a.repeats - 1)):
            if b.allow("b", S * est["pack_plain"] * 1.3 + 2):
                b.add_run("b_md", pack_run(b, models, label="b", empty=k == 0))
            if b.allow("c", (K * est["pack_sync"] + (S - K) * est["pack_plain"]) * 1.3 + 2):
                b.add_run("c_sync", pack_run(b, models, w=W, label="c", empty=k == 0))
    compiled_levers(b, models, C, ((2, "vae"), (3, "vae_checkpointed")))


def compiled_levers(b: Bench, models, C, variants):
    """Short compiled runs, every step synchronized, one per (sync_batch, loss_decoder): sync step time (the
    first step, which compiles, left out) and peak memory, appended to ``results["levers"]``."""
    ns = b.args.sweep_steps
    levers = b.results.setdefault("levers", [])
    with b.section("compiled_levers"):
        for sb, dec in variants:
            if not b.allow(f"compiled lever {sb} {dec}", 60):
                continue
            try:
                rec = pack_run(b, models, steps=ns + 1, w=W, sync_steps=ns + 1, sync_batch=sb, loss_decoder=dec,
                               label=f"compiled lever sb={sb} {dec}", compile=C)
                rec["sync_step_s"] = statistics.median(rec["step_s"][2:])  # the first step compiles
            except Exception as e:  # noqa: BLE001
                rec = {"sync_batch": sb, "loss_decoder": dec, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                b.fresh_memory()
            rec["loss_decoder"] = f"{dec} compiled"
            levers.append(rec)
            print("lever", rec.get("loss_decoder"), rec.get("sync_batch"), rec.get("sync_step_s"),
                  rec.get("peak_alloc_gib"), rec.get("error", ""), flush=True)
            b.save()


def lean_compile_plan(b: Bench, models, C):
    """Eager headline, baseline, then compiled: one full-length warm-up run per mode (compiles every graph
    for this schedule; its time is what a user's first run costs; the compile phases' times are recorded after the
    last) and ``--repeats`` timed runs. ``--sync-only``: only SyncDiffusion (its first compiled run then compiles
    the plain pass's graph too), no baseline."""
    a, R = b.args, b.results
    modes = (("c", "c_sync", W),) if a.sync_only else (("b", "b_md", 0.0), ("c", "c_sync", W))
    if not a.compile_only:
        with b.section("eager_headline"):
            for k in range(a.repeats):
                for label, key, w in modes:
                    b.add_run(key, pack_run(b, models, w=w, label=label, empty=k == 0))
        if not a.sync_only:
            with b.section("baseline"):
                for k in range(a.baseline_repeats):
                    b.add_run("a_md", baseline_run(b, models, label="a md"))
                    b.add_run("a_sync", baseline_run(b, models, w=W, label="a sync"))
    with b.section("compile_warmup"):
        for label, key, w in modes:
            b.add_run(f"warm_compiled_{label}", pack_run(b, models, w=w, label=f"{label} compiled, first run",
                                                         compile=C))
        R["compile_warmup_s"] = round(sum(b.runs(f"warm_compiled_{label}")[-1]["time_s"] for label, _, _ in modes), 1)
        R["compile_times"] = compile_phase_times()
        R["compiled_graphs"] = compiled_graph_count()
        print(R["compile_times"], "\ngraphs compiled:", R["compiled_graphs"], flush=True)
    with b.section("compiled_headline"):
        for k in range(a.repeats):
            for label, key, w in modes:
                b.add_run(f"{key}_compiled", pack_run(b, models, w=w, label=f"{label} compiled", empty=k == 0,
                                                      compile=C))
    if not (a.compile_only or a.sync_only):  # does a larger gradient batch fit 10 GiB, and pay?
        compiled_levers(b, models, C, ((3, "vae_checkpointed"), (4, "vae_checkpointed")))


def compiled_graph_count() -> int | None:
    """How many distinct graphs dynamo has compiled in this process (torch's own counter)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a private API
        return None


def compile_phase_times() -> str | None:
    """torch's own table of the process's compile phases (dynamo tracing, AOTAutograd, inductor), in seconds."""
    try:
        from torch._dynamo.utils import compile_times

        return compile_times(repr="str", aggregate=True)
    except Exception as e:  # noqa: BLE001 - a private API: its absence must not end the run
        return f"unavailable: {e}"
