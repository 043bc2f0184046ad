"""Layout-guided panoramas (MultiDiffusion's region-based mode) through the real ComfyUI sampling path:
LayoutMaskRegion's masks as fusion weights, the background, bootstrapping only in its steps, regions across window
borders and the wrap seam, stretched masks, and bad input caught before any model call. Canvas 64x256 px, 64 px
windows every 32 px (7 windows, 8 under wrap), the micro UNet of ``layout_helpers``.

Two exact facts make the fusion checks precise: after ONE step every window starts from the same noise, so the
result is, pixel for pixel, ``m * result(region prompt alone) + (1 - m) * result(background alone)`` for any mask m
(the DDIM step is linear in x0 and every window covering a pixel weighs it alike), across window borders and the
seam alike; after k steps a pixel can depend on the other prompt only through windows within (k - 1) strides of the
mask's edge.
"""
import logging
from types import SimpleNamespace

import pytest
import torch

from devtools import harness as h
from layout_helpers import CFG, build_micro_model, one_thread, prompt, stock_node

H, W = 8, 32           # latent px
PX_H, PX_W = 64, 256   # pixels
WIN_PX, STRIDE_PX = 64, 32
SEED = 5


@pytest.fixture(scope="module")
def env(comfy, pack, tiny_kl_vae):
    with one_thread():
        yield SimpleNamespace(pack=pack, model=build_micro_model(seed=11), vae=tiny_kl_vae, rt=comfy,
                              bg=prompt(1), a=prompt(2), b=prompt(3), neg=prompt(4), cache={})


def job(env, steps=3, wrap=False, window_batch=8, w=0.0, sync_steps=0):
    return h.make_job(env.pack, w=w, sync_steps=sync_steps, seed=SEED, steps=steps, cfg=CFG, window_px=WIN_PX,
                      stride_px=STRIDE_PX, wrap=wrap, window_batch=window_batch)


def run(env, positive, *, steps=3, wrap=False, batch=1, vae=None, model=None, negative=None, j=None, loss=None):
    return h.sample(env.pack, model or env.model, positive, env.neg if negative is None else negative,
                    (batch, 4, H, W), j or job(env, steps, wrap), vae=vae, loss=loss)


def single(env, name: str, steps: int, wrap: bool = False, batch: int = 1) -> torch.Tensor:
    """The panorama of one plain prompt (cached per module)."""
    key = (name, steps, wrap, batch)
    if key not in env.cache:
        env.cache[key] = run(env, getattr(env, name), steps=steps, wrap=wrap, batch=batch)
    return env.cache[key]


def region(env, cond, mask, fraction=0.0, soft=False, regions=None):
    """LayoutMaskRegion's own execute (the node's logic, as a graph would call it)."""
    out = env.pack.layout_nodes.LayoutMaskRegion.execute(cond, mask, fraction, soft, regions)
    return out.result[0]


def px_mask(cols=None, rows=None, value=1.0, shape=(PX_H, PX_W)) -> torch.Tensor:
    """A (1, H, W) pixel MASK that is ``value`` on the given slices."""
    m = torch.zeros(1, *shape)
    m[0, rows or slice(None), cols or slice(None)] = value
    return m


def lat_mask(cols, rows=slice(None), batch=1) -> torch.Tensor:
    """A (batch, 1, H, W) latent-size mask that is 1 on the given slices."""
    m = torch.zeros(batch, 1, H, W)
    m[..., rows, cols] = 1
    return m


def spied(model):
    """A clone of ``model`` whose UNet calls are recorded through ComfyUI's model_function_wrapper hook."""
    calls = []

    def wrapper(apply_model, args):
        calls.append(SimpleNamespace(input=args["input"].clone(), t=float(args["timestep"][0]),
                                     cond_or_uncond=list(args["cond_or_uncond"]),
                                     crossattn=args["c"]["c_crossattn"].clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone = model.clone()
    clone.set_model_unet_function_wrapper(wrapper)
    return clone, calls


def close(a, b, rel=1e-4):
    """Equal up to float noise (batch composition changes the CPU kernels' summation order)."""
    return float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max()))


def far(a, b, rel=0.05):
    return float((a - b).abs().max()) >= rel * float(b.abs().max())


# ----------------------------------------------------------------------------- masks, no sampling

