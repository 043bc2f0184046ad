"""Gradient checkpointing of a DiT's blocks through ComfyUI's block-replace patches.

ComfyUI's DiTs look up ``transformer_options["patches_replace"]["dit"][(block_name, i)]`` before each block and,
when a patch is there, call ``patch(args, {"original_block": block_wrap})`` instead of the block, where ``args``
holds the block's tensors (``img``, ``txt``, ``vec``, ``pe`` ...) and ``transformer_options``; the patch returns the
block's outputs as a dict. :func:`with_block_checkpointing` installs a patch that runs the block (or a patch that
another node pack installed there before) through :class:`syncdiff_core.gradients.Recompute`: during a gradient
pass only each block's inputs are kept and the block is recomputed in backward -- safely for blocks that add into
their saved input in place (Flux.1, Flux.2, Chroma, HunyuanImage). Without gradients the patch calls the block
directly, so it may stay installed for the whole sampling run.

Models whose forward has no such lookup (UNets, Lumina 2 / Z-Image in ComfyUI 0.3.75 and 0.33) never call the
patch; :class:`BlockCheckpointing` counts calls, so the caller can tell (``calls == 0`` after a gradient pass) and
fall back to :func:`syncdiff_core.gradients.saved_activation_copies`.
"""
from __future__ import annotations

import torch

from ..gradients import recompute

#: ModuleList attributes of ComfyUI diffusion models and the block name their forward looks up in
#: ``patches_replace["dit"]``: Flux / Chroma / HunyuanVideo / HunyuanImage (double_blocks, single_blocks),
#: Qwen-Image (transformer_blocks), SD3's MMDiT (joint_blocks), Wan (blocks).
BLOCK_LISTS = (("double_blocks", "double_block"), ("single_blocks", "single_block"),
               ("transformer_blocks", "double_block"), ("joint_blocks", "double_block"), ("blocks", "double_block"))


class BlockCheckpointing:
    """The installed patch for one block key; ``calls`` counts checkpointed calls (shared by all keys)."""

    def __init__(self, key, previous=None, counter=None):
        self.key, self.previous = key, previous
        self.counter = counter if counter is not None else [0]

    @property
    def calls(self) -> int:
        return self.counter[0]

    def __call__(self, args: dict, extra: dict) -> dict:
        extra = {**extra, "original_block": frozen_closure(extra["original_block"])}

        def run(a: dict) -> dict:
            return self.previous(a, extra) if self.previous is not None else extra["original_block"](a)

        names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
        tensors = [args[k] for k in names]
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return run(args)
        rest = {k: v for k, v in args.items() if k not in names}
        if isinstance(rest.get("transformer_options"), dict):  # the model mutates it (block_index ...): snapshot
            rest["transformer_options"] = dict(rest["transformer_options"])
        out_names: list = []

        def fn(*ts):
            out = run({**rest, **dict(zip(names, ts))})
            if not out_names:
                out_names.extend(out.keys())
            return tuple(out[k] for k in out_names)

        self.counter[0] += 1
        outs = recompute(fn, *tensors)
        return dict(zip(out_names, outs))


def frozen_closure(fn):
    """A copy of function ``fn`` whose closure cells hold the values they hold now.

    ComfyUI defines ``block_wrap`` inside its block loop and it reads the loop variable (``block``, or ``i`` in
    MMDiT) when called -- Python closures bind late -- so it calls the right block only during that loop iteration.
    The backward recompute runs after the loop, so it calls this snapshot instead (``types.FunctionType`` with new
    ``types.CellType`` cells; ComfyUI's function is not modified)."""
    import types

    closure = getattr(fn, "__closure__", None)
    if not closure or not isinstance(fn, types.FunctionType):
        return fn
    cells = []
    for cell in closure:
        try:
            cells.append(types.CellType(cell.cell_contents))
        except ValueError:  # an empty cell (not assigned yet): keep it
            cells.append(cell)
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def block_keys(diffusion_model) -> list[tuple[str, int]]:
    """The ``(block_name, index)`` keys a DiT may look up in ``patches_replace["dit"]`` (empty for other models)."""
    keys = []
    for attr, block_name in BLOCK_LISTS:
        blocks = getattr(diffusion_model, attr, None)
        if isinstance(blocks, torch.nn.ModuleList):
            keys += [(block_name, i) for i in range(len(blocks))]
    return list(dict.fromkeys(keys))


def with_block_checkpointing(model_options: dict, diffusion_model) -> tuple[dict, list]:
    """A copy of ``model_options`` whose DiT blocks are checkpointed during gradient passes (see the module doc);
    a block patch already installed at a key (by another node pack) runs inside the checkpoint. Returns the new
    options and the list of installed patches (read ``patches[0].calls`` after a gradient pass; 0 means the model
    does not look up block patches)."""
    import comfy.model_patcher

    options = dict(model_options)
    options["transformer_options"] = dict(options.get("transformer_options", {}))
    existing = options["transformer_options"].get("patches_replace", {}).get("dit", {})
    counter = [0]
    patches = []
    for block_name, i in block_keys(diffusion_model):
        patch = BlockCheckpointing((block_name, i), existing.get((block_name, i)), counter)
        options = comfy.model_patcher.set_model_options_patch_replace(options, patch, "dit", block_name, i)
        patches.append(patch)
    return options, patches
