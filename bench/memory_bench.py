"""Sync on the card you have: the memory plan on emulated cards of 8 to 32 GB and on the whole GPU.

Random weights of real sizes built on the GPU through ComfyUI's classes: SD 1.5 and SD 2.0-base (fp16, 512 px
windows), SDXL (fp16, 1024 px), Flux.1-dev and Qwen-Image (weights in float8_e4m3fn computed in bf16, as UNETLoader's
``weight_dtype`` fp8_e4m3fn), each with its real-width VAE, at the pack's defaults. A card is emulated by a hard cap on
this process's allocations (``torch.cuda.set_per_process_memory_fraction``) plus ComfyUI's reserve
(``EXTRA_RESERVED_VRAM``), every model unloaded before each card, so the loader and the pack's plan see its budget.

Per family: a warm-up on a two-window canvas, the whole GPU (the reference panorama), then each card: MultiDiffusion
and SyncDiffusion, time, peak memory, the plan logged, the relative difference to the whole GPU's panorama.
``--steps`` / ``--sync-steps`` shorten the schedule; whole-panorama times are then extrapolated per step.
``results.json`` in ``--out`` is rewritten after every run (a call stopped by its time limit keeps what it measured);
``--budget-s`` (the call) and ``--family-budget-s`` skip runs the whole GPU's time says would end after them.

    python -m bench.memory_bench --out OUT [--family sd2 --family sdxl] [--cards 8,12,16,24,32] [--tiny]

``--tiny``: the test suite's tiny models on the CPU, cards scaled to them (:data:`TINY_PER_GIB` bytes a GiB).
"""
import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30
#: Usable GiB of the usual cards (the driver and display keep the rest), by their nominal GB.
CARDS = {8: 7.5, 12: 11.2, 16: 14.9, 24: 22.4, 32: 29.8}
#: ``--tiny``: bytes of plan budget per GiB of an emulated card, beyond the plan's fixed share (tiny models are about
#: a thousandth of the real ones, so the cards still choose different plans).
TINY_PER_GIB = 2 ** 18
_SD = {"vae": "sd", "tokens": 77, "cfg": 7.5, "width": 3072, "height": 512, "steps": 50, "sync_steps": 10,
       "weights": "float16", "cards": (8, 12, 16, 24, 32)}
#: ``cls``/``unet``: the ``comfy.supported_models`` class and its config (``devtools.models``); ``weights``: the
#: storage dtype; ``ctx``/``pooled``/``guidance``: the conditioning; ``cards``: the default order (targets first);
#: ``tiny``: the ``devtools.families`` model of ``--tiny``.
FAMILIES = {
    "sd15": {**_SD, "cls": "SD15", "unet": "SD15_UNET", "ctx": 768, "tiny": "sd15"},
    "sd2": {**_SD, "cls": "SD20", "unet": "SD2_BASE_UNET", "ctx": 1024, "tiny": "sd20"},
    "sdxl": {**_SD, "cls": "SDXL", "unet": "SDXL_UNET", "ctx": 2048, "pooled": 1280, "width": 4096,
             "height": 1024, "steps": 30, "cards": (12, 16, 8, 24, 32), "tiny": "sdxl"},
    "flux-fp8": {"cls": "Flux", "unet": "FLUX_DEV", "weights": "float8_e4m3fn", "vae": "kl16", "tokens": 512,
                 "ctx": 4096, "pooled": 768, "guidance": 3.5, "cfg": 1.0, "width": 4096, "height": 1024, "steps": 20,
                 "sync_steps": 10, "cards": (24, 16, 32, 12, 8), "tiny": "flux"},
    "qwen-fp8": {"cls": "QwenImage", "unet": "QWEN_IMAGE", "weights": "float8_e4m3fn", "vae": "wan21-real",
                 "tokens": 128, "ctx": 3584, "cfg": 2.5, "width": 4096, "height": 1024, "steps": 20,
                 "sync_steps": 10, "cards": (24, 32, 16), "tiny": "qwen_image"},
}
MODES = (("MultiDiffusion", 0.0), ("SyncDiffusion", 20.0))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--family", action="append", choices=list(FAMILIES))
    p.add_argument("--cards", default="", help="nominal GB, comma-separated, in this order (default: the family's)")
    p.add_argument("--steps", default="", help="one number or NAME=N,...; 0 or unset: the family's whole schedule "
                                               "(50 SD, 30 SDXL, 20 Flux and Qwen-Image)")
    p.add_argument("--sync-steps", default="", help="one number or NAME=N,...; 0 or unset: the family's (10)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip runs that would start after this")
    p.add_argument("--family-budget-s", default="",
                   help="seconds per family, one number or NAME=S,... (skip that family's later runs)")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models: checks the script")
    return p.parse_args(argv)


