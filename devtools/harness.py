"""Test harness: this pack inside a real, headless ComfyUI with tiny random-weight models; ``tests/conftest.py``'s
fixtures are thin wrappers around it, and tests and benches import it directly (``from devtools import harness as h``).

``run_prompt(prompt)`` validates an API-format prompt (``execution.validate_prompt``) and executes it with ComfyUI's
``execution.PromptExecutor``, returning a ``devtools.headless.PromptResult`` (``result["3"]``: that node's outputs).
A failing node raises ``PromptExecutionError`` (``.exception_type``, ``.exception_message``, ``.node_id``), an
invalid prompt ``PromptValidationError``; a prompt without an output node gets a sink on its leaf nodes.
``object_node(value, "VAE")`` is a node whose one output is ``value`` (any ComfyUI type name); a graph can equally
load a tiny checkpoint by name (``CheckpointLoaderSimple``), the path users take, which makes inference-mode weights.
"""
import itertools
from pathlib import Path

import torch

from devtools import headless as comfy_headless
from devtools.headless import ComfyRuntime, PromptExecutionError, PromptResult, PromptValidationError  # noqa: F401

OBJECTS: dict[str, object] = {}
_KEYS = itertools.count()
OBJECT_NODE_PREFIX = "SyncDiffTest_"

DEFAULT_PROMPT = "a wide mountain panorama at sunrise, lake, pine forest"
SEED = 1234


def runtime() -> ComfyRuntime:
    """The started runtime (ComfyUI + this pack + the test helper nodes)."""
    rt = comfy_headless.start()
    _ensure_object_node(rt, "LATENT")
    return rt


def _ensure_object_node(rt: ComfyRuntime, io_type: str) -> str:
    name = OBJECT_NODE_PREFIX + io_type
    if name in rt.nodes.NODE_CLASS_MAPPINGS:
        return name

    class ObjectNode:
        """Test-only: outputs an in-memory object stored in devtools.harness.OBJECTS under ``key``."""
        CATEGORY = "_for_testing/syncdiffusion"
        RETURN_TYPES = (io_type,)
        FUNCTION = "get"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"key": ("STRING", {"default": ""})}}

        @classmethod
        def VALIDATE_INPUTS(cls, key):
            return True if key in OBJECTS else f"no test object stored under key {key!r}"

        def get(self, key):
            return (OBJECTS[key],)

    ObjectNode.__name__ = name
    rt.register_nodes({name: ObjectNode}, {name: f"Test object ({io_type})"})
    return name


def object_node(value, io_type: str) -> dict:
    """A prompt node whose only output (slot 0) is ``value``, declared as ComfyUI type ``io_type``."""
    rt = runtime()
    name = _ensure_object_node(rt, io_type)
    key = f"obj{next(_KEYS)}"
    OBJECTS[key] = value
    return {"class_type": name, "inputs": {"key": key}}


class Pack:
    """The pack's modules as ComfyUI's ``load_custom_node`` imported them (never the repository as ``nodes``):
    ``pack.sampling`` is ``<pack>.syncdiff_core.comfy.sampling``, ``pack.job`` is ``<pack>.syncdiff_core.job``,
    ``pack.sampler_nodes`` is ``<pack>.nodes.sampler_nodes``; ``pack.module("a.b")`` takes any dotted path."""

    def __init__(self, package: str):
        self.package = package

    def module(self, dotted: str):
        import importlib
        return importlib.import_module(f"{self.package}.{dotted}")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        for folder in ("syncdiff_core/comfy", "nodes"):  # the bridge's and the nodes' modules, else the core's
            if (comfy_headless.REPO_ROOT / folder / f"{name}.py").is_file():
                return self.module(f"{folder.replace('/', '.')}.{name}")
        return self.module(f"syncdiff_core.{name}")


def pack() -> Pack:
    return Pack(runtime().pack_module.__name__)


def make_job(pack: Pack, *, w: float = 0.0, decay: float = 0.95, sync_steps: int = 10, every: int = 1,
             anchor=None, **kw):
    """A ``PanoramaJob`` of the pack's own classes; ``w``, ``decay``, ``sync_steps``, ``every`` make its
    ``SyncSettings``, the rest are the job's fields."""
    sync = pack.sync
    return pack.job.PanoramaJob(sync=sync.SyncSettings(weight=w, decay=decay, steps=sync_steps, every=every),
                                anchor=anchor if anchor is not None else sync.Anchor(), **kw)


