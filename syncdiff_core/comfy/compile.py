"""``torch.compile`` for the windowed sampler, with one compile serving every step count: the whole diffusion
model through ComfyUI's own compile wrapper (what its TorchCompileModel node sets), or its repeated blocks one by
one (``REGIONAL``, regional compilation: smaller graphs, less compile time)."""
from __future__ import annotations

import copy
import logging
import weakref

import torch

#: The key of our APPLY_MODEL wrapper that keeps the whole schedule out of the compiled diffusion model.
SCHEDULE_FREE_KEY = "syncdiffusion.schedule_free"
#: Diffusion models that read ``transformer_options["sample_sigmas"]`` themselves keep it.
_READS_SAMPLE_SIGMAS = ("comfy.ldm.hunyuan_video.",)
#: Compile the diffusion model's blocks (``block_regions``) one by one instead of the whole model.
REGIONAL = False
#: The key of our APPLY_MODEL wrapper that runs the compiled blocks.
REGIONAL_KEY = "syncdiffusion.compiled_blocks"


def check_compile_backend(backend: str, device) -> None:
    """A clear error, before any model work, when ``torch.compile`` with ``backend`` cannot run here."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"compile backend {backend!r} is not available in this torch; "
                         f"choose one of {sorted(torch._dynamo.list_backends())}")
    if backend == "inductor" and torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("compile needs Triton for the GPU (pip install triton; on Windows: triton-windows); "
                             "turn compile off to sample without it")


def compiled_patcher(model, backend: str):
    """``model`` itself when ``backend`` is empty and nothing compiled it; else a clone of ``model`` whose
    diffusion model runs through ``torch.compile`` (static shapes), set with ComfyUI's own
    ``set_torch_compile_wrapper`` (what its TorchCompileModel node does); a model that already carries a
    compile wrapper (e.g. from TorchCompileModel) keeps it. Either way the clone's diffusion model no longer
    sees the schedule's length (``_without_schedule``), so one compile serves every step count."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_api.torch_helpers.torch_compile import TORCH_COMPILE_KWARGS

    compiled_already = TORCH_COMPILE_KWARGS in model.model_options
    if not (backend or compiled_already):
        return model
    model = model.clone()
    if not compiled_already and REGIONAL:
        from comfy.patcher_extension import WrappersMP

        model.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, REGIONAL_KEY)
        model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, REGIONAL_KEY, CompiledBlocks(backend))
    elif not compiled_already:
        set_torch_compile_wrapper(model, backend=backend, dynamic=False)
    diffusion_model = model.get_model_object("diffusion_model")
    if not type(diffusion_model).__module__.startswith(_READS_SAMPLE_SIGMAS):
        from comfy.patcher_extension import WrappersMP

        model.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, SCHEDULE_FREE_KEY)
        model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, SCHEDULE_FREE_KEY, _without_schedule)
    return model


def _without_schedule(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                      **kwargs):
    """ComfyUI hands the diffusion model the whole sigma schedule (``transformer_options["sample_sigmas"]``,
    steps + 1 long). Dynamo guards on its length, so a compiled UNet recompiled for every new step count (a
    minute or more each with inductor, and after 8 recompiles dynamo silently runs it eagerly). UNets do not
    read it; hooks and context windows read it before ``apply_model``, where it stays."""
    options = {k: v for k, v in (transformer_options or {}).items() if k != "sample_sigmas"}
    return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def block_regions(module) -> list[str]:
    """The dotted names of ``module``'s blocks: each module that has submodules of its own and sits directly in a
    ModuleList or Sequential (a UNet's ResBlocks, SpatialTransformers and resamplers, a DiT's transformer
    blocks), not looking inside a block. Plain layers (a Linear, a Conv) are not blocks."""
    containers = (torch.nn.ModuleList, torch.nn.Sequential)
    names = []

    def walk(parent, prefix):
        for name, child in parent.named_children():
            if isinstance(parent, containers) and not isinstance(child, containers) and next(child.children(), None):
                names.append(prefix + name)
            else:
                walk(child, f"{prefix}{name}.")

    walk(module, "")
    return names


class CompiledBlocks:
    """An APPLY_MODEL wrapper that runs each block of the diffusion model (``block_regions``) through
    ``torch.compile`` (``backend``, static shapes) for the call, and puts the original blocks back after.

    Each compiled block is a shallow copy of the original (the same parameters, buffers and submodules, and the
    same class, which ComfyUI's UNet dispatches on) compiled with ``nn.Module.compile``; the copies are made once
    per diffusion model (each GPU's model has its own), and again for a block another patch has replaced. Dynamo
    keeps one cache of graphs per block class, so its recompile limit is raised to the number of blocks."""

    def __init__(self, backend: str):
        self.backend = backend
        self._copies = weakref.WeakKeyDictionary()  # diffusion model -> {name: (original, compiled copy)}

    def compiled_blocks(self, diffusion_model) -> dict:
        import comfy.utils

        copies = self._copies.setdefault(diffusion_model, {})
        current = {name: comfy.utils.get_attr(diffusion_model, name) for name in block_regions(diffusion_model)}
        for name, block in current.items():
            if name not in copies or copies[name][0] is not block:
                compiled = copy.copy(block)
                compiled.compile(backend=self.backend, dynamic=False)
                copies[name] = (block, compiled)
        _allow_recompiles(2 * len(current))  # one graph per block and grad mode at most
        return {name: copies[name][1] for name in current}

    def __call__(self, executor, *args, **kwargs):
        import comfy.utils

        diffusion_model = executor.class_obj.diffusion_model
        originals = {}
        try:
            for name, compiled in self.compiled_blocks(diffusion_model).items():
                originals[name] = comfy.utils.set_attr(diffusion_model, name, compiled)
            return executor(*args, **kwargs)
        finally:
            for name, block in originals.items():
                comfy.utils.set_attr(diffusion_model, name, block)


def _allow_recompiles(count: int) -> None:
    """Raise dynamo's per-function recompile limit to ``count`` (never lower it): its default (8) would run the
    blocks past the eighth distinct one eagerly. Named ``cache_size_limit`` before torch 2.7."""
    import torch._dynamo.config as config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            if getattr(config, name) < count:
                logging.info("SyncDiffusion: raising torch._dynamo.config.%s to %d for compiled blocks", name,
                             count)
                setattr(config, name, count)
            return
