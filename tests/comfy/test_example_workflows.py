"""Every UI-format workflow in example_workflows/ is checked against the live node schemas and executed, converted to
API format, through ComfyUI's PromptExecutor with the tiny model.

Every file a workflow's loaders name is provided (``devtools.harness.provide_workflow_files``). Families whose text
encoders exist only at full size (``FAMILY_STAND_INS``) run with that family's tiny model in place
(``stand_in_family``); the executed copy is shrunk for CPU speed (``shrink_for_cpu``), the schema checks use the file
as it is. Also checked: the ``models`` list, the note's title, description and GPU cost, and the thumbnail
(``scripts/make_thumbnails.py``).
"""
import copy
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools import harness as h
from scripts import make_thumbnails
from devtools import workflow as wc

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
# What ComfyUI's frontend (1.32, MissingModelsWarning) accepts for a download offer
DOWNLOAD_URL = re.compile(r"^https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/main/(?P<file>[^?#]+)$")
DOWNLOAD_SUFFIXES = (".safetensors", ".sft")


def test_there_are_example_workflows():
    assert WORKFLOWS, "example_workflows/ holds no .json workflow"


# Text encoders that ComfyUI builds only at their real size (SDXL's CLIP-G, Flux's T5-XXL, Qwen-Image's 7 B
# Qwen2.5-VL) are out of reach of a CPU test: a workflow that loads one of these model files runs with the tiny
# random model of that family (devtools/families.py) in place of its loaders and text encoders; every other node
# (guidance, model sampling, guider, scheduler, the pack's nodes, decode, save) runs as saved.
FAMILY_STAND_INS = {"sd_xl_base_1.0.safetensors": "sdxl", "flux1-dev.safetensors": "flux",
                    "flux1-fill-dev.safetensors": "flux_fill", "qwen_image_fp8_e4m3fn.safetensors": "qwen_image"}
TEXT_ENCODERS = {"CLIPTextEncode"}


def _provide_files(comfy, tiny, wf: dict) -> None:
    h.provide_workflow_files(wf, comfy.nodes.NODE_CLASS_MAPPINGS, comfy.models_dir, comfy.input_dir,
                             tiny.ckpt_path, tiny.family)


def stand_in_family(prompt: dict, family: str, node_classes: dict) -> dict:
    """A copy of ``prompt`` whose model loaders and text encoders are replaced by the tiny ``family``'s model, VAE
    and conditioning (a text encoder feeding an input named ``negative`` gives the negative conditioning)."""
    from devtools import families as fm
    fam = fm.build(family)
    loaders = {ntype for ntype, _ in h.MODEL_LOADERS}
    gone = {nid for nid, n in prompt.items() if n["class_type"] in loaders | TEXT_ENCODERS}
    objects = {"MODEL": h.object_node(fam.model, "MODEL"), "VAE": h.object_node(fam.vae, "VAE"),
               "positive": h.object_node(fam.positive, "CONDITIONING"),
               "negative": h.object_node(fam.negative, "CONDITIONING")}
    p = {nid: copy.deepcopy(n) for nid, n in prompt.items() if nid not in gone}
    for node in p.values():
        for name, v in node["inputs"].items():
            if isinstance(v, list) and v[0] in gone:
                src = prompt[v[0]]
                if src["class_type"] in TEXT_ENCODERS:
                    kind = "negative" if name == "negative" else "positive"
                else:
                    kind = node_classes[src["class_type"]].RETURN_TYPES[v[1]]
                assert kind in objects, f"no stand-in for {src['class_type']} output {kind} (into {name})"
                node["inputs"][name] = [f"standin_{kind}", 0]
    p.update({f"standin_{kind}": n for kind, n in objects.items()})
    return p


