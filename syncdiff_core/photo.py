"""A photo placed on a panorama canvas, with the mask of what is left to generate.

Two ways to place it:

* ``flat``: the photo pasted as it is onto a wider (or taller) canvas, at the left, the centre, the right or a
  given offset in pixels, for outpainting into a wide panorama.
* ``equirectangular``: a perspective (pinhole) photo projected onto the sphere of a 360° equirectangular canvas
  by the gnomonic mapping. Each canvas pixel's viewing direction is turned into the camera's frame; directions in
  front of the camera that hit the image plane inside the photo sample it bilinearly, the rest of the sphere stays
  empty. ``equirect_to_perspective`` is the inverse (a pinhole view of an equirectangular image).

Conventions (equirectangular): canvas column ``x`` (pixel centre ``x + 0.5``) is longitude
``(x + 0.5) / W * 360° - 180°``, so longitude 0 is the canvas' middle column and ±180° its left/right border
(the wrap seam); row ``y`` is latitude ``90° - (y + 0.5) / H * 180°``. A camera of yaw ``ψ`` and pitch ``θ`` looks
toward longitude ``ψ`` (positive = to the right on the canvas) and latitude ``θ`` (positive = up). Its horizontal
field of view spans the photo's width; square pixels give the vertical one.

Images are ComfyUI IMAGEs (batch, height, width, channels) in [0, 1]; the mask is a ComfyUI MASK
(batch, height, width) with 1 where the model generates and 0 where the photo is kept, the form that
VAEEncodeForInpaint, InpaintModelConditioning and SetLatentNoiseMask take. The feather is a soft ramp of
``feather`` photo pixels inside the photo's border where it meets generated area (never along a canvas border),
so the generated part blends into the photo. Plain torch: nothing here imports ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .windows import WindowPlan, crop

#: How the photo is put on the canvas; the first is the default.
PROJECTIONS = ("flat", "equirectangular")
#: Where a flat photo goes horizontally; "offset" uses the given offsets in pixels.
PLACEMENTS = ("center", "left", "right", "offset")
#: Canvas sizes are multiples of this many pixels (one latent pixel of SD-family VAEs).
CANVAS_MULTIPLE = 8
#: Grey of the area to generate in the canvas IMAGE (what VAEEncodeForInpaint puts there too).
EMPTY = 0.5


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: horizontal field of view, yaw and pitch, in degrees."""

    fov: float = 90.0
    yaw: float = 0.0
    pitch: float = 0.0

    def check(self) -> None:
        if not (math.isfinite(self.fov) and 0.0 < self.fov < 180.0):
            raise ValueError(f"fov must be a horizontal field of view in degrees strictly between 0 and 180, "
                             f"got {self.fov}")
        if not math.isfinite(self.yaw):
            raise ValueError(f"yaw must be a finite angle in degrees, got {self.yaw}")
        if not (math.isfinite(self.pitch) and -90.0 <= self.pitch <= 90.0):
            raise ValueError(f"pitch must be between -90 and 90 degrees (looking straight down to straight up): "
                             f"beyond that the photo's centre is off the sphere; got {self.pitch}")

    def basis(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The camera's right, up and forward unit vectors in world coordinates (x right, y up, z toward
        longitude 0)."""
        psi, th = math.radians(self.yaw), math.radians(self.pitch)
        forward = torch.tensor([math.cos(th) * math.sin(psi), math.sin(th), math.cos(th) * math.cos(psi)], dtype=dtype)
        right = torch.tensor([math.cos(psi), 0.0, -math.sin(psi)], dtype=dtype)
        up = torch.tensor([-math.sin(th) * math.sin(psi), math.cos(th), -math.sin(th) * math.cos(psi)], dtype=dtype)
        return right, up, forward

    def focal_px(self, photo_width: int) -> float:
        """Focal length in photo pixels: the photo's width spans the horizontal field of view."""
        return (photo_width / 2.0) / math.tan(math.radians(self.fov) / 2.0)


@dataclass(frozen=True)
class Placement:
    """What ``place_photo`` does: the canvas size in pixels, the projection, and its parameters."""

    width: int
    height: int
    projection: str = PROJECTIONS[0]
    placement: str = PLACEMENTS[0]
    offset_x: int = 0
    offset_y: int = 0
    camera: Camera = Camera()
    feather: int = 0


