"""SyncDiffusion's method in plain torch. Nothing in this package imports ComfyUI except the ``comfy`` package."""
from .batching import BatchPolicy
from .fusion import Fusion
from .job import PanoramaJob
from .lanes import Lanes
from .sampler import sample
from .sync import NO_SYNC, Anchor, SyncSettings
from .windows import Window, WindowPlan, crop, paste_add, plan_windows

__all__ = [
    "Anchor", "BatchPolicy", "Fusion", "Lanes", "NO_SYNC", "PanoramaJob", "SyncSettings", "Window", "WindowPlan",
    "crop", "paste_add", "plan_windows", "sample",
]
