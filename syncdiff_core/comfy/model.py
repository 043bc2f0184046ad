"""Facts about a ComfyUI MODEL that the windowed sampler needs, and the switches of the gradient section."""
from __future__ import annotations

import contextlib
import inspect

import torch

import comfy.latent_formats
import comfy.model_management
import comfy.model_sampling
import comfy.samplers


def latent_scale(model) -> int:
    """Pixels per latent pixel of the model's latent space (8 for SD1.x/2.x/SDXL)."""
    fmt = model.model.latent_format
    return int(getattr(fmt, "spacial_downscale_ratio", 8))


def native_window(model) -> int:
    """The model's native square size in latent px: 64 for SD1.x/2.x (512 px), 128 for SDXL and newer."""
    fmt = model.model.latent_format
    if isinstance(fmt, comfy.latent_formats.SD15):  # SD1.x and SD2.x share this latent format
        if isinstance(model.model.model_sampling, comfy.model_sampling.V_PREDICTION):
            return 96  # SD2.x 768-v
        return 64
    return 128


def is_vp_family(model_sampling) -> bool:
    """Whether the model is a discrete variance-preserving one (SD's EPS / V), whose reference is DDIM."""
    return isinstance(model_sampling, comfy.model_sampling.EPS) and hasattr(model_sampling, "sigmas")


def reference_sigmas(model, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The reference DDIM schedule: ComfyUI's ``ddim_uniform`` (timesteps 981, 961, …, 1 for 50 steps) whose
    last step lands on the sigma of timestep 0 instead of on 0, as diffusers' DDIM with ``set_alpha_to_one=False``.
    Models outside the discrete EPS/V family keep ComfyUI's schedule, ending at 0. With ``denoise`` below 1, the
    last ``steps`` steps of a ``steps / denoise`` schedule, as KSampler takes them."""
    ms = model.get_model_object("model_sampling")
    total = steps if denoise > 0.9999 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", total)[-(steps + 1):].clone()
    if is_vp_family(ms) and float(sigmas[-1]) == 0.0:
        sigmas[-1] = ms.sigmas[0]
    return sigmas


def start_state(model_sampling, sigmas: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor,
                at_max: bool) -> torch.Tensor:
    """The sampler's first state, as KSampler makes it (``at_max``: ComfyUI's "the schedule starts at the model's
    largest sigma"); an empty latent of a discrete VP model starts from the reference's unit-variance noise at t0
    (noise · sqrt(1 + sigma0^2)) whatever the schedule's first sigma: there is no image to keep."""
    empty = not bool(torch.count_nonzero(latent))
    return model_sampling.noise_scaling(sigmas[0], noise, latent,
                                        max_denoise=at_max or (empty and is_vp_family(model_sampling)))


def final_latent(model_sampling, sigma_last: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The sampler's last state as the model's latent: for the DDIM reference, which ends on timestep 0 rather than
    on sigma 0, the variance-preserving latent there (``x / sqrt(1 + sigma^2)``); otherwise what KSampler returns
    (``inverse_noise_scaling``)."""
    if is_vp_family(model_sampling) and float(sigma_last) > 0:
        return model_sampling.calculate_input(sigma_last, x)
    if hasattr(model_sampling, "inverse_noise_scaling"):
        return model_sampling.inverse_noise_scaling(sigma_last, x)
    return x


def input_scale(model_sampling):
    """``sigma -> c``: the factor from the sampler's space to the model's input space, where the sync step is
    taken (``1 / sqrt(1 + sigma^2)`` for SD; DESIGN §1)."""
    def scale(sigma: torch.Tensor) -> float:
        one = torch.ones(1, device=sigma.device)
        return float(model_sampling.calculate_input(sigma.reshape(1), one)[0])
    return scale


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


def gradient_ready_patcher(model):
    """A patcher whose weights are real module parameters, for the gradient pass.

    Newer ComfyUI's dynamic VRAM makes the weights used in compute per call, so replacing module weights neither
    takes effect nor keeps gradients safe. Its cached non-dynamic delegate (what ComfyUI's own samplers use for
    conditioning hooks) loads the model once per patcher; ``clone(disable_dynamic=True)`` where only that exists
    (it reloads from disk on every call); the patcher itself when it is not dynamic (or this ComfyUI has no
    dynamic VRAM)."""
    is_dynamic = getattr(model, "is_dynamic", None)
    if not (callable(is_dynamic) and is_dynamic()):
        return model
    delegate = getattr(model, "get_non_dynamic_delegate", None)
    if callable(delegate):
        return delegate()
    if "disable_dynamic" in inspect.signature(model.clone).parameters:
        return model.clone(disable_dynamic=True)
    return model
