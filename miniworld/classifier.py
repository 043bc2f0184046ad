"""A small attribute classifier for the world (plain torch): from a window-sized RGB crop it predicts the
scene's time of day and season. The evaluation uses it to ask whether a panorama's windows show the same scene
as its anchor window."""
from __future__ import annotations

import torch
from torch import nn

from miniworld.world import SEASONS, TIMES


class AttributeNet(nn.Module):
    """Four stride-2 conv blocks, global average pooling, two heads. Input (B, 3, H, W) in 0..1, any H, W >= 16."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, c = [], 3
        for w in (width, width * 2, width * 2, width * 4):
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.trunk = nn.Sequential(*layers)
        self.time_head = nn.Linear(c, len(TIMES))
        self.season_head = nn.Linear(c, len(SEASONS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x * 2 - 1).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.time_head(f), self.season_head(f)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2) int: time index, season index."""
        t, s = self(x)
        return torch.stack([t.argmax(1), s.argmax(1)], dim=1)
