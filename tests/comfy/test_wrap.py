"""Loop closure (wrap): the windowed sampler is shift-equivariant on a 360° canvas.

Under wrap every column is covered by the same windows-per-column as any other, and windows straddle the seam,
so the canvas has no border: rolling the initial noise by a multiple of the stride rolls the sampled panorama by
the same amount, as long as nothing else singles out a position. With synchronization on, the anchor window does;
moving the anchor along with the shift (``Anchor(mode="index")`` shifted by the roll in windows) restores the
symmetry. Without wrap the canvas has borders and the same test fails, which shows it can fail.

Part 1: the core loop with a toy denoiser (no ComfyUI). Part 2: through ComfyUI's executor on the tiny SD1.x
model with the SyncDiffusionSampler node. Part 3: bad input.
"""
import pytest
import torch

from devtools import harness as h
from reference import F64, Toy
from syncdiff_core import Anchor, BatchPolicy, Lanes, SyncSettings, plan_windows, sample

# ------------------------------------------------------------------------------ Part 1: the core loop, toy callables

WINDOW, STRIDE = 8, 4
SIGMAS = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.1], dtype=F64)


SYNC = SyncSettings(weight=40.0, decay=0.9, steps=3)


def run(noise, wrap, sync=None, anchor=Anchor(), plan=None):
    """The core loop on the reference toy (translation-equivariant: a convolution that knows nothing of the
    window's position, like a UNet given the same prompt everywhere)."""
    toy = Toy()
    plan = plan or plan_windows(noise.shape[-2], noise.shape[-1], WINDOW, STRIDE, wrap=wrap)
    kwargs = dict(sync=sync, anchor=anchor) if sync else {}
    return sample(Lanes.single(toy.denoise, toy.decode, toy.loss), noise * SIGMAS[0], SIGMAS, plan,
                  batching=BatchPolicy(window_batch=3), **kwargs)


def noise(h=8, w=32, batch=1, seed=0):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rel_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("height", [8, 16])  # one row of windows; three rows
@pytest.mark.parametrize("shift_windows", [1, 3, 5])
def test_wrap_sampling_is_shift_equivariant_without_sync(height, shift_windows):
    z = noise(h=height)
    k = shift_windows * STRIDE
    base = run(z, wrap=True)
    assert base.abs().max() > 0.1  # the toy produces a real, position-dependent panorama
    assert rel_error(run(torch.roll(z, k, -1), wrap=True), torch.roll(base, k, -1)) < 1e-5


def test_without_wrap_the_same_roll_is_not_equivariant():
    z = noise()
    k = STRIDE
    base = run(z, wrap=False)
    assert rel_error(run(torch.roll(z, k, -1), wrap=False), torch.roll(base, k, -1)) > 0.05


def _shifted_index(plan, index, shift_windows):
    """The window of ``plan`` that holds, after a roll by ``shift_windows`` strides, what window ``index`` held."""
    cols = plan.canvas_width // plan.stride
    row, col = divmod(index, cols)
    return row * cols + (col + shift_windows) % cols


@pytest.mark.parametrize("height", [8, 16])
def test_wrap_sampling_with_sync_is_equivariant_when_the_anchor_moves_along(height):
    z = noise(h=height)
    plan = plan_windows(height, z.shape[-1], WINDOW, STRIDE, wrap=True)
    a, m = plan.center_index, 3
    base = run(z, wrap=True, sync=SYNC, anchor=Anchor(mode="index", index=a))
    no_sync = run(z, wrap=True)
    assert rel_error(base, no_sync) > 1e-2, "synchronization must change the result, or this test proves nothing"
    moved = run(torch.roll(z, m * STRIDE, -1), wrap=True, sync=SYNC,
                anchor=Anchor(mode="index", index=_shifted_index(plan, a, m)))
    assert rel_error(moved, torch.roll(base, m * STRIDE, -1)) < 1e-5
    # the anchor left where it was breaks the symmetry (the anchor is the only position that is special)
    stayed = run(torch.roll(z, m * STRIDE, -1), wrap=True, sync=SYNC, anchor=Anchor(mode="index", index=a))
    assert rel_error(stayed, torch.roll(base, m * STRIDE, -1)) > 1e-3


def test_with_sync_and_without_wrap_the_roll_is_not_equivariant():
    z = noise()
    plan = plan_windows(z.shape[-2], z.shape[-1], WINDOW, STRIDE, wrap=False)
    base = run(z, wrap=False, sync=SYNC, anchor=Anchor(mode="index", index=2))
    moved = run(torch.roll(z, STRIDE, -1), wrap=False, sync=SYNC,
                anchor=Anchor(mode="index", index=_shifted_index(plan, 2, 1)))
    assert rel_error(moved, torch.roll(base, STRIDE, -1)) > 0.05