def shrink_for_cpu(prompt: dict, node_classes: dict) -> dict:
    """A copy of ``prompt`` small enough for 2 CPU cores (see the module doc). Values stay within the schema."""
    p = copy.deepcopy(prompt)

    def snap(v, spec, lo=8):
        v = max(lo, (int(v) // 8) // 8 * 8)
        return max(spec.options.get("min", v), min(spec.options.get("max", v), v))

    for node in p.values():
        cls = node_classes[node["class_type"]]
        specs = {s.name: s for s in wc.node_inputs(cls)}
        ins = node["inputs"]
        for name, v in list(ins.items()):
            if isinstance(v, list) or name not in specs:
                continue
            spec = specs[name]
            if name in ("width", "height") and spec.type == "INT":
                ins[name] = snap(v, spec, lo=64)
            elif name == "window_size" and spec.type == "INT":
                ins[name] = snap(v or 512, spec, lo=64)
            elif name in ("stride", "band_width", "feather") and spec.type == "INT":
                ins[name] = snap(v, spec)
            elif name == "steps" and spec.type == "INT":
                ins[name] = max(spec.options.get("min", 1), min(v, 2))
            elif name == "sync_steps" and spec.type == "INT":
                ins[name] = min(v, 1)
            elif name == "batch_size" and spec.type == "INT":
                ins[name] = 1
        if "stride" in ins and "window_size" in ins and not isinstance(ins["stride"], list) \
                and not isinstance(ins["window_size"], list):
            ins["stride"] = min(ins["stride"], ins["window_size"])
    return p


@pytest.fixture(scope="module")
def prepared(comfy, tiny_sd15, lpips_trunk):
    return comfy, tiny_sd15


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_matches_current_schemas(prepared, path):
    comfy, tiny = prepared
    wf = wc.load_workflow(path)
    known = comfy.nodes.NODE_CLASS_MAPPINGS
    unknown = sorted({n["type"] for n in wf["nodes"]} - set(known) - wc.FRONTEND_ONLY)
    assert not unknown, f"{path.name}: node types that do not exist: {unknown}"
    _provide_files(comfy, tiny, wf)
    conv = wc.convert(wf, known, strict=False)
    assert not conv.problems, f"{path.name}:\n  " + "\n  ".join(conv.problems)
    # the pack's nodes are used, and what the template browser shows is a graph that ends in an output
    assert any(n["class_type"] in comfy.pack_node_ids for n in conv.prompt.values()), \
        f"{path.name} uses none of the pack's nodes"
    ok, error, outputs, node_errors = comfy.validate(conv.prompt)
    assert ok and not node_errors, f"{path.name} fails ComfyUI's validation: {error} {json.dumps(node_errors)[:2000]}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_executes_with_the_tiny_model(prepared, path):
    comfy, tiny = prepared
    wf = wc.load_workflow(path)
    _provide_files(comfy, tiny, wf)
    classes = comfy.nodes.NODE_CLASS_MAPPINGS
    prompt = wc.convert(wf, classes).prompt
    families = {FAMILY_STAND_INS[name] for name, _ in h.named_models(wf, classes) if name in FAMILY_STAND_INS}
    assert len(families) <= 1, f"{path.name} loads models of several families: {families}"
    if families:
        prompt = stand_in_family(prompt, families.pop(), classes)
    prompt = shrink_for_cpu(prompt, classes)
    result = comfy.run_prompt(prompt)
    assert result.success
    saved = result.image_files()
    if any(n["class_type"] == "SaveImage" for n in prompt.values()):
        assert saved and all(f.is_file() for f in saved), f"{path.name}: SaveImage wrote nothing"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_offers_its_models_for_download(comfy, path):
    wf = wc.load_workflow(path)
    listed = wf.get("models") or []
    assert {(m["name"], m["directory"]) for m in listed} == h.named_models(wf, comfy.nodes.NODE_CLASS_MAPPINGS), \
        f"{path.name}: the models list does not match the models its loaders select"
    for m in listed:
        match = DOWNLOAD_URL.match(m["url"])
        assert match, f"{path.name}: {m['url']} is not a Hugging Face file URL the frontend downloads from"
        assert match.group("file").rsplit("/", 1)[-1] == m["name"], f"{path.name}: {m['url']} is not {m['name']}"
        assert m["name"].endswith(DOWNLOAD_SUFFIXES), f"{path.name}: the frontend offers no download of {m['name']}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_note_gives_title_description_and_cost(path):
    wf = wc.load_workflow(path)
    notes = [n for n in wf["nodes"] if n["type"] in ("MarkdownNote", "Note")]
    assert len(notes) == 1, f"{path.name}: {len(notes)} notes; the template's text lives in exactly one"
    title, description = make_thumbnails.template_text(wf, fallback="")
    assert title and description, f"{path.name}: the note does not start with '## Title' and '*description*'"
    assert len(description) <= 100, f"{path.name}: the description is not one line: {description!r}"
    cost = notes[0]["widgets_values"][0].split("**Cost.**", 1)
    assert len(cost) == 2, f"{path.name}: the note has no '**Cost.**' paragraph"
    assert re.search(r"H100|H200|GPU", cost[1]) and re.search(r"\d+ s\b", cost[1]), \
        f"{path.name}: the cost paragraph gives no GPU time: {cost[1]!r}"
    assert "CPU" in cost[1], f"{path.name}: the cost paragraph does not warn CPU users: {cost[1]!r}"


def _jpeg_roundtrip(img: Image.Image) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=make_thumbnails.QUALITY)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_thumbnail_is_drawn_from_the_workflow(path):
    """The .jpg is what make_thumbnails draws from the .json now (a changed stride alone moves ~5 % of the
    pixels by more than 32; JPEG and font-rendering differences between library versions move almost none)."""
    thumb = make_thumbnails.thumbnail_path(path)
    assert thumb.is_file(), f"{path.name} has no thumbnail {thumb.name}; run scripts/make_thumbnails.py"
    with Image.open(thumb) as im:
        assert im.size == make_thumbnails.SIZE
        saved = np.asarray(im.convert("RGB"), dtype=np.int16)
    drawn = _jpeg_roundtrip(make_thumbnails.draw(wc.load_workflow(path), path.stem.replace("_", " ")))
    off = np.abs(drawn - saved).max(axis=-1)
    assert (off > 32).mean() < 0.01 and off.mean() < 2.0, \
        f"{thumb.name} is not what scripts/make_thumbnails.py draws from {path.name} now: run it"
