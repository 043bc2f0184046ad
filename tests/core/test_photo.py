"""The photo canvas: flat placement, the equirectangular (gnomonic) projection and its inverse, the mask and its
feather, every bad input, and the window a photo-following anchor picks. Plain torch: no ComfyUI."""
import math

import numpy as np
import pytest
import torch

from syncdiff_core import photo as P
from syncdiff_core.sync import Anchor
from syncdiff_core.windows import plan_windows


def coordinate_photo(h: int, w: int) -> torch.Tensor:
    """A photo whose red channel is its pixel centres' u / w and green v / h: linear, so bilinear sampling
    returns exactly the photo coordinates it sampled at (away from the clamped outer half pixel)."""
    u = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    v = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    return torch.stack([u[None].expand(h, w), v[:, None].expand(h, w), torch.full((h, w), 0.25,
                                                                                 dtype=torch.float64)], -1)[None]


def gnomonic(lat, lon, lat0, lon0):
    """The textbook forward gnomonic projection (Snyder, Map Projections: A Working Manual, eqs. 22-4, 22-5):
    plane coordinates (x right, y up) on the tangent plane at (lat0, lon0), and cos c (> 0: the near side)."""
    cos_c = np.sin(lat0) * np.sin(lat) + np.cos(lat0) * np.cos(lat) * np.cos(lon - lon0)
    x = np.cos(lat) * np.sin(lon - lon0) / cos_c
    y = (np.cos(lat0) * np.sin(lat) - np.sin(lat0) * np.cos(lat) * np.cos(lon - lon0)) / cos_c
    return x, y, cos_c


def inverse_gnomonic(x, y, lat0, lon0):
    """Snyder eqs. 20-14, 20-15 with c = atan(rho): the latitude and longitude of plane point (x, y)."""
    rho = math.hypot(x, y)
    c = math.atan(rho)
    if rho == 0:
        return lat0, lon0
    lat = math.asin(math.cos(c) * math.sin(lat0) + y * math.sin(c) * math.cos(lat0) / rho)
    lon = lon0 + math.atan2(x * math.sin(c), rho * math.cos(lat0) * math.cos(c) - y * math.sin(lat0) * math.sin(c))
    return lat, lon


def equirect(photo, w, h, fov, yaw, pitch, feather=0):
    return P.place_photo(photo.float() if photo.dtype != torch.float64 else photo,
                         P.Placement(w, h, "equirectangular", camera=P.Camera(fov, yaw, pitch), feather=feather))


CAMERAS = [(90.0, 0.0, 0.0), (60.0, 40.0, 25.0), (100.0, -120.0, -50.0), (75.0, 180.0, 10.0), (50.0, 30.0, 90.0)]


@pytest.mark.parametrize("fov,yaw,pitch", CAMERAS)
def test_every_canvas_pixel_shows_the_photo_point_the_gnomonic_formulas_give(fov, yaw, pitch):
    ph, pw, H, W = 48, 64, 256, 512
    canvas, mask = equirect(coordinate_photo(ph, pw), W, H, fov, yaw, pitch)
    lon = ((np.arange(W) + 0.5) / W * 2 - 1) * np.pi
    lat = (0.5 - (np.arange(H) + 0.5) / H) * np.pi
    lon, lat = np.meshgrid(lon, lat)
    x, y, cos_c = gnomonic(lat, lon, math.radians(pitch), math.radians(yaw))
    f = (pw / 2) / math.tan(math.radians(fov) / 2)
    u, v = pw / 2 + f * x, ph / 2 - f * y
    on = (cos_c > 0) & (u >= 0) & (u <= pw) & (v >= 0) & (v <= ph)
    kept = mask[0].numpy() == 0
    # the kept area is where the photo lands (the borders' half pixel may go either way by rounding)
    inner = on & (u > 0.01) & (u < pw - 0.01) & (v > 0.01) & (v < ph - 0.01)
    outer = ~on
    assert kept[inner].all() and not kept[outer].any() and inner.sum() > 100
    # and each of its pixels shows the photo point at (u, v), within half a photo pixel (away from the clamped rim)
    core = on & (u > 0.5) & (u < pw - 0.5) & (v > 0.5) & (v < ph - 0.5)
    got_u = canvas[0, ..., 0].double().numpy() * pw
    got_v = canvas[0, ..., 1].double().numpy() * ph
    assert np.abs(got_u - u)[core].max() < 0.5 and np.abs(got_v - v)[core].max() < 0.5
    assert np.abs(got_u - u)[core].max() < 1e-3  # bilinear sampling of a linear photo: exact up to float32
    # what is not the photo is the empty grey
    assert torch.all(canvas[0][torch.from_numpy(outer)] == P.EMPTY)


