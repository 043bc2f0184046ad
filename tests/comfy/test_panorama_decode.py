"""The circular (wrap) panorama decode: padding, cropping, tiling with blended overlaps.

Part 1 runs the core (``syncdiff_core.panorama_decode``) on a toy decoder written here whose receptive field is
known exactly, so a circular decode can be compared with the truth (the same decoder with circular padding in
width) to float precision. Part 2 decodes through ComfyUI's ``VAE.decode`` on a tiny random-weight VAE, whose
global operations (GroupNorm statistics, mid-block attention) make the result depend slightly on the context
columns, and checks roll-equivariance and seam closure within tolerances justified next to each test.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from syncdiff_core import gpano
from syncdiff_core import panorama_decode as PD

# --------------------------------------------------- Part 1: the core, on a toy decoder with a known receptive field

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


# ------------ Part 2: through ComfyUI's VAE.decode on the tiny random-weight KL VAE (SD's architecture, 32 channels)
#
# Why tolerances here and not exactness: SD's VAE decoder has global operations -- GroupNorm statistics over the
# whole image and self-attention in its mid block. Under wrap they see the canvas plus 2·padding duplicated
# context columns, and *which* columns are duplicated changes with a roll, so decode(roll(z)) and roll(decode(z))
# differ by a small change of tone spread over the whole image, not at any particular column. That is what the
# tests assert: the error has no peak at the seam (the column profile of the error near the seam is at the level
# of the error elsewhere), and it is several times smaller than the plain decode's. The plain decode's error is a
# seam: its zero-padded borders land in the middle of the rolled image. Where the decoder's inputs are identical up
# to the roll (tiles that move onto tiles), the result must be identical: that case is tested to float tolerance.

LAT_H, LAT_W, PAD = 8, 48, 8
ROLL = 13  # latent px; not a multiple of anything in the layout


def _latent(seed=0, smooth=False):
    g = torch.Generator().manual_seed(seed)
    if not smooth:
        return torch.randn(1, 4, LAT_H, LAT_W, generator=g)
    # a periodic, spatially smooth latent (low frequencies of the loop, a little noise), like real content
    x = torch.arange(LAT_W) * 2 * math.pi / LAT_W
    z = sum(torch.randn(1, 4, LAT_H, 1, generator=g) * torch.cos(f * x + 6.28 * torch.rand(1, 4, LAT_H, 1, generator=g))
            for f in (1, 2, 3)) / 1.5
    return z + 0.1 * torch.randn(1, 4, LAT_H, LAT_W, generator=g)


@pytest.fixture(scope="module")
def vae_decode(tiny_kl_vae, pack):
    def run(z, **kw):
        with torch.inference_mode():
            return pack.decode.decode_panorama_image(tiny_kl_vae, z, **kw)

    return run


def _roll_error_profile(vae_decode, k=ROLL, **kw):
    """Per-pixel-column mean |decode(roll(z, k)) - roll(decode(z), 8k)|, the max error, and the seam columns
    of both images (in the rolled frame: column 0 / the right border, and 8k)."""
    z = _latent()
    err = (vae_decode(torch.roll(z, k, -1), **kw) - torch.roll(vae_decode(z, **kw), 8 * k, -2)).abs()
    cols = err.mean(dim=(0, 1, 3))
    near = torch.zeros_like(cols, dtype=torch.bool)
    for c in (0, 8 * k):
        near[PD.wrap_columns(cols.numel(), c - 8, c + 8)] = True
    return cols, near, err.max().item()


def test_comfy_vae_scale_and_plain_decode_match_vae_decode(tiny_kl_vae, vae_decode, pack):
    assert pack.families.vae_scale(tiny_kl_vae) == 8
    z = _latent()
    with torch.inference_mode():
        ref = tiny_kl_vae.decode(z)
    got = vae_decode(z, wrap=False)
    assert got.shape == (1, LAT_H * 8, LAT_W * 8, 3) and torch.equal(got, ref.clamp(0, 1))
    assert 0.05 < got.std() and 0.0 <= got.min() and got.max() <= 1.0  # the test VAE makes a real image


def test_comfy_wrap_decode_commutes_with_roll_and_plain_decode_does_not(vae_decode):
    cols, near, max_err = _roll_error_profile(vae_decode, wrap=True, padding=PAD)
    cols0, near0, max_err0 = _roll_error_profile(vae_decode, wrap=False)
    # plain decode: a seam where each image had its borders, several times the error elsewhere
    assert cols0[near0].max() > 5 * cols0[~near0].median(), (cols0[near0].max(), cols0[~near0].median())
    # wrap: no seam, the error near the seams is at the level of the (global, tone) error elsewhere ...
    assert cols[near].max() < 2 * cols[~near].median() + 2e-3, (cols[near].max(), cols[~near].median())
    # ... and far below the plain decode's, in the worst pixel and on average
    assert max_err < 0.3 * max_err0, (max_err, max_err0)
    assert cols.mean() < 0.6 * cols0.mean() and cols.mean() < 0.03


@pytest.mark.slow
def test_comfy_tiled_wrap_decode_is_roll_equivariant(vae_decode):
    """Tiles of 16 latent px with 4 of overlap spread over 48 columns: 4 tiles, one every 12 columns. A roll by
    the tile spacing moves every tile onto the next one, so the decoder sees exactly the same inputs: equal to float
    tolerance. Without wrap the same roll moves the borders: a large error. A roll that moves content across tile
    borders leaves no seam either."""
    tiled = dict(padding=PAD, tile_width_px=128, tile_overlap_px=32)
    tiles = PD.plan_tiles(LAT_W, 16, 4, PAD, wrap=True)
    assert [t.start for t in tiles] == [0, 12, 24, 36]
    z = _latent()
    a = vae_decode(torch.roll(z, 12, -1), wrap=True, **tiled)
    b = torch.roll(vae_decode(z, wrap=True, **tiled), 96, -2)
    assert (a - b).abs().max() < 1e-4, (a - b).abs().max()
    a = vae_decode(torch.roll(z, 12, -1), wrap=False, **tiled)
    b = torch.roll(vae_decode(z, wrap=False, **tiled), 96, -2)
    assert (a - b).abs().max() > 0.1
    cols, near, _ = _roll_error_profile(vae_decode, wrap=True, **tiled)
    assert cols[near].max() < 2 * cols[~near].median() + 2e-3, (cols[near].max(), cols[~near].median())


def test_comfy_wrap_decode_left_and_right_edges_meet(vae_decode):
    """On smooth periodic content the jump between the last and the first pixel column is no larger than the jumps
    between neighbouring columns inside the image (measured at latent-pixel borders, every 8 px, where the jumps
    are largest); the plain decode's border jump is well above them."""
    z = _latent(seed=0, smooth=True)

    def jumps(image):
        inner = (image[:, :, 1:] - image[:, :, :-1]).abs().mean(dim=(0, 1, 3))[7::8]
        return (image[:, :, 0] - image[:, :, -1]).abs().mean().item(), inner

    seam, inner = jumps(vae_decode(z, wrap=True, padding=PAD))
    assert seam <= inner.max().item() and seam < 1.5 * inner.median().item(), (seam, inner.median(), inner.max())
    seam0, inner0 = jumps(vae_decode(z, wrap=False))
    assert seam0 > inner0.max().item() and seam0 > 2 * inner0.median().item(), (seam0, inner0.median())