def per_family(text: str, names: list[str], default: float) -> dict[str, float]:
    """``text`` (one number for every family, or ``NAME=N,...``; the rest get ``default``) by family name."""
    if not text:
        return dict.fromkeys(names, default)
    if "=" not in text:
        return dict.fromkeys(names, float(text))
    given = dict(item.split("=", 1) for item in text.split(",") if item)
    unknown = set(given) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; known: {list(FAMILIES)}")
    return {n: float(given[n]) if n in given else default for n in names}


def build(name: str, tiny: bool):
    """(model, vae, positive, negative) of ``name``: real size on the GPU, or the tiny family on the CPU (with the
    family's weight dtype)."""
    import torch

    from devtools import families as fm
    from devtools import models

    spec = FAMILIES[name]
    weights = getattr(torch, spec["weights"])
    if tiny:
        fam = fm.build(spec["tiny"])
        model = fam.model
        if weights.itemsize == 1:
            fs = fm.FAMILIES[spec["tiny"]]
            model = models.build_sized_model(fs.cls, fs.unet_config, weights, seed=fm.SEED, device="cpu")
        return model, fam.vae, fam.positive, fam.negative
    model = models.build_sized_model(spec["cls"], getattr(models, spec["unet"]), weights)
    vae = models.build_sd_vae(seed=1) if spec["vae"] == "sd" else fm.build_vae(spec["vae"])
    g = torch.Generator().manual_seed(2)

    def cond():
        extra = {"pooled_output": torch.randn(1, spec["pooled"], generator=g) if spec.get("pooled") else None}
        if "guidance" in spec:
            extra["guidance"] = spec["guidance"]
        return [[torch.randn(1, spec["tokens"], spec["ctx"], generator=g), extra]]

    return model, vae, cond(), cond()


