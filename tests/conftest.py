"""pytest setup: ComfyUI (``$COMFYUI_PATH`` or ``.comfyui/ComfyUI``) in --cpu mode with a temp base
directory, this pack loaded through ``nodes.load_custom_node``, and tiny random-weight models.

Fixtures (see ``devtools/harness.py`` and ``devtools/models.py`` for the helpers behind them):

=====================  =========  ===============================================================
``comfy``              session    ``ComfyRuntime``: ``.nodes`` (ComfyUI's nodes module), ``.execution``,
                                  ``.folder_paths``, ``.pack_node_ids``, ``.models_dir``, ``.output_dir``,
                                  ``.run_prompt(prompt)``, ``.model_folder(kind)``
``run_prompt``         session    ``run_prompt(prompt, *, raise_on_error=True, interrupt_after_progress=None,
                                  on_progress=None) -> PromptResult`` (validate + PromptExecutor)
``object_node``        session    ``object_node(value, "VAE") -> node dict`` to feed in-memory objects
``tiny_sd15``          session    ``TinyModels``: ``.model`` ``.clip`` ``.vae`` ``.positive`` ``.negative``
                                  ``.ckpt_name`` ``.ckpt_path`` ``.family`` -- SD1.x, one-level UNet
                                  (25.8M), full-size random CLIP-L, TAESD VAE; loaded with
                                  CheckpointLoaderSimple under inference mode, like a graph does
``tiny_sd20``          session    same for SD2.x (context 1024, linear projections); no text encoder
                                  (``.clip is None``), conditioning from random tensors
``tiny_kl_vae``        session    a small KL VAE (SD's VAE architecture, 32 channels) as comfy.sd.VAE
``lpips_trunk``        session    path of a random VGG16 trunk in ``models/lpips`` (sync runs offline)
``pack``               session    ``devtools.harness.Pack``: the pack's modules as ComfyUI loaded them
                                  (``pack.sampling``, ``pack.job``, ``pack.sampler_nodes``, ...)
``lpips``              session    the pack's LPIPS on the CPU, from ``lpips_trunk``
``micro``              session    a 32-channel SD1.x UNet (``devtools.models.build_micro_model``) built
                                  under inference mode like a loader's, with random prompts
=====================  =========  ===============================================================

Seeds are fixed (``devtools.harness.SEED``), so every run builds bit-identical weights.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from devtools import headless as comfy_headless

pytest.register_assert_rewrite("cancel_check")

_BASE: dict = {}


def pytest_configure(config):
    # As early as possible: ComfyUI first on sys.path (so `nodes` is ComfyUI's nodes.py, not this repo's
    # nodes/ folder), --cpu, and a throw-away base directory, before anything imports comfy.
    base = Path(tempfile.mkdtemp(prefix="syncdiff-tests-"))
    _BASE["dir"] = base
    try:
        # SYNCDIFF_GPU_TESTS=1 (bench/run_on_device.sh gpu-tests): ComfyUI on the GPU, for the tests marked gpu
        comfy_headless.bootstrap(base, cpu=os.environ.get("SYNCDIFF_GPU_TESTS") != "1")
    except RuntimeError as e:  # no ComfyUI: core unit tests still run; ComfyUI fixtures will error
        _BASE["error"] = str(e)


def pytest_unconfigure(config):
    base = _BASE.get("dir")
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)


def pytest_report_header(config):
    try:
        path = comfy_headless.comfyui_path()
        return f"ComfyUI {comfy_headless.comfyui_version(path)}: {path}  base dir: {_BASE.get('dir')}"
    except RuntimeError as e:
        return f"ComfyUI: not available ({e})"


@pytest.fixture(autouse=True)
def default_dtype(request):
    """torch's default dtype while a test runs: its module's ``DEFAULT_DTYPE`` when it sets one (the exact tests
    compare in float64; others assume float32 whatever an earlier module left set), restored afterwards."""
    dtype = getattr(request.module, "DEFAULT_DTYPE", None)
    if dtype is None:
        yield
        return
    import torch
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.fixture(scope="session")
def comfy():
    if "error" in _BASE:
        pytest.fail(_BASE["error"])
    from devtools import harness as comfy_harness
    return comfy_harness.runtime()


@pytest.fixture(scope="session")
def run_prompt(comfy):
    return comfy.run_prompt


@pytest.fixture(scope="session")
def object_node(comfy):
    from devtools import harness as comfy_harness
    return comfy_harness.object_node


@pytest.fixture(scope="session")
def tiny_sd15(comfy):
    from devtools import harness as comfy_harness
    return comfy_harness.tiny_models("sd15")


@pytest.fixture(scope="session")
def tiny_sd20(comfy):
    from devtools import harness as comfy_harness
    return comfy_harness.tiny_models("sd20")


@pytest.fixture(scope="session")
def tiny_kl_vae(comfy):
    from devtools import models as tiny_models
    return tiny_models.build_kl_vae(seed=7)


@pytest.fixture(scope="session")
def lpips_trunk(comfy):
    from devtools import harness as comfy_harness
    return comfy_harness.write_random_lpips_trunk()


@pytest.fixture(scope="session")
def pack(comfy):
    from devtools import harness as comfy_harness
    return comfy_harness.pack()


@pytest.fixture(scope="session")
def lpips(pack, lpips_trunk):
    import torch
    return pack.assets.get_lpips(torch.device("cpu"))


@pytest.fixture(scope="session")
def micro(comfy):
    import types

    import torch
    from devtools.models import build_micro_model
    from layout_helpers import prompt

    with torch.inference_mode():
        model = build_micro_model(seed=5)
    return types.SimpleNamespace(model=model, positive=prompt(6), negative=prompt(7))
