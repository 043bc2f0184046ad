"""Seams of 360° images (issue 13, part 3): the seam score, the band a repair redoes, the circular encode, and the
seam repair node through ComfyUI's executor on the micro UNet and the tiny KL VAE."""
import pytest
import torch
import torch.nn.functional as F

from devtools import harness as h
from syncdiff_core.panorama_decode import encode_panorama
from syncdiff_core.seams import band_weights, seam_score

H_PX, W_PX = 64, 256


def ramp_image(width=W_PX, height=H_PX, seed=0) -> torch.Tensor:
    """A smooth IMAGE whose brightness climbs from 0.2 to 0.8 across the width, with a little texture: its left and
    right edges do not meet (a hard seam of 0.6)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.8, width).reshape(1, 1, width, 1)
    texture = F.avg_pool2d(torch.rand(1, 3, height, width, generator=g), 5, 1, 2).movedim(1, -1) * 0.05
    return (ramp + texture).expand(1, height, width, 3).clamp(0, 1).contiguous()


def periodic_image(width=W_PX, height=H_PX) -> torch.Tensor:
    x = torch.arange(width) * 2 * torch.pi / width
    row = 0.5 + 0.3 * torch.sin(x) + 0.1 * torch.cos(3 * x)
    return row.reshape(1, 1, width, 1).expand(1, height, width, 3).contiguous()


def test_seam_score_is_about_one_for_a_loop_and_large_for_a_hard_seam():
    seamless = float(seam_score(periodic_image())[0])
    assert 0.5 < seamless < 1.5
    assert float(seam_score(ramp_image())[0]) > 20 * seamless
    rolled = torch.roll(periodic_image(), W_PX // 3, dims=2)  # any roll of a loop is still a loop
    assert abs(float(seam_score(rolled)[0]) - seamless) < 0.5


def test_seam_score_needs_a_few_columns():
    with pytest.raises(ValueError, match="at least 18 px wide"):
        seam_score(torch.rand(1, 8, 10, 3))


def test_band_weights_are_one_inside_zero_outside_and_ramp_between():
    w = band_weights(64, band=16, feather=8)
    assert torch.equal(w[24:40], torch.ones(16))
    assert torch.equal(w[:16], torch.zeros(16)) and torch.equal(w[48:], torch.zeros(16))
    ramp = w[16:24]
    assert bool((ramp > 0).all() and (ramp < 1).all() and (ramp[1:] > ramp[:-1]).all())
    assert torch.equal(w, w.flip(0))  # symmetric about the centre
    off = band_weights(64, band=16, feather=0, centre=8)
    assert torch.equal(off.nonzero().flatten(), torch.arange(0, 16))


@pytest.mark.parametrize("band,feather,match", [(60, 4, "band_width"), (0, 4, "band_width"), (8, -1, "feather")])
def test_band_weights_refuse_what_does_not_fit(band, feather, match):
    with pytest.raises(ValueError, match=match):
        band_weights(64, band, feather)


def test_circular_encode_rolls_with_the_image():
    """A translation-equivariant encoder with zero padding (a 3x3 convolution, then 8x8 average pooling): with
    circular padding its latent of a rolled image is the rolled latent, exactly; without, the borders differ."""
    kernel = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def encode(image):  # IMAGE (B, H, W, 3) -> latent (B, 4, H/8, W/8)
        return F.avg_pool2d(F.conv2d(image.movedim(-1, 1), kernel, padding=1), 8)

    image = torch.rand(1, 32, 128, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = encode_panorama(encode, image, 8, wrap=True, padding=2)
    assert z.shape == (1, 4, 4, 16)
    rolled = encode_panorama(encode, torch.roll(image, 40, dims=2), 8, wrap=True, padding=2)
    assert torch.allclose(rolled, torch.roll(z, 5, dims=-1), rtol=0, atol=1e-12)
    plain = encode_panorama(encode, torch.roll(image, 40, dims=2), 8, wrap=False)
    assert not torch.allclose(plain, torch.roll(encode(image), 5, dims=-1), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the VAE's 8 px"):
        encode_panorama(encode, image[:, :, :100], 8)


def test_panorama_encode_node(run_prompt, object_node, tiny_kl_vae):
    image = ramp_image()
    out = {}
    for wrap in (True, False):
        prompt = {"1": object_node(image, "IMAGE"), "2": object_node(tiny_kl_vae, "VAE"),
                  "3": {"class_type": "PanoramaEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0], "wrap": wrap,
                                                                   "padding": 4}}}
        out[wrap] = run_prompt(prompt)["3"][0]["samples"]
    assert out[True].shape == (1, 4, H_PX // 8, W_PX // 8)
    with torch.inference_mode():
        plain = tiny_kl_vae.encode(image)
    assert torch.allclose(out[False], plain)
    # the circular context changes the border columns most (the KL encoder's GroupNorm and attention see the whole
    # padded image, so the middle moves a little too)
    diff = (out[True] - plain).abs().mean(dim=(0, 1, 2))
    borders = torch.cat([diff[:2], diff[-2:]]).mean()
    assert borders > 2 * diff[8:-8].mean(), diff


def repair_prompt(object_node, micro, vae, image, **kw) -> dict:
    inputs = {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["4", 0], "image": ["5", 0],
              "seed": 3, "steps": 3, "cfg": 5.0, "denoise": 0.8, "band_width": 64, "feather": 16,
              "window_size": 64, "stride": 32, "window_batch": 8}
    inputs.update(kw)
    return {"1": object_node(micro.model, "MODEL"), "2": object_node(micro.positive, "CONDITIONING"),
            "3": object_node(micro.negative, "CONDITIONING"), "4": object_node(vae, "VAE"),
            "5": object_node(image, "IMAGE"), "6": {"class_type": "PanoramaSeamRepair", "inputs": inputs},
            "7": {"class_type": "PanoramaSeamScore", "inputs": {"image": ["6", 0]}}}


@pytest.mark.slow
def test_seam_repair_changes_only_the_band_and_lowers_the_seam_score(run_prompt, object_node, micro, tiny_kl_vae):
    image = ramp_image()
    result = run_prompt(repair_prompt(object_node, micro, tiny_kl_vae, image))
    repaired, band = result["6"]
    assert repaired.shape == image.shape and band.shape == (1, H_PX, W_PX)
    untouched = band[0, 0] == 0
    assert untouched[W_PX // 2] and not untouched[0] and not untouched[-1]  # the band sits on the border
    assert torch.equal(repaired[:, :, untouched], image[:, :, untouched])  # bit for bit
    assert float((repaired[:, :, ~untouched] - image[:, :, ~untouched]).abs().max()) > 1e-2
    before, after = float(seam_score(image)[0]), result["7"][0]
    assert after < before / 4, (before, after)


def test_seam_repair_refuses_bad_sizes_before_any_model_call(run_prompt, object_node, micro, tiny_kl_vae):
    calls = []
    model = micro.model.clone()
    model.set_model_unet_function_wrapper(lambda apply, args: calls.append(1) or apply(args["input"], args["timestep"],
                                                                                      **args["c"]))
    watched = type(micro)(model=model, positive=micro.positive, negative=micro.negative)
    cases = [(ramp_image(width=252), {}, "image"), (ramp_image(), {"band_width": 240}, "band_width"),
             (ramp_image(), {"stride": 72}, "stride (72 px)")]
    for image, kw, match in cases:
        with pytest.raises(h.PromptExecutionError) as info:
            run_prompt(repair_prompt(object_node, watched, tiny_kl_vae, image, **kw))
        assert match in info.value.exception_message, info.value.exception_message
    assert calls == []
