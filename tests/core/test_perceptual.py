"""LPIPS loading (offline search order, file formats, clear errors), LPIPS behaviour under ComfyUI's inference
mode, and the paper's coherence metrics. Trunk files are written here with seeded random weights."""
import warnings
from pathlib import Path

import pytest
import torch

from syncdiff_core import perceptual as P

DEFAULT_DTYPE = torch.float32  # whatever another test module left set (tests/conftest.py)

V16 = P.TRUNKS["vgg16"].file_name
V19 = P.TRUNKS["vgg19"].file_name


@pytest.fixture(scope="session")
def trunks(tmp_path_factory):
    """torchvision's vgg16()/vgg19() with seeded random weights, written under torchvision's file names (VGG16
    as the whole model, classifier included, as torchvision ships it; VGG19 as its features only) and VGG16
    also as a features-only .safetensors."""
    import torchvision
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("trunks")
    pth_dir, st_dir = root / "pth", root / "safetensors"
    pth_dir.mkdir()
    st_dir.mkdir()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # whatever another test module left set
    try:
        torch.manual_seed(0)
        vgg16 = torchvision.models.vgg16()
        # torchvision's keys and shapes; the classifier (unused by LPIPS, 500 MB at full size) saved as one zero
        # broadcast to each shape, so the file stays small on disk
        whole = {k: (torch.zeros(()).expand(v.shape) if k.startswith("classifier.") else v)
                 for k, v in vgg16.state_dict().items()}
        torch.save(whole, pth_dir / V16)
        f16 = {k: v.clone() for k, v in vgg16.state_dict().items() if k.startswith("features.")}
        save_file(f16, str(st_dir / "vgg16.safetensors"))
        vgg16.classifier = None  # keep only what the LPIPS reference below needs
        torch.manual_seed(1)
        vgg19 = torchvision.models.vgg19()
        torch.save({k: v for k, v in vgg19.state_dict().items() if k.startswith("features.")}, pth_dir / V19)
    finally:
        torch.set_default_dtype(default_dtype)
    return {"pth": pth_dir, "st": st_dir, "f16": f16, "vgg16": vgg16.eval(), "vgg19_features": vgg19.features.eval()}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """An empty hub cache, no network (the download raises, and records that it was tried), an empty cache."""
    tried = []

    def offline(url, dst, hash_prefix, timeout):
        tried.append((url, Path(dst)))
        raise OSError("network is unreachable (simulated)")

    monkeypatch.setattr(P.trunks, "_download", offline)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    P.clear_cache()
    yield tried
    P.clear_cache()
    torch.hub.set_dir(old)


def _trunk_weight(loss: P.LPIPSLoss) -> torch.Tensor:
    return loss.inner.net.slice1[0].weight


