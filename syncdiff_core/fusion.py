"""MultiDiffusion fusion: every canvas pixel becomes the average of the windows covering it."""
from __future__ import annotations

import torch

from .windows import Window, paste_add


class Fusion:
    """Accumulates ``value += x`` and ``count += 1`` over windows, then averages (MultiDiffusion)."""

    def __init__(self, like: torch.Tensor):
        self.value = torch.zeros_like(like)
        self.count = torch.zeros_like(like[:, :1])

    def add(self, win: Window, x: torch.Tensor) -> None:
        paste_add(self.value, win, x)
        paste_add(self.count, win, torch.ones_like(x[:, :1]))

    def result(self, fallback: torch.Tensor) -> torch.Tensor:
        """The average where any window contributed; ``fallback`` where none did."""
        covered = self.count > 0
        return torch.where(covered, self.value / self.count.clamp_min(1e-12), fallback)