def sample(pack: Pack, model, positive, negative, latent_shape, job, *, vae=None, loss=None) -> torch.Tensor:
    """``sample_panorama`` on a zero LATENT of ``latent_shape``, under inference mode as a node runs: the samples."""
    with torch.inference_mode():
        return pack.sampling.sample_panorama(model, positive, negative, {"samples": torch.zeros(latent_shape)}, job,
                                             vae=vae, loss=loss)["samples"]


#: The SyncDiffusionSampler's widgets in :func:`panorama_prompt` unless given: 2 steps, the first synchronized,
#: 64 px windows every 32 px.
SAMPLER_WIDGETS = {"seed": 11, "steps": 2, "cfg": 5.0, "window_size": 64, "stride": 32, "sync_weight": 20.0,
                   "sync_decay": 0.95, "sync_steps": 1, "sync_every": 1, "wrap": False, "window_batch": 4}


def panorama_prompt(ckpt_name: str | None = None, *, objects: tuple | None = None, width: int = 128,
                    height: int = 64, batch: int = 1, decode: tuple | None = None, save: tuple | None = None,
                    **sampler) -> dict:
    """An API prompt of a panorama: the checkpoint ``ckpt_name`` (prompts DEFAULT_PROMPT and "") or ``objects`` =
    (model, positive, negative, vae) fed by object nodes; a PanoramaLatent "lat"; the SyncDiffusionSampler "sampler"
    (``sampler`` over :data:`SAMPLER_WIDGETS`); when given, a decode node "dec" and an output node "save"
    (``decode`` / ``save`` = (class_type, the other inputs))."""
    if objects is None:
        prompt = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
                  **{k: {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}}
                     for k, text in (("pos", DEFAULT_PROMPT), ("neg", ""))}}
        model, vae = ["ckpt", 0], ["ckpt", 2]
    else:
        prompt = {k: object_node(v, t) for k, v, t in zip(("model", "pos", "neg", "vae"), objects,
                                                          ("MODEL", "CONDITIONING", "CONDITIONING", "VAE"))}
        model, vae = ["model", 0], ["vae", 0]
    prompt["lat"] = {"class_type": "PanoramaLatent", "inputs": {"width": width, "height": height, "batch_size": batch}}
    prompt["sampler"] = {"class_type": "SyncDiffusionSampler", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "vae": vae, "latent_image": ["lat", 0],
        **SAMPLER_WIDGETS, **sampler}}
    if decode is not None:
        prompt["dec"] = {"class_type": decode[0], "inputs": {"samples": ["sampler", 0], "vae": vae, **decode[1]}}
    if save is not None:
        prompt["save"] = {"class_type": save[0], "inputs": {"images": ["dec", 0], **save[1]}}
    return prompt


#: The pack's circular decode and its 360° save, as :func:`panorama_prompt`'s ``decode`` and ``save``.
DECODE_360 = ("PanoramaDecode", {"wrap": True, "padding": 4, "tile_width": 0, "tile_overlap": 64})
SAVE_360 = ("SavePanorama360", {"filename_prefix": "pano", "format": "png", "jpeg_quality": 95})


def run_prompt(prompt: dict, **kw) -> PromptResult:
    return runtime().run_prompt(prompt, **kw)


# ----------------------------------------------------------------------------- tiny models

def tiny_models(family: str, seed: int = SEED, with_clip: bool | None = None, ckpt_name: str | None = None):
    """A tiny checkpoint of ``family`` written into ComfyUI's checkpoints folder (once per name) and loaded as a
    graph does (``CheckpointLoaderSimple`` under inference mode), as ``devtools.models.TinyModels`` with
    conditioning encoded by its CLIP (DEFAULT_PROMPT and ""), else ``make_conditioning`` tensors."""
    from devtools import models as tm
    rt = runtime()
    ckpt_name = ckpt_name or f"tiny_{family}.safetensors"
    path = rt.model_folder("checkpoints") / ckpt_name
    if not path.exists():
        tm.write_checkpoint(path, family=family, seed=seed, with_clip=with_clip)
    loader = rt.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]()
    with torch.inference_mode():
        model, clip, vae = loader.load_checkpoint(ckpt_name)[:3]
        if clip is not None:
            positive = _encode(clip, DEFAULT_PROMPT)
            negative = _encode(clip, "")
        else:
            positive = tm.make_conditioning(family, seed=seed + 10)
            negative = tm.make_conditioning(family, seed=seed + 11)
    return tm.TinyModels(family=family, ckpt_name=ckpt_name, ckpt_path=path, model=model, clip=clip, vae=vae,
                         positive=positive, negative=negative)


