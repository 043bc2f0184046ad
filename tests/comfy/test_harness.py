"""The harness itself, against real ComfyUI: the pack loads as a custom node, tiny checkpoints are detected
as the right families, and prompts execute through ComfyUI's PromptExecutor (stock nodes + PanoramaLatent)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devtools import harness as h

ROOT = Path(__file__).resolve().parents[2]


def test_pack_is_loaded_as_a_custom_node_package(comfy):
    assert comfy.pack_node_ids, "the pack registered no nodes"
    assert "PanoramaLatent" in comfy.pack_node_ids
    for nid in comfy.pack_node_ids:
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[nid]
        assert cls.RELATIVE_PYTHON_MODULE.startswith("custom_nodes."), nid
    # the top-level `nodes` module is ComfyUI's nodes.py, never this repository's nodes/ folder
    assert Path(sys.modules["nodes"].__file__).resolve() == (comfy.comfy_dir / "nodes.py").resolve()
    assert comfy.pack_module is not None and Path(comfy.pack_module.__file__).resolve() == ROOT / "__init__.py"


def test_folder_paths_point_at_the_temp_base(comfy):
    base = comfy.base_dir
    assert comfy.output_dir == base / "output"
    assert comfy.input_dir == base / "input"
    assert Path(comfy.folder_paths.get_folder_paths("checkpoints")[0]).is_relative_to(base)
    assert not base.is_relative_to(comfy.comfy_dir)


@pytest.mark.parametrize("family,ctx,cls_name,linear", [("sd15", 768, "SD15", False), ("sd20", 1024, "SD20", True)])
def test_tiny_checkpoint_is_detected_as_its_family(request, family, ctx, cls_name, linear):
    tiny = request.getfixturevalue(f"tiny_{family}")
    mc = tiny.model.model.model_config
    assert type(mc).__name__ == cls_name
    assert mc.unet_config["context_dim"] == ctx
    assert mc.unet_config["model_channels"] == 320
    assert mc.unet_config["use_linear_in_transformer"] is linear
    assert tiny.model.model.latent_format.scale_factor == pytest.approx(0.18215)
    assert type(tiny.vae.first_stage_model).__name__ == "TAESD"
    n_params = sum(p.numel() for p in tiny.model.model.diffusion_model.parameters())
    assert 20e6 < n_params < 30e6
    cond, extra = tiny.positive[0]
    assert cond.shape == (1, 77, ctx) and torch.isfinite(cond).all()
    assert extra["pooled_output"].shape[-1] == ctx
    if family == "sd15":
        assert tiny.clip is not None
        assert not torch.equal(tiny.positive[0][0], tiny.negative[0][0])
    else:
        assert tiny.clip is None


def test_tiny_vae_round_trip_is_finite(tiny_sd15):
    fsm = tiny_sd15.vae.first_stage_model
    assert float(fsm.vae_scale.detach()) == 1.0 and float(fsm.vae_shift.detach()) == 0.0
    # the fixture's weights were loaded under inference mode, as in a graph: use them the same way
    with torch.inference_mode():
        img = tiny_sd15.vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
        lat = tiny_sd15.vae.encode(img)
    assert img.shape == (1, 64, 64, 3) and 0.2 < img.mean() < 0.8 and img.std() > 0.05
    assert lat.shape == (1, 4, 8, 8) and torch.isfinite(lat).all()


def test_same_seed_gives_identical_weights(comfy, tmp_path):
    from devtools import models as tiny_models
    a = tiny_models.build_model("sd15", seed=3).model.diffusion_model.state_dict()
    b = tiny_models.build_model("sd15", seed=3).model.diffusion_model.state_dict()
    c = tiny_models.build_model("sd15", seed=4).model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())


def test_panorama_latent_through_the_executor(run_prompt):
    result = run_prompt({"1": {"class_type": "PanoramaLatent", "inputs": {"width": 256, "height": 128, "batch_size": 2}}})
    assert result.success
    latent = result["1"][0]
    assert latent["samples"].shape == (2, 4, 16, 32)
    assert not latent["samples"].any()


def test_node_error_is_raised_with_its_type(run_prompt):
    with pytest.raises(h.PromptExecutionError) as ei:
        run_prompt({"1": {"class_type": "PanoramaLatent", "inputs": {"width": 100, "height": 128, "batch_size": 1}}})
    assert ei.value.exception_type.endswith("ValueError")
    assert "width" in ei.value.exception_message
    assert ei.value.node_id == "1"


def test_invalid_prompt_fails_validation(run_prompt):
    with pytest.raises(h.PromptValidationError, match="PanoramaLatent|width"):
        run_prompt({"1": {"class_type": "PanoramaLatent", "inputs": {"width": 16, "height": 128, "batch_size": 1}}})
    # ComfyUI's wording differs between versions ("Cannot execute because node X does not exist." in 0.3.x,
    # "Node 'X' not found. The custom node may not be installed." in 0.33): both name the class and say it is missing
    with pytest.raises(h.PromptValidationError, match=r"NoSuchNode\W.*(does not exist|not found)") as ei:
        run_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert ei.value.error.get("type") in ("invalid_prompt", "missing_node_type"), ei.value.error


def test_executor_is_built_for_this_comfyui(comfy):
    """The harness's PromptExecutor gets ``cache_args`` with every key an executor reads (0.33 reads
    ``ram_inactive``), which every supported ComfyUI's constructor takes."""
    import inspect

    params = inspect.signature(comfy.execution.PromptExecutor.__init__).parameters
    executor = h.comfy_headless.new_executor(comfy.execution, h.comfy_headless.ServerStub())
    assert "cache_args" in params
    assert executor.cache_args == {"lru": 0, "ram": 0, "ram_inactive": 0}


