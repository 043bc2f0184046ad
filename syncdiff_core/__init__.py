"""SyncDiffusion's method in plain torch. Nothing in this package imports ComfyUI except ``comfy_bridge``."""
from .fusion import Fusion
from .sampler import NO_SYNC, sample
from .sync import Anchor, SyncSettings
from .windows import Window, WindowPlan, crop, crop_many, paste_add, plan_windows

__all__ = [
    "Anchor", "Fusion", "NO_SYNC", "SyncSettings", "Window", "WindowPlan",
    "crop", "crop_many", "paste_add", "plan_windows", "sample",
]
