"""The memory benchmark's ``--tiny`` check (CPU, tiny models, the fp8 families with fp8 weights) and its per-step
extrapolation of a shortened schedule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import memory_bench as mb

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_schedule_extrapolates_per_step():
    md = {"steps": 5, "sync_steps": 0, "seconds": 10.0, "error": None}
    sync = {"steps": 5, "sync_steps": 2, "seconds": 30.0, "error": None}
    mb.extrapolate(md, sync, 50, 10)
    assert md["est_full_s"] == 100.0  # 2 s a plain step
    assert sync["est_full_s"] == 200.0  # and 10 s more a sync step
    whole = {"steps": 50, "sync_steps": 0, "seconds": 10.0, "error": None}
    mb.extrapolate(whole, {"steps": 50, "sync_steps": 10, "seconds": 30.0, "error": None}, 50, 10)
    assert "est_full_s" not in whole  # measured, not estimated


@pytest.mark.slow
def test_tiny_run_of_the_new_families(tmp_path):
    """sd15, flux-fp8 and qwen-fp8 on the whole (emulated) GPU and the 8 GB card: every run fits, the card takes
    other levers than the whole GPU, and its plan gives the whole GPU's panorama."""
    names = ("sd15", "flux-fp8", "qwen-fp8")
    cmd = [sys.executable, "-m", "bench.memory_bench", "--tiny", "--out", str(tmp_path), "--cards", "8"]
    for name in names:
        cmd += ["--family", name]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["families"]) == list(names)
    for name in names:
        fam = report["families"][name]
        assert fam["weight_dtype"] == ("torch.float8_e4m3fn" if name.endswith("fp8") else "torch.float32")
        runs = {(r["card_gb"], r["mode"]): r for r in fam["runs"]}
        assert set(runs) == {(c, m) for c in ("full", 8) for m in ("MultiDiffusion", "SyncDiffusion")}
        assert all(r["error"] is None and r["finite"] and len(r["plan"]) == 1 for r in runs.values()), name
        assert "two stages" not in runs[("full", "SyncDiffusion")]["plan"][0]
        assert "gradient in two stages" in runs[(8, "SyncDiffusion")]["plan"][0]
        for mode in ("MultiDiffusion", "SyncDiffusion"):
            assert runs[(8, mode)]["rel_diff_to_full"] < 1e-3, (name, mode)
        assert f"{name:9} 8 GB" in done.stdout
