#!/usr/bin/env python3
"""What the browser test (``tests/comfy/test_frontend.py``) needs, installed when missing: Debian's ``chromium`` and the
``playwright`` PyPI package (its driver only; the test launches the system Chromium by path). Idempotent.

    python scripts/setup_browser.py          # prints the Chromium executable it found or installed

apt needs root (true on CI). ``$SYNCDIFF_CHROMIUM`` points at another Chromium/Chrome instead. ``ensure()`` returns
the executable's path or raises ``BrowserSetupError`` saying what failed; the test fails with it (never skips).
"""
import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")
APT_PACKAGES = ["chromium"]
PIP_SPEC = "playwright>=1.49"
# apt may be busy with another process (another developer's test run on the same machine): wait for its lock
APT_LOCK_TIMEOUT_S = 600


class BrowserSetupError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[setup_browser] {msg}", file=sys.stderr, flush=True)


def find_chromium() -> Path | None:
    env = os.environ.get("SYNCDIFF_CHROMIUM")
    if env:
        p = Path(env)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise BrowserSetupError(f"SYNCDIFF_CHROMIUM={env} is not an executable file")
        return p
    for c in CANDIDATES:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return Path(c)
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return Path(found) if found else None


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def install_chromium() -> Path:
    if shutil.which("apt-get") is None:
        raise BrowserSetupError("Chromium is not installed and there is no apt-get to install it with; install a "
                                "Chromium and set SYNCDIFF_CHROMIUM to its executable")
    if os.geteuid() != 0:
        raise BrowserSetupError("Chromium is not installed and installing it (apt-get install chromium) needs root; "
                                "run `sudo apt-get install chromium` once, or set SYNCDIFF_CHROMIUM")
    # One installer at a time on this machine (apt's own lock would make a second one fail at once).
    lock_path = Path(tempfile.gettempdir()) / "syncdiffusion-setup-browser.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find_chromium()
        if found:
            return found
        opts = ["-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}"]
        install = ["apt-get", *opts, "install", "-y", "--no-install-recommends", *APT_PACKAGES]
        t0 = time.time()
        r = _run(install, timeout=1800)
        if r.returncode != 0:
            # a fresh machine has no package lists yet, or stale ones: refresh and try once more
            u = _run(["apt-get", *opts, "update"], timeout=900)
            if u.returncode != 0:
                raise BrowserSetupError(f"apt-get update failed ({u.returncode}):\n{u.stderr[-2000:]}")
            r = _run(install, timeout=1800)
        if r.returncode != 0:
            raise BrowserSetupError(f"apt-get install {' '.join(APT_PACKAGES)} failed ({r.returncode}):\n"
                                    f"{(r.stdout + r.stderr)[-3000:]}")
        log(f"installed {' '.join(APT_PACKAGES)} in {time.time() - t0:.0f} s")
    found = find_chromium()
    if not found:
        raise BrowserSetupError(f"apt-get installed {APT_PACKAGES} but none of {CANDIDATES} exists")
    return found


def check_chromium(path: Path) -> str:
    """The browser's version line; raises when the executable does not run (e.g. missing libraries)."""
    try:
        r = subprocess.run([str(path), "--headless", "--no-sandbox", "--version"], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BrowserSetupError(f"{path} does not run: {e}") from e
    if r.returncode != 0:
        raise BrowserSetupError(f"{path} --version failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
    return r.stdout.strip()


def ensure_playwright(python: str = sys.executable) -> None:
    """The ``playwright`` package importable by ``python`` (normally it comes from requirements-dev.txt)."""
    if python == sys.executable and importlib.util.find_spec("playwright") is not None:
        return
    probe = subprocess.run([python, "-c", "import playwright.sync_api"], capture_output=True)
    if probe.returncode == 0:
        return
    r = _run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q", PIP_SPEC], timeout=900)
    if r.returncode != 0:
        raise BrowserSetupError(f"pip install {PIP_SPEC} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    importlib.invalidate_caches()


def ensure(python: str = sys.executable) -> Path:
    """Playwright importable and a working Chromium: returns the Chromium executable."""
    ensure_playwright(python)
    path = find_chromium() or install_chromium()
    check_chromium(path)
    return path


def main() -> int:
    try:
        path = ensure()
    except BrowserSetupError as e:
        log(f"FAILED: {e}")
        return 1
    log(check_chromium(path))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