# ----------------------------------------------------------------------------- The nodes, through ComfyUI's executor

def _decode_prompt(object_node, vae, z, **inputs):
    values = dict(wrap=True, padding=PAD, tile_width=0, tile_overlap=64)
    values.update(inputs)
    return {
        "1": object_node({"samples": z}, "LATENT"),
        "2": object_node(vae, "VAE"),
        "3": {"class_type": "PanoramaDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0], **values}},
    }


def test_panorama_decode_node_equals_the_bridge(run_prompt, object_node, tiny_kl_vae, vae_decode):
    z = _latent(seed=3)
    result = run_prompt(_decode_prompt(object_node, tiny_kl_vae, z, tile_width=128, tile_overlap=32))
    image = result["3"][0]
    assert image.shape == (1, LAT_H * 8, LAT_W * 8, 3)
    assert torch.equal(image, vae_decode(z, wrap=True, padding=PAD, tile_width_px=128, tile_overlap_px=32))


@pytest.mark.parametrize("inputs,match", [
    (dict(tile_width=64, tile_overlap=64), "tile_overlap"),
    (dict(tile_width=64, tile_overlap=128), "tile_overlap"),
])
def test_panorama_decode_node_refuses_bad_tiling(run_prompt, object_node, tiny_kl_vae, inputs, match):
    from devtools import harness as comfy_harness

    calls = []
    vae = _CountingVAE(tiny_kl_vae, calls)
    with pytest.raises(comfy_harness.PromptExecutionError) as info:
        run_prompt(_decode_prompt(object_node, vae, _latent(), **inputs))
    assert info.value.exception_type.endswith("ValueError") and match in info.value.exception_message
    assert calls == [], "bad values must be refused before any decoding"


class _CountingVAE:
    """A VAE stand-in that records decode calls and forwards everything else."""

    def __init__(self, vae, calls):
        self._vae, self._calls = vae, calls

    def decode(self, z):
        self._calls.append(tuple(z.shape))
        return self._vae.decode(z)

    def __getattr__(self, name):
        return getattr(self._vae, name)


# -------------- SavePanorama360: the photo sphere (GPano XMP) metadata a 360° viewer reads, read back from the files

GPANO = "{http://ns.google.com/photos/1.0/panorama/}"


def _gpano_fields(xmp) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8")
    root = ET.fromstring(xmp[xmp.index("<x:xmpmeta"):xmp.index("</x:xmpmeta>") + len("</x:xmpmeta>")])
    return {el.tag[len(GPANO):]: el.text for el in root.iter() if el.tag.startswith(GPANO)}


def _image(height, width, seed=0):
    """A smooth test picture (JPEG keeps it to a few grey levels), different in each batch item."""
    y = torch.linspace(0, 1, height).reshape(1, height, 1, 1)
    x = torch.linspace(0, 1, width).reshape(1, 1, width, 1)
    phase = torch.rand(2, 1, 1, 3, generator=torch.Generator().manual_seed(seed))
    return 0.5 + 0.4 * torch.sin(6.28 * (x + 0.5 * y + phase))


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_save_panorama_360_writes_gpano_metadata(run_prompt, object_node, fmt):
    from PIL import Image

    images = _image(64, 256)  # 4:1, a cylindrical panorama: a band of the sphere around the horizon
    prompt = {
        "1": object_node(images, "IMAGE"),
        "2": {"class_type": "SavePanorama360",
              "inputs": {"images": ["1", 0], "filename_prefix": f"test360/{fmt}", "format": fmt,
                         "jpeg_quality": 90}},
    }
    files = run_prompt(prompt).image_files("2")
    assert len(files) == 2 and all(f.is_file() for f in files)
    with Image.open(files[0]) as im:
        assert im.size == (256, 64) and im.format == ("PNG" if fmt == "png" else "JPEG")
        xmp = im.info["XML:com.adobe.xmp"] if fmt == "png" else im.info["xmp"]
        if fmt == "png":  # the workflow is embedded too, as Save Image does
            assert "prompt" in im.info and "SavePanorama360" in im.info["prompt"]
        pixels = torch.from_numpy(__import__("numpy").array(im.convert("RGB"))).float() / 255
    fields = _gpano_fields(xmp)
    assert fields["ProjectionType"] == "equirectangular"
    assert fields["UsePanoramaViewer"] == "True"
    assert int(fields["FullPanoWidthPixels"]) == 256 and int(fields["FullPanoHeightPixels"]) == 128
    assert int(fields["CroppedAreaImageWidthPixels"]) == 256 and int(fields["CroppedAreaImageHeightPixels"]) == 64
    assert int(fields["CroppedAreaLeftPixels"]) == 0 and int(fields["CroppedAreaTopPixels"]) == 32
    tolerance = 0.5 / 255 if fmt == "png" else 0.05  # PNG: exact to rounding; JPEG: lossy, a few grey levels
    assert (pixels - images[0]).abs().max() <= tolerance + 1e-6


def test_gpano_layout_of_a_full_sphere_and_too_tall_images(run_prompt, object_node):
    from devtools import harness as comfy_harness

    full = gpano.gpano_layout(2048, 1024)  # 2:1 equirectangular: the whole sphere, no crop
    assert full["FullPanoHeightPixels"] == 1024 and full["CroppedAreaTopPixels"] == 0
    assert _gpano_fields(gpano.gpano_xmp(2048, 1024))["CroppedAreaImageHeightPixels"] == "1024"
    with pytest.raises(ValueError, match="at most half as tall"):
        gpano.gpano_layout(512, 300)
    prompt = {"1": object_node(_image(80, 128), "IMAGE"),
              "2": {"class_type": "SavePanorama360", "inputs": {"images": ["1", 0], "filename_prefix": "tall",
                                                                "format": "png", "jpeg_quality": 95}}}
    with pytest.raises(comfy_harness.PromptExecutionError, match="at most half as tall"):
        run_prompt(prompt)


def test_jpeg_xmp_segment_follows_jfif():
    import io as bytes_io

    from PIL import Image

    buffer = bytes_io.BytesIO()
    Image.new("RGB", (16, 8), (10, 20, 30)).save(buffer, format="JPEG")
    data = gpano.jpeg_with_xmp(buffer.getvalue(), gpano.gpano_xmp(16, 8))
    assert data[:4] == b"\xff\xd8\xff\xe0"  # SOI, then JFIF APP0 still first
    app0_end = 4 + int.from_bytes(data[4:6], "big")
    assert data[app0_end:app0_end + 2] == b"\xff\xe1" and data[app0_end + 4:].startswith(b"http://ns.adobe.com/xap/1.0/\x00")
    with Image.open(bytes_io.BytesIO(data)) as im:
        assert im.size == (16, 8) and _gpano_fields(im.info["xmp"])["ProjectionType"] == "equirectangular"
