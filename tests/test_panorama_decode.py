"""The circular (wrap) panorama decode: padding, cropping, tiling with blended overlaps.

Part 1 runs the core (``syncdiff_core.panorama_decode``) on a toy decoder written here whose receptive field is
known exactly, so a circular decode can be compared with the truth (the same decoder with circular padding in
width) to float precision. Part 2 decodes through ComfyUI's ``VAE.decode`` on a tiny random-weight VAE, whose
global operations (GroupNorm statistics, mid-block attention) make the result depend slightly on the context
columns, and checks roll-equivariance and seam closure within tolerances justified next to each test.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from syncdiff_core import panorama_decode as PD  # noqa: E402

# ------------------------------------------------------------------------------------------------------------
# Part 1: the core, on a toy decoder with a known receptive field
# ------------------------------------------------------------------------------------------------------------

SCALE = 4


class ToyDecoder:
    """Latent (B, 4, h, w) -> image (B, 3, h*4, w*4): two 3x3 convs at latent resolution, nearest upsampling,
    one 3x3 conv at image resolution. Borders are zero-padded (``circular=False``, like a VAE decoder) or, for
    the truth, circular in width and zero in height. Receptive field: 2 latent px + 1 image px, so 3 latent px
    of context on each side determine every output column exactly."""

    RF = 3

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(16, 4, 3, 3, generator=g, dtype=torch.float64) / 6
        self.w2 = torch.randn(8, 16, 3, 3, generator=g, dtype=torch.float64) / 12
        self.w3 = torch.randn(3, 8, 3, 3, generator=g, dtype=torch.float64) / 8
        self.calls: list[tuple[int, ...]] = []

    @staticmethod
    def _conv(x, w, circular):
        x = F.pad(x, (1, 1, 0, 0), mode="circular") if circular else F.pad(x, (1, 1, 0, 0))
        return F.conv2d(F.pad(x, (0, 0, 1, 1)), w)

    def __call__(self, z, circular=False):
        self.calls.append(tuple(z.shape))
        x = torch.tanh(self._conv(z.double(), self.w1, circular))
        x = torch.tanh(self._conv(x, self.w2, circular))
        x = F.interpolate(x, scale_factor=SCALE, mode="nearest")
        return self._conv(x, self.w3, circular)


@pytest.fixture(scope="module")
def toy():
    return ToyDecoder()


def latent(h=5, w=24, seed=1, batch=2):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_circular_pad_width_takes_columns_around_the_loop():
    z = torch.arange(5.0).reshape(1, 1, 1, 5)
    assert PD.circular_pad_width(z, 2).flatten().tolist() == [3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert PD.circular_pad_width(z, 7).flatten().tolist() == [3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert PD.circular_pad_width(z, 0) is z
    with pytest.raises(ValueError, match="padding"):
        PD.circular_pad_width(z, -1)


@pytest.mark.parametrize("tiling", [dict(), dict(tile_width=7, tile_overlap=2), dict(tile_width=10, tile_overlap=4)])
def test_wrap_decode_equals_the_periodic_truth(toy, tiling):
    """With padding >= the receptive field, the wrap decode (whole or tiled, tiles straddling the seam) is exactly
    the decoder's output on the infinite periodic canvas; with too little padding it is not (the test can fail)."""
    z = latent()
    truth = toy(z, circular=True)
    got = PD.decode_panorama(toy, z, SCALE, wrap=True, padding=ToyDecoder.RF, **tiling)
    assert got.shape == truth.shape
    assert torch.allclose(got, truth.float(), atol=1e-5), (got - truth).abs().max()
    short = PD.decode_panorama(toy, z, SCALE, wrap=True, padding=1, **tiling)
    assert (short - truth).abs().max() > 1e-2


def test_tiles_straddle_the_seam_and_stay_bounded(toy):
    tiles = PD.plan_tiles(24, tile_width=7, tile_overlap=2, padding=3, wrap=True)
    assert any(t.start + t.width > 24 for t in tiles), "under wrap the last tile must continue past the border"
    covered = torch.zeros(24)
    for t in tiles:
        covered[PD.wrap_columns(24, t.start, t.start + t.width)] += 1
    assert (covered >= 1).all()
    toy.calls.clear()
    PD.decode_panorama(toy, latent(), SCALE, wrap=True, padding=3, tile_width=7, tile_overlap=2)
    assert len(toy.calls) == len(tiles) and all(shape[-1] == 7 + 2 * 3 for shape in toy.calls)


