"""The offline coherence benchmark: its closed-form ideal denoiser, its schedule, and a quick smoke run."""
import math

import numpy as np
import pytest
import torch

from bench import coherence as C

DEFAULT_DTYPE = torch.float32  # whatever another test module left set (tests/conftest.py)


def _brute_force_posterior_mean(x: np.ndarray, sigma: float, data: np.ndarray) -> np.ndarray:
    """E[y | x] for y uniform over ``data`` and x = y + sigma * eps, one term at a time."""
    log_lik = [-float(((x - y) ** 2).sum()) / (2 * sigma**2) for y in data]
    top = max(log_lik)
    weights = [math.exp(v - top) for v in log_lik]
    total = sum(weights)
    return sum(w / total * y for w, y in zip(weights, data))


def test_closed_form_denoiser_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    data = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    x = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64) * 1.5
    sigmas = torch.tensor([0.3, 1.0, 2.5, 40.0], dtype=torch.float64)
    got = C.IdealDenoiser(data)(x, sigmas)
    assert got.shape == x.shape and got.dtype == torch.float64
    for i in range(4):
        want = _brute_force_posterior_mean(x[i].numpy(), float(sigmas[i]), data.double().numpy())
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-10, atol=1e-12)
    # the limits: tiny noise snaps to the nearest sample, huge noise gives the data mean
    d = C.IdealDenoiser(data)
    near = data[2] + 0.01 * torch.randn(3, 4, 4, generator=g)
    torch.testing.assert_close(d(near[None], 1e-3)[0], data[2])
    torch.testing.assert_close(d(near[None], 1e4)[0], data.mean(0), rtol=1e-4, atol=1e-4)


def test_closed_form_denoiser_is_differentiable():
    g = torch.Generator().manual_seed(1)
    d = C.IdealDenoiser(torch.rand(5, 3, 2, 2, generator=g))
    x = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: d(t, torch.tensor([0.7, 2.0], dtype=torch.float64)), (x,))


def test_schedule_is_ddim_on_sd_betas_ending_clean():
    s = C.ddim_sigmas(50)
    assert s.shape == (51,) and s[-1] == 0 and torch.all(s[1:] < s[:-1])
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ac = np.cumprod(1 - betas)
    for i, t in ((0, 981), (1, 961), (49, 1)):
        assert float(s[i]) == pytest.approx(math.sqrt((1 - ac[t]) / ac[t]), rel=1e-5)
    assert C.ddim_sigmas(5).shape == (6,)


def test_crops_come_from_the_bundled_images():
    crops = C.load_crops(window=32, short_side=48, crop_stride=16, names=("astronaut", "camera"))
    # 48x48 each: 2x2 crops per image at stride 16
    assert crops.shape == (8, 3, 32, 32)
    assert crops.min() >= -1 and crops.max() <= 1 and crops.std() > 0.1
    grey = crops[4:]  # camera is a grey image: equal channels
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


@pytest.mark.slow
def test_benchmark_smoke_two_seeds_few_steps():
    data = C.load_crops(window=32, short_side=48, crop_stride=8, names=("coffee", "brick"))
    setup = C.Setup(steps=4)
    res = C.run_benchmark([0, 1], (2,), 20.0, setup, data=data, log=lambda *_: None)
    assert [s["sync_steps"] for s in res["settings"]] == [0, 2]
    for s in res["settings"]:
        assert len(s["intra_lpips"]) == 2 and np.all(np.isfinite(s["intra_lpips"]))
        assert np.all(np.isfinite(s["intra_style_l"])) and np.all(np.array(s["intra_lpips"]) > 0)
    a, b = res["images"].values()
    assert a.shape == b.shape == (2, 3, 32, 128) and torch.isfinite(b).all()
    assert not torch.allclose(a, b)  # synchronization changed the panoramas
    table = C.markdown_table(res)
    assert "MultiDiffusion" in table and "sync_steps = 2" in table
    assert "relu1_1" in C.layer_table(res) and len(res["settings"][1]["colour_spread"]) == 2


def test_crop_spreads_separate_colour_from_contrast():
    g = torch.Generator().manual_seed(2)
    crop = torch.rand(3, 8, 8, generator=g) - 0.5
    shifted = torch.cat([crop, crop + 0.2, crop, crop], dim=-1)[None]  # one crop brighter by 0.2
    colour, contrast = C.crop_spreads(shifted, 8)
    # 3 of the 6 pairs differ by 0.2 in each of the 3 channel means: 3 * 3 * 0.04 / 6
    assert colour[0] == pytest.approx(3 * 3 * 0.04 / 6) and contrast[0] == pytest.approx(0, abs=1e-12)
    scaled = torch.cat([crop, crop * 2, crop, crop], dim=-1)[None]
    colour, contrast = C.crop_spreads(scaled, 8)
    assert contrast[0] > 0
