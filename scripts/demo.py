#!/usr/bin/env python3
"""`make demo`: run the shipped example workflow headless through ComfyUI's real executor and write the panorama
PNG under output/.

    make demo                                  # offline: a tiny random-weight model built with ComfyUI's classes
    make demo CKPT=/path/to/sd15.safetensors   # a real SD1.x/SD2.x checkpoint (its CLIP and VAE)
    .venv/bin/python -m scripts.demo --help    # sizes, steps, workflow, output folder

The workflow (default ``example_workflows/syncdiffusion_panorama.json``) is converted from the UI format the
frontend saves to an API prompt with the live node schemas, its checkpoint loader is pointed at the model,
and it runs through ``execution.PromptExecutor`` exactly as the server would run it.

Without CKPT the model is random: the PNG shows structured noise, not a landscape; what the demo shows is that
the whole graph (checkpoint loading, text encoding, windowed sampling with LPIPS synchronization, decoding,
saving) runs offline. For speed on a CPU the tiny run uses fewer steps and smaller windows (printed). The
LPIPS VGG16 trunk comes from ComfyUI's ``models/lpips`` (the managed ComfyUI's, or ``--lpips-dir``); the
tiny run uses a random trunk when none is there.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_WORKFLOW = ROOT / "example_workflows" / "syncdiffusion_panorama.json"
CKPT_LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "CheckpointLoader": "ckpt_name"}
# What the tiny model runs with on a CPU (the workflow's own values are used with a real checkpoint):
# native 512 px windows as in the workflow, but every 256 px instead of 128, and 4 DDIM steps, 1 with sync.
TINY_OVERRIDES = {"steps": 4, "sync_steps": 1, "stride": 256}
TINY_MODEL_CHANNELS = 64
TINY_LOADER = "SyncDiffusionDemo_TinyModel"


class Stages:
    def __init__(self):
        self.times: list[tuple[str, float]] = []
        self._t = time.perf_counter()
        self._name = None

    def start(self, name: str):
        self.stop()
        print(f"\n== {name}", flush=True)
        self._name, self._t = name, time.perf_counter()

    def stop(self):
        if self._name is not None:
            self.times.append((self._name, time.perf_counter() - self._t))
            self._name = None

    def report(self):
        self.stop()
        print("\nStage timings:")
        for name, dt in self.times:
            print(f"  {name:<44s} {dt:8.1f} s")
        print(f"  {'total':<44s} {sum(t for _, t in self.times):8.1f} s")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Run the example SyncDiffusion workflow headless.")
    ap.add_argument("--ckpt", default=os.environ.get("CKPT") or None,
                    help="a real SD1.x/SD2.x checkpoint (.safetensors/.ckpt); default: a tiny random model")
    ap.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="UI-format workflow JSON")
    ap.add_argument("--output", type=Path, default=ROOT / "output", help="where SaveImage writes (default output/)")
    ap.add_argument("--width", type=int, default=None, help="panorama width in pixels (workflow default 2048)")
    ap.add_argument("--height", type=int, default=None, help="panorama height in pixels (workflow default 512)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (tiny model default: %d)" % TINY_OVERRIDES["steps"])
    ap.add_argument("--sync-steps", type=int, default=None, help="steps with LPIPS synchronization")
    ap.add_argument("--window-size", type=int, default=None, help="window side in pixels (0 = native)")
    ap.add_argument("--stride", type=int, default=None, help="window stride in pixels")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--lpips-dir", type=Path, default=None, help="a folder holding vgg16-397923af.pth")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    opts = parse_args(argv)
    stages = Stages()

    cpu = opts.cpu or not _has_gpu()
    stages.start(f"start ComfyUI headless ({'--cpu' if cpu else 'on the GPU'}) and load the pack")
    from devtools import headless
    base = Path(tempfile.mkdtemp(prefix="syncdiff-demo-"))
    rt = headless.start(base, cpu=cpu)
    opts.output.mkdir(parents=True, exist_ok=True)
    rt.folder_paths.set_output_directory(str(opts.output.resolve()))
    print(f"ComfyUI {rt.comfy_dir}; pack nodes: {', '.join(rt.pack_node_ids)}")
    for lp in [opts.lpips_dir, rt.comfy_dir / "models" / "lpips"]:
        if lp is not None and Path(lp).is_dir():
            rt.add_model_folder("lpips", Path(lp).resolve())

    tiny = opts.ckpt is None
    stages.start("prepare the model")
    if tiny:
        n_params = _register_tiny_loader(rt)
        print("No CKPT given: built a tiny random-weight SD1.5-architecture model through ComfyUI's own classes\n"
              f"(comfy.supported_models.SD15 with a one-level UNet of {TINY_MODEL_CHANNELS} channels and one attention head, "
              f"{n_params / 1e6:.1f}M parameters; a full-size random CLIP-L; a random TAESD VAE) so the graph runs\n"
              f"offline. The workflow's CheckpointLoaderSimple is swapped for the in-memory loader {TINY_LOADER}\n"
              "(a UNet this narrow is not a checkpoint ComfyUI would recognise). Its weights are random: expect\n"
              "structured noise, not a landscape. Use CKPT=/path/model.safetensors for a real image.")
        if not _has_trunk(rt):
            _write_random_trunk(rt)
            print("No LPIPS VGG16 trunk found in models/lpips: using a random one for this tiny run.")
        ckpt_name = None
    else:
        ckpt_path = Path(opts.ckpt).expanduser().resolve()
        if not ckpt_path.is_file():
            print(f"CKPT={opts.ckpt}: no such file", file=sys.stderr)
            return 2
        ckpt_name = stage_checkpoint(rt, ckpt_path)
        print(f"Using checkpoint {ckpt_path} (its own CLIP and VAE).")
        if not _has_trunk(rt):
            print("Note: no LPIPS VGG16 trunk in models/lpips; the pack will look in torch's hub cache and try to "
                  "download it, else stop and say where to put vgg16-397923af.pth (or pass --lpips-dir).")

    stages.start("convert the UI workflow to an API prompt")
    from devtools import workflow as wc
    wf = wc.load_workflow(opts.workflow)
    loaders = [n for n in wf["nodes"] if n.get("type") in CKPT_LOADERS]
    if not loaders:
        print(f"{opts.workflow} has no checkpoint loader to point at the model", file=sys.stderr)
        return 2
    if ckpt_name is not None:
        for n in loaders:
            n["widgets_values"] = [ckpt_name] + list(n.get("widgets_values") or [])[1:]
    conv = wc.convert(wf, rt.nodes.NODE_CLASS_MAPPINGS, strict=ckpt_name is not None)
    problems = [p for p in conv.problems if not any(f"node {n['id']} ({n['type']}) widget" in p for n in loaders)]
    if problems:
        print("The workflow does not match the current node schemas:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    prompt = conv.prompt
    if ckpt_name is None:
        for n in loaders:
            prompt[str(n["id"])] = {"class_type": TINY_LOADER, "inputs": {}, "_meta": {"title": "tiny model"}}
    overrides = dict(TINY_OVERRIDES) if tiny else {}
    for key, val in (("steps", opts.steps), ("sync_steps", opts.sync_steps), ("window_size", opts.window_size),
                     ("stride", opts.stride), ("width", opts.width), ("height", opts.height), ("seed", opts.seed)):
        if val is not None:
            overrides[key] = val
    changed = _apply_overrides(prompt, rt, overrides)
    print(f"{opts.workflow.relative_to(ROOT) if opts.workflow.is_relative_to(ROOT) else opts.workflow}: "
          f"{len(prompt)} nodes ({', '.join(sorted({n['class_type'] for n in prompt.values()}))})")
    if changed:
        why = " (tiny model on a CPU: fewer steps, one sync step, a wider stride, so it finishes in minutes)" if tiny else ""
        print("Changed from the workflow" + why + ":")
        for line in changed:
            print("  " + line)

    stages.start("sample, decode and save (ComfyUI's PromptExecutor)")
    last = {}

    def on_progress(node_id, value, total):
        t = prompt.get(str(node_id), {}).get("class_type", node_id)
        if last.get(node_id) != value:
            last[node_id] = value
            print(f"  {t}: {int(value)}/{int(total)}", flush=True)

    result = rt.run_prompt(prompt, on_progress=on_progress)
    files = result.image_files()
    stages.report()
    if not files:
        print("The workflow saved no image.", file=sys.stderr)
        return 1
    from PIL import Image
    print("\nPanorama written:")
    for f in files:
        with Image.open(f) as im:
            print(f"  {f}  ({im.size[0]}x{im.size[1]})")
    return 0


def _has_gpu() -> bool:
    """Whether torch sees a CUDA (or ROCm) device; ComfyUI then runs there with its default settings."""
    import torch
    return torch.cuda.is_available()


def stage_checkpoint(rt, ckpt_path: Path) -> str:
    """Make one checkpoint file visible to ComfyUI and return the name to load it by.

    The file is linked (copied where links are not possible) into the run's own checkpoints folder under the
    temporary base directory. Registering the file's parent folder instead would make ComfyUI list that whole
    folder, following links (``os.walk(followlinks=True)``); a folder that contains this repository holds the
    link ``.comfyui/ComfyUI/custom_nodes/comfyui-syncdiffusion -> ../../..``, a loop the listing never leaves."""
    folder = rt.model_folder("checkpoints")
    target = folder / ckpt_path.name
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(ckpt_path)
    except OSError:
        import shutil
        shutil.copy2(ckpt_path, target)
    return target.name


def _register_tiny_loader(rt) -> int:
    """Build the tiny model and register a demo-only node that outputs it like CheckpointLoaderSimple."""
    from devtools import models as tiny_models
    model = tiny_models.build_model("sd15", seed=2024, model_channels=TINY_MODEL_CHANNELS, num_heads=1)
    clip = tiny_models.build_clip("sd15", seed=2025)
    vae = tiny_models.build_taesd_vae(seed=2026)

    class TinyModelLoader:
        CATEGORY = "_for_testing/syncdiffusion"
        RETURN_TYPES = ("MODEL", "CLIP", "VAE")
        FUNCTION = "load"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            return (model, clip, vae)

    rt.register_nodes({TINY_LOADER: TinyModelLoader}, {TINY_LOADER: "Tiny random model (demo)"})
    return sum(p.numel() for p in model.model.diffusion_model.parameters())


def _has_trunk(rt) -> bool:
    for folder in rt.folder_paths.get_folder_paths("lpips") if "lpips" in rt.folder_paths.folder_names_and_paths else []:
        p = Path(folder)
        if p.is_dir() and any(f.name.startswith("vgg16") for f in p.iterdir()):
            return True
    return False


def _write_random_trunk(rt) -> None:
    from devtools import models
    models.install_random_trunk(rt.models_dir, "vgg16", seed=0, file_name="vgg16-random-demo.safetensors")


def _apply_overrides(prompt: dict, rt, overrides: dict) -> list[str]:
    """Set widget inputs named in ``overrides`` on every node that has them (never on linked inputs)."""
    from devtools import workflow as wc
    changed = []
    for nid, node in prompt.items():
        specs = {s.name: s for s in wc.node_inputs(rt.nodes.NODE_CLASS_MAPPINGS[node["class_type"]])}
        for key, val in overrides.items():
            if key in node["inputs"] and not isinstance(node["inputs"][key], list) and key in specs:
                old = node["inputs"][key]
                if old != val:
                    node["inputs"][key] = val
                    changed.append(f"{node['class_type']} (node {nid}) {key}: {old} -> {val}")
    return changed


if __name__ == "__main__":
    sys.exit(main())
