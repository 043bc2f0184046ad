"""ComfyUI's processed conditioning, served cropped to each batch of windows."""
from __future__ import annotations

import torch

import comfy.conds
import comfy.utils

from .. import regions as core_regions
from ..windows import crop_stack


def _is_spatial(cond_obj) -> bool:
    return isinstance(cond_obj, comfy.conds.CONDNoiseShape)


def _position_dependent(c: dict) -> bool:
    return "area" in c or "mask" in c or "control" in c or any(
        _is_spatial(v) for v in c.get("model_conds", {}).values())


def _control_chain(control):
    while control is not None:
        yield control
        control = getattr(control, "previous_controlnet", None)


class WindowConds:
    """ComfyUI's processed conds (for the full canvas), served cropped to each batch of windows.

    After ``process_conds`` masks and spatial model conds (``c_concat``) have the canvas' size and areas are
    in canvas latent px; every one of them is cropped to the windows (wrap-aware), and ControlNet / T2I
    hints are set to each window's crop before each call (ComfyUI would otherwise reuse a cached hint).
    """

    def __init__(self, conds: dict, canvas_shape, n: int):
        self.conds, self.n = conds, n
        self.plain = not any(_position_dependent(c) for cs in conds.values() for c in cs)
        self.has_area = any("area" in c for cs in conds.values() for c in cs)
        self.hints = {}  # id(control) -> (control, original hint, hint at the canvas' pixel size, scale)
        h, w = canvas_shape
        for cs in conds.values():
            for c in cs:
                for node in _control_chain(c.get("control")):
                    orig = getattr(node, "cond_hint_original", None)
                    if orig is None or id(node) in self.hints:
                        continue
                    s = int(getattr(node, "compression_ratio", 8))
                    if getattr(node, "vae", None) is not None:  # the hint is VAE-encoded: it is in pixels
                        s *= int(node.vae.spacial_compression_encode())
                    full = orig
                    if tuple(orig.shape[-2:]) != (h * s, w * s):
                        full = comfy.utils.common_upscale(
                            orig, w * s, h * s, getattr(node, "upscale_algorithm", "nearest-exact"), "center")
                    self.hints[id(node)] = (node, orig, full, s)

    def batches(self, windows):
        """Yield ``(rows, windows, conds)``: rows of the window batch, the windows they hold and the conds cropped
        to those windows; a single item when the windows can share one call."""
        rows = slice(0, len(windows) * self.n)
        if self.plain:
            yield rows, windows, self.conds
        elif not self.has_area:
            self._set_hints(windows)
            yield rows, windows, {k: [self._cond(c, windows) for c in cs] for k, cs in self.conds.items()}
        else:  # areas differ per window: one window at a time
            for j, w in enumerate(windows):
                self._set_hints([w])
                out = {}
                for k, cs in self.conds.items():
                    out[k] = []
                    for c in cs:
                        if "area" not in c:
                            out[k].append(self._cond(c, [w]))
                        else:  # an area that misses the window is skipped for it
                            out[k] += [self._cond(c, [w], a) for a in w.area_pieces(c["area"])]
                yield slice(j * self.n, (j + 1) * self.n), [w], out

    def region_calls(self, windows):
        """For bootstrapping steps: one call per positive cond (each its own prompt, its mask removed and
        returned as the fusion weight), sharing the cropped negatives. Yields ``(conds, mask, strength, region
        spec)``: the fusion weight is ``mask * strength``, as in ComfyUI's own fusion (mask_strength x strength)."""
        self._set_hints(windows)
        negatives = {k: [self._cond(c, windows) for c in cs] for k, cs in self.conds.items() if k != "positive"}
        for c in self.conds["positive"]:
            cc = self._cond(c, windows)
            mask = cc.pop("mask", None)
            strength = float(cc.get("strength", 1.0)) * (1.0 if mask is None else float(cc.pop("mask_strength", 1.0)))
            yield {"positive": [cc], **negatives}, None if mask is None else mask.unsqueeze(1), strength, \
                c.get(core_regions.REGION_KEY)

    def _cond(self, c: dict, windows, area=None) -> dict:
        c = c.copy()
        if area is not None:
            c["area"] = area
        if "mask" in c:
            c["mask"] = crop_stack(c["mask"], windows, self.n)
        if "model_conds" in c:
            c["model_conds"] = {
                k: v._copy_with(crop_stack(v.cond, windows, self.n)) if _is_spatial(v) else v
                for k, v in c["model_conds"].items()
            }
        return c

    def _set_hints(self, windows):
        for node, _, full, s in self.hints.values():
            node.cond_hint_original = crop_stack(full, [w.scaled(s) for w in windows], self.n)
            node.cond_hint = None  # drop ComfyUI's cached, resized hint

    def restore(self):
        for node, orig, _, _ in self.hints.values():
            node.cond_hint_original = orig
            node.cond_hint = None

    def control_modules(self) -> list:
        """The ControlNets' networks: synchronization differentiates through them, so their inference-mode
        weights need the same normal stand-ins as the UNet's (see ``weights.trainable_weights``)."""
        found = {}
        for node, *_ in self.hints.values():
            net = getattr(node, "control_model", None)
            if isinstance(net, torch.nn.Module):
                found[id(net)] = net
        return list(found.values())


def clone_skips_for_gradients(model_options: dict) -> dict:
    """``model_options`` plus a UNet patch that makes ControlNet residuals differentiable: ComfyUI's UNet adds
    them to its stored skip connections in place (``hsp += ctrl``), after the next layer saved that tensor for
    backward, which autograd refuses. With gradients on, the next input block gets a clone instead (the sanctioned
    ``input_block_patch_after_skip`` hook); without, nothing changes."""
    def patch(h, transformer_options):
        return h.clone() if torch.is_grad_enabled() and h.requires_grad else h

    options = dict(model_options)
    to = dict(options.get("transformer_options", {}))
    patches = dict(to.get("patches", {}))
    patches["input_block_patch_after_skip"] = list(patches.get("input_block_patch_after_skip", [])) + [patch]
    to["patches"] = patches
    options["transformer_options"] = to
    return options


def window_size_conditioning(conditioning: list, height: int, width: int) -> list:
    """Size conditioning (SDXL's ``width``/``height``) describes one window, not the whole canvas, unless the
    user set it (e.g. with CLIPTextEncodeSDXL)."""
    return [[emb, {"width": width, "height": height, **d}] for emb, d in conditioning]
