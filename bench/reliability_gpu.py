#!/usr/bin/env python3
"""Reliability on a real GPU (issue 15): repeated runs, Cancel in every phase, and out-of-memory handling, with random
weights of SD 2.0-base's size loaded the way users load them (a checkpoint file through ComfyUI's loader, so ComfyUI
0.33's dynamic VRAM applies where it is on).

Sections (``--sections``, default all):

- ``repeat``: ``--runs`` (20) consecutive SyncDiffusion panoramas + the pack's decode; ``torch.cuda.memory_allocated``
  after each run must equal its value after run 1 (nothing accumulates), reported with the time and peak per run.
- ``cancel``: ComfyUI's interrupt pressed in each phase -- a plain step, the anchor's decode, the gradient pass's
  forward and backward, the decode -- from a model function wrapper, a tensor backward hook, a module pre-hook and the
  progress hook. After each: every weight and buffer of the UNet, the VAE and LPIPS the same object with the same
  values and flags, the patchers' patches and options unchanged, allocated memory back to its value before the run,
  and the next run with the same seed bit-identical to an uninterrupted one.
- ``oom`` (CUDA only): peaks of the gradient pass at sync_batch 2 and 4 are measured, then a memory cap
  (``torch.cuda.set_per_process_memory_fraction``) between them: sync_batch 4 must halve once (a logged warning) and
  give the same panorama as sync_batch 2; a cap below sync_batch 2's peak must stop with an error naming sync_batch;
  after each, allocated memory is back where it was. The same for the plain pass (window_batch 8 vs 4, sync off).

``--tiny`` runs everything on the CPU with the tests' tiny checkpoint in a minute or two (a check of the script, not a
measurement; ``oom`` needs CUDA and is skipped). Results: ``<out>/reliability.json`` and a table printed last.
Runs from the repository root with ComfyUI in ``.comfyui/ComfyUI`` (or ``--comfyui`` / ``$COMFYUI_PATH``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models: checks the script in a minute or two")
    p.add_argument("--out", default=os.environ.get("OUT", "reliability-out"), help="folder for reliability.json")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(ROOT / ".comfyui" / "ComfyUI")))
    p.add_argument("--sections", default="repeat,cancel,oom")
    p.add_argument("--runs", type=int, default=20, help="repeated runs")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sync-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    if a.tiny:
        a.runs = min(a.runs, 2)
        a.steps, a.sync_steps = 2, 1
    return a


ARGS = parse_args()
if ARGS.tiny:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
COMFY = Path(ARGS.comfyui).resolve()
for p in (str(ROOT / "scripts"), str(ROOT), str(COMFY)):
    if p in sys.path:
        sys.path.remove(p)
    sys.path.insert(0, p)  # ComfyUI first: its `nodes`, `utils` and `comfy` win

import torch  # noqa: E402

from comfy.cli_args import args as comfy_args  # noqa: E402

if ARGS.tiny:
    comfy_args.cpu = True
    comfy_args.use_pytorch_cross_attention = True

import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from bench.sizes import write_sd2_base_checkpoint  # noqa: E402
from syncdiff_core import perceptual  # noqa: E402
from syncdiff_core.comfy import assets  # noqa: E402
from syncdiff_core.comfy.decode import decode_panorama_image  # noqa: E402
from syncdiff_core.comfy.model import is_dynamic  # noqa: E402
from syncdiff_core.comfy.sampling import sample_panorama  # noqa: E402
from syncdiff_core.job import PanoramaJob  # noqa: E402
from syncdiff_core.sync import SyncSettings  # noqa: E402

DEVICE = mm.get_torch_device()
CUDA = DEVICE.type == "cuda"
T0 = time.monotonic()
RESULTS: dict = {"errors": [], "sections": {}}
log = logging.getLogger("syncdiffusion")


def elapsed() -> float:
    return round(time.monotonic() - T0, 1)


def gib(b) -> float:
    return round(b / 2**30, 4)


def allocated() -> int:
    if CUDA:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return 0


def settle():
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()


def save():
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(RESULTS, indent=1, default=str))


@contextlib.contextmanager
def section(name):
    t = time.monotonic()
    print(f"[{elapsed():7.1f} s] section {name}", flush=True)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a failed section is reported, the others still run
        msg = f"{name}: {type(e).__name__}: {e}"
        print("ERROR", msg, flush=True)
        traceback.print_exc()
        RESULTS["errors"].append(msg[:3000])
    finally:
        RESULTS.setdefault("section_s", {})[name] = round(time.monotonic() - t, 1)
        with contextlib.suppress(Exception):
            torch.cuda.set_per_process_memory_fraction(1.0, DEVICE) if CUDA else None
        mm.interrupt_current_processing(False)
        save()


# ----------------------------------------------------------------------------------------------------------- models

def load_models(tmp: Path):
    """(model, vae, positive, negative, lpips) loaded as CheckpointLoaderSimple loads them (under inference mode)."""
    t = time.monotonic()
    ckpt = tmp / "random_sd2.safetensors"
    if ARGS.tiny:
        import tiny_models

        tiny_models.write_checkpoint(ckpt, family="sd20", seed=ARGS.seed)
    else:
        write_sd2_base_checkpoint(ckpt, seed=ARGS.seed)
    lpips_dir = tmp / "lpips"
    import tiny_models

    tiny_models.write_random_trunk(lpips_dir / "vgg16.safetensors", "vgg16", seed=ARGS.seed + 2)
    folder_paths.add_model_folder_path("lpips", str(lpips_dir))
    written = time.monotonic() - t
    with torch.inference_mode():
        model, _, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=False,
                                                              embedding_directory=None)[:3]
    g = torch.Generator().manual_seed(ARGS.seed + 3)
    positive = [[torch.randn(1, 77, 1024, generator=g), {}]]
    negative = [[torch.randn(1, 77, 1024, generator=g), {}]]
    loss = assets.get_lpips(DEVICE)
    RESULTS["models"] = {
        "unet_params": sum(p.numel() for p in model.model.diffusion_model.parameters()),
        "vae_params": sum(p.numel() for p in vae.first_stage_model.parameters()),
        "patcher": type(model).__name__, "dynamic_vram": is_dynamic(model),
        "unet_dtype": str(model.model.get_dtype()), "vae_dtype": str(vae.vae_dtype),
        "write_s": round(written, 1), "load_s": round(time.monotonic() - t - written, 1),
    }
    print("models:", RESULTS["models"], flush=True)
    return model, vae, positive, negative, loss


# ----------------------------------------------------------------------------------------------------------- runs

def canvas():
    """(latent shape, window px, stride px): 9 windows in a row, so 8 move in the gradient pass (groups of 4 or 2)."""
    if ARGS.tiny:
        return (1, 4, 8, 8 + 8 * 4), 64, 32
    return (1, 4, 64, 64 + 8 * 32), 512, 256


def job(**kw) -> PanoramaJob:
    shape, window, stride = canvas()
    base = dict(seed=ARGS.seed, steps=ARGS.steps, cfg=7.5, window_px=window, stride_px=stride, window_batch=8,
                sync=SyncSettings(weight=20.0, decay=0.95, steps=ARGS.sync_steps), sync_batch=2,
                loss_decoder="vae_checkpointed")
    base.update(kw)
    return PanoramaJob(**base)


def run(models, j: PanoramaJob, decode: bool = True, tile_px: int = 0):
    """One panorama as the sampler node and the decode node make it: (latent, image or None)."""
    model, vae, positive, negative, loss = models
    shape = canvas()[0]
    with torch.inference_mode():
        latent = sample_panorama(model, positive, negative, {"samples": torch.zeros(shape)}, j, vae=vae,
                                 loss=loss)["samples"]
        image = decode_panorama_image(vae, latent, wrap=False, padding=4, tile_width_px=tile_px,
                                      tile_overlap_px=64 if tile_px else 0) if decode else None
    return latent, image


# ----------------------------------------------------------------------------------------------------------- repeat

def repeat_section(models):
    rows = []
    before = allocated()
    ref = None
    for i in range(ARGS.runs):
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        t = time.monotonic()
        latent, image = run(models, job())
        if CUDA:
            torch.cuda.synchronize()
        seconds = time.monotonic() - t
        same = None
        if ref is None:
            ref = (latent.clone(), image.clone())
        else:
            same = bool(torch.equal(latent, ref[0]) and torch.equal(image, ref[1]))
        del latent, image
        rows.append({"run": i + 1, "s": round(seconds, 3), "allocated": allocated(),
                     "peak": torch.cuda.max_memory_allocated() if CUDA else 0, "same_as_run_1": same})
        print(f"  run {i + 1}: {seconds:.2f} s, allocated {gib(rows[-1]['allocated'])} GiB, peak "
              f"{gib(rows[-1]['peak'])} GiB, same result {same}", flush=True)
    first = rows[0]["allocated"]
    RESULTS["sections"]["repeat"] = {
        "runs": rows, "allocated_before_run_1": before, "allocated_after_run_1": first,
        "allocated_after_each_run_equal": all(r["allocated"] == first for r in rows),
        "max_drift_bytes": max(abs(r["allocated"] - first) for r in rows),
        "results_identical": all(r["same_as_run_1"] in (None, True) for r in rows),
    }


# ----------------------------------------------------------------------------------------------------------- cancel

class Cancel:
    """Presses ComfyUI's Cancel once, in the armed phase (see the module docstring)."""

    PHASES = ("plain step", "anchor decode", "gradient forward", "gradient backward", "decode")

    def __init__(self):
        self.phase, self.fired, self.grad_calls = None, None, 0

    def arm(self, phase):
        self.phase, self.fired, self.grad_calls = phase, None, 0

    def press(self, where):
        self.fired = where
        mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    def unet(self, apply_model, args):
        grad = torch.is_grad_enabled()
        self.grad_calls += grad
        if self.fired is None and self.phase == "gradient forward" and grad:
            self.press("UNet forward with gradient")
        if self.fired is None and self.phase == "plain step" and not grad and self.grad_calls:
            self.press("UNet forward of the plain pass")
        out = apply_model(args["input"], args["timestep"], **args["c"])
        if self.fired is None and self.phase == "gradient backward" and grad:
            out.register_hook(self.backward)
        return out

    def backward(self, grad):
        if self.fired is None:
            self.press("backward through the UNet")
        return grad

    def decoder(self, module, inputs):
        if self.fired is None and self.phase == "anchor decode" and not torch.is_grad_enabled():
            self.press("VAE decoder forward of the anchor")

    def progress(self, value, total, preview=None, *args, **kwargs):
        # as main.py's hook: this is where a pressed Cancel surfaces during a node's progress
        if self.fired is None and self.phase == "decode" and value >= 1 and total > 1:
            self.fired = f"decode progress {value}/{total}"
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()


