"""PanoramaCoherence, with ComfyUI imported (CPU): schema, results, bad input, and trunk loading through the
registered ``models/lpips`` folder."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMFY = ROOT / ".comfyui" / "ComfyUI"
PACK = "syncdiffusion_pack_metrics_test"


def _import_pack():
    if not COMFY.is_dir():
        pytest.skip("ComfyUI runtime not installed (.comfyui/ComfyUI)")
    if str(COMFY) not in sys.path:
        sys.path.insert(0, str(COMFY))
    from comfy.cli_args import args

    args.cpu = True
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.nodes.metric_nodes")


@pytest.fixture(scope="module")
def mn():
    return _import_pack()


@pytest.fixture
def lpips_folder(mn, tmp_path, monkeypatch):
    """A folder registered under ComfyUI's ``lpips`` name holding random VGG16/VGG19 trunks; no hub cache,
    no network."""
    import folder_paths

    P = mn.perceptual
    folder = tmp_path / "lpips"
    folder.mkdir()
    for name, seed in (("vgg16", 0), ("vgg19", 1)):
        torch.manual_seed(seed)
        sd = {f"features.{k}": v for k, v in P.vgg_features(name).state_dict().items()}
        torch.save(sd, folder / P.TRUNKS[name].file_name)

    def offline(*args, **kwargs):
        raise OSError("offline (simulated)")

    monkeypatch.setattr(P, "_download", offline)
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    mn.comfy_bridge.lpips_search_paths()  # registers the default folder
    folder_paths.add_model_folder_path("lpips", str(folder))
    P.clear_cache()
    yield folder
    folder_paths.folder_names_and_paths["lpips"][0].remove(str(folder))
    torch.hub.set_dir(old_hub)
    P.clear_cache()


def _image(crops: list[torch.Tensor]) -> torch.Tensor:
    """ComfyUI IMAGE (1, H, W, 3) in [0, 1] from (3, h, w) crops in [0, 1] laid side by side."""
    return torch.cat(crops, dim=-1).movedim(0, -1)[None].contiguous()


def test_schema_is_complete_with_tooltips_and_registered(mn):
    from comfy_api.latest import io

    schema = mn.PanoramaCoherence.define_schema()
    assert schema.node_id == "PanoramaCoherence"
    assert schema.category == importlib.import_module(f"{PACK}.nodes.common").CATEGORY
    assert [i.id for i in schema.inputs] == ["image", "window_size"]
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert [type(o) for o in schema.outputs] == [io.Float.Output, io.Float.Output, io.String.Output]
    assert schema.inputs[1].default == 512
    nodes_pkg = importlib.import_module(f"{PACK}.nodes")
    assert mn.PanoramaCoherence in nodes_pkg.NODES


def test_repeated_crop_scores_zero_and_different_crops_score_higher(mn, lpips_folder):
    g = torch.Generator().manual_seed(3)
    crop = torch.rand(3, 32, 32, generator=g, dtype=torch.float32)
    same = mn.PanoramaCoherence.execute(image=_image([crop] * 3), window_size=32)
    lp0, st0, text = same.result
    assert isinstance(lp0, float) and isinstance(st0, float) and isinstance(text, str)
    assert lp0 == pytest.approx(0, abs=1e-7) and st0 == pytest.approx(0, abs=1e-12)
    assert "3 crops" in text and "3 pairs" in text and "vgg16-397923af.pth" in text
    other = [torch.rand(3, 32, 32, generator=g, dtype=torch.float32) for _ in range(3)]
    diff = mn.PanoramaCoherence.execute(image=_image(other), window_size=32)
    lp1, st1, _ = diff.result
    assert lp1 > 1e-3 and st1 > 0
    # a batch of both: per-image numbers in the text, outputs their mean
    both = mn.PanoramaCoherence.execute(image=torch.cat([_image([crop] * 3), _image(other)]), window_size=32)
    assert both.result[0] == pytest.approx((lp0 + lp1) / 2, rel=1e-5)
    assert "image 1" in both.result[2]


def test_an_image_smaller_than_two_windows_is_refused_before_loading(mn, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("LPIPS was loaded for an image that cannot be measured")

    monkeypatch.setattr(mn.comfy_bridge, "get_lpips", must_not_load)
    with pytest.raises(ValueError, match="image") as info:
        mn.PanoramaCoherence.execute(image=torch.rand(1, 512, 1000, 3), window_size=512)
    assert "1024x512" in str(info.value) and "window_size" in str(info.value)


def test_missing_trunk_names_the_file_and_the_models_lpips_folder(mn, tmp_path, monkeypatch):
    import folder_paths

    P = mn.perceptual
    monkeypatch.setattr(P, "_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline (simulated)")))
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    P.clear_cache()
    try:
        with pytest.raises(FileNotFoundError) as info:
            mn.PanoramaCoherence.execute(image=torch.rand(1, 32, 64, 3), window_size=32)
    finally:
        torch.hub.set_dir(old_hub)
    msg = str(info.value)
    assert "vgg16-397923af.pth" in msg
    assert os.path.join(folder_paths.models_dir, "lpips") in msg
