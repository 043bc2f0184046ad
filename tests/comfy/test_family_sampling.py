"""Every model family through the pack's sampler (issue 12): sync off and on end to end, pixel sizes in the node's
units, w = 0 equal to sync off, the schedule the family expects, clear refusals. Tiny random-weight models of each
family built through ComfyUI's own classes (``devtools.families``); the gradient of each family's sync step is checked
against finite differences in ``test_families.py``.

Canvas: 4 x 8 latent px of the family's own scale (so 32 x 64 px for SD, 64 x 128 for Flux.2, 128 x 256 for
HunyuanImage 2.1), windows of 4 latent px every 2: three windows, 2 DDIM steps, 1 sync step.
"""
import math

import pytest
import torch

from devtools import harness as h

FAMILIES = ["sd15", "sd20_v", "sdxl", "sdxl_edm", "sd3", "flux", "chroma", "flux2", "qwen_image", "lumina2",
            "hunyuan_image"]


@pytest.fixture(scope="module")
def fm(comfy):
    from devtools import families as family_models
    return family_models


def family(fm, name):
    if name not in fm.available():
        pytest.skip(f"this ComfyUI has no {name} family")
    return fm.build(name)


def run(pack, fam, lpips, *, w, sync_steps=1, latent=None, **kw):
    scale = int(fam.vae.spacial_compression_decode())
    job = h.make_job(pack, w=w, sync_steps=sync_steps, seed=7, steps=2, cfg=2.0, window_px=4 * scale,
                     stride_px=2 * scale, **kw)
    latent = latent if latent is not None else {"samples": fam.latent(4 * scale, 8 * scale)}
    with torch.inference_mode():
        return pack.sampling.sample_panorama(fam.model, fam.positive, fam.negative, latent, job, vae=fam.vae,
                                             loss=lpips)["samples"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_sync_off_and_on_end_to_end(pack, fm, lpips, name):
    fam = family(fm, name)
    scale = int(fam.vae.spacial_compression_decode())
    off = run(pack, fam, lpips, w=0.0)
    zero = run(pack, fam, lpips, w=0.0, sync_steps=2)
    on = run(pack, fam, lpips, w=200.0)
    empty = fam.latent(4 * scale, 8 * scale)
    for out in (off, on):
        assert out.shape == empty.shape and torch.isfinite(out).all()
    assert torch.equal(off, zero)  # w = 0 is MultiDiffusion
    assert float((on - off).abs().max()) > 0, "the sync step must move the windows"
    with torch.inference_mode():
        image = pack.decode.decode_panorama_image(fam.vae, on, wrap=False)
    assert tuple(image.shape[-3:]) == (4 * scale, 8 * scale, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux2", "hunyuan_image"])
def test_a_panorama_latent_in_pixels_keeps_its_pixel_size(pack, run_prompt, fm, name):
    """Panorama Latent makes an 8 px grid; for a 16 px (Flux.2) or 32 px (HunyuanImage 2.1) model the sampler
    resizes the empty canvas, so a 256 px wide canvas decodes to 256 px."""
    fam = family(fm, name)
    scale = int(fam.vae.spacial_compression_decode())
    result = run_prompt(h.panorama_prompt(
        objects=(fam.model, fam.positive, fam.negative, fam.vae), width=8 * scale, height=4 * scale, seed=1, steps=1,
        cfg=2.0, window_size=4 * scale, stride=2 * scale, sync_weight=0.0, sync_steps=0,
        decode=("PanoramaDecode", {"wrap": False, "padding": 0, "tile_width": 0, "tile_overlap": 0})))
    assert "downscale_ratio_spacial" not in result["sampler"][0]
    assert tuple(result["dec"][0].shape[1:3]) == (4 * scale, 8 * scale)


@pytest.mark.parametrize("name", ["sd15", "sdxl_edm", "flux", "qwen_image"])
def test_the_schedule_starts_and_ends_where_the_family_expects(pack, fm, name):
    fam = family(fm, name)
    ms = fam.model.get_model_object("model_sampling")
    sigmas = pack.families.sampling_sigmas(fam.model, 10)
    assert len(sigmas) == 11 and bool((sigmas[1:] < sigmas[:-1]).all())
    kind = pack.families.schedule_kind(ms)
    if kind == "vp":  # the reference DDIM: timestep 901 first, ending on timestep 0's sigma
        assert float(sigmas[-1]) == pytest.approx(float(ms.sigmas[0]))
        assert float(ms.timestep(sigmas[:1]).round()) == 901
    else:  # flow / EDM: ComfyUI's default, from the model's largest sigma to 0
        assert float(sigmas[0]) == pytest.approx(float(ms.sigma_max)) and float(sigmas[-1]) == 0.0
    half = pack.families.sampling_sigmas(fam.model, 5, denoise=0.5)
    assert torch.allclose(half, pack.families.sampling_sigmas(fam.model, 10)[-6:])


@pytest.mark.slow
def test_flux_canvas_positions_change_the_result_and_block_checkpointing_does_not(pack, fm, lpips):
    fam = family(fm, "flux")
    local = run(pack, fam, lpips, w=200.0)
    canvas = run(pack, fam, lpips, w=200.0, positions="canvas")
    assert float((canvas - local).abs().max()) > 1e-4  # each window sees its place on the canvas
    checkpointed = run(pack, fam, lpips, w=200.0, checkpoint_model=True)
    rel = float((checkpointed - local).norm() / local.norm())
    assert rel < 1e-5, rel


def test_canvas_positions_are_refused_for_a_model_without_the_rope_hook(pack, fm, lpips):
    fam = family(fm, "sd15")
    with pytest.raises(ValueError, match="positions 'canvas'.*SD15"):
        run(pack, fam, lpips, w=0.0, positions="canvas")


def test_a_latent_of_another_layout_is_refused_naming_the_family(pack, fm, lpips):
    """A latent of the wrong layout for the family is refused before sampling, naming the family."""
    fam = family(fm, "flux")
    with pytest.raises(ValueError, match="Flux expects latents of shape"):
        run(pack, fam, lpips, w=0.0, latent={"samples": torch.ones(1, 4, 4, 8)})


def test_sync_weight_is_a_step_in_the_models_input_space(pack, fm):
    """The sync step's input scale per family: 1/sqrt(1+sigma^2) for SD, 1 for flow models."""
    for name, want in (("sd15", lambda s: 1 / math.sqrt(1 + s * s)), ("flux", lambda s: 1.0)):
        ms = family(fm, name).model.get_model_object("model_sampling")
        for sigma in (0.5, 3.0):
            assert pack.families.input_scale(ms, torch.tensor(sigma)) == pytest.approx(want(sigma), rel=1e-6)
