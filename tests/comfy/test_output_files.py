"""SavePanorama360's files (issue 15): never an overwrite, never a half-written file, the workflow kept, and a clear
error for a folder that cannot be written."""
import contextlib
import errno
import os
import tempfile
from pathlib import Path

import pytest
import torch

from devtools import harness as h


def _images(n=2, height=32, width=64, seed=0):
    return torch.rand(n, height, width, 3, generator=torch.Generator().manual_seed(seed))


def _save_prompt(object_node, images, prefix, fmt="png"):
    return {"1": object_node(images, "IMAGE"),
            "2": {"class_type": "SavePanorama360", "inputs": {"images": ["1", 0], "filename_prefix": prefix,
                                                              "format": fmt, "jpeg_quality": 90}}}


def _partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.startswith(".syncdiff-"))


def _pixels(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).float() / 255


@pytest.mark.slow
def test_saving_twice_never_overwrites_and_keeps_the_workflow(run_prompt, object_node, comfy):
    workflow = {"nodes": [{"id": 2, "type": "SavePanorama360"}], "note": "kept"}
    first = run_prompt(_save_prompt(object_node, _images(seed=1), "files/again"),
                       extra_data={"extra_pnginfo": {"workflow": workflow}}).image_files("2")
    before = {p: p.read_bytes() for p in first}
    second = run_prompt(_save_prompt(object_node, _images(seed=2), "files/again")).image_files("2")
    assert len(first) == len(second) == 2 and not set(first) & set(second)
    assert [p.name for p in first + second] == [f"again_{c:05}_.png" for c in (1, 2, 3, 4)]
    for p, data in before.items():
        assert p.read_bytes() == data, f"{p} was changed by the second save"
    from PIL import Image

    import json
    with Image.open(first[0]) as im:
        assert json.loads(im.info["workflow"]) == workflow
        assert "SavePanorama360" in json.loads(im.info["prompt"])["2"]["class_type"]
        assert "GPano:ProjectionType" in im.info["XML:com.adobe.xmp"]
    assert not _partials(comfy.output_dir / "files")


@pytest.mark.slow
def test_a_name_that_is_taken_is_skipped_never_overwritten(run_prompt, object_node, comfy):
    """ComfyUI's counter does not see every clash: with %batch_num% in the prefix it always starts at 1, and another
    process may take the name between the count and the write. Existing files, and a folder of that name, stay."""
    folder = comfy.output_dir / "clash"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pano_0_00001_.png").write_bytes(b"not mine")
    (folder / "pano_0_00002_.png").mkdir()
    (folder / "pano_1_00001_.png").write_bytes(b"not mine either")
    images = _images(seed=3)
    files = run_prompt(_save_prompt(object_node, images, "clash/pano_%batch_num%")).image_files("2")
    assert [f.name for f in files] == ["pano_0_00003_.png", "pano_1_00004_.png"]
    assert (folder / "pano_0_00001_.png").read_bytes() == b"not mine"
    assert (folder / "pano_1_00001_.png").read_bytes() == b"not mine either"
    assert (folder / "pano_0_00002_.png").is_dir()
    for f, image in zip(files, images):
        assert (_pixels(f) - image).abs().max() <= 0.5 / 255 + 1e-6
    assert not _partials(folder)


def test_write_new_file_is_atomic_also_without_hard_links(pack, tmp_path, monkeypatch):
    """The file appears under its name complete (a hard link of the finished temporary file); where the file system
    has no hard links, the name is claimed exclusively and the finished file renamed over the claim."""
    out = pack.output
    names = lambda k: f"x_{k:05}_.png"  # noqa: E731
    (tmp_path / names(0)).write_bytes(b"old")
    assert out.write_new_file(str(tmp_path), b"new data", names) == names(1)

    def no_links(src, dst, **kw):
        raise OSError(errno.EPERM, "hard links not supported here", dst)

    monkeypatch.setattr(os, "link", no_links)
    assert out.write_new_file(str(tmp_path), b"more data", names) == names(2)
    assert [(p.name, p.read_bytes()) for p in sorted(tmp_path.iterdir())] == [
        (names(0), b"old"), (names(1), b"new data"), (names(2), b"more data")]
    for k in (1, 2):  # the umask applies as for any new file, not the temporary file's owner-only mode
        assert (tmp_path / names(k)).stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_cancel_while_saving_leaves_complete_files_and_no_temporary_file(run_prompt, object_node, comfy):
    images = _images(n=3, seed=4)
    pressed = []

    def cancel_after_first_image(node_id, value, total):
        if node_id == "2" and value == 1 and not pressed:
            pressed.append(1)
            comfy.nodes.interrupt_processing(True)

    result = run_prompt(_save_prompt(object_node, images, "cancelsave/pano"), on_progress=cancel_after_first_image)
    assert result.interrupted and pressed
    folder = comfy.output_dir / "cancelsave"
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["pano_00001_.png"], files
    assert (_pixels(files[0]) - images[0]).abs().max() <= 0.5 / 255 + 1e-6
    assert not _partials(folder)


@contextlib.contextmanager
def _without_write_permission(folder: Path):
    """``folder`` read-only for the code in the block. As root, permission bits do not stop writes, so the block
    runs with the effective user id of 'nobody' (root can take its own id back)."""
    folder.chmod(0o555)
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    try:
        if as_root:
            os.seteuid(65534)
        yield
    finally:
        if as_root:
            os.seteuid(0)
        folder.chmod(0o755)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "seteuid"), reason="POSIX permissions")
@pytest.mark.parametrize("where", ["folder", "subfolder"])
def test_a_read_only_output_folder_gives_a_clear_error_naming_it(run_prompt, object_node, comfy, where):
    root = Path(tempfile.mkdtemp(prefix="syncdiff-ro-"))
    root.chmod(0o755)  # traversable by the unprivileged user below
    output = root / "output"
    output.mkdir()
    saved_dir = comfy.folder_paths.get_output_directory()
    comfy.folder_paths.set_output_directory(str(output))
    prefix = "pano" if where == "folder" else "sub/pano"
    expected = output if where == "folder" else output / "sub"
    try:
        with _without_write_permission(output):
            probe = output / "probe"
            with pytest.raises(PermissionError):
                probe.write_bytes(b"")
            with pytest.raises(h.PromptExecutionError) as err:
                run_prompt(_save_prompt(object_node, _images(seed=5), prefix))
    finally:
        comfy.folder_paths.set_output_directory(saved_dir)
    message = err.value.exception_message
    assert "cannot write into the output folder" in message and str(expected) in message, message
    assert "Permission denied" in message
    assert list(output.iterdir()) == []


@pytest.mark.parametrize("prefix,match", [
    ("x" * 300, "filename_prefix makes the file name 'xxx"),
    ("bad\x00name", "filename_prefix must not contain a NUL character"),
    ("../../escape", "outside the output folder"),
])
def test_a_bad_filename_prefix_gets_a_clear_error_and_writes_nothing(pack, comfy, prefix, match):
    before = set(comfy.output_dir.rglob("*"))
    with pytest.raises(Exception, match=match):
        pack.output.save_panoramas(_images(n=1, seed=6), prefix, "png", 95)
    assert set(comfy.output_dir.rglob("*")) == before