class PlanLog(logging.Handler):
    """The pack's memory-plan and out-of-memory fallback log lines of one run."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.plans, self.fallbacks = [], []

    def emit(self, record):
        msg = record.getMessage()
        if "memory plan" in msg:
            self.plans.append(msg.split("memory plan: ", 1)[-1])
        elif "out of GPU memory" in msg:
            self.fallbacks.append(msg)


def one_run(pack, model, vae, pos, neg, latent, steps, sync_steps, w, cfg, **sizes) -> tuple[dict, object]:
    import torch

    from syncdiff_core.job import PanoramaJob
    from syncdiff_core.sync import SyncSettings

    job = PanoramaJob(seed=1, steps=steps, cfg=cfg, sync=SyncSettings(weight=w, steps=sync_steps), **sizes)
    cuda = torch.cuda.is_available()
    handler = PlanLog()
    logger = logging.getLogger("syncdiffusion")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out, error = None, None
    try:
        with torch.inference_mode():
            out = pack.sample_panorama(model, pos, neg, {"samples": latent.clone()}, job, vae=vae)["samples"]
        if cuda:
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - recorded: an out-of-memory or a refused plan is a result here
        error = f"{type(e).__name__}: {str(e)[:400]}"
    finally:
        logger.removeHandler(handler)
    rec = {"sync_steps": sync_steps if w else 0, "steps": steps, "seconds": round(time.perf_counter() - t0, 2),
           "plan": handler.plans, "fallbacks": handler.fallbacks, "error": error}
    if out is not None:
        rec["finite"] = bool(torch.isfinite(out).all())
        out = out.float().cpu()
    if cuda:
        rec["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        rec["resident_before_gib"] = round(base / GIB, 2)
    return rec, out


def emulate(card_gib: float | None, tiny: bool, pack) -> None:
    """Unload every model, then cap this process at ``card_gib`` (None: the whole GPU) and tell ComfyUI's reserve
    the same (``--tiny``: the plan's free-memory reading set to the scaled card)."""
    import torch

    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()
    if not hasattr(emulate, "reserve"):
        emulate.reserve = mm.EXTRA_RESERVED_VRAM
    if tiny:  # no GPU: the plan reads the card's budget directly
        free = float(GIB * 1024) if card_gib is None else pack.FIXED + card_gib * TINY_PER_GIB
        pack.free_memory = lambda device: free
        return
    total = torch.cuda.get_device_properties(0).total_memory
    cap = total if card_gib is None else card_gib * GIB
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    mm.EXTRA_RESERVED_VRAM = emulate.reserve + max(0, total - cap)


def load(model) -> dict:
    """The diffusion model loaded as ComfyUI's executor loads it on this card (fully, or partially); its time and
    how much of it is on the device."""
    import torch

    import comfy.model_management as mm

    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            mm.load_models_gpu([model])
    except Exception as e:  # noqa: BLE001 - recorded: the runs then say what happens
        return {"load_error": f"{type(e).__name__}: {str(e)[:300]}"}
    rec = {"load_s": round(time.perf_counter() - t0, 2)}
    if hasattr(model, "loaded_size") and hasattr(model, "model_size"):
        rec["weights_loaded_gib"] = round(model.loaded_size() / GIB, 2)
        rec["weights_gib"] = round(model.model_size() / GIB, 2)
    return rec


def extrapolate(md: dict, sync: dict, steps: int, sync_steps: int) -> None:
    """Whole-panorama seconds (``steps`` steps, ``sync_steps`` of them synchronized) from a shorter run of each mode
    on the same card: per plain step from MultiDiffusion, per sync step's extra from the difference."""
    if md.get("error") or (md["steps"] == steps and (not sync or sync["sync_steps"] == sync_steps)):
        return
    per_step = md["seconds"] / md["steps"]
    md["est_full_s"] = round(per_step * steps, 1)
    if sync and not sync.get("error") and sync["sync_steps"]:
        extra = (sync["seconds"] - per_step * sync["steps"]) / sync["sync_steps"]
        sync["est_full_s"] = round(per_step * steps + extra * sync_steps, 1)


def line(name: str, card, recs: dict) -> str:
    """One compact line per family and card."""
    parts = [f"{name:9} {str(card) + ' GB' if card else 'full GPU':8}"]
    for label, short in (("MultiDiffusion", "MD"), ("SyncDiffusion", "sync")):
        r = recs.get(label)
        if r is None:
            parts.append(f"{short} skipped")
            continue
        fits = "fits" if not r["error"] else ("NO PLAN" if "not enough GPU memory" in r["error"] else "FAILS")
        est = f" (whole {r['est_full_s']} s)" if "est_full_s" in r else ""
        peak = f" peak {r['peak_allocated_gib']} GiB" if "peak_allocated_gib" in r else ""
        rel = f" rel {r['rel_diff_to_full']:.1e}" if "rel_diff_to_full" in r else ""
        parts.append(f"{short} {fits} {r['seconds']} s{est}{peak}{rel}")
    plans = (recs.get("SyncDiffusion") or recs.get("MultiDiffusion") or {}).get("plan") or ["-"]
    return " | ".join(parts + [f"plan: {plans[0]}"])


def main(argv=None) -> int:
    opts = parse_args(argv)
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if opts.tiny:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    from devtools import headless

    base = tempfile.mkdtemp(prefix="memory-bench-")
    headless.bootstrap(base, cpu=opts.tiny, pytorch_attention=False, log_level=None)
    import torch

    import comfy.model_management as mm
    from devtools import models
    from syncdiff_core.comfy import families, memory_plan, sampling

    models.install_random_trunk(Path(base) / "models")
    start = time.perf_counter()
    commit = ROOT / "bench" / ".commit"
    cuda = torch.cuda.is_available()
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "total_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1) if cuda else None,
              "torch": torch.__version__, "commit": commit.read_text().strip() if commit.exists() else "",
              "date": time.strftime("%Y-%m-%d"), "cards_gib": CARDS,
              "argv": sys.argv[1:] if argv is None else argv, "families": {}}
    save = lambda: (out_dir / "results.json").write_text(json.dumps(report, indent=1))  # noqa: E731
    names = opts.family or list(FAMILIES)
    budgets = per_family(opts.family_budget_s, names, float("inf"))
    short_steps, short_sync = per_family(opts.steps, names, 0), per_family(opts.sync_steps, names, 0)
    for name in names:
        spec = FAMILIES[name]
        fam_start = time.perf_counter()
        fam = report["families"][name] = {"runs": []}
        if time.perf_counter() - start > opts.budget_s:
            fam["skipped_for_time"] = "all"
            save()
            continue
        emulate(None, opts.tiny, memory_plan)
        try:
            model, vae, pos, neg = build(name, opts.tiny)
        except Exception as e:  # noqa: BLE001 - recorded; the next family still runs
            fam["error"] = f"build: {type(e).__name__}: {str(e)[:400]}"
            print(name, fam["error"], flush=True)
            save()
            continue
        facts = families.facts(model, vae)
        scale = facts.pixel_scale
        h, w = (16, 48) if opts.tiny else (spec["height"], spec["width"])
        latent = torch.zeros(1, facts.latent_channels, h // scale, w // scale)
        if facts.latent_dims == 3:
            latent = latent.unsqueeze(2)
        full_steps = 2 if opts.tiny else spec["steps"]
        full_sync = 1 if opts.tiny else spec["sync_steps"]
        steps = min(int(short_steps[name]) or full_steps, full_steps)
        sync_steps = min(int(short_sync[name]) or full_sync, steps)
        sizes = {"window_px": 16, "stride_px": 8} if opts.tiny else {}
        dm = model.model.diffusion_model
        fam.update(canvas_px=[h, w], steps=steps, sync_steps=sync_steps, full_steps=full_steps,
                   full_sync_steps=full_sync, params=sum(p.numel() for p in dm.parameters()),
                   weight_dtype=str(next(dm.parameters()).dtype), compute_dtype=str(
                       getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()),
                   build_s=round(time.perf_counter() - fam_start, 1))
        print(f"== {name}: {fam['params'] / 1e9:.2f} B parameters ({fam['weight_dtype']}, computed in "
              f"{fam['compute_dtype']}), built in {fam['build_s']} s; {steps} steps, {sync_steps} synchronized",
              flush=True)
        # warm-up: two windows (kernels, LPIPS, the loss decoder), not timed
        win = (sizes["window_px"] // scale) if sizes else facts.native_latent
        stride = (sizes["stride_px"] if sizes else facts.default_stride_px) // scale
        fam["warmup"] = one_run(sampling, model, vae, pos, neg, latent[..., :win + stride].contiguous(), 2, 1, 20.0,
                                spec["cfg"], **sizes)[0]
        cards = [int(c) for c in opts.cards.split(",") if c] if opts.cards else list(spec["cards"])
        reference, seconds_full = {}, {}
        for card in [None] + cards:
            recs = {}
            card_label = card or "full"
            emulate(None if card is None else CARDS[card], opts.tiny, memory_plan)
            loaded = None
            for label, weight in MODES:
                # a card is at least as slow as the whole GPU: skip a run its budget cannot finish
                expect = seconds_full.get(label, 0.0)
                elapsed, fam_elapsed = time.perf_counter() - start, time.perf_counter() - fam_start
                if elapsed + expect > opts.budget_s or fam_elapsed + expect > budgets[name]:
                    fam.setdefault("skipped_for_time", []).append(f"{card_label} {label}")
                    continue
                first, loaded = loaded is None, loaded or load(model)
                rec, out = one_run(sampling, model, vae, pos, neg, latent, steps, sync_steps if weight else 0,
                                   weight, spec["cfg"], **sizes)
                rec.update(card_gb=card_label, mode=label, **(loaded if first else {}))
                if out is not None:
                    if card is None:
                        reference[label], seconds_full[label] = out, rec["seconds"]
                    elif label in reference:
                        ref = reference[label]
                        rec["rel_diff_to_full"] = float((out - ref).norm() / ref.norm())
                recs[label] = rec
                fam["runs"].append(rec)
                if "MultiDiffusion" in recs:
                    extrapolate(recs["MultiDiffusion"], recs.get("SyncDiffusion", {}), full_steps, full_sync)
                save()
            print(line(name, card, recs), flush=True)
        emulate(None, opts.tiny, memory_plan)
        fam["elapsed_s"] = round(time.perf_counter() - fam_start, 1)
        del model, vae
        mm.unload_all_models()
        mm.soft_empty_cache()
        save()
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
