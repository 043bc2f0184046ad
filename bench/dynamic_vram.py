#!/usr/bin/env python3
"""The pack on the ComfyUI users run (issue 18): ComfyUI 0.3.75 against ComfyUI 0.33 with dynamic VRAM on (its default
on NVIDIA) and off (``--disable-dynamic-vram``), on the GPU.

One process per lane and mode (ComfyUI's arguments are per process), each running ComfyUI headless in-process
(``devtools/headless.py``: ComfyUI's own ``PromptExecutor``, as the server runs prompts). A random-weight
checkpoint of SD 2.0-base's size (UNet 865 M, the KL VAE; fp16) is written once and loaded by the graph's own
``CheckpointLoaderSimple``, as a user's would be (dynamic VRAM's non-dynamic delegate needs a core loader). Each
process runs the same synchronized panorama prompt twice (the second is the warm prompt that reloaded the model on
0.33 before the cached delegate) and reports:

- time of each prompt, peak memory (torch's allocator: allocated and reserved);
- the output latent (saved; the parent compares the lanes and modes);
- the loaded model left unchanged: every parameter and buffer's checksum, dtype, ``requires_grad`` and
  inference-ness before and after.

    python bench/dynamic_vram.py --out OUT --lane 0.3.75=.comfyui/ComfyUI --lane 0.33=/tmp/c033/ComfyUI-0.33.0
    python bench/dynamic_vram.py --tiny ...   # CPU, tiny models: checks the script

Results: ``dynamic_vram.json`` in ``--out`` and a table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODES = {"default": [], "no-dynamic": ["disable_dynamic_vram"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--lane", action="append", default=[], help="NAME=COMFYUI_PATH (repeatable)")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models: checks the script")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sync-steps", type=int, default=5)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # "lane:mode:comfyui path:checkpoint"
    opts = p.parse_args(argv)
    if opts.tiny:  # a check of the script: a few windows of 64 px and a short schedule
        opts.width, opts.height = min(opts.width, 256), min(opts.height, 64)
        opts.steps, opts.sync_steps = min(opts.steps, 3), min(opts.sync_steps, 1)
    return opts


# ----------------------------------------------------------------------------------------------------------------
# Child: one lane, one mode

def _checksums(model) -> dict:
    import torch

    out = {}
    with torch.inference_mode(False), torch.no_grad():
        for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
            for name, t in items:
                out[f"{kind}:{name}"] = (float(t.detach().double().sum()), str(t.dtype), bool(t.requires_grad),
                                         bool(t.is_inference()))
    return out


def _start_dynamic_vram_like_main_py(args) -> str:
    """What ComfyUI 0.33's main.py does at start for dynamic VRAM (the headless harness skips main.py): initialise
    comfy-aimdo when the arguments enable dynamic VRAM. Returns "init", or why dynamic VRAM stays off."""
    try:
        from comfy.cli_args import enables_dynamic_vram
        import comfy_aimdo.control as control
    except ImportError as e:
        return f"not in this ComfyUI ({e})"
    if not enables_dynamic_vram():
        return "off by arguments"
    for kwargs in ({"simple_vram_headroom": None, "nvml_pressure": not getattr(args, "disable_nvml_pressure", False)},
                   {"simple_vram_headroom": None}, {}):
        try:
            control.init(**kwargs)
            return "init"
        except TypeError:
            continue
    return "comfy_aimdo.control.init failed"


def _enable_dynamic_vram_devices_like_main_py(args) -> str:
    """The rest of main.py's dynamic-VRAM start: the devices registered with comfy-aimdo, and ComfyUI's loaders
    making ``ModelPatcherDynamic`` (main.py rebinds ``CoreModelPatcher`` the same way)."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy_aimdo.control as control
    devices = mm.get_all_torch_devices()
    try:
        ok = control.init_devices((d.index, int(getattr(args, "vram_headroom", 0) * 1024 ** 3)) for d in devices)
    except TypeError:
        ok = control.init_devices(d.index for d in devices)
    if not ok:
        return "comfy-aimdo found no working device"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "enabled"