def state_of(models, values: bool):
    """Each weight and buffer (object, flags; values as CPU copies when ``values``), and the patchers' state."""
    model, vae, _, _, loss = models
    out = {}
    for key, t in _all_tensors(models):
        flags = (id(t), type(t).__name__, t.is_inference(), t.requires_grad, str(t.dtype), str(t.device), t.data_ptr())
        out[key] = (flags, t.detach().to("cpu", copy=True) if values else None)
    for label, patcher in (("model", model), ("vae", vae.patcher)):
        out[f"{label}.patcher"] = ((repr(sorted(patcher.patches)), repr(sorted(patcher.object_patches)),
                                    repr(patcher.model_options), len(getattr(patcher, "backup", {}))), None)
    out["switches"] = ((getattr(mm, "in_training", None), getattr(comfy_args, "disable_comfy_compiler", None),
                        torch.is_grad_enabled(), torch.is_inference_mode_enabled()), None)
    return out


def compare_state(before, models) -> list[str]:
    after = state_of(models, values=False)
    tensors = dict(_all_tensors(models))
    problems = []
    for key, (flags, value) in before.items():
        if key not in after:
            problems.append(f"{key} missing")
        elif after[key][0] != flags:
            problems.append(f"{key}: {flags} -> {after[key][0]}")
        elif value is not None and not torch.equal(tensors[key].detach().cpu(), value):
            problems.append(f"{key}: values changed")
    return problems[:10]