@pytest.mark.parametrize("tiling", [dict(), dict(tile_width=7, tile_overlap=2)])
def test_wrap_decode_commutes_with_a_roll_and_plain_decode_does_not(toy, tiling):
    z = latent()
    for k in (5, 13):
        a = PD.decode_panorama(toy, torch.roll(z, k, -1), SCALE, wrap=True, padding=4, **tiling)
        b = torch.roll(PD.decode_panorama(toy, z, SCALE, wrap=True, padding=4, **tiling), k * SCALE, -1)
        assert torch.allclose(a, b, atol=1e-5), (k, (a - b).abs().max())
        a = PD.decode_panorama(toy, torch.roll(z, k, -1), SCALE, wrap=False, **tiling)
        b = torch.roll(PD.decode_panorama(toy, z, SCALE, wrap=False, **tiling), k * SCALE, -1)
        assert (a - b).abs().max() > 0.05


def test_tiled_decode_without_wrap_equals_the_whole_decode(toy):
    """Without wrap, tiles take their context from inside the canvas (none past the borders), so with padding >=
    the receptive field the tiled decode equals decoding the whole canvas at once: the blending leaves no seam."""
    z = latent(w=29)
    whole = toy(z)
    for tile_width, overlap in [(8, 3), (12, 1), (6, 0)]:
        got = PD.decode_panorama(toy, z, SCALE, wrap=False, padding=3, tile_width=tile_width, tile_overlap=overlap)
        assert torch.allclose(got, whole.float(), atol=1e-5), (tile_width, overlap)
    # without context the tile borders differ from the whole decode: the check above can fail
    got = PD.decode_panorama(toy, z, SCALE, wrap=False, padding=0, tile_width=8, tile_overlap=0)
    assert (got - whole).abs().max() > 1e-2


def test_overlap_ramps_blend_tiles_and_sum_to_one():
    tiles = PD.plan_tiles(40, tile_width=10, tile_overlap=4, padding=0, wrap=True)
    total = torch.zeros(40 * 2, dtype=torch.float64)
    for t in tiles:
        total.index_add_(0, PD.wrap_columns(80, t.start * 2, (t.start + t.width) * 2), PD._ramp_weights(t, 4, 2))
    assert tiles[1].start - tiles[0].start == 6  # 40 columns, step 6 -> 7 tiles, evenly spaced
    # where two neighbours overlap by exactly the ramp, their weights add to one; elsewhere one tile has weight 1
    assert torch.all(total >= 1 - 1e-12) and torch.all(total <= 2)
    w = PD._ramp_weights(tiles[0], 4, 2)
    assert w[0] < 0.1 and w[-1] < 0.1 and w[10] == 1
    # a blend of two constant tiles is a linear ramp between them: no step
    dec = lambda z: z[:, :1].repeat_interleave(2, -1)  # noqa: E731
    z = torch.zeros(1, 1, 1, 20)
    z[..., 10:] = 1.0
    out = PD.decode_panorama(dec, z, 2, wrap=False, tile_width=12, tile_overlap=4)
    assert torch.equal(out, z.repeat_interleave(2, -1))  # exact where the decoder is local with no context needed


@pytest.mark.parametrize("kwargs,match", [
    (dict(tile_width=8, tile_overlap=8), "tile_overlap"),
    (dict(tile_width=8, tile_overlap=9), "tile_overlap"),
    (dict(tile_width=-1), "tile_width"),
    (dict(tile_width=8, tile_overlap=-1), "tile_overlap"),
    (dict(padding=-2), "padding"),
])
def test_bad_tiling_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PD.plan_tiles(30, **kwargs)


def test_wrong_scale_is_reported(toy):
    with pytest.raises(ValueError, match="scale factor"):
        PD.decode_panorama(toy, latent(), 8)


def test_progress_and_interrupt(toy):
    seen = []
    PD.decode_panorama(toy, latent(), SCALE, padding=2, tile_width=8, tile_overlap=2,
                       progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] == len(seen) and len(seen) > 2

    class Stop(Exception):
        pass

    def interrupt():
        raise Stop

    with pytest.raises(Stop):
        PD.decode_panorama(toy, latent(), SCALE, interrupt=interrupt)
