"""What the tests compare the pack against, in one place (plain torch, no ComfyUI, nothing from the pack):

- ``Toy``: small differentiable float64 stand-ins for the guided denoiser, the VAE decoder and LPIPS, of the
  shapes of docs/dev/method.md (``Bimodal``: a denoiser whose windows settle into one of two modes);
- ``input_scale``: SD's variance-preserving input scale 1 / sqrt(1 + sigma^2), where the paper's sync step is taken;
- ``reference_loop``: the method (docs/dev/method.md) read literally, one window at a time, value / count fusion.
"""
import math

import torch

F64 = torch.float64


def input_scale(sigma) -> float:
    """The factor from the sampler's space (x = x0 + sigma * eps) to SD's variance-preserving model input."""
    return 1.0 / math.sqrt(1.0 + float(sigma) ** 2)


class Toy:
    """``denoise(x, sigma, windows, step)``, ``decode(x0)`` and ``loss(images, targets)`` of the shapes of
    docs/dev/method.md;
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


class Bimodal:
    """A denoiser whose windows settle into one of two modes (all +1 or all -1) by the sign of their mean."""

    def denoise(self, x, sigma, windows=None, step=None):
        s = sigma.reshape(-1, 1, 1, 1)
        m = x.mean(dim=(1, 2, 3), keepdim=True) / torch.sqrt(1 + s**2)
        return torch.tanh(2 * m) * torch.ones_like(x)

    def decode(self, x0):
        return x0[:, :3]

    def loss(self, images, targets):
        return ((images - targets) ** 2).flatten(1).mean(1)


def raster_views(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The reference code's windows ``(top, left, height, width)``: every ``stride``, row by row."""
    rows = (height - window) // stride + 1
    cols = (width - window) // stride + 1
    return [(r * stride, c * stride, window, window) for r in range(rows) for c in range(cols)]


def reference_loop(x, sigmas, views, model, *, w, decay=0.95, sync_steps=10, every=1, anchor=None):
    """The method (docs/dev/method.md) read literally: one window at a time, value / count fusion.

    ``views``: ``(top, left, height, width)`` per window, in order; ``anchor``: the anchor window's index (default:
    the middle one, as the reference code). ``model`` has ``denoise``, ``decode`` and ``loss`` (as :class:`Toy`)."""
    a = len(views) // 2 if anchor is None else anchor
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        value, count = torch.zeros_like(x), torch.zeros_like(x)
        syncing = w > 0 and (i + 1) % every == 0 and i < sync_steps
        if syncing:
            with torch.no_grad():
                t, l, h, wd = views[a]
                img_a = model.decode(model.denoise(x[..., t:t + h, l:l + wd], s.reshape(1)))
        for v, (t, l, h, wd) in enumerate(views):
            xv = x[..., t:t + h, l:l + wd].clone()
            if syncing and v != a:
                c = input_scale(s)
                u = (xv * c).detach().requires_grad_(True)
                loss = model.loss(model.decode(model.denoise(u / c, s.reshape(1))), img_a).sum()
                (g,) = torch.autograd.grad(loss, u)
                xv = (u.detach() - w * decay**i * g) / c
            x0 = model.denoise(xv, s.reshape(1))
            x_prev = x0 + (s_next / s) * (xv - x0)
            value[..., t:t + h, l:l + wd] += x_prev
            count[..., t:t + h, l:l + wd] += 1
        x = torch.where(count > 0, value / count, value)
    return x