def _images(seed, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------------------------- Loading

def test_folder_comes_before_the_hub_cache_and_the_hub_cache_before_a_download(trunks, tmp_path, isolated):
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(7)
    other = {f"features.{k}": v for k, v in P.vgg_features("vgg16").state_dict().items()}
    torch.save(other, hub / V16)

    from_folder = P.load_lpips([tmp_path / "empty", trunks["pth"]], "cpu")
    assert Path(from_folder.source) == trunks["pth"] / V16
    assert torch.equal(_trunk_weight(from_folder), trunks["f16"]["features.0.weight"])

    from_hub = P.load_lpips([tmp_path / "empty"], "cpu")
    assert Path(from_hub.source) == hub / V16
    assert torch.equal(_trunk_weight(from_hub), other["features.0.weight"])
    assert isolated == []  # found offline both times: no download tried


def test_offline_with_no_file_raises_a_clear_error_naming_file_folder_and_url(tmp_path, isolated):
    folder = tmp_path / "models" / "lpips"
    folder.mkdir(parents=True)
    with pytest.raises(P.TrunkWeightsNotFound) as info:
        P.load_lpips([folder], "cpu")
    msg = str(info.value)
    assert V16 in msg and str(folder) in msg
    assert P.TRUNKS["vgg16"].url in msg
    assert str(Path(torch.hub.get_dir()) / "checkpoints") in msg
    assert "simulated" in msg  # the download's failure is reported
    assert len(isolated) == 1 and isolated[0][0] == P.TRUNKS["vgg16"].url
    assert isolated[0][1] == Path(torch.hub.get_dir()) / "checkpoints" / V16

    with pytest.raises(FileNotFoundError, match="turned off"):
        P.load_lpips([folder], "cpu", allow_download=False)
    assert len(isolated) == 1  # not tried again


def test_download_lands_in_the_hub_cache_and_is_loaded(trunks, tmp_path, monkeypatch):
    calls = []

    def online(url, dst, hash_prefix, timeout):
        calls.append((url, hash_prefix))
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.save({f"features.{k}": v for k, v in P.vgg_features("vgg16").state_dict().items()}, dst)

    monkeypatch.setattr(P.trunks, "_download", online)
    loss = P.load_lpips([tmp_path], "cpu")
    assert calls == [(P.TRUNKS["vgg16"].url, "397923af")]
    assert Path(loss.source) == Path(torch.hub.get_dir()) / "checkpoints" / V16
    P.load_lpips([tmp_path], "cpu")
    assert len(calls) == 1  # second time it is in the hub cache


def test_safetensors_and_pth_give_the_same_lpips(trunks):
    a, b = _images(0), _images(1)
    from_pth = P.load_lpips([trunks["pth"]], "cpu")
    from_st = P.load_lpips([trunks["st"]], "cpu")
    assert Path(from_st.source).suffix == ".safetensors"
    assert from_pth is not from_st
    torch.testing.assert_close(from_pth(a, b), from_st(a, b), rtol=0, atol=0)


def test_a_file_of_the_wrong_network_is_refused_by_name(trunks, tmp_path):
    torch.save({f"features.{k}": v for k, v in P.vgg_features("vgg19").state_dict().items()}, tmp_path / V16)
    with pytest.raises(ValueError, match=V16.replace(".", r"\.")) as info:
        P.load_lpips([tmp_path], "cpu")
    assert "VGG16" in str(info.value)


def test_the_cache_returns_the_loaded_module_per_device(trunks):
    first = P.load_lpips([trunks["pth"]], "cpu")
    assert P.load_lpips([trunks["pth"]], torch.device("cpu")) is first
    P.clear_cache()
    assert P.load_lpips([trunks["pth"]], "cpu") is not first


# --------------------------------------------------------------------------------------------------- LPIPS behaviour

def test_lpips_equals_the_lpips_package_with_the_same_trunk(trunks, monkeypatch):
    import lpips
    import torchvision

    loss = P.load_lpips([trunks["pth"]], "cpu")
    # The package's own LPIPS, its trunk taken from the very torchvision model that wrote the file.
    monkeypatch.setattr(torchvision.models, "vgg16", lambda *args, **kwargs: trunks["vgg16"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", pretrained=True, verbose=False)
    a, b = _images(2, n=3), _images(3, n=3)
    with torch.no_grad():
        torch.testing.assert_close(loss(a, b), ref(a, b).reshape(-1), rtol=1e-5, atol=1e-6)


def test_lpips_is_zero_for_identical_images_and_positive_otherwise(trunks):
    loss = P.load_lpips([trunks["pth"]], "cpu")
    a, b = _images(4, n=3), _images(5, n=3)
    same, diff = loss(a, a), loss(a, b)
    assert same.shape == diff.shape == (3,)
    assert torch.all(same == 0)
    assert torch.all(diff > 1e-3)
    broadcast = loss(a, a[:1])  # a batch-1 target broadcasts
    assert float(broadcast[0]) == pytest.approx(0, abs=1e-9) and torch.all(broadcast[1:] > 1e-3)


def test_lpips_runs_in_float32_and_gradients_flow_to_half_images(trunks):
    loss = P.load_lpips([trunks["pth"]], "cpu")
    assert all(not p.requires_grad for p in loss.parameters())
    assert all(p.dtype == torch.float32 for p in loss.parameters())
    x = _images(6).half().requires_grad_(True)
    out = loss(x, _images(7).half())
    assert out.dtype == torch.float32 and out.shape == (2,)
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float16
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())


def test_loaded_under_inference_mode_backward_works_with_inference_mode_off(trunks):
    with torch.inference_mode():  # how ComfyUI runs a node
        loss = P.load_lpips([trunks["pth"]], "cpu")
        target = _images(8)  # an inference tensor, as a decoded anchor would be
        assert all(not p.is_inference() for p in loss.parameters())
        assert all(not b.is_inference() for b in loss.buffers())
        with torch.inference_mode(False), torch.enable_grad():
            x = _images(9).requires_grad_(True)
            (grad,) = torch.autograd.grad(loss(x, target).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------- Metrics

def test_crop_grid_cuts_non_overlapping_crops_in_raster_order_and_refuses_single_crops():
    img = torch.arange(2 * 3 * 5 * 9, dtype=torch.float32).reshape(2, 3, 5, 9)
    crops = P.crop_grid(img, 4)  # 1 row x 2 cols; the 1-px bottom and right remainders are left out
    assert crops.shape == (2, 2, 3, 4, 4)
    assert torch.equal(crops[1, 1], img[1, :, 0:4, 4:8])
    with pytest.raises(ValueError, match="at least two"):
        P.crop_grid(img, 5)


def _panorama(crops: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(crops, dim=-1)[None]  # one row of crops


def test_metrics_are_zero_for_one_repeated_crop_and_grow_as_crops_differ(trunks):
    lp = P.load_lpips([trunks["pth"]], "cpu")
    style = P.load_style_features([trunks["pth"]], "cpu")
    base = _images(10, n=1)[0] * 0.5
    g = torch.Generator().manual_seed(11)
    noise = [torch.randn(3, 32, 32, generator=g) for _ in range(4)]
    lpips_values, style_values = [], []
    for amount in (0.0, 0.1, 0.4):
        pano = _panorama([(base + amount * n).clamp(-1, 1) for n in noise])
        with torch.no_grad():
            lpips_values.append(float(P.intra_lpips(pano, 32, lp)))
            style_values.append(float(P.intra_style_l(pano, 32, style)))
    with torch.no_grad():
        layers = P.intra_style_l(pano, 32, style, per_layer=True)
    assert layers.shape == (1, 5) and float(layers.sum()) == pytest.approx(style_values[-1], rel=1e-5)
    assert lpips_values[0] == pytest.approx(0, abs=1e-7) and style_values[0] == pytest.approx(0, abs=1e-12)
    assert 0 < lpips_values[1] < lpips_values[2]
    assert 0 < style_values[1] < style_values[2]


def test_intra_lpips_is_the_mean_over_all_pairs(trunks):
    lp = P.load_lpips([trunks["pth"]], "cpu")
    crops = [_images(20 + i, n=1)[0] for i in range(3)]
    pano = torch.stack([_panorama(crops)[0], _panorama(crops[::-1])[0]])  # a batch of two panoramas
    with torch.no_grad():
        got = P.intra_lpips(pano, 32, lp)
        pairs = [float(lp(crops[i][None], crops[j][None])) for i, j in ((0, 1), (0, 2), (1, 2))]
        plain = P.intra_lpips(pano, 32, lambda a, b: lp(a, b))  # a callable without features/distance
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.full((2,), sum(pairs) / 3), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(plain, got, rtol=1e-5, atol=1e-7)


def test_style_features_are_torchvision_vgg19_relu_x_1_on_imagenet_normalised_input(trunks):
    style = P.load_style_features([trunks["pth"]], "cpu")
    assert Path(style.source).name == V19
    x = _images(30, n=1)
    ref_net = trunks["vgg19_features"]
    h = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    expected = []
    with torch.no_grad():
        for i, layer in enumerate(ref_net[:30]):
            h = layer(h)
            if i in (1, 6, 11, 20, 29):
                expected.append(h.clone())
        got = style(x)
    assert len(got) == 5
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # the Gram matrix is normalised by C*h*w
    f = torch.ones(1, 2, 3, 4)
    torch.testing.assert_close(P.gram(f), torch.full((1, 2, 2), 12 / 24))


def test_vgg19_missing_gives_the_same_clear_error(trunks, tmp_path):
    torch.save(trunks["f16"], tmp_path / V16)  # only the VGG16 file
    with pytest.raises(P.TrunkWeightsNotFound, match=V19.replace(".", r"\.")):
        P.load_style_features([tmp_path], "cpu")
