"""The real ComfyUI server (``main.py --cpu``) with this pack in its custom_nodes folder, driven over HTTP:
the pack loads exactly as users load it, shows up in /object_info, and a prompt POSTed to /prompt that
runs the pack's sampler ends in an image file written by SaveImage."""
import json
import urllib.request

import pytest

from devtools import harness as h
from devtools.server import LINK_NAME, running
from devtools.server import get as _get

pytestmark = pytest.mark.slow  # starts the real server in a subprocess

RUN_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfy, tiny_sd15, lpips_trunk):
    yield from running(tmp_path_factory.mktemp("server"), comfy.models_dir)


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
    prompt = h.panorama_prompt(tiny_sd15.ckpt_name, decode=("VAEDecode", {}),
                               save=("SaveImage", {"filename_prefix": "server_pano"}))
    info = _get(server.url + "/object_info/SyncDiffusionSampler")["SyncDiffusionSampler"]
    # send only inputs the running schema knows, so a renamed input fails here with a clear message
    unknown = set(prompt["sampler"]["inputs"]) - _known_inputs(info)
    assert not unknown, f"the server's SyncDiffusionSampler has no inputs {unknown}"
    status, body = server.submit(prompt)
    assert status == 200, f"/prompt refused the prompt: {json.dumps(body, indent=1)}"
    assert not body.get("node_errors"), body
    entry = server.wait(body["prompt_id"], RUN_TIMEOUT_S)  # raises when the server dies meanwhile
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