def test_wrap_covers_every_column_equally_and_straddles_the_seam():
    plan = plan_windows(16, 32, WINDOW, STRIDE, wrap=True)
    count = torch.zeros(16, 32)
    for w in plan:
        count[w.top:w.top + w.height, w.columns()] += 1
    assert torch.all(count[:, :1] == count)  # every column as often as every other, seam included
    assert any(w.wraps for w in plan)
    flat = plan_windows(16, 32, WINDOW, STRIDE, wrap=False)
    edge = torch.zeros(32)
    for w in flat:
        edge[w.columns()] += 1
    assert edge[0] < edge[16]  # without wrap the borders are covered less: what makes the roll test fail


# -------------------------------------------------------- Part 3 (core): bad input, the rules stated by plan_windows

def test_wrap_needs_two_windows_and_a_stride_that_divides_the_width():
    with pytest.raises(ValueError, match="at least two windows wide"):
        plan_windows(8, 15, 8, 4, wrap=True)
    with pytest.raises(ValueError, match="stride must divide the canvas width"):
        plan_windows(8, 30, 8, 4, wrap=True)
    assert len(plan_windows(8, 16, 8, 4, wrap=True)) == 4  # exactly two windows wide: fine


# -------------------------------------------- Part 2: through ComfyUI (SyncDiffusionSampler on the tiny SD1.x model)

CANVAS_W, CANVAS_H, WIN_PX, STRIDE_PX = 256, 128, 128, 64  # 32 x 16 latent px, windows of 16, stride 8


def _sampler_prompt(tiny, *, wrap, width=CANVAS_W, stride=STRIDE_PX):
    return h.panorama_prompt(objects=(tiny.model, tiny.positive, tiny.negative, tiny.vae), width=width,
                             height=CANVAS_H, seed=7, cfg=1.0, window_size=WIN_PX, stride=stride, sync_weight=0.0,
                             sync_steps=0, wrap=wrap)


def _sampler_has_wrap(comfy):
    schema = comfy.nodes.NODE_CLASS_MAPPINGS["SyncDiffusionSampler"].INPUT_TYPES()
    return "wrap" in {**schema.get("required", {}), **schema.get("optional", {})}


@pytest.fixture
def rolled_noise(monkeypatch):
    """Make ComfyUI's seeded noise come out rolled by ``shift[0]`` latent columns (0 = unchanged)."""
    import comfy.sample

    real = comfy.sample.prepare_noise
    shift = [0]

    def prepare_noise(latent_image, seed, noise_inds=None):
        return torch.roll(real(latent_image, seed, noise_inds), shift[0], -1)

    monkeypatch.setattr(comfy.sample, "prepare_noise", prepare_noise)
    return shift


@pytest.mark.slow
@pytest.mark.parametrize("wrap", [True, False])
def test_comfy_wrap_sampler_rolls_with_the_noise(comfy, run_prompt, tiny_sd15, rolled_noise, wrap):
    """Rolling the seeded noise by two strides rolls the sampled latent by the same amount under wrap (to float
    tolerance: the windows meet the UNet in other batches, which may round differently); without wrap it does
    not."""
    if not _sampler_has_wrap(comfy):
        pytest.skip("SyncDiffusionSampler has no 'wrap' input yet")
    k = 2 * STRIDE_PX // 8
    base = run_prompt(_sampler_prompt(tiny_sd15, wrap=wrap))["sampler"][0]["samples"]
    rolled_noise[0] = k
    moved = run_prompt(_sampler_prompt(tiny_sd15, wrap=wrap))["sampler"][0]["samples"]
    assert base.shape == (1, 4, CANVAS_H // 8, CANVAS_W // 8) and base.abs().max() > 0.1
    err = rel_error(moved, torch.roll(base, k, -1))
    if wrap:
        assert err < 1e-4, err
    else:
        assert err > 0.05, err


@pytest.mark.parametrize("width,stride,match", [
    (192, STRIDE_PX, "at least two windows wide"),  # 24 latent px < 2 windows of 16
    (CANVAS_W, 80, "stride must divide the canvas width"),  # 32 latent px, stride 10
])
def test_comfy_wrap_bad_canvas_is_refused(comfy, run_prompt, tiny_sd15, width, stride, match):
    from devtools import harness as comfy_harness

    if not _sampler_has_wrap(comfy):
        pytest.skip("SyncDiffusionSampler has no 'wrap' input yet")
    with pytest.raises(comfy_harness.PromptExecutionError) as info:
        run_prompt(_sampler_prompt(tiny_sd15, wrap=True, width=width, stride=stride))
    assert info.value.exception_type.endswith("ValueError") and match in info.value.exception_message