def test_masks_are_resized_to_the_latent_and_binarized_at_half_unless_soft(env):
    R = env.pack.regions
    m = px_mask(cols=slice(0, 128), value=0.6) + px_mask(cols=slice(128, 256), value=0.4)
    hard = R.mask_to_canvas(m, H, W, soft=False)
    assert hard.shape == (1, H, W)
    assert torch.equal(hard[..., :16], torch.ones(1, H, 16)) and not hard[..., 16:].any()
    soft = R.mask_to_canvas(m, H, W, soft=True)
    assert torch.allclose(soft[..., :16], torch.full((1, H, 16), 0.6))
    assert torch.allclose(soft[..., 16:], torch.full((1, H, 16), 0.4))
    assert R.mask_to_canvas(m[0], H, W, soft=False).shape == (1, H, W)  # a 2-D mask is one mask
    with pytest.raises(ValueError, match="MASK"):
        R.mask_to_canvas(torch.ones(1, 1, 8, 8), H, W, soft=False)


def test_a_mask_of_another_aspect_ratio_is_stretched_with_a_warning(env, caplog):
    R = env.pack.regions
    square = px_mask(cols=slice(0, 32), shape=(64, 64))  # the left half of a square mask
    with caplog.at_level(logging.WARNING, logger="syncdiffusion"):
        m = R.mask_to_canvas(square, H, W, soft=False, name="region 1's mask")
    assert "aspect ratio" in caplog.text and "region 1's mask" in caplog.text
    assert torch.equal(m, R.mask_to_canvas(px_mask(cols=slice(0, 128)), H, W, soft=False))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="syncdiffusion"):
        R.mask_to_canvas(px_mask(cols=slice(0, 64), shape=(16, 64)), H, W, soft=False)  # same aspect
    assert "aspect" not in caplog.text


def test_background_is_what_the_foregrounds_leave_and_coverage_is_checked(env, caplog):
    R = env.pack.regions
    a = torch.zeros(1, H, W)
    a[..., :20] = 1
    b = torch.zeros(1, H, W)
    b[..., 12:24] = 0.5  # soft, overlapping a
    keep, bg = R.layout_masks([a, b], batch=1, has_background=True)
    assert keep == [0, 1]
    assert torch.equal(bg, (1 - a - b).clamp_min(0))
    assert bg[..., :20].eq(0).all() and bg[..., 20:24].eq(0.5).all() and bg[..., 24:].eq(1).all()

    with caplog.at_level(logging.WARNING, logger="syncdiffusion"):
        keep, bg = R.layout_masks([torch.zeros(1, H, W), a], batch=1, has_background=True)
    assert keep == [1] and "region 1 has an empty mask" in caplog.text
    assert torch.equal(bg, 1 - a)

    with pytest.raises(ValueError, match=r"leave 96 latent pixels with no prompt.*no background prompt"):
        R.layout_masks([a], batch=1, has_background=False)
    keep, bg = R.layout_masks([a, 1 - a], batch=1, has_background=False)  # covered: fine without one
    assert keep == [0, 1] and not bg.any()
    with pytest.raises(ValueError, match=r"region 2's mask has a batch of 3.*latent batch \(2\)"):
        R.layout_masks([a, torch.ones(3, H, W)], batch=2, has_background=True)


def test_bootstrap_is_active_only_for_its_fraction_of_the_steps(env, comfy):
    R, cb = env.pack.regions, env.pack.layout
    specs = [R.RegionSpec(bootstrap_fraction=0.5), R.RegionSpec(bootstrap_fraction=0.25)]
    assert [s.bootstrap_steps(4) for s in specs] == [2, 1]
    plan = env.pack.windows.plan_windows(H, W, 8, 4)
    with torch.inference_mode():
        b = cb.Bootstrap(env.model, env.vae, specs, plan, n=1, seed=SEED)
    assert [b.active(i, 4) for i in range(4)] == [True, True, False, False]
    assert [b.active(i, 10) for i in range(10)] == [True] * 5 + [False] * 5
    assert b.latents.shape == (8, 4, 8, 8)  # window-sized flat-colour latents, encoded once here


# ----------------------------------------------------------------------------- fusion weights

