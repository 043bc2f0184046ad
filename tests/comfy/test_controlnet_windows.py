"""ComfyUI's own spatial conditioning inside the windows: ``ConditioningSetArea`` / ``ConditioningSetMask`` and
ControlNet hints (``ControlNetApplyAdvanced``) are cropped to each window, wrap-aware, on the micro UNet and
ControlNet (``layout_helpers``). The result equals an independent per-window reference (stock ``CFGGuider`` per
window, with the conditioning ComfyUI's nodes build from the window's part of the input); and a spy on the hint each
ControlNet used in every UNet call (``model_function_wrapper``), with a hint that encodes its own pixel column, shows
every window gets the crop at its own position in every step, batched or not, across the seam, through a chain of
two ControlNets, and the user's ControlNet gets its hint back.
"""
from types import SimpleNamespace

import pytest
import torch

from syncdiff_core.batching import even_group_sizes
from devtools import harness as h
from layout_helpers import (CFG, build_micro_controlnet, build_micro_model, one_thread, prompt, reference_panorama,
                            stock_node, window_columns_px)

H, W = 8, 32           # latent px
PX_H, PX_W = 64, 256   # pixels
WIN, STRIDE = 8, 4     # latent px
SEED = 9


@pytest.fixture(scope="module")
def env(comfy, pack):
    with one_thread():
        yield SimpleNamespace(pack=pack, rt=comfy, model=build_micro_model(seed=21),
                              cnet=build_micro_controlnet(seed=22), bg=prompt(31), a=prompt(32), neg=prompt(33))


def plan(env, wrap):
    return env.pack.windows.plan_windows(H, W, WIN, STRIDE, wrap=wrap)


def run(env, positive, negative=None, *, steps=2, wrap=False, window_batch=8, model=None):
    job = h.make_job(env.pack, sync_steps=0, seed=SEED, steps=steps, cfg=CFG, window_px=WIN * 8,
                     stride_px=STRIDE * 8, wrap=wrap, window_batch=window_batch)
    return h.sample(env.pack, model or env.model, positive, env.neg if negative is None else negative,
                    (1, 4, H, W), job)


def reference(env, window_conds, *, steps=2, wrap=False):
    sigmas = env.pack.families.sampling_sigmas(env.model, steps)
    with torch.inference_mode():
        return reference_panorama(env.model, window_conds, (1, 4, H, W), SEED, sigmas, plan(env, wrap))


def close(a, b, rel=1e-4):
    return float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max()))


def far(a, b, rel=1e-2):
    return float((a - b).abs().max()) >= rel * float(b.abs().max())


def set_area(env, cond, width, height, x, y):
    return stock_node(env.rt, "ConditioningSetArea").append(cond, width, height, x, y, 1.0)[0]


def runs(flags):
    """(start, length) of each run of True in a 1-D bool tensor."""
    out, start = [], None
    for k, v in enumerate(flags.tolist() + [False]):
        if v and start is None:
            start = k
        elif not v and start is not None:
            out.append((start, k - start))
            start = None
    return out


# ----------------------------------------------------------------------------- area and mask conditioning

AREA_CASES = {  # (width, height, x, y) in canvas pixels, wrap
    "left_area": ((96, 64, 0, 0), False),
    "middle_area_rows": ((80, 32, 88, 16), False),
    "full_width_band_with_wrap": ((256, 32, 0, 0), True),
    "right_end_with_wrap": ((64, 64, 192, 0), True),
}


