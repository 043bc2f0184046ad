"""pytest setup: ComfyUI (``$COMFYUI_PATH`` or ``.comfyui/ComfyUI``) in --cpu mode with a temp base directory, this
pack loaded through ``nodes.load_custom_node``, and tiny random-weight models (the helpers behind the fixtures are in
``devtools/harness.py`` and ``devtools/models.py``). Seeds are fixed (``devtools.harness.SEED``), so every run builds
bit-identical weights.
"""
import os
import shutil
import tempfile
import types
from pathlib import Path

import pytest
import torch

from devtools import harness as h
from devtools import headless as comfy_headless
from devtools import models as tiny_models

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
    h.OBJECTS.clear()  # the graphs' in-memory models go while ComfyUI's modules are intact, not at interpreter exit
    if _BASE.get("dir") is not None:
        shutil.rmtree(_BASE["dir"], ignore_errors=True)


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
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype or before)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.fixture(scope="session")
def comfy():
    """The started ``devtools.headless.ComfyRuntime``."""
    if "error" in _BASE:
        pytest.fail(_BASE["error"])
    return h.runtime()


@pytest.fixture(scope="session")
def run_prompt(comfy):
    """``ComfyRuntime.run_prompt``: validate + PromptExecutor -> ``PromptResult``."""
    return comfy.run_prompt


@pytest.fixture(scope="session")
def object_node(comfy):
    """``object_node(value, "VAE")`` -> a node dict that feeds an in-memory object into a prompt."""
    return h.object_node


@pytest.fixture(scope="session")
def tiny_sd15(comfy):
    """``devtools.models.TinyModels`` of the tiny SD1.x checkpoint, loaded by CheckpointLoaderSimple."""
    return h.tiny_models("sd15")


@pytest.fixture(scope="session")
def tiny_sd20(comfy):
    """The same for SD2.x, without a text encoder (``.clip is None``: random conditioning)."""
    return h.tiny_models("sd20")


@pytest.fixture(scope="session")
def tiny_kl_vae(comfy):
    """A small KL VAE (SD's VAE architecture, 32 channels) as ``comfy.sd.VAE``."""
    return tiny_models.build_kl_vae(seed=7)


@pytest.fixture(scope="session")
def lpips_trunk(comfy):
    """The path of a random VGG16 trunk in ``models/lpips``, so synchronization runs offline."""
    return h.write_random_lpips_trunk()


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack's modules as ComfyUI loaded them (``pack.sampling``, ``pack.job``, ``pack.sampler_nodes`` ...)."""
    return h.pack()


@pytest.fixture(scope="session")
def lpips(pack, lpips_trunk):
    """The pack's LPIPS on the CPU, on ``lpips_trunk``."""
    return pack.assets.get_lpips(torch.device("cpu"))


@pytest.fixture(scope="session")
def micro(comfy):
    """A 32-channel SD1.x UNet (``devtools.models.build_micro_model``) built under inference mode as a loader
    builds it, with random prompts."""
    from layout_helpers import prompt

    with torch.inference_mode():
        model = tiny_models.build_micro_model(seed=5)
    return types.SimpleNamespace(model=model, positive=prompt(6), negative=prompt(7))
