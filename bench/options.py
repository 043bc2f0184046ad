"""The benchmarks' shared command-line options, and ComfyUI's start-up for a bench process.

Plain Python: nothing here imports torch or ComfyUI at import time, so ``start_comfy`` can set ComfyUI's switches before
``comfy.model_management`` is imported (by ``bench.state`` and the modules after it).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def add_run_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of one pack run (canvas, schedule, batching) and of the bench process (device, output, budget)."""
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models, small canvas: checks the script")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="folder for the results file")
    p.add_argument("--budget-s", type=float, default=500.0, help="skip sections that would end after this")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sync-steps", type=int, default=10)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--stride", type=int, default=128, help="pixels")
    p.add_argument("--window-px", type=int, default=0, help="0 = the model's native window")
    p.add_argument("--window-batch", type=int, default=8)
    p.add_argument("--sync-batch", type=int, default=0, help="0 = the pack's default")
    p.add_argument("--loss-decoder", default="", help="empty: the pack's default")
    p.add_argument("--seed", type=int, default=0)
    return p


def apply_tiny(a: argparse.Namespace) -> argparse.Namespace:
    """``--tiny``: a canvas, schedule and budget small enough for the CPU (the options a parser lacks are skipped)."""
    if a.tiny:
        tiny = {"height": 32, "width": 128, "window_px": 32, "stride": 16, "widths": "96,160",
                "window_batches": "1,4", "steps": 3, "sync_steps": 2, "repeats": 1, "sweep_steps": 2,
                "budget_s": 1e9}
        for k, v in tiny.items():
            if hasattr(a, k):
                setattr(a, k, v)
    return a


def start_comfy(tiny: bool, base_dir: Path | str) -> None:
    """ComfyUI (``devtools.headless.bootstrap``) with its models folder under ``base_dir`` (where the bench writes
    its random trunk and TAESD files); with ``tiny`` on the CPU (``--cpu``, no CUDA device visible). Call before
    anything imports ``comfy.model_management``; the settings hold for the whole process, as ComfyUI's own flags do.
    ComfyUI's attention choice stays its own (as a user's ComfyUI picks it); log levels stay the caller's."""
    if tiny:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    from devtools import headless

    headless.bootstrap(base_dir, cpu=tiny, pytorch_attention=False, log_level=None)


def run_in_comfy(args: argparse.Namespace, prefix: str, modules: tuple[str, ...], run, **bench_kwargs) -> None:
    """A bench script's body: ComfyUI started (``start_comfy``) with a throw-away base folder named ``prefix...``,
    ``modules`` imported (they import ComfyUI and the pack), then ``run(b, models_dir)`` with a
    ``bench.state.Bench(args, **bench_kwargs)``, whose results are saved however ``run`` ends."""
    import importlib
    import logging
    import tempfile

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix=prefix) as base:
        start_comfy(args.tiny, base)
        for name in modules:
            importlib.import_module(name)
        from bench.state import Bench

        b = Bench(args, **bench_kwargs)
        try:
            run(b, Path(base) / "models")
        finally:
            b.save()

