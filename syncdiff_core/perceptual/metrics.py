"""The SyncDiffusion paper's coherence metrics of a panorama: Intra-LPIPS and Intra-Style-L. Plain torch."""
from __future__ import annotations

import itertools
from typing import Callable

import torch

from .networks import gram

#: The most crops one image is cut into (32,640 pairs): the paper's 512x3072 px panoramas give 6. More would take
#: hours and memory without changing what the mean says.
MAX_CROPS = 256


def crop_counts(height: int, width: int, window_px: int) -> tuple[int, int]:
    """Rows and columns of the non-overlapping ``window_px`` crops of a ``width`` x ``height`` px image; an image that
    holds fewer than two crops cannot be measured (the metrics compare pairs) and gets a clear error, and so does
    one cut into more than :data:`MAX_CROPS`."""
    if window_px < 1:
        raise ValueError(f"window_size must be positive, got {window_px}")
    rows, cols = height // window_px, width // window_px
    if rows * cols > MAX_CROPS:
        least = window_px
        while (height // least) * (width // least) > MAX_CROPS:
            least += 8
        raise ValueError(
            f"window_size {window_px} px cuts this {width}x{height} px image into {rows * cols} crops "
            f"({rows * cols * (rows * cols - 1) // 2:,} pairs); at most {MAX_CROPS} crops are compared: use a "
            f"window_size of at least {least} px (the model's native size, e.g. 512)"
        )
    if rows * cols < 2:
        raise ValueError(
            f"image: a {width}x{height} px image holds {rows * cols} non-overlapping {window_px} px crop(s); the "
            f"coherence metrics compare pairs of crops, so it must hold at least two: make the image at least "
            f"{2 * window_px}x{window_px} px (two windows wide, or tall)"
            + (f", or window_size at most {max(width, height) // 2} px" if max(width, height) >= 32 else "")
        )
    return rows, cols


def crop_grid(image: torch.Tensor, window_px: int) -> torch.Tensor:
    """Non-overlapping ``window_px`` crops of (N, 3, H, W) images (or one (3, H, W) image), on a grid from the
    top-left corner (the rightmost / bottom remainder narrower than a window is left out), in raster order:
    (N, rows·cols, 3, window_px, window_px)."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"expected an image (N, 3, H, W), got {tuple(image.shape)}")
    n, c, h, w = image.shape
    rows, cols = crop_counts(h, w, window_px)
    x = image[:, :, : rows * window_px, : cols * window_px]
    x = x.reshape(n, c, rows, window_px, cols, window_px).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, rows * cols, c, window_px, window_px)


def _pairs(m: int) -> tuple[list[int], list[int]]:
    ij = list(itertools.combinations(range(m), 2))
    return [i for i, _ in ij], [j for _, j in ij]


def _chunked(fn, items: torch.Tensor, chunk: int) -> list:
    return [fn(items[s : s + chunk]) for s in range(0, items.shape[0], chunk)]


def intra_lpips(panorama_image: torch.Tensor, window_px: int, lpips_fn: Callable, *, chunk: int = 16) -> torch.Tensor:
    """Intra-LPIPS (SyncDiffusion, Lee et al. 2023): the mean LPIPS over all unordered pairs of the panorama's
    non-overlapping window-size crops (:func:`crop_grid`). Lower is more coherent.

    ``panorama_image``: (N, 3, H, W) or (3, H, W) in [-1, 1]. ``lpips_fn(a, b) -> (B,)``; when it also has
    ``features`` and ``distance`` (as :class:`LPIPSLoss`), each crop goes through the trunk once.
    Returns one value per image: (N,), float32.
    """
    crops = crop_grid(panorama_image, window_px)
    n, m = crops.shape[:2]
    ii, jj = _pairs(m)
    out = []
    for b in range(n):
        if hasattr(lpips_fn, "features") and hasattr(lpips_fn, "distance"):
            per_crop = _chunked(lpips_fn.features, crops[b], chunk)
            feats = [torch.cat(layer) for layer in zip(*per_crop)]
            d = []
            for s in range(0, len(ii), chunk):
                a, c = ii[s : s + chunk], jj[s : s + chunk]
                d.append(lpips_fn.distance([f[a] for f in feats], [f[c] for f in feats]))
            d = torch.cat(d)
        else:
            d = torch.cat([lpips_fn(crops[b, ii[s : s + chunk]], crops[b, jj[s : s + chunk]]).reshape(-1)
                           for s in range(0, len(ii), chunk)])
        out.append(d.float().mean())
    return torch.stack(out)


def intra_style_l(panorama_image: torch.Tensor, window_px: int, vgg19_features: Callable, *,
                  chunk: int = 16, per_layer: bool = False) -> torch.Tensor:
    """Intra-Style-L: the Gram-matrix style loss between every unordered pair of the panorama's non-overlapping
    window-size crops (:func:`crop_grid`), averaged over pairs. Lower is more coherent.

    The style loss follows Gatys et al. (2016) as commonly implemented:

    - features: VGG19 (torchvision's weights) activations after ReLU at relu1_1, relu2_1, relu3_1, relu4_1,
      relu5_1 (:class:`StyleFeatures`), input [-1, 1] mapped to [0, 1] and normalised by ImageNet's mean/std;
    - Gram matrix per layer ``G = F Fᵀ / (C·h·w)`` (F: C × h·w);
    - loss between crops a and b: ``Σ_layers mean((G_a − G_b)²)`` (mean over the C×C entries), layers weighted
      equally.

    ``vgg19_features(images) -> list of (B, C, h, w)`` (as :class:`StyleFeatures`). Returns (N,), float32;
    with ``per_layer`` the layers' terms (N, layers), whose sum over layers is the metric.
    """
    crops = crop_grid(panorama_image, window_px)
    n, m = crops.shape[:2]
    ii, jj = _pairs(m)
    out = []
    for b in range(n):
        per_crop = _chunked(lambda x: [gram(f.float()) for f in vgg19_features(x)], crops[b], chunk)
        grams = [torch.cat(layer) for layer in zip(*per_crop)]
        pair_chunk = max(1, chunk * 16)  # (pairs, C, C) differences of relu5_1 take 1 MB a pair: bounded chunks
        terms = torch.stack([
            sum(((g[ii[s:s + pair_chunk]] - g[jj[s:s + pair_chunk]]) ** 2).mean(dim=(1, 2)).sum()
                for s in range(0, len(ii), pair_chunk)) / len(ii)
            for g in grams])
        out.append(terms if per_layer else terms.sum())
    return torch.stack(out)
