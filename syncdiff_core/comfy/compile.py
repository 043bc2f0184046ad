"""``torch.compile`` for the windowed sampler, through ComfyUI's own compile wrapper (what its TorchCompileModel
node sets), with one compile serving every step count."""
from __future__ import annotations

#: The key of our APPLY_MODEL wrapper that keeps the whole schedule out of the compiled diffusion model.
SCHEDULE_FREE_KEY = "syncdiffusion.schedule_free"
#: Diffusion models that read ``transformer_options["sample_sigmas"]`` themselves keep it.
_READS_SAMPLE_SIGMAS = ("comfy.ldm.hunyuan_video.",)


def check_compile_backend(backend: str, device) -> None:
    """A clear error, before any model work, when ``torch.compile`` with ``backend`` cannot run here."""
    import torch
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"compile backend {backend!r} is not available in this torch; "
                         f"choose one of {sorted(torch._dynamo.list_backends())}")
    if backend == "inductor" and torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("compile needs Triton for the GPU (pip install triton; on Windows: triton-windows); "
                             "turn compile off to sample without it")


def is_compiled(model) -> bool:
    """Whether ``model`` (a ModelPatcher) runs its diffusion model through ComfyUI's compile wrapper (set by this
    pack's ``compile`` or by ComfyUI's TorchCompileModel node)."""
    from comfy_api.torch_helpers.torch_compile import TORCH_COMPILE_KWARGS

    return TORCH_COMPILE_KWARGS in model.model_options


def compiled_patcher(model, backend: str):
    """``model`` itself when ``backend`` is empty and nothing compiled it; else a clone of ``model`` whose
    diffusion model runs through ``torch.compile`` (static shapes), set with ComfyUI's own
    ``set_torch_compile_wrapper`` (what its TorchCompileModel node does); a model that already carries a
    compile wrapper (e.g. from TorchCompileModel) keeps it. Either way the clone's diffusion model no longer
    sees the schedule's length (``_without_schedule``), so one compile serves every step count."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    compiled_already = is_compiled(model)
    if not (backend or compiled_already):
        return model
    model = model.clone()
    if not compiled_already:
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
    steps + 1 long). Dynamo guards on its length, so a compiled UNet would recompile for every new step count
    (each recompile is a full inductor compile, and past dynamo's recompile limit it silently runs eagerly). UNets do not
    read it; hooks and context windows read it before ``apply_model``, where it stays."""
    options = {k: v for k, v in (transformer_options or {}).items() if k != "sample_sigmas"}
    return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