def _check_image(image, name: str = "image") -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name} must be an IMAGE (batch, height, width, 1/3/4 channels), got {got}")
    if image.shape[0] < 1 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")


def _rgb(image: torch.Tensor) -> torch.Tensor:
    """Three channels: grey is repeated, alpha dropped."""
    if image.shape[-1] == 1:
        return image.expand(*image.shape[:-1], 3)
    return image[..., :3]


def flat_origin(p: Placement, photo_h: int, photo_w: int) -> tuple[int, int]:
    """(top, left) of a flat photo on the canvas, in pixels."""
    if p.placement == "offset":
        return p.offset_y, p.offset_x
    top = (p.height - photo_h) // 2
    left = {"left": 0, "center": (p.width - photo_w) // 2, "right": p.width - photo_w}[p.placement]
    return top, left


def check_placement(p: Placement, photo_h: int, photo_w: int) -> None:
    """Every input of ``place_photo`` against its allowed range (a ValueError naming it), before any work."""
    for name, v in (("width", p.width), ("height", p.height)):
        if not isinstance(v, int) or v <= 0 or v % CANVAS_MULTIPLE:
            raise ValueError(f"{name} must be a positive multiple of {CANVAS_MULTIPLE} pixels, got {v}")
    if p.projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(map(repr, PROJECTIONS))}; got {p.projection!r}")
    p.camera.check()  # unused by a flat placement, but a NaN there is still bad input
    if not isinstance(p.feather, int) or p.feather < 0:
        raise ValueError(f"feather must be a whole number of pixels, 0 or more, got {p.feather}")
    if 2 * p.feather > min(photo_h, photo_w):
        raise ValueError(f"feather must be at most half the photo's shorter side ({min(photo_h, photo_w) // 2} px "
                         f"for a {photo_w}x{photo_h} photo), got {p.feather}")
    if p.projection == "flat":
        if p.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(map(repr, PLACEMENTS))}; got {p.placement!r}")
        if photo_w > p.width or photo_h > p.height:
            raise ValueError(f"the photo ({photo_w}x{photo_h} px) is larger than the canvas ({p.width}x{p.height} "
                             f"px): scale it down (e.g. Upscale Image) to at most the canvas' width and height, or "
                             f"enlarge the canvas")
        top, left = flat_origin(p, photo_h, photo_w)
        if not 0 <= left <= p.width - photo_w:
            raise ValueError(f"offset_x must be between 0 and {p.width - photo_w} px (canvas width {p.width} minus "
                             f"the photo's {photo_w}), got {left}")
        if not 0 <= top <= p.height - photo_h:
            raise ValueError(f"offset_y must be between 0 and {p.height - photo_h} px (canvas height {p.height} "
                             f"minus the photo's {photo_h}), got {top}")
        if photo_w == p.width and photo_h == p.height:
            raise ValueError(f"the photo ({photo_w}x{photo_h} px) covers the whole canvas, so the mask is all "
                             f"zero and there is nothing to generate: make width or height larger than the photo")


def _edge_ramp(dist: torch.Tensor, feather: int) -> torch.Tensor:
    """Mask value of a photo pixel whose centre is ``dist`` photo pixels inside an edge that meets generated
    area: the ``feather`` outermost pixels ramp down (``feather / (feather + 1)`` at the edge, in steps of
    ``1 / (feather + 1)``), every pixel further in is 0 (kept); 0 = a hard edge."""
    if feather == 0:
        return torch.zeros_like(dist)
    return (1.0 - (dist + 0.5) / (feather + 1)).clamp(0.0, 1.0)


def _flat(photo: torch.Tensor, p: Placement) -> tuple[torch.Tensor, torch.Tensor]:
    b, ph, pw, _ = photo.shape
    top, left = flat_origin(p, ph, pw)
    canvas = torch.full((b, p.height, p.width, 3), EMPTY, dtype=photo.dtype, device=photo.device)
    canvas[:, top:top + ph, left:left + pw] = photo
    # distance of each photo pixel's centre from each edge that meets generated area (canvas borders excluded)
    ys = torch.arange(ph, dtype=torch.float32) + 0.5
    xs = torch.arange(pw, dtype=torch.float32) + 0.5
    inf = torch.full_like(ys, float("inf"))
    d_y = torch.minimum(ys if top > 0 else inf, (ph - ys) if top + ph < p.height else inf)
    inf = torch.full_like(xs, float("inf"))
    d_x = torch.minimum(xs if left > 0 else inf, (pw - xs) if left + pw < p.width else inf)
    inside = _edge_ramp(torch.minimum(d_y[:, None], d_x[None, :]), p.feather)
    mask = torch.ones((p.height, p.width), dtype=torch.float32)
    mask[top:top + ph, left:left + pw] = inside
    return canvas, mask.to(photo.device).expand(b, -1, -1).contiguous()


