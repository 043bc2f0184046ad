"""Draw the template browser's thumbnail for each example workflow (``example_workflows/NAME.jpg``).

A thumbnail is a diagram of what the workflow samples: the panorama canvas from its Panorama Latent node,
the sampler's windows (window size and stride from the SyncDiffusion Sampler's widgets; wrap-around windows
straddle the border), and the workflow's title. Run after adding or changing a workflow:
``.venv/bin/python scripts/make_thumbnails.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
SIZE = (512, 288)
# SyncDiffusionSampler widget order: seed, control, steps, cfg, window_size, stride, w, decay, sync_steps,
# sync_every, wrap, window_batch
WINDOW, STRIDE, SYNC_WEIGHT, WRAP = 4, 5, 6, 10


def _widgets(nodes, node_type):
    return [n.get("widgets_values") or [] for n in nodes if n["type"] == node_type]


def draw(workflow: dict, title: str) -> Image.Image:
    nodes = workflow["nodes"]
    width, height = (_widgets(nodes, "PanoramaLatent") or [[2048, 512]])[0][:2]
    samplers = _widgets(nodes, "SyncDiffusionSampler") or [[0, "fixed", 50, 7.5, 0, 128, 20.0, 0.95, 10, 1, False, 8]]
    img = Image.new("RGB", SIZE, (24, 26, 33))
    d = ImageDraw.Draw(img)
    d.text((16, 12), title, fill=(235, 235, 235))
    rows = len(samplers)
    row_h = (SIZE[1] - 40) / rows
    scale = min((SIZE[0] - 32) / width, (row_h - 24) / height)
    for r, sw in enumerate(samplers):
        x0, y0 = 16, 36 + r * row_h
        cw, ch = width * scale, height * scale
        for i in range(int(cw)):  # a horizon-like gradient for the canvas
            t = i / max(cw - 1, 1)
            sky = (int(70 + 90 * t), int(110 + 60 * (1 - t)), int(170 + 40 * t))
            d.line([(x0 + i, y0), (x0 + i, y0 + ch * 0.6)], fill=sky)
            d.line([(x0 + i, y0 + ch * 0.6), (x0 + i, y0 + ch)], fill=(40, int(90 + 50 * t), 60))
        win = sw[WINDOW] or 512
        stride = sw[STRIDE] or 128
        wrap = bool(sw[WRAP]) if len(sw) > WRAP else False
        starts = range(0, width, stride) if wrap else range(0, max(width - win, 0) + 1, stride)
        colour = (255, 200, 60) if sw[SYNC_WEIGHT] else (120, 200, 255)
        for k, s in enumerate(starts):
            top = y0 + (k % 3) * 2
            left, right = x0 + s * scale, x0 + min(s + win, width) * scale
            d.rectangle([left, top, right, top + min(win, height) * scale - 1], outline=colour)
            if s + win > width:  # wraps: the rest continues at the left border
                d.rectangle([x0, top, x0 + (s + win - width) * scale, top + min(win, height) * scale - 1],
                            outline=colour)
        label = f"{width}x{height}, window {win}, stride {stride}" + (", 360" if wrap else "")
        label += ", SyncDiffusion" if sw[SYNC_WEIGHT] else ", MultiDiffusion"
        d.text((x0, y0 + ch + 4), label, fill=(200, 200, 200))
    return img


def main(paths: list[str]) -> None:
    files = [Path(p).resolve() for p in paths] or sorted((ROOT / "example_workflows").glob("*.json"))
    for path in files:
        wf = json.loads(path.read_text())
        title = path.stem.replace("_", " ")
        draw(wf, title).save(path.with_suffix(".jpg"), quality=90)
        print(f"wrote {path.with_suffix('.jpg').relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