def _all_tensors(models):
    model, vae, _, _, loss = models
    for label, module in (("unet", model.model), ("vae", vae.first_stage_model), ("lpips", loss)):
        for name, t in {**dict(module.named_parameters(remove_duplicate=False)),
                        **dict(module.named_buffers(remove_duplicate=False))}.items():
            yield f"{label}.{name}", t


def cancel_section(models):
    model, vae, positive, negative, loss = models
    cancel = Cancel()
    wrapped = model.clone()
    wrapped.set_model_unet_function_wrapper(cancel.unet)
    first_stage = vae.first_stage_model  # SD's KL VAE (.decoder), or the tiny checkpoint's TAESD (.taesd_decoder)
    decoder = getattr(first_stage, "decoder", None) or first_stage.taesd_decoder
    hook = decoder.register_forward_pre_hook(cancel.decoder)
    comfy.utils.set_progress_bar_global_hook(cancel.progress)
    cmodels = (wrapped, vae, positive, negative, loss)
    rows = []
    try:
        cancel.arm(None)
        ref_latent, ref_image = run(cmodels, job(), tile_px=128 if ARGS.tiny else 1024)
        base_alloc = allocated()
        before = state_of(cmodels, values=True)
        for phase in Cancel.PHASES:
            cancel.arm(phase)
            t = time.monotonic()
            interrupted = False
            try:
                run(cmodels, job(), tile_px=128 if ARGS.tiny else 1024)
            except mm.InterruptProcessingException:
                interrupted = True
            finally:
                mm.interrupt_current_processing(False)
            stop_s = time.monotonic() - t
            fired = cancel.fired
            cancel.arm(None)
            settle()
            after_cancel = allocated()
            problems = compare_state(before, cmodels)
            latent, image = run(cmodels, job(), tile_px=128 if ARGS.tiny else 1024)
            identical = bool(torch.equal(latent, ref_latent) and torch.equal(image, ref_image))
            del latent, image
            settle()
            rows.append({"phase": phase, "fired": fired, "interrupted": interrupted,
                         "run_until_stop_s": round(stop_s, 2),
                         "state_unchanged": not problems, "problems": problems,
                         "allocated_after_cancel": after_cancel, "allocated_before": base_alloc,
                         "memory_back": after_cancel == base_alloc, "next_run_bit_identical": identical})
            print(f"  {phase}: fired={fired!r} interrupted={interrupted} state_unchanged={not problems} "
                  f"memory_back={after_cancel == base_alloc} next_run_identical={identical}", flush=True)
    finally:
        hook.remove()
        comfy.utils.set_progress_bar_global_hook(None)
    RESULTS["sections"]["cancel"] = {"phases": rows, "dynamic_vram": RESULTS["models"]["dynamic_vram"]}


