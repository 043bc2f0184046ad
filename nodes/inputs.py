"""What the nodes' linked inputs must hold, checked before any work.

ComfyUI checks the type of a link between nodes, but an API prompt may put a literal where a link belongs (a hand-made
or generated prompt, a workflow edited by hand): the node then receives that literal (``"pixels": "abc"``), and
without a check it would fail somewhere inside with an AttributeError. Duck-typed, plain torch: nothing here imports
ComfyUI.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..syncdiff_core.sync import Anchor


def _conditioning(v) -> bool:
    return isinstance(v, list) and all(
        isinstance(c, (list, tuple)) and len(c) >= 2 and isinstance(c[0], torch.Tensor) and isinstance(c[1], dict)
        for c in v)


CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "IMAGE": (lambda v: isinstance(v, torch.Tensor) and v.ndim == 4, "an IMAGE (batch, height, width, channels)"),
    "MASK": (lambda v: isinstance(v, torch.Tensor) and v.ndim in (2, 3), "a MASK ((batch,) height, width)"),
    "LATENT": (lambda v: isinstance(v, dict) and isinstance(v.get("samples"), torch.Tensor), "a LATENT"),
    "CONDITIONING": (_conditioning, "a CONDITIONING"),
    "MODEL": (lambda v: all(hasattr(v, a) for a in ("model", "load_device", "clone")), "a MODEL"),
    "VAE": (lambda v: all(hasattr(v, a) for a in ("decode", "first_stage_model")), "a VAE"),
    "SYNCDIFF_ANCHOR": (lambda v: isinstance(v, Anchor), "an anchor (SyncDiffusion Anchor Selector)"),
}


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    kind = type(value).__name__
    article = "an" if kind[0] in "aeiouAEIOU" else "a"
    return f"{article} {kind}" + (f" ({repr(value)[:40]})" if isinstance(value, (str, int, float, bool)) else "")


def expect_option(name: str, value, options) -> None:
    """A COMBO widget's value must be one of its options. ComfyUI 0.3.75 checks the options of its own (V1) combos
    but not of V3 nodes' ``Combo`` inputs, so a prompt's ``"format": "bogus"`` reaches the node."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {describe(value)}")


def expect(**inputs: tuple[object, str]) -> None:
    """``expect(pixels=(pixels, "IMAGE"), vae=(vae, "VAE"))``: each value must be of its ComfyUI type; None is
    accepted only for types given as ``"VAE?"`` (an optional input left unconnected). Raises a ValueError naming the
    input, the type it needs and what it got."""
    for name, (value, kind) in inputs.items():
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if value is None and optional:
            continue
        check, what = CHECKS[kind]
        if not check(value):
            raise ValueError(f"{name} must be {what}: connect a node's {kind} output to it; got {describe(value)}")