def _encode(clip, text: str) -> list:
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


# ----------------------------------------------------------------------------- what example workflows name

# The stock loaders' file inputs and the models folder each lists (what a workflow's ``models`` entries name).
MODEL_LOADERS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints", ("CheckpointLoader", "ckpt_name"): "checkpoints",
    ("ImageOnlyCheckpointLoader", "ckpt_name"): "checkpoints",
    ("ControlNetLoader", "control_net_name"): "controlnet", ("DiffControlNetLoader", "control_net_name"): "controlnet",
    ("UNETLoader", "unet_name"): "diffusion_models", ("VAELoader", "vae_name"): "vae",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders", ("DualCLIPLoader", "clip_name2"): "text_encoders",
}


def _active_widgets(workflow: dict, classes: dict):
    """(node, {widget name: value}) of every node of the workflow that runs (not muted), in file order."""
    from devtools import workflow as wc
    for n in workflow["nodes"]:
        if n.get("mode", 0) == wc.MODE_MUTED or n["type"] not in classes:
            continue
        specs = [s for s in wc.node_inputs(classes[n["type"]]) if s.is_widget]
        yield n, wc.assign_widgets(n, specs).values


def named_models(workflow: dict, classes: dict) -> set[tuple[str, str]]:
    """(file name, models folder) of every model file the workflow's active loaders select."""
    return {(values[inp], folder) for n, values in _active_widgets(workflow, classes)
            for (ntype, inp), folder in MODEL_LOADERS.items() if n["type"] == ntype and inp in values}


def named_input_images(workflow: dict, classes: dict) -> set[str]:
    """File names the workflow's LoadImage nodes read from ComfyUI's input folder."""
    return {values["image"] for n, values in _active_widgets(workflow, classes) if n["type"] == "LoadImage"}


def provide_workflow_files(workflow: dict, classes: dict, models_dir: Path, input_dir: Path, tiny_ckpt: Path,
                           family: str = "sd15") -> None:
    """Put a file under every name the workflow's loaders and LoadImage nodes select: the tiny checkpoint
    (linked) for checkpoints, a tiny random ControlNet of ``family`` for ControlNets, a small 2:1 test picture for
    images, and an empty placeholder for the rest (diffusion models, text encoders, VAEs): enough for ComfyUI's
    validation and the frontend's model lists, which only read names; a run replaces those loaders
    (``tests/comfy/test_example_workflows.py``, ``stand_in_family``)."""
    import numpy as np
    from PIL import Image

    from devtools import models as tm
    for name, folder in named_models(workflow, classes):
        target = models_dir / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            continue
        if folder == "checkpoints":
            target.symlink_to(tiny_ckpt)
        elif folder == "controlnet":
            tm.write_controlnet(target, family=family, seed=SEED + 5)
        else:
            target.write_bytes(b"")
    for name in named_input_images(workflow, classes):
        target = input_dir / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            x = np.linspace(0, 255, 128, dtype=np.float32)
            rgb = np.stack([np.broadcast_to(x, (64, 128)), np.broadcast_to(x[::-1], (64, 128)),
                            np.full((64, 128), 96.0)], axis=-1)
            Image.fromarray(rgb.astype(np.uint8), "RGB").save(target)


def write_random_lpips_trunk(seed: int = SEED) -> Path:
    """A random VGG16 trunk in ComfyUI's ``models/lpips``, so synchronization runs offline (the real architecture,
    shapes and gradients; meaningless as a perception measure)."""
    from devtools import models as tm
    path = runtime().models_dir / "lpips" / "vgg16-random-test.safetensors"
    if not path.exists():
        tm.write_random_trunk(path, "vgg16", seed)
    return path
