"""Repeated runs through the real server (issue 15): consecutive SyncDiffusion panoramas (sync on, tiny checkpoint,
CPU) leave the server's resident memory (at most 5 % above), open files and threads where they were after run 10.

The issue asks for 100 runs; CI runs ``SYNCDIFF_REPEAT_RUNS`` (default 25) to stay within a few minutes on a shared
2-core machine. ``SYNCDIFF_REPEAT_RUNS=100`` runs the full count; ``SYNCDIFF_RELIABILITY_OUT=file.json`` writes
the per-run figures (docs/dev/reliability-record.md quotes them).
"""
import json
import os
import time

import pytest

from devtools import harness as h
from devtools.server import ONE_THREAD, process_stats, running, saved_files

RUNS = int(os.environ.get("SYNCDIFF_REPEAT_RUNS", "25"))
REFERENCE_RUN = 10  # the figures after this run are the baseline (first-run caches, allocator pools are warm)
RSS_TOLERANCE = 0.05
RUN_TIMEOUT_S = 120  # one run takes a few seconds; this only guards against a hang


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfy, tiny_sd15, lpips_trunk):
    yield from running(tmp_path_factory.mktemp("repeat_server"), comfy.models_dir, env=ONE_THREAD)


def panorama_prompt(ckpt_name: str, seed: int) -> dict:
    """Checkpoint -> prompts -> 128x64 px canvas -> SyncDiffusion (2 steps, the first synchronized; 360°: 2 windows,
    the seam one included) -> the pack's circular decode -> SavePanorama360. Only the seed changes between runs, so
    everything after the prompts runs again each time."""
    return h.panorama_prompt(ckpt_name, seed=seed, stride=64, wrap=True, decode=h.DECODE_360,
                             save=(h.SAVE_360[0], {**h.SAVE_360[1], "filename_prefix": "repeat/pano"}))


@pytest.mark.slow
def test_repeated_panoramas_leave_memory_files_and_threads_flat(server, tiny_sd15):
    assert RUNS > REFERENCE_RUN, "SYNCDIFF_REPEAT_RUNS must be above 10"
    workflow = {"extra_pnginfo": {"workflow": {"note": "repeated runs"}}}
    start = process_stats(server.proc.pid)
    runs, names = [], set()
    for i in range(RUNS):
        t0 = time.monotonic()
        entry = server.run(panorama_prompt(tiny_sd15.ckpt_name, seed=1000 + i), RUN_TIMEOUT_S, workflow)
        seconds = time.monotonic() - t0
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
        files = saved_files(server, entry)
        assert len(files) == 1 and files[0].is_file() and files[0].name not in names, files
        names.add(files[0].name)
        runs.append({"run": i + 1, "seconds": round(seconds, 2), **process_stats(server.proc.pid)})
    assert server.alive()
    assert len(list((server.output / "repeat").iterdir())) == RUNS  # every panorama kept, no temporary file left

    ref, last = runs[REFERENCE_RUN - 1], runs[-1]
    summary = {
        "runs": RUNS, "after_start": start, "after_run_10": ref, "after_last_run": last,
        "rss_change_vs_run_10": round(last["rss"] / ref["rss"] - 1, 4),
        "max_rss": max(r["rss"] for r in runs), "median_run_s": sorted(r["seconds"] for r in runs)[RUNS // 2],
        "per_run": runs,
    }
    if os.environ.get("SYNCDIFF_RELIABILITY_OUT"):
        with open(os.environ["SYNCDIFF_RELIABILITY_OUT"], "w") as f:
            json.dump(summary, f, indent=1)
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(f"\n{RUNS} runs, median {summary['median_run_s']} s: RSS after start {mib(start['rss'])}, after run 10 "
          f"{mib(ref['rss'])}, after run {RUNS} {mib(last['rss'])} ({summary['rss_change_vs_run_10']:+.2%}); "
          f"fds {start['fds']}/{ref['fds']}/{last['fds']}, "
          f"threads {start['threads']}/{ref['threads']}/{last['threads']}")
    # a leak grows; the allocator giving memory back (RSS below run 10's) is no failure
    assert last["rss"] <= (1 + RSS_TOLERANCE) * ref["rss"], summary
    assert last["fds"] <= ref["fds"], f"open files grew from {ref['fds']} to {last['fds']}"
    assert last["threads"] <= ref["threads"], f"threads grew from {ref['threads']} to {last['threads']}"
