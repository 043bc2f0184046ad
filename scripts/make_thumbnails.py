"""Draw the template browser's thumbnail for each example workflow (``example_workflows/NAME.jpg``).

The browser titles a custom pack's templates by file name, so the thumbnail carries the real title and description
from the workflow's note (``## Title``, then ``*description*``), and below them a diagram per windowed node: the
canvas, a repair's seam band, the windows (from the widgets; under wrap they straddle the border), and what
conditions them, evaluated from the stock nodes that build it (the ControlNet hint, the layout regions' masks).

Run after changing a workflow: ``.venv/bin/python scripts/make_thumbnails.py`` (all, or the paths given);
``tests/comfy/test_example_workflows.py`` checks every thumbnail is what this draws.
"""
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
SIZE = (512, 288)
QUALITY = 90
BACKGROUND = (24, 26, 33)
# Where window_size, stride, sync_weight and wrap sit in each windowed node's widgets_values (schema order; the
# seed's "control after generate" value counts as a widget).
WIDGET_INDEX = {"SyncDiffusionSampler": (4, 5, 6, 10), "SyncDiffusionCustomSampler": (0, 1, 2, 6),
                "PanoramaSeamRepair": (7, 8, None, None)}
SEAM_BAND, SEAM_FEATHER = 5, 6  # PanoramaSeamRepair's band_width and feather
# A LoadImage's size is not in the workflow: a seam-repair thumbnail draws a 2:1 equirectangular image.
LOADED_IMAGE_SIZE = (2048, 1024)
REGION_COLOURS = [(255, 120, 90), (120, 170, 255), (200, 120, 255), (255, 220, 90)]


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def template_text(workflow: dict, fallback: str) -> tuple[str, str]:
    """(title, one-line description) from the workflow's note: ``## Title`` then ``*description*``."""
    for n in workflow["nodes"]:
        if n["type"] in ("MarkdownNote", "Note") and n.get("widgets_values"):
            m = re.match(r"\s*##\s*(.+?)\s*\n\s*\n\s*\*(.+?)\*\s*(\n|$)", n["widgets_values"][0])
            if m:
                return m.group(1), m.group(2)
    return fallback, ""


# ----------------------------------------------------------------------------- the graph's stock nodes

