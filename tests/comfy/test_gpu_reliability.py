"""Reliability on a real GPU, with random weights of SD 2.0-base's size loaded as users load them (a checkpoint
through ``CheckpointLoaderSimple``, so ComfyUI 0.33's dynamic VRAM applies): repeated runs leave the allocated memory
where run 1 left it and give run 1's result; Cancel in every phase passes the CPU test's checks (``cancel_check.py``)
and frees what the run allocated; out of memory between the peaks of two batch sizes halves once (logged) to the
smaller one's result, below both it stops naming the setting, for the gradient pass and the plain pass.

Marked ``gpu``: they run with ``SYNCDIFF_GPU_TESTS=1`` on a CUDA machine (``bench/run_on_device.sh gpu-tests``),
``SYNCDIFF_GPU_TESTS=tiny`` runs them on the CPU with the tiny SD2 checkpoint (a check of the tests; the
out-of-memory ones need CUDA); ``SYNCDIFF_GPU_RUNS`` sets the repeated runs (20).
"""
import gc
import logging
import os
import types

import pytest
import torch

from cancel_check import PHASES, armed, assert_next_run_identical, cancel_in
from devtools import harness as h
from devtools import models

MODE = os.environ.get("SYNCDIFF_GPU_TESTS", "")
TINY = MODE == "tiny"
CUDA = MODE == "1" and torch.cuda.is_available()
RUNS = min(int(os.environ.get("SYNCDIFF_GPU_RUNS", "20")), 2 if TINY else 10 ** 6)
STEPS, SYNC_STEPS = (2, 1) if TINY else (4, 2)
SEED = 7
#: 9 windows in a row, so 8 move in the gradient pass (groups of 4 or 2): (window px, stride px, height, width)
WINDOW, STRIDE = (64, 32) if TINY else (512, 256)
HEIGHT, WIDTH = WINDOW, WINDOW + 8 * STRIDE

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not (CUDA or TINY), reason="needs SYNCDIFF_GPU_TESTS=1 and CUDA (or =tiny)")]


def allocated() -> int:
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return 0


@pytest.fixture(scope="module")
def sd2(comfy, pack, lpips_trunk):
    """SD 2.0-base-size random weights (tiny: the tiny SD2 checkpoint) loaded by CheckpointLoaderSimple, random
    prompts, and the pack's LPIPS on the device."""
    import comfy.model_management as mm

    name = "random_sd2_tiny.safetensors" if TINY else "random_sd2_base.safetensors"
    path = comfy.model_folder("checkpoints") / name
    if not path.exists():
        if TINY:
            models.write_checkpoint(path, family="sd20", seed=SEED)
        else:
            models.write_sd2_base_checkpoint(path, seed=SEED)
    with torch.inference_mode():
        model, _, vae = comfy.nodes.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(name)[:3]
        mm.load_models_gpu([model, vae.patcher])
    g = torch.Generator().manual_seed(SEED + 3)
    positive, negative = ([[torch.randn(1, 77, 1024, generator=g), {}]] for _ in range(2))
    print(f"\nGPU reliability: {mm.get_torch_device()}, patcher {type(model).__name__}, dynamic VRAM "
          f"{pack.model.is_dynamic(model)}, UNet {sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6:.0f}M")
    return types.SimpleNamespace(model=model, vae=vae, positive=positive, negative=negative,
                                 lpips=pack.assets.get_lpips(mm.get_torch_device()))


def job(pack, **kw):
    base = dict(w=20.0, decay=0.95, sync_steps=SYNC_STEPS, seed=SEED, steps=STEPS, cfg=7.5, window_px=WINDOW,
                stride_px=STRIDE, window_batch=8, sync_batch=2, loss_decoder="vae_checkpointed")
    return h.make_job(pack, **{**base, **kw})