# ----------------------------------------------------------------------------------------------------------- oom

class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def peak_of(models, j, decode=False):
    settle()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    latent, _ = run(models, j, decode=decode)
    torch.cuda.synchronize()
    return latent, torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def capped_run(models, j, cap_bytes):
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    settle()
    torch.cuda.empty_cache()
    handler = Warnings()
    log.addHandler(handler)
    torch.cuda.set_per_process_memory_fraction(cap_bytes / total, DEVICE)
    error, latent = None, None
    try:
        latent, _ = run(models, j, decode=False)
    except Exception as e:  # noqa: BLE001 - the second OOM is expected to raise
        error = f"{type(e).__name__}: {e}"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, DEVICE)
        log.removeHandler(handler)
    return latent, error, handler.lines


def oom_case(models, name, big_job, small_job, tiny_job, setting):
    base = allocated()
    small, small_peak, small_reserved = peak_of(models, small_job)
    _, big_peak, _ = peak_of(models, big_job)
    _, tiny_peak, tiny_reserved = peak_of(models, tiny_job)
    row = {"allocated_before": base, "peak_small": small_peak, "reserved_small": small_reserved,
           "peak_big": big_peak, "peak_tiny": tiny_peak, "reserved_tiny": tiny_reserved}
    if big_peak <= small_reserved * 1.02 or small_peak <= tiny_reserved * 1.02:
        row["skipped"] = "the peaks are too close to put a cap between them"
        RESULTS["sections"][f"oom_{name}"] = row
        return
    cap1 = (small_reserved + big_peak) // 2
    latent, error, lines = capped_run(models, big_job, cap1)
    settle()
    torch.cuda.empty_cache()
    row.update(cap_halving=cap1, halving_error=error, halving_log=lines,
               halved_once=sum("retrying with" in line for line in lines) == 1,
               result_equals_small_batch=bool(latent is not None and torch.equal(latent, small)),
               max_abs_diff=float((latent - small).abs().max()) if latent is not None else None,
               allocated_after_halving=allocated())
    del latent
    cap2 = (tiny_reserved + small_peak) // 2
    latent, error, lines = capped_run(models, big_job, cap2)
    del latent
    settle()
    torch.cuda.empty_cache()
    row.update(cap_second_oom=cap2, second_oom_error=(error or "")[:600], second_oom_log=lines,
               second_oom_names_setting=bool(error and f"Lower {setting}" in error),
               allocated_after_second_oom=allocated())
    row["nothing_left_allocated"] = row["allocated_after_halving"] == base and row["allocated_after_second_oom"] == base
    RESULTS["sections"][f"oom_{name}"] = row
    print(f"  {name}: peaks small {gib(small_peak)} / big {gib(big_peak)} GiB; halved once {row['halved_once']}, "
          f"equal {row['result_equals_small_batch']}; second OOM names {setting}: {row['second_oom_names_setting']}; "
          f"nothing left allocated: {row['nothing_left_allocated']}", flush=True)


