"""The runtime around the gradient pass: out-of-memory errors, ComfyUI's switches for computing gradients, and a
patcher whose weights can carry them (the model-family facts are in ``families``)."""
from __future__ import annotations

import contextlib
import inspect

import torch

import comfy.model_management


def oom_errors() -> tuple:
    """The exception types that mean "out of device memory" (never a catch-all)."""
    oom = getattr(comfy.model_management, "OOM_EXCEPTION", None)
    if isinstance(oom, type) and oom not in (Exception, BaseException):
        return (oom, torch.cuda.OutOfMemoryError) if oom is not torch.cuda.OutOfMemoryError else (oom,)
    return (torch.cuda.OutOfMemoryError,)


@contextlib.contextmanager
def gradient_section():
    """Gradients on (outside inference mode), with the ComfyUI switches that must be set while computing them,
    where this ComfyUI has them: ``model_management.in_training`` (fused kernels without backward are avoided)
    and ``args.disable_comfy_compiler``. Restored afterwards."""
    mm = comfy.model_management
    saved = []
    if hasattr(mm, "in_training"):
        saved.append((mm, "in_training", mm.in_training))
        mm.in_training = True
    try:
        from comfy.cli_args import args as cli_args

        if hasattr(cli_args, "disable_comfy_compiler"):
            saved.append((cli_args, "disable_comfy_compiler", cli_args.disable_comfy_compiler))
            cli_args.disable_comfy_compiler = True
    except ImportError:  # pragma: no cover
        pass
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def is_dynamic(model) -> bool:
    """Whether ``model`` (a ModelPatcher) loads its weights per call (newer ComfyUI's dynamic VRAM)."""
    dynamic = getattr(model, "is_dynamic", None)
    return bool(callable(dynamic) and dynamic())


def gradient_ready_patcher(model):
    """A patcher whose weights are real module parameters, for the gradient pass.

    Newer ComfyUI's dynamic VRAM makes the weights used in compute per call, so replacing module weights neither
    takes effect nor keeps gradients safe. Its cached non-dynamic delegate (what ComfyUI's own samplers use for
    conditioning hooks) loads the model once per patcher; ``clone(disable_dynamic=True)`` where only that exists
    (it reloads from disk on every call); the patcher itself when it is not dynamic (or this ComfyUI has no
    dynamic VRAM)."""
    if not is_dynamic(model):
        return model
    delegate = getattr(model, "get_non_dynamic_delegate", None)
    if callable(delegate):
        return delegate()
    if "disable_dynamic" in inspect.signature(model.clone).parameters:
        return model.clone(disable_dynamic=True)
    return model