@pytest.mark.parametrize("case", list(AREA_CASES))
def test_area_conditioning_is_cropped_to_each_window(env, case):
    (aw, ah, ax, ay), wrap = AREA_CASES[case]
    positive = env.bg + set_area(env, env.a, aw, ah, ax, ay)
    out = run(env, positive, wrap=wrap)

    missed = []

    def window_conds(w):
        cols = window_columns_px(w)
        pieces = runs((cols >= ax) & (cols < ax + aw))  # the area's part of this window, in window px
        if not pieces:
            missed.append(w)  # an area that misses the window is skipped for it
        return env.bg + [c for x, n in pieces for c in set_area(env, env.a, n, ah, x, ay)], env.neg

    expected = reference(env, window_conds, wrap=wrap)
    if case != "full_width_band_with_wrap":
        assert missed, "the case should have windows that the area misses"
    assert far(expected, reference(env, lambda w: (env.bg, env.neg), wrap=wrap)), "the area must matter"
    assert close(out, expected)


def test_area_in_percent_is_resolved_on_the_canvas_before_cropping(env):
    pct = stock_node(env.rt, "ConditioningSetAreaPercentage").append(env.a, 0.375, 1.0, 0.0, 0.0, 1.0)[0]
    assert close(run(env, env.bg + pct), run(env, env.bg + set_area(env, env.a, 96, 64, 0, 0)))


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "wrap"])
def test_mask_conditioning_is_cropped_to_each_window(env, wrap):
    mask = torch.zeros(1, H, W)  # latent-size, so no resizing is involved on either side
    mask[:, 2:7, 26:] = 1.0
    mask[:, 2:7, :6] = 0.5
    set_mask = stock_node(env.rt, "ConditioningSetMask")
    positive = env.bg + set_mask.append(env.a, mask, "default", 0.8)[0]
    out = run(env, positive, wrap=wrap)

    def window_conds(w):
        crop = mask[..., (torch.arange(w.width) + w.left) % W]
        return env.bg + set_mask.append(env.a, crop, "default", 0.8)[0], env.neg

    expected = reference(env, window_conds, wrap=wrap)
    assert far(expected, reference(env, lambda w: (env.bg, env.neg), wrap=wrap))
    assert close(out, expected)


# ----------------------------------------------------------------------------- ControlNet

def column_hint(reverse=False) -> torch.Tensor:
    """An IMAGE (1, 64, 256, 3) whose red channel is its own pixel column / 256 (exact in float), green the
    row / 64, blue 0.25; ``reverse`` mirrors the column code."""
    cols = torch.arange(PX_W, dtype=torch.float32) / PX_W
    if reverse:
        cols = cols.flip(0)
    img = torch.empty(1, PX_H, PX_W, 3)
    img[..., 0] = cols
    img[..., 1] = (torch.arange(PX_H, dtype=torch.float32) / PX_H)[:, None]
    img[..., 2] = 0.25
    return img


def apply_controlnet(env, positive, negative, hint, cnet=None):
    node = stock_node(env.rt, "ControlNetApplyAdvanced")
    return node.apply_controlnet(positive, negative, cnet or env.cnet, hint, 1.0, 0.0, 1.0)


