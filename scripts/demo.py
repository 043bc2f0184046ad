#!/usr/bin/env python3
"""`make demo CKPT=...`: run the shipped example workflow headless on a real SD1.x/SD2.x checkpoint through ComfyUI's
executor and write the panorama PNG under output/ (without a checkpoint `make demo` runs ``miniworld.demo``).

    make demo CKPT=/path/to/sd15.safetensors   # the checkpoint's own CLIP and VAE
    .venv/bin/python -m scripts.demo --help    # sizes, steps, workflow, output folder

The workflow (default ``example_workflows/syncdiffusion_panorama.json``) is converted to an API prompt with the live
node schemas, its checkpoint loader pointed at the model. LPIPS comes from ComfyUI's ``models/lpips`` (or
``--lpips-dir``).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKFLOW = ROOT / "example_workflows" / "syncdiffusion_panorama.json"
CKPT_LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "CheckpointLoader": "ckpt_name"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Run the example SyncDiffusion workflow headless on a checkpoint.")
    ap.add_argument("--ckpt", default=os.environ.get("CKPT") or None, required=not os.environ.get("CKPT"),
                    help="a real SD1.x/SD2.x checkpoint (.safetensors/.ckpt)")
    ap.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="UI-format workflow JSON")
    ap.add_argument("--output", type=Path, default=ROOT / "output", help="where SaveImage writes (default output/)")
    ap.add_argument("--width", type=int, default=None, help="panorama width in pixels (workflow default 2048)")
    ap.add_argument("--height", type=int, default=None, help="panorama height in pixels (workflow default 512)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps")
    ap.add_argument("--sync-steps", type=int, default=None, help="steps with LPIPS synchronization")
    ap.add_argument("--window-size", type=int, default=None, help="window side in pixels (0 = native)")
    ap.add_argument("--stride", type=int, default=None, help="window stride in pixels")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--lpips-dir", type=Path, default=None, help="a folder holding vgg16-397923af.pth")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return ap.parse_args(argv)


def stage(name: str, times: list) -> None:
    """Start the stage ``name`` (``times`` holds (name, start) of every stage so far)."""
    print(f"\n== {name}", flush=True)
    times.append((name, time.perf_counter()))


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    opts = parse_args(argv)
    times: list = []
    ckpt_path = Path(opts.ckpt).expanduser().resolve()
    if not ckpt_path.is_file():
        print(f"CKPT={opts.ckpt}: no such file", file=sys.stderr)
        return 2
    import torch

    cpu = opts.cpu or not torch.cuda.is_available()  # else ComfyUI runs on the GPU with its default settings
    stage(f"start ComfyUI headless ({'--cpu' if cpu else 'on the GPU'}) and load the pack", times)
    from devtools import headless
    from devtools import workflow as wc

    rt = headless.start(Path(tempfile.mkdtemp(prefix="syncdiff-demo-")), cpu=cpu)
    opts.output.mkdir(parents=True, exist_ok=True)
    rt.folder_paths.set_output_directory(str(opts.output.resolve()))
    print(f"ComfyUI {rt.comfy_dir}; pack nodes: {', '.join(rt.pack_node_ids)}")
    for lp in [opts.lpips_dir, rt.comfy_dir / "models" / "lpips"]:
        if lp is not None and Path(lp).is_dir():
            rt.add_model_folder("lpips", Path(lp).resolve())
    ckpt_name = stage_checkpoint(rt, ckpt_path)
    print(f"Using checkpoint {ckpt_path} (its own CLIP and VAE).")
    if not any(Path(f).is_dir() and any(p.name.startswith("vgg16") for p in Path(f).iterdir())
               for f in rt.folder_paths.get_folder_paths("lpips")):
        print("Note: no LPIPS VGG16 trunk in models/lpips; the pack will look in torch's hub cache and try to "
              "download it, else stop and say where to put vgg16-397923af.pth (or pass --lpips-dir).")

    stage("convert the UI workflow to an API prompt", times)
    wf = wc.load_workflow(opts.workflow)
    loaders = [n for n in wf["nodes"] if n.get("type") in CKPT_LOADERS]
    if not loaders:
        print(f"{opts.workflow} has no checkpoint loader to point at the model", file=sys.stderr)
        return 2
    for n in loaders:
        n["widgets_values"] = [ckpt_name] + list(n.get("widgets_values") or [])[1:]
    conv = wc.convert(wf, rt.nodes.NODE_CLASS_MAPPINGS, strict=False)
    if conv.problems:
        print("The workflow does not match the current node schemas:\n  " + "\n  ".join(conv.problems),
              file=sys.stderr)
        return 2
    prompt = conv.prompt
    overrides = {k: v for k, v in (("steps", opts.steps), ("sync_steps", opts.sync_steps),
                                   ("window_size", opts.window_size), ("stride", opts.stride), ("width", opts.width),
                                   ("height", opts.height), ("seed", opts.seed)) if v is not None}
    changed = _apply_overrides(prompt, rt, overrides)
    print(f"{opts.workflow.name}: {len(prompt)} nodes ({', '.join(sorted({n['class_type'] for n in prompt.values()}))})")
    for line in changed:
        print("  changed: " + line)

    stage("sample, decode and save (ComfyUI's PromptExecutor)", times)
    last = {}

    def on_progress(node_id, value, total):
        if last.get(node_id) != value:
            last[node_id] = value
            print(f"  {prompt.get(str(node_id), {}).get('class_type', node_id)}: {int(value)}/{int(total)}", flush=True)

    files = rt.run_prompt(prompt, on_progress=on_progress).image_files()
    times.append(("", time.perf_counter()))
    print("\nStage timings:")
    for (name, t0), (_, t1) in zip(times, times[1:]):
        print(f"  {name:<56s} {t1 - t0:8.1f} s")
    if not files:
        print("The workflow saved no image.", file=sys.stderr)
        return 1
    from PIL import Image
    print("\nPanorama written:")
    for f in files:
        with Image.open(f) as im:
            print(f"  {f}  ({im.size[0]}x{im.size[1]})")
    return 0


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


def _apply_overrides(prompt: dict, rt, overrides: dict) -> list[str]:
    """Set widget inputs named in ``overrides`` on every node that has them (never on linked inputs)."""
    from devtools import workflow as wc
    changed = []
    for nid, node in prompt.items():
        specs = {s.name for s in wc.node_inputs(rt.nodes.NODE_CLASS_MAPPINGS[node["class_type"]])}
        for key, val in overrides.items():
            if key in node["inputs"] and not isinstance(node["inputs"][key], list) and key in specs:
                old = node["inputs"][key]
                if old != val:
                    node["inputs"][key] = val
                    changed.append(f"{node['class_type']} (node {nid}) {key}: {old} -> {val}")
    return changed


if __name__ == "__main__":
    sys.exit(main())