def child(opts) -> dict:
    lane, mode, comfy_path, ckpt = opts.child.split(":", 3)
    os.environ["COMFYUI_PATH"] = comfy_path
    from devtools import headless as ch

    base = Path(opts.out) / f"base-{lane}-{mode}"
    ch.bootstrap(base, cpu=opts.tiny)
    from comfy.cli_args import args

    found = {}
    for flag in MODES[mode]:
        found[flag] = hasattr(args, flag)
        if hasattr(args, flag):
            setattr(args, flag, True)
    aimdo = _start_dynamic_vram_like_main_py(args) if not opts.tiny else "cpu"
    rt = ch.start(base, cpu=opts.tiny)
    import torch
    if aimdo == "init":
        aimdo = _enable_dynamic_vram_devices_like_main_py(args)

    import comfy.model_management as mm
    ckpt_dir = rt.model_folder("checkpoints")
    link = ckpt_dir / Path(ckpt).name
    if not link.exists():
        link.symlink_to(Path(ckpt).resolve())
    from devtools import models
    models.install_random_trunk(rt.models_dir, "vgg16", seed=0)
    loader = rt.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]()
    with torch.inference_mode():
        model, _, vae = loader.load_checkpoint(link.name)[:3]
    g = torch.Generator().manual_seed(2)
    pos = [[torch.randn(1, 77, 1024, generator=g), {}]]
    neg = [[torch.randn(1, 77, 1024, generator=g), {}]]
    before = _checksums(model.model)
    from syncdiff_core.comfy.model import is_dynamic

    dynamic = is_dynamic(model)
    from devtools import harness as h
    window = 64 if opts.tiny else 512
    prompt = {
        "1": h.object_node(model, "MODEL"), "2": h.object_node(pos, "CONDITIONING"),
        "3": h.object_node(neg, "CONDITIONING"), "4": h.object_node(vae, "VAE"),
        "5": {"class_type": "PanoramaLatent", "inputs": {"width": opts.width, "height": opts.height, "batch_size": 1}},
        "6": {"class_type": "SyncDiffusionSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["4", 0], "latent_image": ["5", 0],
            "seed": 5, "steps": opts.steps, "cfg": 7.5, "window_size": window, "stride": window // 4,
            "sync_weight": 20.0, "sync_decay": 0.95, "sync_steps": opts.sync_steps, "sync_every": 1, "wrap": False,
            "window_batch": 8}},
    }
    runs, latents = [], []
    for k in range(2):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = rt.run_prompt(prompt)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30) \
            if torch.cuda.is_available() else (None, None)
        runs.append({"seconds": round(seconds, 3), "peak_allocated_gib": peak[0], "peak_reserved_gib": peak[1]})
        latent = result["6"][0]["samples"]
        latents.append(latent.float().cpu())
    torch.save(latent.cpu(), Path(opts.out) / f"latent-{lane}-{mode}.pt")
    after = _checksums(model.model)
    changed = [k for k in before if before[k] != after.get(k)]
    return {"lane": lane, "mode": mode, "flags_found": found, "aimdo": aimdo, "dynamic_patcher": dynamic,
            "device": str(mm.get_torch_device()), "torch": torch.__version__, "runs": runs,
            "model_unchanged": not changed and before.keys() == after.keys(), "changed": changed[:5],
            "latent_std": float(latent.float().std()), "finite": bool(torch.isfinite(latent).all()),
            # the same prompt twice in one process: the GPU's own run-to-run spread (the floor for the comparisons)
            "repeat_relative_difference": float((latents[1] - latents[0]).norm() / latents[0].norm())}


# ----------------------------------------------------------------------------------------------------------------
# Parent: the checkpoint, the children, the comparison

def write_checkpoint(opts, comfy_path: str, path: Path) -> None:
    """A random-weight SD2-base-size checkpoint, written by a process of the first lane (ComfyUI's own
    ``save_checkpoint``); with ``--tiny`` the test suite's tiny SD2 checkpoint (one-level UNet, TAESD)."""
    size = "tiny-sd20" if opts.tiny else "sd2-base"
    subprocess.run([sys.executable, "-m", "devtools.models", str(path), "--size", size], check=True, cwd=ROOT,
                   env={**os.environ, "COMFYUI_PATH": comfy_path})


def main(argv=None) -> int:
    opts = parse_args(argv)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if opts.child:
        result = child(opts)
        (out / f"child-{result['lane']}-{result['mode']}.json").write_text(json.dumps(result, indent=1))
        return 0
    lanes = [lane.split("=", 1) for lane in opts.lane] or [["0.3.75", str(ROOT / ".comfyui" / "ComfyUI")]]
    ckpt = out / "sd2-size-random.safetensors"
    if not ckpt.exists():
        write_checkpoint(opts, lanes[0][1], ckpt)
    report = {"args": vars(opts), "results": [], "errors": []}
    for lane, path in lanes:
        for mode in MODES:
            if mode != "default" and lane.startswith("0.3."):  # 0.3.x has no dynamic VRAM
                continue
            cmd = [sys.executable, "-m", "bench.dynamic_vram", "--child", f"{lane}:{mode}:{path}:{ckpt}", "--out", str(out),
                   "--width", str(opts.width), "--height", str(opts.height), "--steps", str(opts.steps),
                   "--sync-steps", str(opts.sync_steps)] + (["--tiny"] if opts.tiny else [])
            print("==", lane, mode, flush=True)
            done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            result_file = out / f"child-{lane}-{mode}.json"
            if done.returncode or not result_file.exists():
                report["errors"].append(f"{lane} {mode}: exit {done.returncode}")
                continue
            report["results"].append(json.loads(result_file.read_text()))
    import torch
    latents = {f"{r['lane']}/{r['mode']}": torch.load(out / f"latent-{r['lane']}-{r['mode']}.pt")
               for r in report["results"]}
    names = list(latents)
    report["differences"] = {f"{a} vs {b}": float((latents[a] - latents[b]).norm() / latents[b].norm())
                             for i, a in enumerate(names) for b in names[i + 1:]}
    (out / "dynamic_vram.json").write_text(json.dumps(report, indent=1))
    print("\nlane/mode            dynamic  cold s  warm s  peak alloc GiB  reserved GiB  model unchanged")
    for r in report["results"]:
        cold, warm = r["runs"]
        print(f"{r['lane'] + '/' + r['mode']:20} {str(r['dynamic_patcher']):8} {cold['seconds']:7.2f} "
              f"{warm['seconds']:7.2f} {warm['peak_allocated_gib'] or 0:14.2f} {warm['peak_reserved_gib'] or 0:13.2f}"
              f"  {r['model_unchanged']}")
    for k, v in report["differences"].items():
        print(f"relative difference {k}: {v:.2e}")
    for r in report["results"]:
        print(f"same prompt twice, {r['lane']}/{r['mode']}: {r['repeat_relative_difference']:.2e}")
    for e in report["errors"]:
        print("ERROR", e)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
