"""Cancel at any point: ComfyUI's own interrupt pressed in each phase of a SyncDiffusion graph -- a plain step, the
anchor's decode, the gradient pass (its forward and its backward), the decode node, the save node. After each, the
loaded models are exactly as before (every weight and buffer: the same object, values, requires_grad,
inference-ness; the patcher's patches and options; ComfyUI's switches), no temporary file is left, and the next run
with the same seed is bit-identical to an uninterrupted one. How Cancel is pressed, and the checks: ``cancel_check.py``
(the GPU test runs the same ones on real-size models).
"""
import pytest

from cancel_check import PHASES, armed, assert_next_run_identical, cancel_in
from layout_helpers import one_thread

SEED = 21


@pytest.fixture(scope="module")
def setup(comfy, pack, micro, tiny_kl_vae, lpips):
    with one_thread(), armed(comfy, micro.model, tiny_kl_vae, lpips, micro.positive, micro.negative,
                             width=192, height=64, window=64, stride=32, steps=2, sync_steps=1, tile=64, overlap=16,
                             seed=SEED) as s:
        yield s


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_cancel_in_each_phase_leaves_models_and_the_next_run_unchanged(setup, comfy, phase):
    with one_thread():
        cancel_in(setup, comfy, phase)
        assert_next_run_identical(setup, comfy, phase)
