"""Small differentiable float64 stand-ins for the guided denoiser, the VAE decoder and LPIPS, shared by the core
tests (no ComfyUI)."""
from __future__ import annotations

import torch

F64 = torch.float64


class Toy:
    """``denoise(x, sigma, windows, step)``, ``decode(x0)`` and ``loss(images, targets)`` of DESIGN §1's shapes;
    ``batches`` records the rows of every denoise call."""

    def __init__(self, channels=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w_den = torch.randn(channels, channels, 3, 3, generator=g, dtype=F64) * 0.2
        self.w_dec = torch.randn(3, channels, 3, 3, generator=g, dtype=F64) * 0.3
        self.w_feat = torch.randn(8, 3, 3, 3, generator=g, dtype=F64) * 0.3
        self.batches = []

    def denoise(self, x, sigma, windows=None, step=None):
        self.batches.append(x.shape[0])
        s = sigma.reshape(-1, 1, 1, 1)
        h = torch.nn.functional.conv2d(x / torch.sqrt(1 + s**2), self.w_den, padding=1)
        return torch.tanh(h) * 2.0 + 0.1 * x / (1 + s)

    def decode(self, x0):
        up = torch.nn.functional.interpolate(x0, scale_factor=2, mode="nearest")
        return torch.tanh(torch.nn.functional.conv2d(up, self.w_dec, padding=1))

    def loss(self, images, targets):
        fa = torch.relu(torch.nn.functional.conv2d(images, self.w_feat, padding=1))
        fb = torch.relu(torch.nn.functional.conv2d(targets, self.w_feat, padding=1))
        return ((fa - fb) ** 2).flatten(1).mean(1)