def run(pack, sd2, j, decode: bool = True):
    """One panorama as the sampler node and the decode node make it: (latent, image or None)."""
    s = WINDOW // 8
    latent = h.sample(pack, sd2.model, sd2.positive, sd2.negative, (1, 4, s, WIDTH // 8), j, vae=sd2.vae,
                      loss=sd2.lpips)
    if not decode:
        return latent, None
    with torch.inference_mode():
        return latent, pack.decode.decode_panorama_image(sd2.vae, latent, wrap=False, padding=4, tile_width_px=0,
                                                         tile_overlap_px=0)


def test_repeated_runs_leave_memory_and_results_unchanged(pack, sd2):
    ref, after = None, []
    for i in range(RUNS):
        latent, image = run(pack, sd2, job(pack))
        if ref is None:
            ref = (latent.clone(), image.clone())
        else:
            assert torch.equal(latent, ref[0]) and torch.equal(image, ref[1]), f"run {i + 1} differs from run 1"
        del latent, image
        after.append(allocated())
        print(f"  run {i + 1}: allocated {after[-1] / 2**30:.4f} GiB")
    assert all(a == after[0] for a in after), f"allocated bytes after each run: {after}"


@pytest.fixture(scope="module")
def gpu_cancel(comfy, sd2):
    with armed(comfy, sd2.model, sd2.vae, sd2.lpips, sd2.positive, sd2.negative, width=WIDTH,
               height=HEIGHT, window=WINDOW, stride=STRIDE, steps=STEPS, sync_steps=SYNC_STEPS,
               tile=2 * WINDOW, overlap=WINDOW // 8, seed=SEED) as s:
        yield s


@pytest.mark.parametrize("phase", PHASES)
def test_cancel_in_each_phase_on_real_sizes(gpu_cancel, comfy, phase):
    before = allocated()
    fired = cancel_in(gpu_cancel, comfy, phase)
    assert allocated() == before, f"memory left allocated after Cancel in {phase} ({fired})"
    assert_next_run_identical(gpu_cancel, comfy, phase)


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def peak_of(pack, sd2, j):
    allocated()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    latent, _ = run(pack, sd2, j, decode=False)
    torch.cuda.synchronize()
    return latent, torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def capped_run(pack, sd2, j, cap_bytes):
    """(latent or None, error text or None, logged warnings) of a run under a memory cap of ``cap_bytes``."""
    import comfy.model_management as mm

    device = mm.get_torch_device()
    allocated()
    torch.cuda.empty_cache()
    handler = Warnings()
    logging.getLogger("syncdiffusion").addHandler(handler)
    torch.cuda.set_per_process_memory_fraction(cap_bytes / torch.cuda.get_device_properties(device).total_memory,
                                               device)
    try:
        return run(pack, sd2, j, decode=False)[0], None, handler.lines
    except Exception as e:  # noqa: BLE001 - the second cap is expected to raise
        return None, f"{type(e).__name__}: {e}", handler.lines
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        logging.getLogger("syncdiffusion").removeHandler(handler)


@pytest.mark.parametrize("setting", ["sync_batch", "window_batch"])
def test_out_of_memory_halves_once_then_names_the_setting(pack, sd2, setting):
    if not CUDA:
        pytest.skip("needs CUDA (torch.cuda.set_per_process_memory_fraction)")
    if setting == "sync_batch":  # the gradient pass
        big, small, least = (job(pack, sync_batch=n) for n in (4, 2, 1))
    else:  # the plain pass, sync off
        big, small, least = (job(pack, w=0.0, sync_steps=0, window_batch=n) for n in (8, 4, 2))
    base = allocated()
    small_latent, small_peak, small_reserved = peak_of(pack, sd2, small)
    _, big_peak, _ = peak_of(pack, sd2, big)
    _, _, least_reserved = peak_of(pack, sd2, least)
    print(f"  {setting}: peaks small {small_peak / 2**30:.2f} GiB, big {big_peak / 2**30:.2f} GiB")
    if big_peak <= small_reserved * 1.02 or small_peak <= least_reserved * 1.02:
        pytest.skip("the peaks are too close to put a cap between them")

    latent, error, lines = capped_run(pack, sd2, big, (small_reserved + big_peak) // 2)
    assert error is None, error
    assert sum("retrying with" in line for line in lines) == 1, lines
    assert torch.equal(latent, small_latent), float((latent - small_latent).abs().max())
    del latent
    assert allocated() == base

    latent, error, lines = capped_run(pack, sd2, big, (least_reserved + small_peak) // 2)
    assert latent is None and error is not None and f"Lower {setting}" in error, (error, lines)
    assert allocated() == base