@pytest.mark.parametrize("fov,yaw,pitch", CAMERAS)
def test_marked_points_land_where_the_inverse_gnomonic_formulas_put_them(fov, yaw, pitch):
    ph, pw, H, W = 60, 80, 512, 1024
    photo = torch.zeros(1, ph, pw, 3)
    marks = [(10, 12), (40, 70), (29, 39), (55, 5), (3, 77)]  # (row, column) of single marked pixels
    for k, (r, c) in enumerate(marks):
        photo[0, r, c] = torch.tensor([1.0, (k + 1) / 8, 0.0])
    canvas, _ = equirect(photo, W, H, fov, yaw, pitch)
    f = (pw / 2) / math.tan(math.radians(fov) / 2)
    for k, (r, c) in enumerate(marks):
        x, y = (c + 0.5 - pw / 2) / f, -(r + 0.5 - ph / 2) / f
        lat, lon = inverse_gnomonic(x, y, math.radians(pitch), math.radians(yaw))
        want_x = ((lon / math.pi + 1) / 2 * W - 0.5) % W  # canvas pixel coordinates of that direction
        want_y = (0.5 - lat / math.pi) * H - 0.5
        # the mark's footprint on the canvas: the pixels it lit, its centre of brightness
        # (bilinear sampling scales the mark's colour by the sample's weight: the green/red ratio names the mark)
        red = canvas[0, ..., 0]
        lit = (red > 0) & ((canvas[0, ..., 1] / red.clamp(min=1e-12) - (k + 1) / 8).abs() < 1e-4)
        weight = red * lit
        ys, xs = torch.nonzero(lit, as_tuple=True)
        assert len(ys), f"mark {k} is nowhere on the canvas"
        # columns relative to the expected one, unwrapped around the seam
        dx = ((xs.double() - want_x + W / 2) % W) - W / 2
        wts = weight[ys, xs].double()
        cx, cy = float((dx * wts).sum() / wts.sum()), float((ys.double() * wts).sum() / wts.sum()) - want_y
        assert abs(cx) < 0.5 and abs(cy) < 0.5, f"mark {k} at offset ({cx:.2f}, {cy:.2f}) px from the formula"