def equirect_directions(height: int, width: int, dtype=torch.float64, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Unit viewing direction of each equirectangular pixel centre, (height, width, 3); of rows ``rows[0]`` to
    ``rows[1]`` only when given."""
    lon = ((torch.arange(width, dtype=dtype) + 0.5) / width * 2.0 - 1.0) * math.pi
    first, stop = rows if rows is not None else (0, height)
    lat = (0.5 - (torch.arange(first, stop, dtype=dtype) + 0.5) / height) * math.pi
    lat, lon = lat[:, None], lon[None, :]
    return torch.stack([torch.cos(lat) * torch.sin(lon), torch.sin(lat).expand_as(lon * lat),
                        torch.cos(lat) * torch.cos(lon)], dim=-1)


def photo_coordinates(height: int, width: int, camera: Camera, photo_h: int, photo_w: int,
                      rows: tuple[int, int] | None = None):
    """Where each equirectangular pixel's direction meets the photo: (u, v) in photo pixels (pixel ``i`` spans
    ``i..i+1``) and whether it lands on the photo (in front of the camera, inside its borders); of rows ``rows[0]``
    to ``rows[1]`` only when given."""
    right, up, forward = camera.basis()
    d = equirect_directions(height, width, rows=rows)
    xc, yc, zc = d @ right, d @ up, d @ forward
    f = camera.focal_px(photo_w)
    front = zc > 1e-9
    z = torch.where(front, zc, torch.ones_like(zc))
    u = photo_w / 2.0 + f * xc / z
    v = photo_h / 2.0 - f * yc / z
    hit = front & (u >= 0) & (u <= photo_w) & (v >= 0) & (v <= photo_h)
    return u, v, hit


def _sample(image: torch.Tensor, u: torch.Tensor, v: torch.Tensor, wrap: bool = False) -> torch.Tensor:
    """Bilinear samples of ``image`` (B, H, W, C) at pixel coordinates (u, v) (pixel ``i`` centred at ``i+0.5``):
    (B, *u.shape, C), in the image's dtype. Edges are clamped; under ``wrap`` columns continue across the left/right
    border."""
    b, h, w, c = image.shape
    src = image.movedim(-1, 1)
    if wrap:  # one column of the other side on each side, so samples near the seam blend across it
        src = torch.cat([src[..., -1:], src, src[..., :1]], dim=-1)
        u, w = u + 1.0, w + 2
    grid = torch.stack([u / w * 2.0 - 1.0, v / h * 2.0 - 1.0], dim=-1).to(src.dtype)
    grid = grid.reshape(1, -1, 1, 2).expand(b, -1, -1, -1).to(src.device)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].movedim(1, -1).reshape(b, *u.shape, c)


#: Canvas pixels projected at a time: the float64 geometry of a chunk stays small (tens of MB) on any canvas.
CHUNK_PIXELS = 1 << 20


def _equirect(photo: torch.Tensor, p: Placement) -> tuple[torch.Tensor, torch.Tensor]:
    b, ph, pw, _ = photo.shape
    canvas = torch.full((b, p.height, p.width, 3), EMPTY, dtype=photo.dtype, device=photo.device)
    mask = torch.ones((p.height, p.width), dtype=torch.float32)
    rows = max(1, CHUNK_PIXELS // p.width)
    for top in range(0, p.height, rows):
        n = min(rows, p.height - top)
        u, v, hit = photo_coordinates(p.height, p.width, p.camera, ph, pw, rows=(top, top + n))
        if not bool(hit.any()):
            continue
        sampled = _sample(photo, u, v)
        part = canvas[:, top:top + n]
        part[:, hit.to(photo.device)] = sampled[:, hit.to(photo.device)]
        dist = torch.minimum(torch.minimum(u, pw - u), torch.minimum(v, ph - v)).clamp(min=0.0)
        inside = _edge_ramp(dist, p.feather).to(torch.float32)
        mask[top:top + n] = torch.where(hit, inside, mask[top:top + n])
    return canvas, mask.to(photo.device).expand(b, -1, -1).contiguous()


def place_photo(image: torch.Tensor, p: Placement) -> tuple[torch.Tensor, torch.Tensor]:
    """The canvas IMAGE (B, height, width, 3) with the photo on it (the rest grey) and the MASK (B, height, width):
    1 = generate, 0 = keep the photo, a ramp across the feather. Checks every input first."""
    _check_image(image)
    check_placement(p, image.shape[1], image.shape[2])
    photo = _rgb(image).clamp(0.0, 1.0)
    canvas, mask = _flat(photo, p) if p.projection == "flat" else _equirect(photo, p)
    if not bool((mask < 1).any()):
        raise ValueError("the photo lands nowhere on the canvas, so the mask is all one and nothing is kept: check "
                         "fov, yaw and pitch")
    if not bool((mask > 0).any()):
        raise ValueError("the mask is all zero: the photo covers the whole canvas and there is nothing to "
                         "generate; make the canvas larger or the field of view smaller")
    return canvas, mask


def equirect_to_perspective(image: torch.Tensor, camera: Camera, width: int, height: int) -> torch.Tensor:
    """A pinhole view (B, height, width, C) of an equirectangular IMAGE, from ``camera``: the inverse of the
    equirectangular placement, for checking it and for looking at a result the way the photo was taken."""
    _check_image(image)
    camera.check()
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive pixel counts, got {width}x{height}")
    b, eh, ew, _ = image.shape
    right, up, forward = camera.basis()
    f = camera.focal_px(width)
    xs = (torch.arange(width, dtype=torch.float64) + 0.5 - width / 2.0) / f
    ys = -(torch.arange(height, dtype=torch.float64) + 0.5 - height / 2.0) / f
    d = xs[None, :, None] * right + ys[:, None, None] * up + forward
    d = d / d.norm(dim=-1, keepdim=True)
    lon = torch.atan2(d[..., 0], d[..., 2])
    lat = torch.asin(d[..., 1].clamp(-1.0, 1.0))
    u = (lon / math.pi + 1.0) / 2.0 * ew
    v = (0.5 - lat / math.pi) * eh
    return _sample(image, u, v, wrap=True)


def kept_window_index(plan: WindowPlan, keep_mask_latent: torch.Tensor) -> int:
    """The window of ``plan`` that covers the most kept area, for an anchor that follows the photo.

    ``keep_mask_latent``: (H, W) or (B, H, W) at the plan's latent size, 1 = kept (the photo), 0 = generated
    (``1 -`` a noise mask resized to the latent); soft values count by their weight, a batch by its mean. Windows
    crossing the wrap seam count the columns on both sides. Ties go to the lowest window index (raster order)."""
    if not isinstance(keep_mask_latent, torch.Tensor) or keep_mask_latent.ndim not in (2, 3):
        raise ValueError("keep_mask_latent must be a (batch,) height, width tensor")
    keep = keep_mask_latent if keep_mask_latent.ndim == 2 else keep_mask_latent.float().mean(0)
    if tuple(keep.shape) != (plan.canvas_height, plan.canvas_width):
        raise ValueError(f"keep_mask_latent is {tuple(keep.shape)}, the plan's canvas is "
                         f"{(plan.canvas_height, plan.canvas_width)} latent px")
    keep = keep.to(torch.float64)
    areas = [float(crop(keep, w).sum()) for w in plan]
    best = max(areas)
    if best <= 0.0:
        raise ValueError("the mask keeps nothing (it is 1 = generate everywhere, so no window covers a kept area): "
                         "there is no photo for a 'kept region' anchor to follow")
    return areas.index(best)


def keep_mask_for_latent(noise_mask: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """A MASK (1 = generate) at pixel size as a keep mask (1 = kept) at the latent size (B, latent_h, latent_w),
    resized bilinearly as ComfyUI resizes a noise mask to the latent."""
    m = noise_mask.reshape(-1, 1, *noise_mask.shape[-2:]).float()
    m = F.interpolate(m, size=(latent_h, latent_w), mode="bilinear")
    return 1.0 - m[:, 0]