def test_cache_reader_awaits_async_caches():
    """The executor's output caches answer ``get`` directly (0.3.x) or with a coroutine (0.33): both are read."""
    store = {"a": ("x",)}

    class PlainCache:
        def get(self, node_id):
            return store.get(node_id)

    class AsyncCache:
        async def get(self, node_id):
            return store.get(node_id)

    assert h.comfy_headless.cache_get_all(PlainCache(), ["a", "b"]) == [("x",), None]
    assert h.comfy_headless.cache_get_all(AsyncCache(), ["a", "b"]) == [("x",), None]


def _txt2img(ckpt_name: str, steps: int = 2, width: int = 128, height: int = 64, prefix: str = "harness") -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": h.DEFAULT_PROMPT}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "lat": {"class_type": "PanoramaLatent", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": 7, "steps": steps, "cfg": 5.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
            "denoise": 1.0}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": prefix}},
    }


def test_stock_sampling_graph_writes_an_image(run_prompt, tiny_sd15):
    result = run_prompt(_txt2img(tiny_sd15.ckpt_name, steps=2))
    files = result.image_files("save")
    assert len(files) == 1 and files[0].is_file()
    with Image.open(files[0]) as im:
        assert im.size == (128, 64)
        pixels = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32))
    # a real picture of random content: neither clamped to black/white nor constant
    assert 30 < pixels.mean() < 225 and pixels.std() > 5
    samples = result["ks"][0]["samples"]
    assert samples.shape == (1, 4, 8, 16) and torch.isfinite(samples).all() and samples.abs().sum() > 0
    # KSampler reported its steps through comfy.utils.ProgressBar
    assert [(n, v, t) for n, v, t in result.progress if n == "ks"][-1] == ("ks", 2, 2)


def test_same_graph_same_seed_is_deterministic(run_prompt, tiny_sd15):
    a = run_prompt(_txt2img(tiny_sd15.ckpt_name, steps=2, prefix="det_a"))["ks"][0]["samples"]
    b = run_prompt(_txt2img(tiny_sd15.ckpt_name, steps=2, prefix="det_b"))["ks"][0]["samples"]
    assert torch.equal(a, b)


def test_cancel_interrupts_a_running_sampler(run_prompt, tiny_sd15):
    result = run_prompt(_txt2img(tiny_sd15.ckpt_name, steps=4, prefix="cancel"), interrupt_after_progress=1)
    assert result.interrupted
    assert not result.success
    assert result.image_files() == []


def test_object_nodes_feed_in_memory_objects(run_prompt, object_node, tiny_sd20, tiny_kl_vae):
    latent = {"samples": torch.randn(1, 4, 8, 24, generator=torch.Generator().manual_seed(0))}
    prompt = {
        "lat": object_node(latent, "LATENT"),
        "vae": object_node(tiny_kl_vae, "VAE"),
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["lat", 0], "vae": ["vae", 0]}},
    }
    image = run_prompt(prompt)["dec"][0]
    assert image.shape == (1, 64, 192, 3)
    assert 0.0 <= image.min() and image.max() <= 1.0

    # SD2.x model + conditioning tensors, no text encoder involved
    prompt = {
        "model": object_node(tiny_sd20.model, "MODEL"),
        "pos": object_node(tiny_sd20.positive, "CONDITIONING"),
        "neg": object_node(tiny_sd20.negative, "CONDITIONING"),
        "lat": {"class_type": "PanoramaLatent", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": 1, "steps": 1, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    }
    out = run_prompt(prompt)["ks"][0]["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