@pytest.mark.parametrize("fov,yaw,pitch", CAMERAS)
def test_round_trip_back_to_perspective_reproduces_the_photo(fov, yaw, pitch):
    ph, pw = 48, 64
    g = torch.Generator().manual_seed(3)
    # a smooth photo (random low frequencies): what bilinear resampling twice can reproduce
    small = torch.rand(1, 3, 6, 8, generator=g, dtype=torch.float64)
    photo = torch.nn.functional.interpolate(small, size=(ph, pw), mode="bicubic", align_corners=False)
    photo = photo.clamp(0, 1).movedim(1, -1)
    W = 2048  # the canvas finer than the photo: the round trip is limited by the photo's own sampling
    canvas, _ = equirect(photo, W, W // 2, fov, yaw, pitch)
    back = P.equirect_to_perspective(canvas, P.Camera(fov, yaw, pitch), pw, ph)
    inner = (slice(None), slice(2, -2), slice(2, -2))
    err = (back - photo)[inner].abs()
    assert err.max() < 0.02 and err.mean() < 0.003
    # a wrong camera does not reproduce it: the test can fail
    wrong = P.equirect_to_perspective(canvas, P.Camera(fov, yaw + 5, pitch), pw, ph)
    assert (wrong - photo)[inner].abs().mean() > 5 * err.mean()


def test_the_inverse_shows_the_equirectangular_point_the_formulas_give():
    H, W = 128, 256
    lon = ((torch.arange(W, dtype=torch.float64) + 0.5) / W * 2 - 1)
    lat = (0.5 - (torch.arange(H, dtype=torch.float64) + 0.5) / H)
    # longitude as cos/sin (continuous across the seam) and latitude, as colours
    pano = torch.stack([torch.cos(lon * math.pi)[None].expand(H, W) * 0.5 + 0.5,
                        torch.sin(lon * math.pi)[None].expand(H, W) * 0.5 + 0.5,
                        lat[:, None].expand(H, W) + 0.5], -1)[None]
    fov, yaw, pitch, pw, ph = 80.0, 170.0, 20.0, 40, 30
    view = P.equirect_to_perspective(pano, P.Camera(fov, yaw, pitch), pw, ph)
    f = (pw / 2) / math.tan(math.radians(fov) / 2)
    for r, c in ((0, 0), (15, 20), (29, 39), (7, 33)):
        la, lo = inverse_gnomonic((c + 0.5 - pw / 2) / f, -(r + 0.5 - ph / 2) / f, math.radians(pitch),
                                  math.radians(yaw))
        got = view[0, r, c].double()
        assert abs(float(got[0]) - (math.cos(lo) * 0.5 + 0.5)) < 0.02
        assert abs(float(got[1]) - (math.sin(lo) * 0.5 + 0.5)) < 0.02
        assert abs(float(got[2]) - (la / math.pi + 0.5)) < 0.5 / H + 1e-3


def test_photo_straddles_the_seam_at_yaw_180_as_the_roll_of_yaw_0():
    photo = coordinate_photo(40, 56).float()
    at0, m0 = equirect(photo, 256, 128, 90.0, 0.0, 10.0, feather=4)
    at180, m180 = equirect(photo, 256, 128, 90.0, 180.0, 10.0, feather=4)
    # kept pixels on both sides of the seam
    kept = m180[0] < 1
    assert kept[:, 0].any() and kept[:, -1].any() and not kept[:, 128].any()
    torch.testing.assert_close(at180, torch.roll(at0, 128, dims=2), atol=1e-5, rtol=0)
    torch.testing.assert_close(m180, torch.roll(m0, 128, dims=2), atol=1e-5, rtol=0)
    # and the view back across the seam is the photo
    back = P.equirect_to_perspective(at180, P.Camera(90.0, 180.0, 10.0), 56, 40)
    assert (back - photo)[:, 3:-3, 3:-3].abs().max() < 0.05


def test_flat_placements_put_the_photo_where_asked():
    g = torch.Generator().manual_seed(0)
    photo = torch.rand(2, 40, 64, 3, generator=g)
    for placement, left in (("left", 0), ("center", 96), ("right", 192)):
        canvas, mask = P.place_photo(photo, P.Placement(256, 56, "flat", placement))
        assert canvas.shape == (2, 56, 256, 3) and mask.shape == (2, 56, 256)
        assert torch.equal(canvas[:, 8:48, left:left + 64], photo)
        assert torch.all(mask[:, 8:48, left:left + 64] == 0)
        rest = torch.ones(56, 256, dtype=torch.bool)
        rest[8:48, left:left + 64] = False
        assert torch.all(mask[:, rest] == 1) and torch.all(canvas[:, rest] == P.EMPTY)
    canvas, mask = P.place_photo(photo, P.Placement(256, 64, "flat", "offset", offset_x=30, offset_y=5))
    assert torch.equal(canvas[:, 5:45, 30:94], photo) and torch.all(mask[:, 5:45, 30:94] == 0)
    assert torch.all(mask[:, :5] == 1) and torch.all(mask[:, :, :30] == 1) and torch.all(mask[:, 45:] == 1)


def test_alpha_and_grey_photos_become_rgb():
    rgba = torch.rand(1, 16, 16, 4)
    canvas, _ = P.place_photo(rgba, P.Placement(64, 16, "flat", "left"))
    assert canvas.shape[-1] == 3 and torch.equal(canvas[:, :, :16], rgba[..., :3])
    grey = torch.rand(1, 16, 16, 1)
    canvas, _ = P.place_photo(grey, P.Placement(64, 16, "flat", "left"))
    assert torch.equal(canvas[:, :, :16], grey.expand(-1, -1, -1, 3))


def test_feather_ramps_inside_the_edges_that_meet_generated_area_only():
    photo = torch.rand(1, 64, 64, 3)
    _, mask = P.place_photo(photo, P.Placement(256, 64, "flat", "left", feather=3))
    row = mask[0, 32]
    # the right edge meets the generated area: 3 pixels ramp 3/4, 2/4, 1/4 down to kept
    torch.testing.assert_close(row[58:66], torch.tensor([0, 0, 0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    # the left, top and bottom edges are canvas borders: no ramp there
    assert torch.all(mask[0, :, :61] == 0)
    # a photo in the middle ramps on both sides; feather 0 is a hard edge
    _, mask = P.place_photo(photo, P.Placement(256, 128, "flat", "center", feather=2))
    torch.testing.assert_close(mask[0, 64, 94:99], torch.tensor([1.0, 1.0, 2 / 3, 1 / 3, 0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(mask[0, 30:35, 128], torch.tensor([1.0, 1.0, 2 / 3, 1 / 3, 0]), atol=1e-6, rtol=0)
    _, hard = P.place_photo(photo, P.Placement(256, 128, "flat", "center", feather=0))
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    # equirectangular: the ramp follows the photo's border on the sphere
    _, soft = equirect(photo, 512, 256, 90.0, 0.0, 0.0, feather=8)
    _, sharp = equirect(photo, 512, 256, 90.0, 0.0, 0.0, feather=0)
    ramp = (soft[0] > 0) & (soft[0] < 1)
    assert ramp.sum() > 100 and torch.all(sharp[0][ramp] == 0)  # the ramp lies inside the kept photo
    assert torch.all(soft[0][sharp[0] == 1] == 1)
    assert soft[0, 128, 256] == 0  # the photo's centre is kept


def test_the_mask_is_what_comfyui_mask_inputs_take():
    _, mask = P.place_photo(torch.rand(3, 32, 32, 3), P.Placement(128, 64, "flat", feather=4))
    assert mask.dtype == torch.float32 and mask.shape == (3, 64, 128) and mask.min() >= 0 and mask.max() <= 1


BAD = [
    (dict(width=100), "width must be a positive multiple of 8"),
    (dict(height=60), "height must be a positive multiple of 8"),
    (dict(width=48), "larger than the canvas"),
    (dict(height=32), "larger than the canvas"),
    (dict(width=64, height=64), "mask is all zero"),
    (dict(placement="middle"), "placement must be one of"),
    (dict(projection="cubemap"), "projection must be one of"),
    (dict(placement="offset", offset_x=200), "offset_x must be between 0 and 192"),
    (dict(placement="offset", offset_y=1), "offset_y must be between 0 and 0"),
    (dict(feather=33), "feather must be at most half"),
    (dict(feather=-1), "feather must be a whole number"),
    (dict(projection="equirectangular", camera=P.Camera(fov=0.0)), "fov must be"),
    (dict(projection="equirectangular", camera=P.Camera(fov=180.0)), "strictly between 0 and 180"),
    (dict(projection="equirectangular", camera=P.Camera(fov=float("nan"))), "fov must be"),
    (dict(projection="equirectangular", camera=P.Camera(pitch=91.0)), "pitch must be between -90 and 90"),
    (dict(projection="equirectangular", camera=P.Camera(pitch=-120.0)), "pitch must be between -90 and 90"),
    (dict(projection="equirectangular", camera=P.Camera(yaw=float("inf"))), "yaw must be a finite"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(" must")[0][:24] + str(i) for i, (_, m) in
                                                     enumerate(BAD)])
def test_bad_input_is_refused_with_the_input_and_its_range(change, message):
    base = dict(width=256, height=64, projection="flat", placement="center", feather=4)
    with pytest.raises(ValueError, match=message):
        P.place_photo(torch.rand(1, 64, 64, 3), P.Placement(**{**base, **change}))


def test_bad_images_are_refused():
    for bad in (torch.rand(64, 64, 3), torch.rand(1, 64, 64, 2), "photo.png", torch.rand(1, 0, 64, 3)):
        with pytest.raises(ValueError, match="image"):
            P.place_photo(bad, P.Placement(256, 64))


def test_kept_window_index_picks_the_window_the_photo_covers_most():
    plan = plan_windows(8, 64, 8, 4, wrap=False)  # windows start every 4 columns: 0, 4, ..., 56
    keep = torch.zeros(8, 64)
    keep[:, 21:30] = 1  # window 5 (20..28) covers 7 columns, window 6 (24..32) 6, window 4 (16..24) 3
    assert P.kept_window_index(plan, keep) == 5
    # ties go to the lowest index: columns 24..28 lie in windows 5 (20..28) and 6 (24..32) alike
    keep = torch.zeros(8, 64)
    keep[:, 24:28] = 1
    assert P.kept_window_index(plan, keep) == 5
    # a batch counts by its mean, soft values by their weight
    keep = torch.zeros(2, 8, 64)
    keep[0, :, 0:8] = 1.0
    keep[1, :, 56:64] = 1.0
    keep[1, :, 0:2] = 0.5
    assert P.kept_window_index(plan, keep) == 0


def test_kept_window_index_counts_across_the_wrap_seam():
    plan = plan_windows(8, 64, 8, 4, wrap=True)  # 16 windows, the last one crosses the seam
    keep = torch.zeros(8, 64)
    keep[:, 60:64] = 1
    keep[:, 0:6] = 1  # the photo straddles the seam: 10 columns around column 0
    i = P.kept_window_index(plan, keep)
    assert plan[i].wraps and plan[i].left == 60  # 60..68 (mod 64): 8 kept columns; window 0 has 6, 56..64 4
    without = plan_windows(8, 64, 8, 4, wrap=False)
    assert P.kept_window_index(without, keep) == 0


def test_kept_window_index_refuses_a_mask_that_keeps_nothing_or_the_wrong_size():
    plan = plan_windows(8, 64, 8, 4)
    with pytest.raises(ValueError, match="keeps nothing"):
        P.kept_window_index(plan, torch.zeros(8, 64))
    with pytest.raises(ValueError, match="plan's canvas"):
        P.kept_window_index(plan, torch.ones(8, 32))


def test_keep_mask_for_latent_is_one_minus_the_resized_noise_mask():
    _, mask = P.place_photo(torch.rand(1, 64, 64, 3), P.Placement(256, 64, "flat", "left"))
    keep = P.keep_mask_for_latent(mask, 8, 32)
    assert keep.shape == (1, 8, 32) and torch.all(keep[0, :, :8] == 1) and torch.all(keep[0, :, 8:] == 0)
    plan = plan_windows(8, 32, 8, 4)
    assert P.kept_window_index(plan, keep) == 0


def test_a_kept_region_anchor_picks_its_window_from_a_pixel_mask_across_the_wrap_seam():
    """The anchor mode: a noise mask at pixel size (1 = generate), 8 px per latent px, the photo straddling the
    seam (pixel columns 480..512 and 0..48 = latent 60..64 and 0..6): the window at latent column 60, which crosses
    the seam, holds 8 kept columns, window 0 only 6."""
    mask = torch.ones(1, 64, 512)
    mask[:, :, 480:] = 0
    mask[:, :, :48] = 0
    plan = plan_windows(8, 64, 8, 4, wrap=True)
    anchor = Anchor(mode="kept_region", mask=mask)
    i = anchor.window_index(plan)
    assert plan[i].wraps and plan[i].left == 60
    assert anchor.for_plan(plan) == Anchor(mode="index", index=i)
    # its own mask wins over the run's noise mask; without one it follows the noise mask (latent columns 32..40)
    noise_mask = torch.ones(1, 1, 64, 512)
    noise_mask[..., 256:320] = 0
    assert anchor.for_plan(plan, noise_mask).index == i
    assert plan[Anchor(mode="kept_region").for_plan(plan, noise_mask).index].left == 32
    assert Anchor(mode="center").for_plan(plan, noise_mask) == Anchor(mode="center")


def test_a_kept_region_anchor_without_a_mask_or_a_photo_is_refused():
    plan = plan_windows(8, 64, 8, 4, wrap=True)
    with pytest.raises(ValueError, match="'kept region' needs a mask"):
        Anchor(mode="kept_region").for_plan(plan)
    with pytest.raises(ValueError, match="the mask keeps nothing"):
        Anchor(mode="kept_region", mask=torch.ones(1, 64, 512)).for_plan(plan)
    with pytest.raises(ValueError, match="anchor mask must be a mask"):
        Anchor(mode="kept_region", mask=torch.ones(512))


def test_projecting_in_row_chunks_changes_nothing(monkeypatch):
    photo = torch.rand(2, 30, 40, 3, generator=torch.Generator().manual_seed(4))
    whole = equirect(photo, 256, 128, 75.0, 170.0, 35.0, feather=5)
    monkeypatch.setattr(P, "CHUNK_PIXELS", 256 * 7)  # 7 rows at a time, the last chunk shorter
    chunked = equirect(photo, 256, 128, 75.0, 170.0, 35.0, feather=5)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
