"""ComfyUI's own MultiGPU driving the core's lanes: every GPU the model was prepared for samples a share of the windows.

ComfyUI 0.33's *MultiGPU CFG Split* node gives the model patcher a clone on each extra GPU; while a guider samples,
``model_options`` holds ``multigpu_clones`` (device -> patcher) and ``multigpu_thread_pool`` (one worker thread per
device). Left alone, ComfyUI spreads each model call's conds (cond and uncond) over the GPUs, and runs them without
gradient. Here each GPU is a lane of ``syncdiff_core.lanes`` instead:

* the plain pass of a lane goes through ComfyUI's own MultiGPU path restricted to the lane's device (it moves the
  inputs there, runs that device's model, ControlNet instance and casts, and brings the result back);
* the gradient pass of a lane goes through ComfyUI's single-device path with a ``model_function_wrapper`` (the
  sanctioned hook) that calls the lane device's model on inputs moved there, differentiably; the lane's loss
  decoder (a copy of the VAE on that device) and LPIPS run there too;
* the lanes run at once on ComfyUI's thread pool.

Where this ComfyUI has no MultiGPU, or the model was not prepared for it, nothing here is used.
"""
from __future__ import annotations

import copy
import weakref

import torch

MULTIGPU_KEYS = ("multigpu_clones", "multigpu_thread_pool", "multigpu_options")

_VAE_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # vae -> {device name: VAE on that device}


def prepared_devices(model) -> list[torch.device]:
    """The devices a model patcher was prepared for by ComfyUI's MultiGPU node (its load device first); just the
    load device where there is no MultiGPU or no clone."""
    devices = [model.load_device]
    extra = getattr(model, "get_additional_models_with_key", None)
    if callable(extra):
        devices += [m.load_device for m in extra("multigpu") if m.load_device not in devices]
    return devices


def check_devices_present(devices) -> None:
    """Every device of a MultiGPU-prepared model exists on this machine, or an error that names the missing one."""
    if len(devices) < 2:
        return
    for d in devices:
        d = torch.device(d)
        backend = getattr(torch, d.type, None) if d.type != "cpu" else None
        count = backend.device_count() if backend is not None and hasattr(backend, "device_count") else None
        if count is not None and d.index is not None and d.index >= count:
            names = ", ".join(str(x) for x in devices)
            raise ValueError(
                f"model: it was prepared by ComfyUI's MultiGPU CFG Split for {names}, but {d} is not present on "
                f"this machine ({count} {d.type} device{'s' if count != 1 else ''}: "
                f"{', '.join(f'{d.type}:{i}' for i in range(count)) or 'none'}); lower the node's max_gpus or "
                "remove it")


def device_patchers(model_options: dict) -> dict:
    """``{device: patcher}`` of the GPUs ComfyUI prepared for this sampling run (the main one first); empty when
    there is only one."""
    clones = model_options.get("multigpu_clones") or {}
    return dict(clones) if len(clones) > 1 else {}


def without_multigpu(model_options: dict) -> dict:
    """``model_options`` for ComfyUI's single-device path (the gradient pass: its MultiGPU path runs no_grad)."""
    return {k: v for k, v in model_options.items() if k not in MULTIGPU_KEYS}


def plain_options(model_options: dict, device, patcher) -> dict:
    """``model_options`` whose MultiGPU path runs every model call on ``device`` alone, in the calling thread."""
    options = {k: v for k, v in model_options.items() if k != "multigpu_thread_pool"}
    options["multigpu_clones"] = {device: patcher}
    return options


def gradient_options(model_options: dict, device, model) -> dict:
    """``model_options`` for the gradient pass on ``device``: ComfyUI's single-device path, its model call made by
    ``model`` (the BaseModel on ``device``) on inputs moved there, the output moved back; a model function wrapper
    already in the options (another node's) wraps this call."""
    options = without_multigpu(model_options)
    outer = options.get("model_function_wrapper")

    def apply_on_device(x, t, **c):
        out = model.apply_model(x.to(device), t.to(device), **_moved(c, device))
        return out.to(x.device)

    def on_device(apply_model, args):
        if outer is not None:
            return outer(apply_on_device, args)
        return apply_on_device(args["input"], args["timestep"], **args["c"])

    options["model_function_wrapper"] = on_device
    return options


def _moved(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_moved(v, device) for v in obj)
    return obj


def vae_on(vae, device):
    """``vae`` itself when it computes on ``device``, else a copy of it there (made once per VAE and device, kept
    while the VAE lives): each lane decodes its windows for the loss on its own GPU."""
    device = torch.device(device)
    if torch.device(vae.device) == device:
        return vae
    copies = _VAE_COPIES.setdefault(vae, {})
    moved = copies.get(str(device))
    if moved is None:
        moved = copy.copy(vae)
        with torch.inference_mode(False):
            moved.first_stage_model = copy.deepcopy(vae.first_stage_model).to(device)
        moved.device = device
        copies[str(device)] = moved
    return moved


def pool_runner(pool):
    """The lanes' runner on ComfyUI's MultiGPU thread pool (one worker per device); lanes on a device the pool
    has no worker for run in the calling thread. Every submitted task is collected before an error is raised."""
    if pool is None:
        return None
    workers = set(pool.devices)

    def run(tasks):
        results = [None] * len(tasks)
        submitted = []
        for k, (lane, thunk) in enumerate(tasks):
            if lane.device in workers:
                pool.submit(lane.device, thunk)
                submitted.append((k, lane.device))
        error = None
        for k, (lane, thunk) in enumerate(tasks):
            if lane.device not in workers:
                try:
                    results[k] = thunk()
                except BaseException as e:  # noqa: BLE001 - re-raised once the pool's tasks are collected
                    error = error or e
        for k, device in submitted:
            result, e = pool.get_result(device)
            error = error or e
            results[k] = result
        if error is not None:
            raise error
        return results

    return run