class Graph:
    def __init__(self, workflow: dict):
        self.nodes = {n["id"]: n for n in workflow["nodes"]}
        self.links = {}
        for raw in workflow.get("links") or []:
            link_id, origin = (raw["id"], raw["origin_id"]) if isinstance(raw, dict) else (raw[0], raw[1])
            self.links[link_id] = origin

    def source(self, node: dict, input_name: str) -> dict | None:
        for inp in node.get("inputs") or []:
            if inp.get("name") == input_name and inp.get("link") is not None:
                return self.nodes.get(self.links.get(inp["link"]))
        return None

    def upstream(self, node: dict) -> list[dict]:
        """Every node ``node`` depends on, nearest first."""
        seen, order, queue = {node["id"]}, [], [node]
        while queue:
            for inp in queue.pop(0).get("inputs") or []:
                src = self.nodes.get(self.links.get(inp.get("link")))
                if src is not None and src["id"] not in seen:
                    seen.add(src["id"])
                    order.append(src)
                    queue.append(src)
        return order

    def consumers(self, node: dict) -> list[dict]:
        """The nodes that take one of ``node``'s outputs."""
        ids = {link for out in node.get("outputs") or [] for link in out.get("links") or []}
        return [n for n in self.nodes.values() if any(i.get("link") in ids for i in n.get("inputs") or [])]

    def canvas_size(self, node: dict | None, depth: int = 0) -> tuple[int, int] | None:
        """(width, height) in pixels of the LATENT or IMAGE ``node`` outputs, followed back through the stock
        and pack nodes a panorama passes: Panorama Latent, samplers, decoders, encoders, Image Scale By, Load Image."""
        if node is None or depth > 32:
            return None
        w = node.get("widgets_values") or []
        kind = node["type"]
        if kind in ("PanoramaLatent", "PanoramaPhotoCanvas"):  # both start with width, height
            return int(w[0]), int(w[1])
        if kind == "LoadImage":
            return LOADED_IMAGE_SIZE
        if kind == "ImageScaleBy":
            size = self.canvas_size(self.source(node, "image"), depth + 1)
            return None if size is None else (round(size[0] * float(w[1])), round(size[1] * float(w[1])))
        for name in ("latent_image", "samples", "pixels", "image"):
            if self.source(node, name) is not None:
                return self.canvas_size(self.source(node, name), depth + 1)
        return None

    def mask(self, node: dict | None) -> np.ndarray | None:
        """A mask (h, w) in [0, 1] evaluated from SolidMask / MaskComposite nodes; None for anything else."""
        if node is None:
            return None
        w = node.get("widgets_values") or []
        if node["type"] == "SolidMask":
            value, width, height = w[:3]
            return np.full((int(height), int(width)), float(value), dtype=np.float32)
        if node["type"] == "MaskComposite":
            dst, src = self.mask(self.source(node, "destination")), self.mask(self.source(node, "source"))
            if dst is None or src is None:
                return None
            x, y, op = int(w[0]), int(w[1]), w[2]
            out = dst.copy()
            h, wd = max(0, min(src.shape[0], dst.shape[0] - y)), max(0, min(src.shape[1], dst.shape[1] - x))
            a, b = out[y:y + h, x:x + wd], src[:h, :wd]
            ops = {"multiply": a * b, "add": a + b, "subtract": a - b, "and": np.minimum(a, b),
                   "or": np.maximum(a, b), "xor": np.abs(a - b)}
            if op not in ops:
                return None
            out[y:y + h, x:x + wd] = ops[op]
            return np.clip(out, 0.0, 1.0)
        return None

    def image(self, node: dict | None) -> np.ndarray | None:
        """An RGB image (h, w, 3) uint8 from EmptyImage / ImageCompositeMasked / ImageFlip; None otherwise."""
        if node is None:
            return None
        w = node.get("widgets_values") or []
        if node["type"] == "EmptyImage":
            width, height, _batch, colour = (int(v) for v in w[:4])
            rgb = ((colour >> 16) & 255, (colour >> 8) & 255, colour & 255)
            return np.broadcast_to(np.array(rgb, dtype=np.uint8), (height, width, 3)).copy()
        if node["type"] == "ImageCompositeMasked":
            dst, src = self.image(self.source(node, "destination")), self.image(self.source(node, "source"))
            if dst is None or src is None or self.source(node, "mask") is not None or (len(w) > 2 and w[2]):
                return None  # a mask or resize_source: not drawn
            x, y = int(w[0]), int(w[1])
            out = dst.copy()
            h, wd = max(0, min(src.shape[0], dst.shape[0] - y)), max(0, min(src.shape[1], dst.shape[1] - x))
            out[y:y + h, x:x + wd] = src[:h, :wd]
            return out
        if node["type"] == "ImageFlip":
            img = self.image(self.source(node, "image"))
            if img is None:
                return None
            return img[::-1].copy() if str(w[0]).startswith("x-axis") else img[:, ::-1].copy()
        return None


# ----------------------------------------------------------------------------- drawing

def _canvas_background(width: int, height: int) -> Image.Image:
    """A horizon-like gradient: sky above, ground below."""
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    sky = np.stack([70 + 90 * x, 110 + 60 * (1 - x), 170 + 40 * x], axis=-1)
    ground = np.stack([np.full_like(x, 40), 90 + 50 * x, np.full_like(x, 60)], axis=-1)
    rows = np.arange(height)[:, None, None] < int(height * 0.6)
    return Image.fromarray(np.where(rows, sky, ground).astype(np.uint8), "RGB")


