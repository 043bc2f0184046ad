"""A seeded procedural world of wide landscape scenes (plain torch, no ComfyUI).

A scene has global attributes that hold across its whole width and vary between scenes:

* ``time`` of day -- the sky palette (dawn, day, dusk, night), a sun (dawn/day/dusk) or a moon and stars (night);
* ``season`` -- the colour of the ground and of the mountain slopes (summer green, autumn ochre, winter snow);

and per-scene free detail: two or three layered mountain silhouettes (farther ones paler, closer to the sky
colour), a lake or a meadow in the foreground, the place of the sun or moon.

Square crops at the window size are the training images; whole scenes are the ground truth for coherence (one
scene = one set of attributes). Everything is drawn from a ``torch.Generator`` seeded per scene, so a seed gives
bit-identical pixels on any machine.
"""
from __future__ import annotations

import dataclasses
import math

import torch

TIMES = ("dawn", "day", "dusk", "night")
SEASONS = ("summer", "autumn", "winter")
FOREGROUNDS = ("meadow", "lake")

#: Words a prompt uses for each attribute value (the first is the canonical one). The example workflow's
#: "at sunrise ... lake in the foreground" is part of this vocabulary.
TIME_WORDS = {"dawn": ("dawn", "sunrise"), "day": ("day", "noon"), "dusk": ("dusk", "sunset"),
              "night": ("night", "moonlight")}
SEASON_WORDS = {"summer": ("summer", "green"), "autumn": ("autumn", "fall"), "winter": ("snow", "winter")}

#: Sky palettes, top colour then horizon colour, RGB in 0..1.
SKY = {
    "dawn": ((0.32, 0.36, 0.62), (0.98, 0.66, 0.52)),
    "day": ((0.20, 0.45, 0.85), (0.70, 0.85, 0.97)),
    "dusk": ((0.30, 0.16, 0.38), (0.95, 0.42, 0.18)),
    "night": ((0.01, 0.02, 0.08), (0.08, 0.10, 0.22)),
}
#: Light level of the land per time of day (multiplies ground and mountain colours).
LIGHT = {"dawn": 0.75, "day": 1.0, "dusk": 0.6, "night": 0.22}
GROUND = {"summer": (0.22, 0.55, 0.18), "autumn": (0.72, 0.45, 0.12), "winter": (0.92, 0.94, 0.98)}
ROCK = {"summer": (0.30, 0.34, 0.30), "autumn": (0.42, 0.30, 0.22), "winter": (0.80, 0.84, 0.92)}
SUN = {"dawn": (1.0, 0.85, 0.55), "day": (1.0, 1.0, 0.85), "dusk": (1.0, 0.55, 0.25), "night": (0.92, 0.92, 0.85)}


@dataclasses.dataclass(frozen=True)
class Scene:
    seed: int
    time: str
    season: str
    foreground: str
    image: torch.Tensor  # (3, H, W) float32 in 0..1

    @property
    def labels(self) -> tuple[int, int]:
        return TIMES.index(self.time), SEASONS.index(self.season)


def attributes(seed: int) -> tuple[str, str, str]:
    """The scene's (time, season, foreground), a function of the seed alone."""
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    t = TIMES[int(torch.randint(len(TIMES), (1,), generator=g))]
    s = SEASONS[int(torch.randint(len(SEASONS), (1,), generator=g))]
    f = FOREGROUNDS[int(torch.randint(len(FOREGROUNDS), (1,), generator=g))]
    return t, s, f


def _ridge(g: torch.Generator, width: int, period_px: float, octaves: int = 4) -> torch.Tensor:
    """A smooth random ridge line over ``width`` columns, values about -1..1 (a sum of sines with random phases;
    wavelengths halve per octave, amplitudes too)."""
    x = torch.arange(width, dtype=torch.float32)
    out = torch.zeros(width)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        wl = period_px / (2 ** o) * (0.7 + 0.6 * float(torch.rand(1, generator=g)))
        ph = 2 * math.pi * float(torch.rand(1, generator=g))
        out += amp * torch.sin(2 * math.pi * x / wl + ph)
        total += amp
        amp *= 0.5
    return out / total


