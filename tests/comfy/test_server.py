"""The real ComfyUI server (``main.py --cpu``) with this pack in its custom_nodes folder, driven over HTTP:
the pack loads exactly as users load it, shows up in /object_info, and a prompt POSTed to /prompt that
runs the pack's sampler ends in an image file written by SaveImage."""
from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest

from devtools import harness as h
from devtools.server import LINK_NAME, running
from devtools.server import get as _get
from devtools.server import post as _post

pytestmark = pytest.mark.slow  # starts the real server in a subprocess

RUN_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfy, tiny_sd15, lpips_trunk):
    yield from running(tmp_path_factory.mktemp("server"), comfy.models_dir)


def _panorama_prompt(ckpt_name: str) -> dict:
    sampler_inputs = {
        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["ckpt", 2],
        "latent_image": ["lat", 0], "seed": 11, "steps": 2, "cfg": 5.0,
        "window_size": 64, "stride": 32, "sync_weight": 20.0, "sync_decay": 0.95, "sync_steps": 1,
        "sync_every": 1, "wrap": False, "window_batch": 4,
    }
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": h.DEFAULT_PROMPT}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "lat": {"class_type": "PanoramaLatent", "inputs": {"width": 128, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "SyncDiffusionSampler", "inputs": sampler_inputs},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "server_pano"}},
    }


def _known_inputs(info: dict) -> set[str]:
    return set(info["input"].get("required", {})) | set(info["input"].get("optional", {}))


def test_pack_nodes_in_object_info(server, comfy):
    info = _get(server.url + "/object_info", timeout=60)
    missing = [nid for nid in comfy.pack_node_ids if nid not in info]
    assert not missing, f"pack nodes missing from the server's /object_info: {missing}\n{server.tail()}"
    for nid in comfy.pack_node_ids:
        assert info[nid]["python_module"] == f"custom_nodes.{LINK_NAME}", info[nid]["python_module"]
        assert info[nid]["category"].startswith("sampling/syncdiffusion")
    pano = info["PanoramaLatent"]
    assert {"width", "height", "batch_size"} <= _known_inputs(pano)
    assert pano["output"] == ["LATENT"]
    assert "IMPORT FAILED" not in server.tail(200_000).split("Import times for custom nodes")[-1].split("\n\n")[0]


def test_prompt_over_http_writes_the_panorama(server, comfy, tiny_sd15):
    prompt = _panorama_prompt(tiny_sd15.ckpt_name)
    info = _get(server.url + "/object_info/SyncDiffusionSampler")["SyncDiffusionSampler"]
    # send only inputs the running schema knows, so a renamed input fails here with a clear message
    unknown = set(prompt["sampler"]["inputs"]) - _known_inputs(info)
    assert not unknown, f"the server's SyncDiffusionSampler has no inputs {unknown}"
    status, body = _post(server.url + "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
    assert status == 200, f"/prompt refused the prompt: {json.dumps(body, indent=1)}"
    assert not body.get("node_errors"), body
    prompt_id = body["prompt_id"]

    deadline = time.monotonic() + RUN_TIMEOUT_S
    entry = None
    while time.monotonic() < deadline:
        hist = _get(f"{server.url}/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            entry = hist[prompt_id]
            if entry["status"].get("status_str") in ("success", "error"):
                break
        if server.proc.poll() is not None:
            pytest.fail(f"server died while running the prompt:\n{server.tail()}")
        time.sleep(0.5)
    assert entry is not None, f"prompt did not finish in {RUN_TIMEOUT_S} s:\n{server.tail()}"
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-4000:]

    images = entry["outputs"]["save"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    path = server.base / "output" / images[0].get("subfolder", "") / images[0]["filename"]
    assert path.is_file(), f"SaveImage reported {path}, which does not exist"
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (128, 64)
    # and the file is served back like the UI fetches it
    with urllib.request.urlopen(f"{server.url}/view?filename={images[0]['filename']}&type=output"
                                f"&subfolder={images[0].get('subfolder', '')}", timeout=10) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"