def _sampler_row(d: ImageDraw.ImageDraw, img: Image.Image, g: Graph, sampler: dict, box: tuple) -> None:
    x0, y0, avail_w, avail_h = box
    # a SAMPLER's canvas is the latent of the node that runs it (SamplerCustomAdvanced)
    runner = next((n for n in g.consumers(sampler) if g.source(n, "sampler") is sampler), sampler)
    width, height = g.canvas_size(runner) or (2048, 512)
    sw = sampler.get("widgets_values") or []
    at = WIDGET_INDEX[sampler["type"]]
    widget = lambda k, default: sw[at[k]] if at[k] is not None and len(sw) > at[k] else default  # noqa: E731
    scale = min(avail_w / width, (avail_h - 16) / height)
    cw, ch = max(1, round(width * scale)), max(1, round(height * scale))

    up = g.upstream(sampler)
    hint = next((g.image(g.source(n, "image")) for n in up if n["type"].startswith("ControlNetApply")), None)
    canvas = (Image.fromarray(hint).resize((cw, ch), Image.Resampling.NEAREST) if hint is not None
              else _canvas_background(cw, ch))
    img.paste(canvas, (x0, y0))

    small = font(11)
    regions = [n for n in up if n["type"] == "LayoutMaskRegion"]
    for k, region in enumerate(sorted(regions, key=lambda n: n["id"])):
        mask = g.mask(g.source(region, "mask"))
        if mask is None:
            continue
        colour = REGION_COLOURS[k % len(REGION_COLOURS)]
        m = Image.fromarray((mask * 255).astype(np.uint8), "L").resize((cw, ch), Image.Resampling.NEAREST)
        tint = Image.new("RGB", (cw, ch), colour)
        img.paste(Image.blend(img.crop((x0, y0, x0 + cw, y0 + ch)), tint, 0.55), (x0, y0),
                  m.point(lambda v: 255 if v >= 128 else 0))
        bbox = m.point(lambda v: 255 if v >= 128 else 0).getbbox()
        if bbox:
            d.rectangle([x0 + bbox[0], y0 + bbox[1], x0 + bbox[2] - 1, y0 + bbox[3] - 1], outline=(255, 255, 255))
            prompt = g.source(region, "conditioning")
            label = (prompt.get("title") if prompt else None) or region.get("title") or f"region {k + 1}"
            d.text((x0 + bbox[0] + 3, y0 + bbox[1] + 2), label, fill=(255, 255, 255), font=small)

    win = widget(0, 0) or 512
    stride = widget(1, 0) or 128
    synced = bool(widget(2, sampler["type"] != "PanoramaSeamRepair"))  # seam repair: MultiDiffusion
    wrap = bool(widget(3, False))
    if sampler["type"] == "PanoramaSeamRepair":  # the band around the seam, rolled to the middle
        band, feather = int(sw[SEAM_BAND]), int(sw[SEAM_FEATHER])
        left, right = width / 2 - band / 2 - feather, width / 2 + band / 2 + feather
        tint = Image.new("RGB", (cw, ch), (255, 90, 90))
        box_px = (round(x0 + left * scale), y0, round(x0 + right * scale), y0 + ch)
        region = img.crop(box_px)
        img.paste(Image.blend(region, tint.crop((0, 0) + region.size), 0.45), box_px[:2])
        d.text((box_px[0] + 3, y0 + 2), f"seam band {band} px", fill=(255, 255, 255), font=small)
    tops = range(0, max(height - win, 0) + 1, stride)
    lefts = range(0, width, stride) if wrap else range(0, max(width - win, 0) + 1, stride)
    colour = (255, 200, 60) if synced else (120, 200, 255)
    for r, top in enumerate(tops):
        for k, left in enumerate(lefts):
            jitter = (k % 3) * 2
            ty, by = y0 + top * scale + jitter, y0 + min(top + win, height) * scale - 1
            d.rectangle([x0 + left * scale, ty, x0 + min(left + win, width) * scale, by], outline=colour)
            if left + win > width:  # wraps: the rest continues at the left border
                d.rectangle([x0, ty, x0 + (left + win - width) * scale, by], outline=colour)
    n_windows = len(tops) * len(lefts)
    label = f"{width}x{height}, {n_windows} windows of {win} px, stride {stride}" + (", 360°" if wrap else "")
    label += ", SyncDiffusion" if synced else ", MultiDiffusion"
    d.text((x0, y0 + ch + 3), label, fill=(200, 200, 200), font=small)


def _wrap_text(d: ImageDraw.ImageDraw, text: str, fnt, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and d.textlength(trial, font=fnt) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def draw(workflow: dict, fallback_title: str) -> Image.Image:
    title, description = template_text(workflow, fallback_title)
    img = Image.new("RGB", SIZE, BACKGROUND)
    d = ImageDraw.Draw(img)
    d.text((16, 10), title, fill=(240, 240, 240), font=font(24))
    y = 42
    for line in _wrap_text(d, description, font(14), SIZE[0] - 32)[:2]:
        d.text((16, y), line, fill=(190, 195, 205), font=font(14))
        y += 18
    g = Graph(workflow)
    samplers = sorted((n for n in workflow["nodes"] if n["type"] in WIDGET_INDEX), key=lambda n: n["pos"][1])
    top = y + 10
    row_h = (SIZE[1] - top - 6) / max(len(samplers), 1)
    for r, sampler in enumerate(samplers):
        _sampler_row(d, img, g, sampler, (16, round(top + r * row_h), SIZE[0] - 32, round(row_h) - 4))
    return img


def thumbnail_path(workflow_path: Path) -> Path:
    return workflow_path.with_suffix(".jpg")


def main(paths: list[str]) -> None:
    files = [Path(p).resolve() for p in paths] or sorted((ROOT / "example_workflows").glob("*.json"))
    for path in files:
        wf = json.loads(path.read_text())
        draw(wf, path.stem.replace("_", " ")).save(thumbnail_path(path), quality=QUALITY)
        print(f"wrote {thumbnail_path(path).relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