def render(seed: int, width: int = 512, height: int = 128, time: str | None = None,
           season: str | None = None, foreground: str | None = None) -> Scene:
    """Draw scene ``seed`` at ``width`` x ``height`` px. Attributes default to the seed's own (``attributes``);
    passing one keeps every other random choice of the seed."""
    if width < 8 or height < 8:
        raise ValueError(f"width and height must be at least 8 px, got {width}x{height}")
    t0, s0, f0 = attributes(seed)
    time, season, foreground = time or t0, season or s0, foreground or f0
    for name, val, allowed in (("time", time, TIMES), ("season", season, SEASONS),
                               ("foreground", foreground, FOREGROUNDS)):
        if val not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {val!r}")
    g = torch.Generator().manual_seed(int(seed) * 104729 + 3)
    H, W = height, width
    yy = torch.linspace(0, 1, H).view(H, 1).expand(H, W)
    xx = torch.arange(W, dtype=torch.float32).view(1, W).expand(H, W)
    horizon = 0.62 + 0.08 * float(torch.rand(1, generator=g))  # ground starts here (fraction of the height)

    top, hor = (torch.tensor(c).view(3, 1, 1) for c in SKY[time])
    k = (yy / horizon).clamp(0, 1) ** 1.3
    img = top * (1 - k) + hor * k

    # The sun or the moon: a disc with a glow, somewhere across the scene (one per scene).
    sx = W * float(torch.rand(1, generator=g))
    sy = H * (0.12 + 0.28 * float(torch.rand(1, generator=g))) if time in ("day", "night") \
        else H * horizon * (0.55 + 0.25 * float(torch.rand(1, generator=g)))
    r = H * (0.07 if time != "night" else 0.05)
    d = ((xx - sx) ** 2 + ((yy * (H - 1)) - sy) ** 2).sqrt()
    sun = torch.tensor(SUN[time]).view(3, 1, 1)
    glow = torch.exp(-(d / (r * 3.0)) ** 2) * (0.35 if time != "night" else 0.15)
    img = img + (sun - img) * glow
    disc = (d <= r).float()
    img = img * (1 - disc) + sun * disc
    if time == "night":
        n_stars = W * H // 90
        px = torch.randint(W, (n_stars,), generator=g)
        py = (torch.rand(n_stars, generator=g) * horizon * 0.8 * H).long()
        bright = 0.5 + 0.5 * torch.rand(n_stars, generator=g)
        stars = torch.zeros(H, W)
        stars[py, px] = bright
        img = torch.maximum(img, stars.unsqueeze(0).expand(3, H, W) * (1 - disc))

    # Layered mountains, far to near: paler (mixed with the horizon colour) far away, the season's rock near.
    light = LIGHT[time]
    rock = torch.tensor(ROCK[season]).view(3, 1, 1) * light
    layers = 2 + int(torch.randint(2, (1,), generator=g))
    for i in range(layers):
        depth = (i + 1) / layers  # 1 = nearest
        base = horizon - 0.07 * (layers - i)
        amp = 0.14 + 0.16 * float(torch.rand(1, generator=g))
        ridge = base - amp * (0.6 + 0.4 * _ridge(g, W, period_px=H * (2.5 - depth)))
        mask = (yy >= ridge.view(1, W)).float()
        haze = 0.65 * (1 - depth) + 0.1
        colour = rock * (1 - haze) + hor * haze
        if season == "winter" or i == 0:
            # snow caps / pale tops near the ridge line
            cap = ((yy - ridge.view(1, W)) < 0.03).float() * mask
            cap_col = torch.tensor((0.95, 0.95, 1.0)).view(3, 1, 1) * max(light, 0.3)
            colour = colour * (1 - cap * 0.7) + cap_col * cap * 0.7
        img = img * (1 - mask) + colour * mask

    # Foreground: a meadow of the season's colour, or a lake reflecting the sky with a shore.
    ground_col = torch.tensor(GROUND[season]).view(3, 1, 1) * light
    gy = (yy >= horizon).float()
    shade = 1 - 0.25 * ((yy - horizon) / (1 - horizon)).clamp(0, 1)
    texture = 1 + 0.06 * torch.sin(xx * 0.9 + 4 * yy * H * 0.13) * torch.sin(yy * H * 0.7)
    ground = ground_col * shade * texture
    if foreground == "lake":
        lake_top = horizon + 0.04
        ly = (yy >= lake_top).float()
        shore = ((yy >= horizon) & (yy < lake_top)).float()
        refl = (top * 0.6 + hor * 0.4) * (0.55 + 0.2 * light)
        ripple = 1 + 0.08 * torch.sin(yy * H * 1.7 + 0.3 * torch.sin(xx * 0.21))
        water = refl * ripple
        img = img * (1 - gy) + ground * shore + water * ly
    else:
        img = img * (1 - gy) + ground * gy
    return Scene(seed=int(seed), time=time, season=season, foreground=foreground,
                 image=img.clamp(0, 1).contiguous())


def prompt(time: str, season: str, foreground: str, variant: int = 0) -> str:
    """A prompt naming the attributes; ``variant`` picks the wording (synonyms and templates), so the model
    learns the words rather than one fixed string."""
    tw = TIME_WORDS[time][variant % 2]
    sw = SEASON_WORDS[season][(variant // 2) % 2]
    fg = "lake" if foreground == "lake" else "meadow"
    templates = (
        "a photo of a mountain range at {t}, wide panorama, {fg} in the foreground, {s}, highly detailed",
        "mountains at {t}, {s}, {fg}",
        "a {s} landscape at {t} with a {fg}",
    )
    return templates[(variant // 4) % len(templates)].format(t=tw, s=sw, fg=fg)


N_PROMPT_VARIANTS = 6


def crops(scene: Scene, size: int, stride: int) -> torch.Tensor:
    """Square ``size`` crops of a scene every ``stride`` px across: (n, 3, size, size)."""
    img = scene.image[:, :size, :] if scene.image.shape[1] >= size else scene.image
    if img.shape[1] != size:
        raise ValueError(f"scene height {scene.image.shape[1]} must be at least the crop size {size}")
    return img.unfold(2, size, stride).permute(1, 0, 2, 3).contiguous()
