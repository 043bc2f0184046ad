"""The suite passes whatever the checkout's folder is called.

The repository root is a Python package (ComfyUI imports it through its ``__init__.py``). pytest, left to
itself, treats that root as a package named after the folder and imports its ``__init__.py`` before the first
test: a clone named ``comfyui-syncdiffusion`` (what the README tells users) is not a Python identifier, so the
relative import in ``__init__.py`` failed and every test errored. pyproject's ``--confcutdir=tests`` starts
pytest's collection at ``tests/``, so pytest never imports the root; ComfyUI still loads it (by path) as a
custom node. These tests run part of the suite from copies of the checkout under such names.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import headless as comfy_headless

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", ".comfyui", "output", "__pycache__", ".pytest_cache"}

# A probe test written into the copy: it checks, from inside that pytest run, that the pack was loaded by
# ComfyUI from the copy and that pytest itself did not import the copy's root __init__.py under any name.
PROBE = '''
import sys
from pathlib import Path

def test_root_imported_only_by_comfyui(comfy):
    root = Path(__file__).resolve().parent.parent
    importers = sorted(name for name, mod in list(sys.modules.items())
                       if Path(getattr(mod, "__file__", None) or "/").resolve() == root / "__init__.py")
    assert importers == [comfy.pack_module.__name__], importers
    assert "PanoramaLatent" in comfy.pack_node_ids
'''


def _copy_checkout(dest: Path) -> None:
    """The working tree as a clone would have it (tracked and untracked, not ignored), without venvs/ComfyUI."""
    try:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
        files = [f for f in files if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["comfyui-syncdiffusion", "p"])
def test_suite_runs_in_a_checkout_named(folder, tmp_path):
    copy = tmp_path / folder
    _copy_checkout(copy)
    assert (copy / "__init__.py").is_file() and (copy / "pyproject.toml").is_file()
    (copy / "tests" / "test_zz_folder_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["COMFYUI_PATH"] = str(comfy_headless.comfyui_path())  # the copy has no .comfyui/ of its own
    # From the copy's root, as `make test` runs it: a few tests that need no model, one that loads the pack
    # through ComfyUI, and the probe.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/comfy/test_packaging.py", "tests/comfy/test_harness.py::test_pack_is_loaded_as_a_custom_node_package",
           "tests/test_zz_folder_probe.py"]
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"pytest in a checkout named {folder!r} failed:\n{out[-6000:]}"
    assert " passed" in out and "error" not in out.splitlines()[-1], out[-2000:]
