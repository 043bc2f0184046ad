"""`make demo CKPT=...` with the checkpoint in a folder that also holds link loops, as a folder containing this
repository does (.comfyui/ComfyUI/custom_nodes/comfyui-syncdiffusion -> ../../.., and the same link in the 0.33
lane's ComfyUI). The demo used to register the file's folder with ComfyUI, whose listing follows links: with two
links back to the folder, os.walk visits 2^40 paths before the kernel's link limit stops it, i.e. never comes
back. Now the demo shows ComfyUI that one file."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_S = 420


def _place(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)  # a real file in the looping folder, as a user's download would be
    except OSError:
        shutil.copy2(src, dest)


def _make_loops(folder: Path) -> None:
    for name in ("lane_a", "lane_b"):
        (folder / name).symlink_to(folder, target_is_directory=True)


def test_stage_checkpoint_shows_comfyui_only_that_file(comfy, tmp_path):
    from scripts import demo

    folder = tmp_path / "downloads"
    folder.mkdir()
    _make_loops(folder)
    (folder / "other.safetensors").write_bytes(b"")
    ckpt = folder / "my_model.safetensors"
    ckpt.write_bytes(b"not really a model")
    before = list(comfy.folder_paths.get_folder_paths("checkpoints"))
    name = demo.stage_checkpoint(comfy, ckpt)
    try:
        assert name == "my_model.safetensors"
        assert comfy.folder_paths.get_folder_paths("checkpoints") == before  # no folder registered
        assert Path(comfy.folder_paths.get_full_path("checkpoints", name)).resolve() == ckpt.resolve()
        assert "other.safetensors" not in comfy.folder_paths.get_filename_list("checkpoints")
    finally:
        (comfy.model_folder("checkpoints") / name).unlink()


@pytest.mark.slow
def test_demo_with_ckpt_next_to_a_link_loop_finishes(comfy, tiny_sd15, tmp_path):
    folder = tmp_path / "home"
    folder.mkdir()
    # the loops a folder that contains the repository has, and the checkpoint next to them
    _make_loops(folder)
    ckpt = folder / "model.safetensors"
    _place(tiny_sd15.ckpt_path, ckpt)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["COMFYUI_PATH"] = str(comfy.comfy_dir)
    env["PYTHONPATH"] = str(ROOT)  # `python -m scripts.demo` from another folder
    cmd = [sys.executable, "-m", "scripts.demo", "--ckpt", str(ckpt), "--cpu", "--output", str(out),
           "--width", "256", "--height", "256", "--window-size", "256", "--stride", "256",
           "--steps", "1", "--sync-steps", "0"]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the demo did not finish in {DEMO_TIMEOUT_S} s (ComfyUI walking a link loop?):\n"
                    f"{(e.stdout or b'')[-3000:]!r}")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "on the GPU" not in log and "(--cpu)" in log
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 1, log[-3000:]
    from PIL import Image
    with Image.open(pngs[0]) as im:
        assert im.size == (256, 256)