def hint_spy(model, controls):
    """A clone of ``model`` recording, for every UNet call, the hint each ControlNet object of ``controls``
    used in that call (``cond_hint``, set by ComfyUI's ``get_control`` just before the UNet runs)."""
    calls = []

    def wrapper(apply_model, args):
        calls.append(SimpleNamespace(t=float(args["timestep"][0]), batched=len(args["cond_or_uncond"]),
                                     hints=[c.cond_hint.clone() for c in controls]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone = model.clone()
    clone.set_model_unet_function_wrapper(wrapper)
    return clone, calls


SPY_CASES = {  # wrap, window_batch, half-resolution hint
    "one_window_per_call": (False, 1, False),
    "three_windows_per_call": (False, 3, False),
    "wrap_all_windows_in_one_call": (True, 8, False),
    "wrap_half_resolution_hint": (True, 2, True),
}


@pytest.mark.parametrize("case", list(SPY_CASES))
def test_each_window_gets_the_hint_crop_at_its_own_position(env, case):
    import comfy.utils

    wrap, window_batch, half = SPY_CASES[case]
    steps = 2
    hints = [column_hint(), column_hint(reverse=True)]
    if half:  # the hint at half the canvas' size: it is resized to the canvas before being cropped
        hints = [h[:, ::2, ::2] for h in hints]
    pos, neg = apply_controlnet(env, env.bg, env.neg, hints[0])
    pos, neg = apply_controlnet(env, pos, neg, hints[1])  # a chain: second ControlNet -> first
    second = pos[0][1]["control"]
    first = second.previous_controlnet
    assert first is not None and neg[0][1]["control"] is second
    originals = [first.cond_hint_original, second.cond_hint_original]
    model, calls = hint_spy(env.model, [first, second])

    run(env, pos, neg, steps=steps, wrap=wrap, window_batch=window_batch, model=model)

    full = [comfy.utils.common_upscale(h.movedim(-1, 1), PX_W, PX_H, "nearest-exact", "center") for h in hints]
    windows = list(plan(env, wrap))
    by_step: dict[float, list] = {}
    for c in calls:
        for k, used in enumerate(c.hints):
            # ComfyUI repeats the hint for each cond batched in the call (a single crop is left to broadcast)
            per = used.shape[0] // c.batched if used.shape[0] > 1 else 1
            assert all(torch.equal(used[j * per:(j + 1) * per], used[:per]) for j in range(used.shape[0] // per))
            if k == 0:
                by_step.setdefault(c.t, []).append([])
            by_step[c.t][-1].append(used[:per])
    assert len(by_step) == steps
    for t, step_calls in by_step.items():
        for k in range(2):  # each ControlNet of the chain
            used = torch.cat([call[k] for call in step_calls])
            assert used.shape == (len(windows), 3, PX_H, PX_W // 4), "one hint crop per window and step"
            for j, w in enumerate(windows):
                expected = full[k][..., window_columns_px(w)][0]
                assert torch.equal(used[j], expected), f"step t={t:.0f}, ControlNet {k}, window {j} at {w.left}"
        assert max(len(call) for call in step_calls) == 2
    batches = [call[0].shape[0] for call in by_step[max(by_step)]]
    assert batches == even_group_sizes(len(windows), window_batch)
    # the user's ControlNet objects are left as they were: their own hint, no cached crop
    assert first.cond_hint_original is originals[0] and second.cond_hint_original is originals[1]
    assert first.cond_hint is None and second.cond_hint is None


def test_controlnet_result_equals_stock_controlnet_on_each_windows_hint_crop(env):
    hint = column_hint()
    hint[..., 2] = torch.rand(PX_H, PX_W, generator=torch.Generator().manual_seed(0))  # some texture
    pos, neg = apply_controlnet(env, env.bg, env.neg, hint)
    out = run(env, pos, neg, wrap=True)

    def window_conds(w):
        return apply_controlnet(env, env.bg, env.neg, hint[:, :, window_columns_px(w)])

    expected = reference(env, window_conds, wrap=True)
    assert far(expected, reference(env, lambda w: (env.bg, env.neg), wrap=True)), "the ControlNet must matter"
    first_hint_everywhere = reference(env, lambda w: apply_controlnet(env, env.bg, env.neg, hint[:, :, :64]),
                                      wrap=True)
    # the hint's content moves the result much less than the ControlNet itself does (random weights), but
    # still 50x more than the float tolerance of close()
    assert far(expected, first_hint_everywhere, 2e-3), "a wrong crop must be detectable"
    assert close(out, expected)


def test_the_hint_is_restored_when_sampling_fails(env):
    pos, neg = apply_controlnet(env, env.bg, env.neg, column_hint())
    cnet = pos[0][1]["control"]
    original = cnet.cond_hint_original
    n = [0]

    def failing(apply_model, args):
        n[0] += 1
        if n[0] == 2:
            raise RuntimeError("boom (test)")
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = env.model.clone()
    model.set_model_unet_function_wrapper(failing)
    with pytest.raises(RuntimeError, match="boom"):
        run(env, pos, neg, window_batch=2, model=model)
    assert n[0] == 2
    assert cnet.cond_hint_original is original


# ----------------------------------------------------------------------------- WindowConds, directly

def test_window_conds_crop_c_concat_masks_and_areas_across_the_seam(env):
    import comfy.conds

    seam = plan(env, True)[-1]  # latent cols 28..31 then 0..3
    assert seam.wraps
    cols = (torch.arange(WIN) + seam.left) % W
    concat = torch.arange(W, dtype=torch.float32).expand(2, 5, H, W).clone()  # e.g. an inpainting model's
    mask = torch.rand(1, H, W, generator=torch.Generator().manual_seed(1))
    conds = {"positive": [{"model_conds": {"c_concat": comfy.conds.CONDNoiseShape(concat)}, "mask": mask},
                          {"area": (4, W, 2, 0)},  # a full-width band: one area over the whole window
                          {"area": (8, 4, 0, 8)}],  # latent cols 8..11: misses the seam window
             "negative": [{}]}
    wc = env.pack.conds.WindowConds(conds, (H, W), 2)
    (rows, _, out), = list(wc.batches([seam]))
    assert rows == slice(0, 2)
    c0, band = out["positive"]  # the area that misses the window is skipped
    assert torch.equal(c0["model_conds"]["c_concat"].cond, concat[..., cols])
    assert torch.equal(c0["mask"], mask[..., cols].expand(2, H, WIN))
    assert band["area"] == (4, WIN, 2, 0)
    (_, _, out), = list(wc.batches([plan(env, True)[2]]))  # latent cols 8..15: both areas, the second cropped
    assert [c.get("area") for c in out["positive"]] == [None, (4, WIN, 2, 0), (8, 4, 0, 0)]


def test_hints_that_a_controlnet_vae_encodes_are_cropped_in_pixels(env):
    import comfy.controlnet

    class PixelVAE:  # what ComfyUI's get_control asks of the VAE of a latent-space ControlNet
        def spacial_compression_encode(self):
            return 8

    control = comfy.controlnet.ControlBase()
    hint = column_hint().movedim(-1, 1)
    control.set_cond_hint(hint, 1.0, (0.0, 1.0))
    control.compression_ratio, control.vae = 1, PixelVAE()  # as for SD3 / Flux ControlNets
    wc = env.pack.conds.WindowConds({"positive": [{"control": control}], "negative": []}, (H, W), 1)
    w = plan(env, False)[2]
    list(wc.batches([w]))
    assert torch.equal(control.cond_hint_original, hint[..., window_columns_px(w)])
    wc.restore()
    assert control.cond_hint_original is hint


def test_synchronization_differentiates_through_a_controlnet_loaded_in_inference_mode(env, lpips_trunk, tiny_kl_vae):
    # As in a graph: the loaders create the UNet's and the ControlNet's weights under inference mode, and
    # the LPIPS gradient of a sync step runs through both.
    with torch.inference_mode():
        model, cnet = build_micro_model(seed=21), build_micro_controlnet(seed=22)
    params = dict(cnet.control_model.named_parameters())
    assert all(p.is_inference() for p in params.values())
    pos, neg = apply_controlnet(env, env.bg, env.neg, column_hint(), cnet=cnet)
    loss = env.pack.assets.get_lpips(torch.device("cpu"))

    def sample(weight):
        job = h.make_job(env.pack, w=weight, sync_steps=1, seed=SEED, steps=2, cfg=CFG, window_px=WIN * 8,
                         stride_px=STRIDE * 8)
        return h.sample(env.pack, model, pos, neg, (1, 4, H, W), job, vae=tiny_kl_vae, loss=loss)

    synced, plain = sample(20.0), sample(0.0)
    assert torch.isfinite(synced).all() and far(synced, plain, 1e-3)
    assert all(p is params[k] for k, p in cnet.control_model.named_parameters())  # the originals are back
