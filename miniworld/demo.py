"""The SD 1.5 example workflow on the miniature trained world: a landscape panorama and a MultiDiffusion vs
SyncDiffusion comparison from the same seed, headless through ComfyUI's PromptExecutor.

    python -m miniworld.demo                       # writes output/miniworld_*.png
    python -m miniworld.demo --help

The workflow (``example_workflows/syncdiffusion_panorama.json``) is converted to an API prompt with the live
node schemas; its CheckpointLoaderSimple is replaced by the world's loader node (see ``miniworld.graph``) and its
sizes are scaled to the world: 128 px windows (the world's native size, as 512 px is SD1.5's) on a 1024x128
canvas, fewer DDIM steps so a CPU finishes in minutes. The prompt and negative prompt are the workflow's own.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "example_workflows" / "syncdiffusion_panorama.json"
#: The workflow's values scaled to the world's 128 px windows (the stride keeps the workflow's quarter window).
WORLD_OVERRIDES = {"width": 1024, "height": 128, "window_size": 128, "stride": 32, "steps": 20, "sync_steps": 5}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Run the example workflow on the trained miniature world.")
    ap.add_argument("--workflow", type=Path, default=WORKFLOW)
    ap.add_argument("--output", type=Path, default=ROOT / "output")
    ap.add_argument("--seed", type=int, default=None, help="default: the workflow's")
    for key, val in WORLD_OVERRIDES.items():
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=val)
    ap.add_argument("--gpu", action="store_true", help="run on the GPU (default: the CPU)")
    return ap.parse_args(argv)


def convert(rt, workflow: Path) -> dict:
    from devtools import workflow as wc
    from miniworld import graph
    wf = wc.load_workflow(workflow)
    loaders = [n for n in wf["nodes"] if n.get("type") in ("CheckpointLoaderSimple", "CheckpointLoader")]
    if not loaders:
        raise SystemExit(f"{workflow} has no checkpoint loader to replace with the world's model")
    conv = wc.convert(wf, rt.nodes.NODE_CLASS_MAPPINGS, strict=False)
    problems = [p for p in conv.problems if not any(f"node {n['id']} ({n['type']})" in p for n in loaders)]
    if problems:
        raise SystemExit("The workflow does not match the node schemas:\n  " + "\n  ".join(problems))
    prompt = conv.prompt
    for n in loaders:
        prompt[str(n["id"])] = {"class_type": graph.LOADER, "inputs": {}}
    return prompt


def set_inputs(prompt: dict, values: dict) -> list[str]:
    changed = []
    for nid, node in prompt.items():
        for k, v in values.items():
            if k in node["inputs"] and not isinstance(node["inputs"][k], list) and node["inputs"][k] != v:
                changed.append(f"{node['class_type']} {k}: {node['inputs'][k]} -> {v}")
                node["inputs"][k] = v
    return changed


def main(argv=None) -> int:
    opts = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    t0 = time.time()
    from miniworld import graph
    rt = graph.start(cpu=not opts.gpu)
    opts.output.mkdir(parents=True, exist_ok=True)
    rt.folder_paths.set_output_directory(str(opts.output.resolve()))
    prompt = convert(rt, opts.workflow)
    values = {k: getattr(opts, k) for k in WORLD_OVERRIDES}
    if opts.seed is not None:
        values["seed"] = opts.seed
    for line in set_inputs(prompt, values):
        print("  " + line)
    sampler = next(n for n in prompt.values() if n["class_type"] == "SyncDiffusionSampler")
    save = next(n for n in prompt.values() if n["class_type"] == "SaveImage")
    texts = [n["inputs"]["text"] for n in prompt.values() if n["class_type"] == "CLIPTextEncode"]
    print(f"prompt: {texts[0]!r}; seed {sampler['inputs']['seed']}, sync_weight {sampler['inputs']['sync_weight']}")

    from PIL import Image
    images = {}
    for label, w in (("syncdiffusion", sampler["inputs"]["sync_weight"]), ("multidiffusion", 0.0)):
        sampler["inputs"]["sync_weight"] = w
        save["inputs"]["filename_prefix"] = f"miniworld_{label}"
        t = time.time()
        files = rt.run_prompt(prompt).image_files()
        images[label] = Image.open(files[-1]).convert("RGB")
        print(f"{label} (sync_weight {w:g}): {files[-1]}  {time.time() - t:.1f} s")

    a, b = images["multidiffusion"], images["syncdiffusion"]
    gap = 6
    both = Image.new("RGB", (a.width, a.height * 2 + gap), (255, 255, 255))
    both.paste(a, (0, 0))
    both.paste(b, (0, a.height + gap))
    out = opts.output / "miniworld_multidiffusion_vs_syncdiffusion.png"
    both.save(out)
    print(f"comparison (top: MultiDiffusion, bottom: SyncDiffusion, same seed): {out}")
    print(f"total {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