def oom_section(models):
    if not CUDA:
        RESULTS["sections"]["oom"] = {"skipped": "needs CUDA (set_per_process_memory_fraction)"}
        return
    oom_case(models, "gradient", job(sync_batch=4), job(sync_batch=2), job(sync_batch=1), "sync_batch")
    nosync = SyncSettings(weight=0.0, steps=0)
    oom_case(models, "plain", job(sync=nosync, window_batch=8), job(sync=nosync, window_batch=4),
             job(sync=nosync, window_batch=2), "window_batch")


# ----------------------------------------------------------------------------------------------------------- main

def table() -> str:
    note = " (--tiny: a check of the script, not a measurement)" if ARGS.tiny else ""
    lines = ["", "reliability_gpu results" + note]
    m = RESULTS.get("models", {})
    lines.append(f"  device {RESULTS['device']}, ComfyUI {RESULTS['comfyui']}, patcher {m.get('patcher')}, "
                 f"dynamic VRAM {m.get('dynamic_vram')}, UNet {m.get('unet_params', 0) / 1e6:.0f}M")
    r = RESULTS["sections"].get("repeat")
    if r:
        lines.append(f"  repeat: {len(r['runs'])} runs, allocated after run 1 {gib(r['allocated_after_run_1'])} GiB, "
                     f"equal after every run: {r['allocated_after_each_run_equal']} (max drift "
                     f"{r['max_drift_bytes']} B), results identical: {r['results_identical']}")
    c = RESULTS["sections"].get("cancel")
    if c:
        lines.append(f"  {'cancel phase':20s} {'stopped':>8s} {'state same':>10s} {'memory back':>11s} "
                     f"{'next run same':>13s}")
        for row in c["phases"]:
            lines.append(f"  {row['phase']:20s} {str(row['interrupted']):>8s} {str(row['state_unchanged']):>10s} "
                         f"{str(row['memory_back']):>11s} {str(row['next_run_bit_identical']):>13s}")
    for name in ("oom_gradient", "oom_plain", "oom"):
        o = RESULTS["sections"].get(name)
        if o and "skipped" in o:
            lines.append(f"  {name}: skipped ({o['skipped']})")
        elif o:
            lines.append(f"  {name}: halved once {o['halved_once']}, result equal {o['result_equals_small_batch']}, "
                         f"second OOM names the setting {o['second_oom_names_setting']}, nothing left allocated "
                         f"{o['nothing_left_allocated']}")
    lines.append(f"  errors: {len(RESULTS['errors'])}; total {elapsed()} s")
    return "\n".join(lines)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        import comfyui_version
        version = comfyui_version.__version__
    except ImportError:
        version = "unknown"
    RESULTS.update(device=torch.cuda.get_device_name(DEVICE) if CUDA else "cpu", comfyui=version,
                   torch=torch.__version__, tiny=ARGS.tiny, args=vars(ARGS))
    sections = [s.strip() for s in ARGS.sections.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="syncdiff-reliability-") as tmp:
        models = load_models(Path(tmp))
        with torch.inference_mode():
            mm.load_models_gpu([models[0], models[1].patcher])
        for name, fn in (("repeat", repeat_section), ("cancel", cancel_section), ("oom", oom_section)):
            if name in sections:
                with section(name):
                    fn(models)
    perceptual.clear_cache()
    save()
    print(table(), flush=True)
    return 1 if RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
