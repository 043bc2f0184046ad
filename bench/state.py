"""The state of one bench process in one object: its options, the device, the clock, the budget and the results.

Import after ``bench.options.start_comfy`` (this imports ``comfy.model_management``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import time
import traceback
from pathlib import Path

import torch

import comfy.model_management as mm

from .options import ROOT


def gib(b):
    return b / 2**30


def now():
    return time.perf_counter()


def commit() -> str:
    """The commit under test: ``$BENCH_COMMIT``, else ``bench/.commit`` (written by run_on_device.sh's caller:
    .git may not travel to the device), else "unknown"."""
    commit_file = ROOT / "bench" / ".commit"
    return os.environ.get("BENCH_COMMIT") or (commit_file.read_text().strip() if commit_file.exists() else "unknown")


class Bench:
    """One bench run: ``args`` (the parsed options), the compute device, ``results`` (written to ``out/file_name``
    by :meth:`save`), and the clock the budget counts from. Every section, run and plan takes it as an argument."""

    def __init__(self, args: argparse.Namespace, file_name: str = "results.json", results: dict | None = None):
        self.args = args
        self.device = mm.get_torch_device()
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.t_start = time.monotonic()
        self.out_file = Path(args.out) / file_name
        self.results = {"sections": {}, "errors": []} if results is None else results

    # -- device and clock

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize()

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def fresh_memory(self, empty=True):
        gc.collect()
        if self.cuda:
            if empty:
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict:
        if not self.cuda:
            return {"peak_alloc_gib": None, "peak_reserved_gib": None}
        return {"peak_alloc_gib": round(gib(torch.cuda.max_memory_allocated()), 3),
                "peak_reserved_gib": round(gib(torch.cuda.max_memory_reserved()), 3)}

    def env(self) -> dict:
        return {
            "device": torch.cuda.get_device_name() if self.cuda else platform.processor() or "cpu",
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "commit": commit(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "args": vars(self.args), "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        }

    # -- geometry of the runs

    @property
    def window_latent(self) -> int:
        """The window side in latent px (the model's native 64 unless ``--window-px``)."""
        return 64 if not self.args.window_px else self.args.window_px // 8

    # -- results, budget, sections

    def save(self):
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        self.out_file.write_text(json.dumps(self.results, indent=1, default=str))

    def allow(self, name: str, estimate_s: float) -> bool:
        """Whether ``name`` (about ``estimate_s`` seconds) fits in the budget; a skip is printed and recorded."""
        left = self.left()
        if estimate_s > left:
            msg = f"skipped {name}: estimated {estimate_s:.0f} s, {left:.0f} s left"
            print(msg, flush=True)
            self.results.setdefault("skipped", []).append(msg)
            return False
        return True

    def add_run(self, key: str, rec: dict) -> dict:
        """Record one run under ``results["runs"][key]``, print it and save."""
        self.results.setdefault("runs", {}).setdefault(key, []).append(rec)
        extra = f" steps {[round(s, 3) for s in rec['step_s'][:4]]}" if rec.get("step_s") else ""
        print(f"{key}: {rec['time_s']:.3f} s, peak {rec['peak_alloc_gib']} / {rec['peak_reserved_gib']} GiB"
              f"{extra} {rec.get('notes') or ''}", flush=True)
        self.save()
        return rec

    def runs(self, key: str) -> list:
        return self.results.get("runs", {}).get(key) or []

    @contextlib.contextmanager
    def section(self, name: str):
        """A named part of the run: its seconds go to ``results["sections"]``; an exception is printed and recorded
        in ``results["errors"]`` and does not stop the sections after it."""
        t0 = self.elapsed()
        print(f"\n== {name} (t={t0:.0f} s)", flush=True)
        try:
            yield
        except Exception as e:  # noqa: BLE001 - a failing section must not lose the others
            if self.cuda and isinstance(e, torch.cuda.OutOfMemoryError):
                self.fresh_memory()
            msg = f"{name}: {type(e).__name__}: {e}"
            print("ERROR", msg, flush=True)
            traceback.print_exc()
            self.results["errors"].append(msg[:2000])
        finally:
            self.results["sections"][name] = round(self.elapsed() - t0, 1)
            self.save()
