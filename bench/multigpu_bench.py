#!/usr/bin/env python3
"""Windows across several GPUs through ComfyUI's own MultiGPU: one GPU against all of them, one process.

A random-weight checkpoint of SD 2.0-base's size (``python -m devtools.models``) loaded by ``CheckpointLoaderSimple``
(whose reload factory MultiGPU clones from), prepared as ComfyUI's MultiGPU CFG Split node prepares it
(``comfy.multigpu.create_multigpu_deepclones``). Both sample the same panorama (512 x 3072 px, 21 windows, 50 steps;
MultiDiffusion and 10 sync steps) through ``sample_panorama``: a warm-up, then ``--repeats`` timed runs. Reported:
median seconds, the speed-up (targets: >= 1.8x MultiDiffusion, >= 1.7x sync), every GPU's peak memory, the panoramas'
relative difference next to the same run twice on one GPU. Headless ComfyUI, so 0.33's dynamic VRAM stays off.

    python -m bench.multigpu_bench --comfyui /path/to/ComfyUI-0.33.0 --out OUT   # 2+ GPUs
    python -m bench.multigpu_bench --comfyui ... --tiny --out /tmp/mg            # CPU, a stand-in device cpu:1
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TARGETS = {0.0: 1.8, 20.0: 1.7}  # sync weight -> speed-up issue 17 asks for


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", required=True, help="a ComfyUI tree with comfy/multigpu.py (0.33 or later)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--gpus", type=int, default=0, help="max_gpus of the MultiGPU node (0: every GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sync-steps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models, a stand-in second device")
    opts = p.parse_args(argv)
    if opts.tiny:
        opts.width, opts.height, opts.steps, opts.sync_steps, opts.repeats = 384, 64, 3, 2, 1
    return opts


def prepare_multigpu(model, gpus: int, tiny: bool):
    """The model as ComfyUI's MultiGPU CFG Split node returns it. With ``--tiny`` ComfyUI's device list gets a
    stand-in second device (``cpu:1``: a distinct torch device whose tensors live on the CPU)."""
    import torch
    import comfy.model_management as mm
    import comfy.multigpu

    if tiny:
        mm.get_all_torch_devices = lambda exclude_current=False: [model.load_device, torch.device("cpu", 1)]
    count = gpus or len(mm.get_all_torch_devices())
    return comfy.multigpu.create_multigpu_deepclones(model, count, reuse_loaded=True)


def timed_run(sample, model, w: float, cuda: bool) -> dict:
    import torch

    devices = range(torch.cuda.device_count()) if cuda else []
    for d in devices:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
    t0 = time.perf_counter()
    out = sample(model, w)
    for d in devices:
        torch.cuda.synchronize(d)
    rec = {"seconds": round(time.perf_counter() - t0, 3), "finite": bool(torch.isfinite(out).all())}
    rec["peak_reserved_gib"] = [round(torch.cuda.max_memory_reserved(d) / 2**30, 2) for d in devices]
    return rec | {"latent": out.float().cpu()}


def main(argv=None) -> int:
    opts = parse_args(argv)
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["COMFYUI_PATH"] = opts.comfyui
    ckpt = out_dir / "sd2-size-random.safetensors"
    if not ckpt.exists():  # written by a process of its own: ComfyUI's settings hold for a whole process
        subprocess.run([sys.executable, "-m", "devtools.models", str(ckpt), "--size",
                        "tiny-sd20" if opts.tiny else "sd2-base"], check=True, cwd=ROOT)
    from devtools import headless as ch

    rt = ch.start(out_dir / "base", cpu=opts.tiny)
    import torch
    from devtools import models as tiny_models
    from syncdiff_core.comfy.sampling import sample_panorama
    from syncdiff_core.job import PanoramaJob
    from syncdiff_core.sync import Anchor, SyncSettings

    link = rt.model_folder("checkpoints") / ckpt.name
    if not link.exists():
        link.symlink_to(ckpt.resolve())
    tiny_models.install_random_trunk(rt.models_dir, "vgg16", seed=0)
    with torch.inference_mode():
        model, _, vae = rt.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(link.name)[:3]
    g = torch.Generator().manual_seed(2)
    pos, neg = [[torch.randn(1, 77, 1024, generator=g), {}]], [[torch.randn(1, 77, 1024, generator=g), {}]]
    window = 64 if opts.tiny else 512
    cuda = torch.cuda.is_available()

    def sample(m, w, steps=None):
        job = PanoramaJob(seed=5, steps=steps or opts.steps, cfg=7.5, window_px=window, stride_px=window // 4,
                          sync=SyncSettings(weight=w, decay=0.95, steps=opts.sync_steps), anchor=Anchor(),
                          window_batch=8)
        latent = {"samples": torch.zeros(1, 4, opts.height // 8, opts.width // 8)}
        with torch.inference_mode():
            return sample_panorama(m, pos, neg, latent, job, vae=vae)["samples"]

    multi = prepare_multigpu(model, opts.gpus, opts.tiny)
    devices = [str(model.load_device)] + [str(m.load_device) for m in multi.get_additional_models_with_key("multigpu")]
    report = {"args": {k: v for k, v in vars(opts).items()}, "devices": devices, "torch": torch.__version__,
              "cards": [torch.cuda.get_device_name(d) for d in range(torch.cuda.device_count())] if cuda else ["cpu"],
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "modes": {}}
    print("devices of the prepared model:", devices, flush=True)
    for w in (0.0, 20.0):
        for name, m in (("one", model), ("multi", multi)):
            sample(m, w, steps=2)  # warm-up: loads the clones, the VAE copies, LPIPS on each device
            runs = [timed_run(sample, m, w, cuda) for _ in range(opts.repeats + (1 if name == "one" else 0))]
            report["modes"][f"{name} w={w:g}"] = runs
            print(name, f"w={w:g}", [r["seconds"] for r in runs], [r["peak_reserved_gib"] for r in runs][-1],
                  flush=True)
    summary = {}
    for w in (0.0, 20.0):
        one, multi_runs = report["modes"][f"one w={w:g}"], report["modes"][f"multi w={w:g}"]
        t1 = statistics.median(r["seconds"] for r in one[:opts.repeats])
        tn = statistics.median(r["seconds"] for r in multi_runs)
        base = one[0]["latent"]
        summary[f"w={w:g}"] = {
            "one_gpu_s": t1, "all_gpus_s": tn, "speedup": round(t1 / tn, 2), "target": TARGETS[w],
            "relative_difference": float((multi_runs[0]["latent"] - base).norm() / base.norm()),
            "same_run_twice_one_gpu": float((one[-1]["latent"] - base).norm() / base.norm()),
            "finite": all(r["finite"] for r in one + multi_runs)}
    for runs in report["modes"].values():
        for r in runs:
            r.pop("latent")
    report["summary"] = summary
    (out_dir / "multigpu.json").write_text(json.dumps(report, indent=1))
    print(f"\n{report['date_utc']} UTC  {', '.join(report['cards'])}  devices {devices}  torch {report['torch']}")
    print("mode   1 GPU s   all s  speed-up  target  rel. diff  same run twice")
    for k, v in summary.items():
        print(f"{k:6} {v['one_gpu_s']:8.2f} {v['all_gpus_s']:7.2f} {v['speedup']:8.2f}x {v['target']:6.1f}x "
              f"{v['relative_difference']:10.2e} {v['same_run_twice_one_gpu']:10.2e}")
    return 0 if all(v["finite"] for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
