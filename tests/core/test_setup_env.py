"""scripts/setup_env.py's checks of what it is given, run as a user runs it (a subprocess), with bad input:
a COMFYUI_PATH that is not ComfyUI, or a ComfyUI older than requires-comfyui, stops setup before anything is
created or installed, with a message that names the folder and the version found."""
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup_env.py"


def _required() -> str:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"]
    m = re.fullmatch(r">=\s*(\d+(?:\.\d+)*)", spec.strip())
    assert m, f"requires-comfyui should be a lower bound '>=X.Y.Z', is {spec!r}"
    return m.group(1)


def _setup(comfyui_path: Path, venv: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(COMFYUI_PATH=str(comfyui_path), SYNCDIFF_VENV=str(venv))
    return subprocess.run([sys.executable, str(SETUP)], env=env, capture_output=True, text=True, timeout=120)


def _fake_comfyui(folder: Path, version: str | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "main.py").write_text("")
    (folder / "nodes.py").write_text("")
    (folder / "comfy").mkdir()
    (folder / "requirements.txt").write_text("numpy\n")
    if version is not None:
        (folder / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return folder


def _older(version: str) -> str:
    parts = [int(x) for x in version.split(".")]
    for i in reversed(range(len(parts))):
        if parts[i] > 0:
            parts[i] -= 1
            return ".".join(map(str, parts))
    raise AssertionError(f"no version older than {version}")


def test_folder_that_is_not_comfyui_stops_setup(tmp_path):
    folder = tmp_path / "not-comfy"
    folder.mkdir()
    (folder / "README.md").write_text("some other project\n")
    venv = tmp_path / "venv"
    proc = _setup(folder, venv)
    assert proc.returncode != 0
    assert str(folder) in proc.stderr and "is not a ComfyUI checkout" in proc.stderr, proc.stderr
    assert "README.md" in proc.stderr  # says what it found there
    assert not venv.exists(), "setup created the venv before checking COMFYUI_PATH"


@pytest.mark.parametrize("how", ["older", "no version file"])
def test_comfyui_older_than_requires_comfyui_stops_setup(tmp_path, how):
    need = _required()
    found = _older(need) if how == "older" else None
    folder = _fake_comfyui(tmp_path / "ComfyUI", found)
    venv = tmp_path / "venv"
    proc = _setup(folder, venv)
    assert proc.returncode != 0
    assert str(folder) in proc.stderr, proc.stderr
    assert need in proc.stderr and "requires-comfyui" in proc.stderr, proc.stderr
    if found is not None:
        assert f"ComfyUI {found}" in proc.stderr, proc.stderr
    else:
        assert "version found: none" in proc.stderr, proc.stderr
    assert not venv.exists()


def test_the_required_version_itself_passes_the_check(tmp_path):
    """The bound is inclusive: a ComfyUI of exactly requires-comfyui gets past the check (setup then goes on to
    make the venv, which is where this test stops it: PYTHON names an interpreter that does not exist)."""
    need = _required()
    folder = _fake_comfyui(tmp_path / "ComfyUI", need)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(COMFYUI_PATH=str(folder), SYNCDIFF_VENV=str(tmp_path / "venv"), PYTHON="no-such-python-3.11")
    proc = subprocess.run([sys.executable, str(SETUP)], env=env, capture_output=True, text=True, timeout=120)
    assert f"using COMFYUI_PATH={folder} (ComfyUI {need}" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no-such-python-3.11 not found" in proc.stderr


def test_lane_tarball_search_order(tmp_path):
    """The 0.33 lane looks for its tarball at $SYNCDIFF_COMFYUI_033_TARBALL, then ../shared/comfyui/ next to the
    checkout, then /work/shared/comfyui/ (CI's clone may sit anywhere)."""
    code = "from scripts import setup_env as s; print('\\n'.join(map(str, s.tarball_candidates_033())))"
    env = dict(os.environ, SYNCDIFF_COMFYUI_033_TARBALL=str(tmp_path / "x.tar.gz"))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [str(tmp_path / "x.tar.gz"), str(ROOT.parent / "shared" / "comfyui" / "ComfyUI-0.33.0.tar.gz"),
                   "/work/shared/comfyui/ComfyUI-0.33.0.tar.gz"]


def test_identical_large_files_are_hard_linked_between_venvs(tmp_path):
    """The second lane's venv shares torch's files with the first (CI's disk holds both): identical files of 1 MiB
    or more become hard links; a file that differs, a small one, or one the other venv lacks stays its own."""
    from scripts import setup_env
    big = os.urandom(1 << 20)
    venvs = {}
    for name, other_byte in (("a", b"x"), ("b", b"y")):
        v = tmp_path / name
        (v / "bin").mkdir(parents=True)
        (v / "bin" / "python").write_text("")
        lib = v / "lib" / "site-packages" / "torch"
        lib.mkdir(parents=True)
        (lib / "same.so").write_bytes(big)
        (lib / "differs.so").write_bytes(big[:-1] + other_byte)
        (lib / "small.py").write_text("x = 1\n")
        venvs[name] = v
    (venvs["b"] / "lib" / "site-packages" / "torch" / "only_b.so").write_bytes(big)

    setup_env.share_identical_files(venvs["b"], [venvs["a"], venvs["b"]])

    def ino(v, f):
        return (v / "lib" / "site-packages" / "torch" / f).stat().st_ino

    assert ino(venvs["a"], "same.so") == ino(venvs["b"], "same.so")
    assert (venvs["b"] / "lib" / "site-packages" / "torch" / "same.so").read_bytes() == big
    for f in ("differs.so", "small.py"):
        assert ino(venvs["a"], f) != ino(venvs["b"], f)
    assert (venvs["b"] / "lib" / "site-packages" / "torch" / "differs.so").read_bytes()[-1:] == b"y"
    assert not list(venvs["b"].rglob("*.syncdiff-link"))
