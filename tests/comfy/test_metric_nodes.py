"""PanoramaCoherence inside the headless ComfyUI of the harness (conftest.py): schema, results through a real
graph, bad input, and trunk loading through the registered ``models/lpips`` folder."""
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def mn(comfy):
    """The pack's metric_nodes module, as ComfyUI loaded it."""
    return sys.modules[f"{comfy.pack_module.__name__}.nodes.metric_nodes"]


@pytest.fixture(scope="module")
def trunks(comfy, lpips_trunk, mn):
    """The harness's random VGG16 in models/lpips, plus a random VGG19 written next to it."""
    from devtools import models as tiny_models

    path = lpips_trunk.parent / "vgg19-random-test.safetensors"
    if not path.exists():
        tiny_models.write_random_trunk(path, "vgg19", seed=5)
    return lpips_trunk, path


def _image(crops: list[torch.Tensor]) -> torch.Tensor:
    """ComfyUI IMAGE (1, H, W, 3) in [0, 1] from (3, h, w) crops in [0, 1] laid side by side."""
    return torch.cat(crops, dim=-1).movedim(0, -1)[None].contiguous()


def _crops(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 32, 32, generator=g, dtype=torch.float32) for _ in range(n)]


def _coherence(run_prompt, object_node, image, window_size):
    prompt = {"1": object_node(image, "IMAGE"),
              "2": {"class_type": "PanoramaCoherence", "inputs": {"image": ["1", 0], "window_size": window_size}}}
    return run_prompt(prompt)


def test_schema_is_complete_with_tooltips_and_registered(comfy, mn):
    from comfy_api.latest import io

    schema = mn.PanoramaCoherence.define_schema()
    assert schema.node_id == "PanoramaCoherence" and "PanoramaCoherence" in comfy.pack_node_ids
    assert schema.category == mn.CATEGORY == "sampling/syncdiffusion"
    assert [i.id for i in schema.inputs] == ["image", "window_size"]
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert [type(o) for o in schema.outputs] == [io.Float.Output, io.Float.Output, io.String.Output]
    assert schema.inputs[1].default == 512


def test_graph_repeated_crop_scores_zero_and_different_crops_score_higher(run_prompt, object_node, trunks):
    (crop,) = _crops(3, 1)
    same = _coherence(run_prompt, object_node, _image([crop] * 3), 32)["2"]
    lp0, st0, text = same
    assert isinstance(lp0, float) and isinstance(st0, float) and isinstance(text, str)
    assert lp0 == pytest.approx(0, abs=1e-7) and st0 == pytest.approx(0, abs=1e-12)
    assert "3 crops" in text and "3 pairs" in text
    assert trunks[0].name in text and trunks[1].name in text  # loaded from models/lpips
    other = _crops(4, 3)
    lp1, st1, _ = _coherence(run_prompt, object_node, _image(other), 32)["2"]
    assert lp1 > 1e-3 and st1 > 0
    # a batch of both: per-image numbers in the text, outputs their mean
    lp2, _, text2 = _coherence(run_prompt, object_node, torch.cat([_image([crop] * 3), _image(other)]), 32)["2"]
    assert lp2 == pytest.approx((lp0 + lp1) / 2, rel=1e-5)
    assert "image 1" in text2


def test_an_image_smaller_than_two_windows_is_refused_before_loading(mn, pack, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("LPIPS was loaded for an image that cannot be measured")

    monkeypatch.setattr(pack.assets, "get_lpips", must_not_load)
    with pytest.raises(ValueError, match="image") as info:
        mn.PanoramaCoherence.execute(image=torch.rand(1, 512, 1000, 3), window_size=512)
    assert "1024x512" in str(info.value) and "window_size" in str(info.value)


def test_graph_error_for_a_small_image_names_the_input(run_prompt, object_node):
    from devtools.headless import PromptExecutionError

    with pytest.raises(PromptExecutionError) as info:
        _coherence(run_prompt, object_node, torch.rand(1, 32, 40, 3), 32)
    assert info.value.exception_type == "ValueError" and "image" in info.value.exception_message


def test_missing_trunk_names_the_file_and_the_models_lpips_folder(comfy, mn, tmp_path, monkeypatch):
    P = mn.perceptual
    fp = comfy.folder_paths
    empty_models = tmp_path / "models"
    monkeypatch.setattr(fp, "models_dir", str(empty_models))
    monkeypatch.setitem(fp.folder_names_and_paths, "lpips", ([str(empty_models / "lpips")], {".pth"}))
    monkeypatch.setattr(P.trunks, "_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline (simulated)")))
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(FileNotFoundError) as info:
            mn.PanoramaCoherence.execute(image=torch.rand(1, 32, 64, 3), window_size=32)
    finally:
        torch.hub.set_dir(old_hub)
    msg = str(info.value)
    assert "vgg16-397923af.pth" in msg and str(empty_models / "lpips") in msg and "offline (simulated)" in msg


def test_lpips_search_paths_include_models_lpips(comfy, pack):
    import os

    paths = pack.assets.lpips_search_paths()
    assert paths[0] == os.path.join(comfy.folder_paths.models_dir, "lpips")
