"""Make ComfyUI importable for the world's scripts without starting its server: its tree first on ``sys.path``
(``$COMFYUI_PATH``, else ``.comfyui/ComfyUI`` of this checkout) and its command-line settings chosen before
``comfy.model_management`` is imported (``--cpu`` unless a GPU is wanted; torch's attention)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def comfyui_dir() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    path = Path(env).expanduser().resolve() if env else ROOT / ".comfyui" / "ComfyUI"
    if not (path / "comfy").is_dir():
        raise RuntimeError(f"No ComfyUI at {path}: set COMFYUI_PATH to a ComfyUI checkout (or run `make setup`)")
    return path


def setup(cpu: bool) -> Path:
    """Idempotent. Returns the ComfyUI tree used."""
    path = comfyui_dir()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args
        args.cpu = args.cpu or cpu
        if not (args.use_split_cross_attention or args.use_quad_cross_attention):
            args.use_pytorch_cross_attention = True
    return path
