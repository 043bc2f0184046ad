"""Damaged or wrong LPIPS trunk files in models/lpips (issue 15): each gives an error that names the file and says
what was expected, and a file is only ever read through safetensors or ``torch.load(weights_only=True)``."""
import pickle
from pathlib import Path

import pytest
import torch

from syncdiff_core import perceptual as P

V16 = P.TRUNKS["vgg16"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A random VGG16 trunk (features only) as .pth and .safetensors."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("good_trunks")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sd = {f"features.{k}": v.contiguous() for k, v in P.vgg_features("vgg16").state_dict().items()}
    torch.save(sd, root / V16.file_name)
    save_file(sd, str(root / "vgg16.safetensors"))
    return {"pth": root / V16.file_name, "safetensors": root / "vgg16.safetensors", "sd": sd}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No hub cache and no download: only the folder under test is searched."""
    def no_download(url, dst, hash_prefix, timeout):
        raise OSError("offline (test)")

    monkeypatch.setattr(P.trunks, "_download", no_download)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    P.clear_cache()
    yield
    P.clear_cache()
    torch.hub.set_dir(old)


def _folder_with(tmp_path: Path, name: str, data: bytes) -> Path:
    folder = tmp_path / "lpips"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


def _expect_clear_error(folder: Path, name: str, *fragments: str) -> str:
    with pytest.raises(P.TrunkFileError) as info:
        P.load_lpips([folder], "cpu")
    message = str(info.value)
    assert str(folder / name) in message, message
    assert V16.file_name in message and "VGG16" in message, message  # what was expected
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_a_truncated_file_is_named_with_what_was_expected(good, tmp_path, kind, keep):
    data = good[kind].read_bytes()
    name = good[kind].name
    folder = _folder_with(tmp_path, name, data[: int(len(data) * keep)])
    _expect_clear_error(folder, name, "truncated", "cannot be read")


@pytest.mark.parametrize("name", [V16.file_name, "vgg16.safetensors"])
def test_a_web_page_saved_under_the_trunk_name_is_refused(tmp_path, name):
    folder = _folder_with(tmp_path, name, b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    _expect_clear_error(folder, name, "cannot be read")


class _RunsCode:
    """A pickle that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (Path.touch, (Path(MARKER[0]),))


MARKER: list[str] = []


def test_pickled_code_is_never_run(tmp_path):
    MARKER[:] = [str(tmp_path / "code-ran")]
    folder = tmp_path / "lpips"
    folder.mkdir()
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "payload": _RunsCode()}, folder / V16.file_name)
    with open(tmp_path / "plain.pkl", "wb") as f:  # the same object as a legacy (non-zip) pickle
        pickle.dump({"payload": _RunsCode()}, f)
    (tmp_path / "plain.pkl").replace(tmp_path / "vgg16.pth")
    for candidate in (folder, tmp_path / "vgg16.pth"):
        with pytest.raises(P.TrunkFileError, match="weights only"):
            P.load_lpips([candidate], "cpu")
    assert not Path(MARKER[0]).exists(), "loading a trunk file ran pickled code"


def test_a_file_of_other_shapes_or_values_is_refused_with_the_reason(good, tmp_path):
    sd = dict(good["sd"])
    sd["features.28.weight"] = torch.zeros(512, 512, 1, 1)
    folder = _folder_with(tmp_path, "a", b"")
    (folder / "a").unlink()
    torch.save(sd, folder / V16.file_name)
    _expect_clear_error(folder, V16.file_name, "wrong shapes: features.28.weight (512, 512, 1, 1)")
    P.clear_cache()
    sd = dict(good["sd"])
    sd["features.0.weight"] = sd["features.0.weight"].clone()
    sd["features.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, folder / V16.file_name)
    _expect_clear_error(folder, V16.file_name, "non-finite", "features.0.weight")
    P.clear_cache()
    torch.save([1, 2, 3], folder / V16.file_name)
    _expect_clear_error(folder, V16.file_name, "holds a list")


def test_a_repaired_file_loads_after_a_failure(good, tmp_path):
    """A failed load leaves nothing cached: replacing the file is enough."""
    data = good["safetensors"].read_bytes()
    folder = _folder_with(tmp_path, "vgg16.safetensors", data[:1000])
    with pytest.raises(P.TrunkFileError):
        P.load_lpips([folder], "cpu")
    (folder / "vgg16.safetensors").write_bytes(data)
    loss = P.load_lpips([folder], "cpu")
    assert torch.equal(loss.inner.net.slice1[0].weight, good["sd"]["features.0.weight"])


def test_both_file_kinds_load_when_intact(good):
    for kind in ("pth", "safetensors"):
        sd = P.load_trunk_state_dict("vgg16", good[kind])
        assert torch.equal(sd["0.weight"], good["sd"]["features.0.weight"])