@pytest.mark.parametrize("fraction", [0.0, 0.5], ids=["plain", "bootstrapping"])
def test_a_mask_of_ones_reproduces_the_region_prompt_alone(env, fraction):
    positive = region(env, env.a, torch.ones(1, PX_H, PX_W), fraction, regions=env.bg)
    out = run(env, positive, vae=env.vae)
    a, bg = single(env, "a", 3), single(env, "bg", 3)
    assert far(a, bg), "the two prompts must give measurably different panoramas for this test to mean anything"
    assert close(out, a)


def test_an_empty_mask_warns_and_leaves_the_background_result(env, caplog):
    dot = px_mask(cols=slice(100, 102), rows=slice(30, 32))  # 2x2 px: nothing left at 8x32 latent px
    positive = region(env, env.a, dot, regions=region(env, env.b, torch.zeros(1, PX_H, PX_W), regions=env.bg))
    with caplog.at_level(logging.WARNING, logger="syncdiffusion"):
        out = run(env, positive)
    assert "region 1 has an empty mask" in caplog.text and "region 2 has an empty mask" in caplog.text
    assert close(out, single(env, "bg", 3))


def test_a_half_mask_gives_the_region_inside_and_the_background_outside(env):
    # 3 steps, mask = left half (latent cols 0..15), stride 4 latent px: columns more than 2 strides away
    # from the edge (0..7 and 24..31) must equal the single-prompt panoramas; the middle must be a mix.
    positive = region(env, env.a, px_mask(cols=slice(0, 128)), regions=env.bg)
    out = run(env, positive)
    a, bg = single(env, "a", 3), single(env, "bg", 3)
    assert close(out[..., :8], a[..., :8]) and far(out[..., :8], bg[..., :8])
    assert close(out[..., 24:], bg[..., 24:]) and far(out[..., 24:], a[..., 24:])
    mid = slice(12, 20)
    assert far(out[..., mid], a[..., mid], 1e-3) and far(out[..., mid], bg[..., mid], 1e-3)


def _one_step_cases():
    rect = px_mask(cols=slice(80, 176), rows=slice(16, 48))  # crosses the borders of windows 8..20
    seam = px_mask(cols=slice(224, 256)) + px_mask(cols=slice(0, 40))  # both ends: across the wrap seam
    soft = torch.linspace(0, 1, W).expand(1, H, W).clone()  # a latent-size soft ramp
    return {
        "crossing_windows": (rect, False, False),
        "across_the_seam_with_wrap": (seam, False, True),
        "soft_ramp": (soft, True, False),
    }


@pytest.mark.parametrize("case", list(_one_step_cases()))
def test_after_one_step_the_result_is_the_mask_weighted_mix_of_the_prompts(env, case):
    mask, soft, wrap = _one_step_cases()[case]
    positive = region(env, env.a, mask, soft=soft, regions=env.bg)
    out = run(env, positive, steps=1, wrap=wrap)
    m = env.pack.regions.mask_to_canvas(mask, H, W, soft=soft).unsqueeze(1)
    if not soft:  # the binarized mask is what we meant: pixel blocks of 8 -> latent px
        assert m.sum() == mask.sum() / 64
    expected = m * single(env, "a", 1, wrap) + (1 - m) * single(env, "bg", 1, wrap)
    assert close(out, expected)


def test_background_and_two_regions(env):
    left, right = px_mask(cols=slice(0, 96)), px_mask(cols=slice(160, 256), rows=slice(0, 32))
    positive = region(env, env.b, right, regions=region(env, env.a, left, regions=env.bg))
    out = run(env, positive, steps=1)
    ma, mb = lat_mask(slice(0, 12)), lat_mask(slice(20, None), slice(0, 4))
    expected = ma * single(env, "a", 1) + mb * single(env, "b", 1) + (1 - ma - mb) * single(env, "bg", 1)
    assert close(out, expected)


def test_each_latent_of_a_batch_gets_its_own_mask(env):
    masks = torch.cat([px_mask(cols=slice(0, 128)), px_mask(cols=slice(128, 256))])
    out = run(env, region(env, env.a, masks, regions=env.bg), steps=1, batch=2)
    m = torch.cat([lat_mask(slice(0, 16)), lat_mask(slice(16, None))])
    assert close(out, m * single(env, "a", 1, batch=2) + (1 - m) * single(env, "bg", 1, batch=2))


