"""Sync on the card you have: the memory plan on emulated cards of 8 to 32 GB and on the whole GPU.

Random weights of real sizes (SD 2.0-base 512 px windows, SDXL 1024 px windows; timing and memory do not depend on
weight values), the pack's defaults (``window_batch`` and ``sync_batch`` automatic). A card is emulated by a hard
cap on this process's allocations (``torch.cuda.set_per_process_memory_fraction``) together with ComfyUI's reserve
(``EXTRA_RESERVED_VRAM``, what ``--reserve-vram`` sets), so ComfyUI's loader and the pack's plan see the card's
budget. Per family: the whole GPU first (the reference panorama), then each card: MultiDiffusion and SyncDiffusion,
time, peak memory, the plan the pack logged, and the relative difference to the whole GPU's panorama.

    python -m bench.memory_bench --out OUT [--family sd2 --family sdxl] [--cards 8,12,16,24,32] [--tiny]
"""
import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Usable GiB of the usual cards (the driver and display keep the rest), by their nominal GB.
CARDS = {8: 7.5, 12: 11.2, 16: 14.9, 24: 22.4, 32: 29.8}
FAMILIES = {
    "sd2": {"width": 3072, "height": 512, "steps": 50, "sync_steps": 10, "cfg": 7.5},
    "sdxl": {"width": 4096, "height": 1024, "steps": 30, "sync_steps": 10, "cfg": 7.5},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--family", action="append", choices=list(FAMILIES))
    p.add_argument("--cards", default="8,12,16,24,32", help="nominal GB, comma-separated")
    p.add_argument("--steps", type=int, default=0, help="0: the family's (50 for SD 2, 30 for SDXL)")
    p.add_argument("--sync-steps", type=int, default=0, help="0: the family's (10)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip runs that would start after this")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models: checks the script")
    return p.parse_args(argv)


def build(name: str, tiny: bool):
    """(model, vae, positive, negative) of ``name`` at real size on the device (tiny: the test suite's models)."""
    import torch

    from devtools import models

    if tiny:
        from devtools import families as fm
        fam = fm.build("sdxl" if name == "sdxl" else "sd20")
        return fam.model, fam.vae, fam.positive, fam.negative
    if name == "sd2":
        model, vae = models.build_sd2_unet(torch.float16, seed=0), models.build_sd_vae(torch.float16, seed=1)
        g = torch.Generator().manual_seed(2)
        pos, neg = ([[torch.randn(1, 77, 1024, generator=g), {}]] for _ in range(2))
        return model, vae, pos, neg
    from bench import families_bench

    return families_bench.build(name, argparse.Namespace(tiny=False))


class PlanLog(logging.Handler):
    """The pack's memory-plan log lines of one run."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        if "memory plan" in record.getMessage():
            self.lines.append(record.getMessage().split("memory plan: ", 1)[-1])


def one_run(pack, model, vae, pos, neg, latent, spec, steps, sync_steps, w, cfg, **sizes) -> tuple[dict, object]:
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
        torch.cuda.empty_cache()
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
           "plan": handler.lines, "error": error}
    if cuda:
        rec["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
        rec["resident_before_gib"] = round(base / 2 ** 30, 2)
    return rec, out


def emulate(card_gib: float | None, tiny: bool, pack) -> None:
    """Cap this process at ``card_gib`` (None: the whole GPU) and tell ComfyUI's reserve the same."""
    import torch

    import comfy.model_management as mm

    if not hasattr(emulate, "reserve"):
        emulate.reserve = mm.EXTRA_RESERVED_VRAM
    if tiny:  # no GPU: the plan reads the card's budget directly
        pack.free_memory = (lambda d: float("inf")) if card_gib is None else (lambda d: card_gib * 2 ** 30 * 0.5)
        return
    total = torch.cuda.get_device_properties(0).total_memory
    cap = total if card_gib is None else card_gib * 2 ** 30
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    mm.EXTRA_RESERVED_VRAM = emulate.reserve + max(0, total - cap)


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

    from devtools import models
    from syncdiff_core.comfy import families, memory_plan, sampling

    models.install_random_trunk(Path(base) / "models")
    start = time.perf_counter()
    commit = ROOT / "bench" / ".commit"
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
              if torch.cuda.is_available() else None, "torch": torch.__version__,
              "commit": commit.read_text().strip() if commit.exists() else "", "date": time.strftime("%Y-%m-%d"),
              "cards_gib": CARDS, "families": {}}
    save = lambda: (out_dir / "memory_bench.json").write_text(json.dumps(report, indent=1))  # noqa: E731
    cards = [None] + [int(c) for c in opts.cards.split(",") if c]
    for name in opts.family or list(FAMILIES):
        spec = FAMILIES[name]
        emulate(None, opts.tiny, memory_plan)
        model, vae, pos, neg = build(name, opts.tiny)
        facts = families.facts(model, vae)
        h, w = (64, 256) if opts.tiny else (spec["height"], spec["width"])
        latent = torch.zeros(1, facts.latent_channels, h // facts.pixel_scale, w // facts.pixel_scale)
        steps = 3 if opts.tiny else (opts.steps or spec["steps"])
        sync_steps = 2 if opts.tiny else (opts.sync_steps or spec["sync_steps"])
        fam = report["families"][name] = {"canvas_px": [h, w], "steps": steps, "runs": []}
        sizes = {"window_px": 32, "stride_px": 16} if opts.tiny else {}
        one_run(sampling, model, vae, pos, neg, latent, spec, 2, 1, 20.0, spec["cfg"], **sizes)  # warm-up
        reference = {}
        for card in cards:
            if time.perf_counter() - start > opts.budget_s:
                fam["skipped_for_time"] = fam.get("skipped_for_time", []) + [card]
                continue
            card_gib = None if card is None else CARDS[card]
            emulate(card_gib, opts.tiny, memory_plan)
            for label, w_, k in (("MultiDiffusion", 0.0, 0), ("SyncDiffusion", 20.0, sync_steps)):
                rec, out = one_run(sampling, model, vae, pos, neg, latent, spec, steps, k, w_, spec["cfg"], **sizes)
                rec.update(card_gb=card or "full", mode=label)
                if out is not None:
                    if card is None:
                        reference[label] = out
                    elif label in reference:
                        ref = reference[label]
                        rec["rel_diff_to_full"] = float((out - ref).norm() / ref.norm())
                fam["runs"].append(rec)
                print(json.dumps(rec), flush=True)
                save()
        emulate(None, opts.tiny, memory_plan)
        del model, vae
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