def test_a_mask_of_the_wrong_aspect_ratio_is_stretched_and_still_runs(env, caplog):
    square = px_mask(cols=slice(0, 32), shape=(64, 64))
    with caplog.at_level(logging.WARNING, logger="syncdiffusion"):
        out = run(env, region(env, env.a, square, regions=env.bg), steps=1)
    assert "aspect ratio" in caplog.text
    m = lat_mask(slice(0, 16))
    assert close(out, m * single(env, "a", 1) + (1 - m) * single(env, "bg", 1))


# ----------------------------------------------------------------------------- bootstrapping

class CountingVAE:
    """Delegates to a VAE, counting encode calls."""

    def __init__(self, vae):
        self._vae, self.encodes = vae, 0

    def encode(self, pixels):
        self.encodes += 1
        return self._vae.encode(pixels)

    def __getattr__(self, name):
        return getattr(self._vae, name)


def test_bootstrapping_replaces_the_surroundings_only_in_its_steps(env):
    steps = 4
    model, calls = spied(env.model)
    vae = CountingVAE(env.vae)
    left = px_mask(cols=slice(0, 128))
    run(env, region(env, env.a, left, fraction=0.5, regions=env.bg), steps=steps, model=model, vae=vae)
    assert vae.encodes == 1  # the flat colours are encoded once per run, not per step

    plan = env.pack.windows.plan_windows(H, W, 8, 4)
    inside = torch.cat([env.pack.windows.crop(lat_mask(slice(0, 16)), w) for w in plan]).bool()
    chunks: dict[float, list] = {}  # timestep -> [(prompt, input)] for each positive chunk of each call
    for c in calls:
        rows = c.input.shape[0] // len(c.cond_or_uncond)
        parts = [c.input[k * rows:(k + 1) * rows] for k in range(len(c.cond_or_uncond))]
        assert all(torch.equal(p, parts[0]) for p in parts)  # cond and uncond of one call share the input
        for k, cu in enumerate(c.cond_or_uncond):
            ctx = c.crossattn[k * rows]
            name = next((n for n in ("a", "bg") if torch.equal(ctx, getattr(env, n)[0][0][0])), None)
            if cu == 0 and name:
                chunks.setdefault(c.t, []).append((name, parts[k]))
    assert len(chunks) == steps
    for i, t in enumerate(sorted(chunks, reverse=True)):
        seen = dict(chunks[t])
        assert sorted(n for n, _ in chunks[t]) == ["a", "bg"]
        xa, x = seen["a"], seen["bg"]  # the background prompt sees the canvas
        ins = inside.expand_as(x)
        assert torch.equal(xa[ins], x[ins])  # inside its mask the region always sees the canvas
        if i < 2:  # bootstrapping: outside the mask, a noised flat colour instead of the canvas
            assert (xa[~ins] - x[~ins]).abs().mean() > 0.1 * x[~ins].abs().mean(), f"step {i}"
        else:
            assert torch.equal(xa, x), f"step {i}: bootstrapping must be over"


def test_bootstrap_fraction_that_rounds_to_zero_steps_changes_nothing(env):
    left = px_mask(cols=slice(0, 128))
    plain = run(env, region(env, env.a, left, fraction=0.0, regions=env.bg), vae=env.vae)
    zero_steps = run(env, region(env, env.a, left, fraction=0.1, regions=env.bg), vae=env.vae)  # round(0.3) = 0
    one_step = run(env, region(env, env.a, left, fraction=0.34, regions=env.bg), vae=env.vae)  # round(1.02) = 1
    assert torch.equal(zero_steps, plain)
    assert far(one_step, plain, 1e-3)


def test_bootstrapping_keeps_comfyuis_weights_of_other_masked_prompts(env):
    # A ConditioningSetMask prompt at strength 0.5 next to a bootstrapping region: in the first step only the
    # region's own input changes, so wherever the region's mask is 0 the result must equal the one without
    # bootstrapping, where ComfyUI weighs that prompt by mask x strength.
    half = lat_mask(slice(0, 16))[0]
    masked = stock_node(env.rt, "ConditioningSetMask").append(env.b, half, "default", 0.5)[0]
    right = px_mask(cols=slice(192, 256))
    on = run(env, region(env, env.a, right, fraction=1.0, regions=env.bg + masked), steps=1, vae=env.vae)
    off = run(env, region(env, env.a, right, fraction=0.0, regions=env.bg + masked), steps=1)
    assert close(on[..., :24], off[..., :24])
    assert far(on[..., 24:], off[..., 24:], 1e-3)
    assert far(off[..., :16], single(env, "bg", 1)[..., :16], 1e-3)  # the masked prompt matters where it is


def test_synchronization_uses_the_fused_prediction_of_each_window(env, lpips_trunk):
    # With a region covering everything the fused prediction is the region prompt's, in the sync gradient
    # and in the denoising step alike: the synchronized panorama equals that of the region prompt alone.
    j = job(env, steps=2, w=20.0, sync_steps=1)
    loss = env.pack.assets.get_lpips(torch.device("cpu"))
    synced = run(env, region(env, env.a, torch.ones(1, PX_H, PX_W), fraction=0.5, regions=env.bg), vae=env.vae,
                 j=j, loss=loss)
    alone = run(env, env.a, vae=env.vae, j=j, loss=loss)
    assert far(alone, single(env, "a", 2), 1e-3), "synchronization must move this panorama"
    assert close(synced, alone, 1e-3)


# ----------------------------------------------------------------------------- bad input, before sampling

def _no_model_call(env, positive, match, batch=1, vae=None):
    model, calls = spied(env.model)
    with pytest.raises(ValueError, match=match):
        run(env, positive, model=model, batch=batch, vae=vae)
    assert calls == []


def test_masks_leaving_pixels_without_a_prompt_and_no_background_fail_before_sampling(env):
    positive = region(env, env.b, px_mask(cols=slice(192, 256)), regions=region(env, env.a, px_mask(cols=slice(0, 128))))
    _no_model_call(env, positive, r"leave 64 latent pixels with no prompt and there is no background prompt")


def test_a_mask_batch_that_does_not_match_the_latent_batch_fails_before_sampling(env):
    masks = torch.ones(3, PX_H, PX_W)
    _no_model_call(env, region(env, env.a, masks, regions=env.bg), r"region 1's mask has a batch of 3.*\(2\)",
                   batch=2)


def test_bootstrapping_without_a_vae_fails_before_sampling(env):
    _no_model_call(env, region(env, env.a, px_mask(cols=slice(0, 128)), 0.2, regions=env.bg), "vae is required")


@pytest.mark.parametrize("where", ["region", "positive", "negative"])
def test_area_conditioning_with_bootstrapping_fails_before_sampling(env, where):
    set_area = stock_node(env.rt, "ConditioningSetArea")
    area = lambda c: set_area.append(c, 64, 64, 64, 0, 1.0)[0]  # noqa: E731
    left = px_mask(cols=slice(0, 128))
    positive = region(env, area(env.a) if where == "region" else env.a, left, 0.2,
                      regions=env.bg + (area(env.b) if where == "positive" else []))
    negative = env.neg + area(env.b) if where == "negative" else env.neg
    model, calls = spied(env.model)
    with pytest.raises(ValueError, match="area conditioning .* cannot be combined with bootstrapping"):
        run(env, positive, model=model, vae=env.vae, negative=negative)
    assert calls == []


def test_a_bad_mask_fails_in_the_node(env):
    with pytest.raises(ValueError, match="mask must be a MASK"):
        region(env, env.a, torch.ones(1, 1, 8, 8))


def test_through_the_executor_the_no_background_error_names_its_cause(env, run_prompt):
    prompt = h.panorama_prompt(objects=(env.model, env.a, env.neg, env.vae), width=PX_W, height=PX_H, seed=1,
                               cfg=CFG, window_size=WIN_PX, stride=STRIDE_PX, sync_weight=0.0, sync_steps=0,
                               window_batch=8, positive=["reg", 0])
    prompt.update({
        "canvas": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": PX_W, "height": PX_H}},
        "half": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": PX_W // 2, "height": PX_H}},
        "left": {"class_type": "MaskComposite", "inputs": {
            "destination": ["canvas", 0], "source": ["half", 0], "x": 0, "y": 0, "operation": "add"}},
        "reg": {"class_type": "LayoutMaskRegion", "inputs": {
            "conditioning": ["pos", 0], "mask": ["left", 0], "bootstrap_fraction": 0.0, "soft_mask": False}}})
    with pytest.raises(h.PromptExecutionError) as ei:
        run_prompt(prompt)
    assert ei.value.node_id == "sampler" and ei.value.exception_type.endswith("ValueError")
    assert "leave 128 latent pixels with no prompt and there is no background prompt" in ei.value.exception_message
