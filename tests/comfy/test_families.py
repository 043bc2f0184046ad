"""Every still-image family ComfyUI supports, through tiny random-weight models built with ComfyUI's own classes
(``devtools/families.py``): model facts, forward passes, schedules, positions, and the sync gradient checked
against finite differences (``tests/family_checks.py``). Families this ComfyUI lacks are skipped."""
import math

import pytest
import torch

FAMILY_NAMES = ["sd15", "sd15_inpaint", "sd20", "sd20_v", "sdxl", "sdxl_v", "sdxl_edm", "sd3", "sd35", "flux",
                "flux_fill", "flux_schnell", "chroma", "flux2", "qwen_image", "lumina2", "zimage", "hunyuan_image"]

#: (latent channels, latent dims, px per latent px, patch, native px, default stride px, schedule, rope shift)
EXPECTED = {
    "sd15": (4, 2, 8, 1, 512, 128, "vp", False),
    "sd15_inpaint": (4, 2, 8, 1, 512, 128, "vp", False),
    "sd20": (4, 2, 8, 1, 512, 128, "vp", False),
    "sd20_v": (4, 2, 8, 1, 768, 192, "vp", False),
    "sdxl": (4, 2, 8, 1, 1024, 256, "vp", False),
    "sdxl_v": (4, 2, 8, 1, 1024, 256, "vp", False),
    "sdxl_edm": (4, 2, 8, 1, 1024, 256, "edm", False),
    "sd3": (16, 2, 8, 2, 1024, 256, "flow", False),
    "sd35": (16, 2, 8, 2, 1024, 256, "flow", False),
    "flux": (16, 2, 8, 2, 1024, 256, "flow", True),
    "flux_fill": (16, 2, 8, 2, 1024, 256, "flow", True),
    "flux_schnell": (16, 2, 8, 2, 1024, 256, "flow", True),
    "chroma": (16, 2, 8, 2, 1024, 256, "flow", False),
    "flux2": (128, 2, 16, 1, 1024, 256, "flow", True),
    "qwen_image": (16, 3, 8, 2, 1024, 256, "flow", False),
    "lumina2": (16, 2, 8, 2, 1024, 256, "flow", True),
    "zimage": (16, 2, 8, 2, 1024, 256, "flow", True),
    "hunyuan_image": (64, 2, 32, 1, 2048, 512, "flow", False),
}
#: Families whose ComfyUI blocks add into saved activations in place (plain autograd refuses them).
IN_PLACE_BLOCKS = {"flux", "flux_fill", "flux_schnell", "chroma", "flux2", "hunyuan_image"}
#: Gradient checks run in the quick suite: one per kind of problem (UNet; EDM latent-format constants; in-place
#: DiT blocks; 5-D latents and the Wan VAE). The others are marked slow (several seconds each on 2 cores).
QUICK_GRADIENTS = {"sd15", "sdxl_edm", "flux", "qwen_image"}
SLOW_GRADIENTS = set(FAMILY_NAMES) - QUICK_GRADIENTS


@pytest.fixture(scope="module")
def comfy_ready():
    """ComfyUI importable in --cpu mode (conftest bootstraps it); no nodes or pack needed here."""
    try:
        import comfy.supported_models  # noqa: F401
    except ImportError as e:  # pragma: no cover
        pytest.fail(f"ComfyUI is not importable: {e}")


@pytest.fixture(scope="module")
def fm(comfy_ready):
    from devtools import families as family_models
    return family_models


@pytest.fixture(scope="module")
def fc(comfy_ready):
    import family_checks
    return family_checks


@pytest.fixture(scope="module")
def families(comfy_ready):
    from syncdiff_core.comfy import families
    return families


def _family(fm, name, **kw):
    if name not in fm.available():
        pytest.skip(f"this ComfyUI has no {fm.FAMILIES[name].cls}")
    return fm.build(name, **kw)


def test_every_expected_family_is_built(fm):
    """ComfyUI 0.3.75 and later have all of them; a family missing from the builders' table would go untested."""
    import comfy.supported_models as sm
    assert set(FAMILY_NAMES) == set(fm.FAMILIES) == set(EXPECTED)
    for cls in ("SD15", "SD20", "SDXL", "SD3", "Flux", "FluxSchnell", "Chroma", "Flux2", "QwenImage", "Lumina2",
                "ZImage", "HunyuanImage21"):
        assert hasattr(sm, cls), cls
    assert fm.available() == FAMILY_NAMES


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_facts(fm, families, name):
    fam = _family(fm, name)
    f = families.facts(fam.model, fam.vae)
    channels, dims, scale, patch, native, stride, schedule, rope = EXPECTED[name]
    assert (f.latent_channels, f.latent_dims, f.pixel_scale, f.patch) == (channels, dims, scale, patch)
    assert (f.native_px, f.default_stride_px, f.schedule) == (native, stride, schedule)
    assert f.family == fm.FAMILIES[name].cls
    assert families.pixel_scale(fam.model) == scale  # without the VAE: the format's ratio or the known table
    assert families.rope_shift_supported(fam.model) is rope
    assert f.default_stride_px % (scale * patch) == 0 and f.native_px % (scale * patch) == 0


def test_sd_v_prediction_fine_tune_stays_at_512(fm, families):
    """768 px is for SD2.x v-prediction checkpoints (SD20 config + V_PREDICTION from detection), not for every
    v-prediction model on SD's latent format (SD1.x v fine-tunes are 512 px models)."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models as sm
    spec = fm.FAMILIES["sd15"]
    mc = sm.SD15(fm.unet_config_for(spec))
    mc.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(mc, model_type=comfy.model_base.ModelType.V_PREDICTION)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    assert families.native_px(patcher) == 512
    assert families.native_px(_family(fm, "sd20_v").model) == 768


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_forward_and_pixel_size(fm, name):
    """Two KSampler steps and a decode: the latent keeps the family's layout, the image is exactly the asked
    pixel size (a non-square 64 x 96 px canvas), everything finite."""
    import comfy.sample
    fam = _family(fm, name)
    with torch.inference_mode():
        latent = comfy.sample.fix_empty_latent_channels(fam.model, fam.latent(64, 96))
        noise = comfy.sample.prepare_noise(latent, 3)
        out = comfy.sample.sample(fam.model, noise, 2, 2.0, "euler", "simple", fam.positive, fam.negative, latent,
                                  seed=3, disable_pbar=True)
        image = fam.vae.decode(out)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert out.abs().max() > 0
    assert tuple(image.shape[-3:]) == (64, 96, 3) and torch.isfinite(image).all()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_schedule_start_and_end(fm, families, name):
    fam = _family(fm, name)
    ms = fam.model.get_model_object("model_sampling")
    kind = families.schedule_kind(ms)
    for steps in (4, 30, 50):
        sigmas = families.sampling_sigmas(fam.model, steps)
        assert len(sigmas) == steps + 1  # ComfyUI's ddim_uniform gives 31 steps for 30
        assert torch.all(sigmas[:-1] > sigmas[1:])
        if kind == "vp":
            ratio = len(ms.sigmas) // steps
            assert float(sigmas[0]) == pytest.approx(float(ms.sigmas[(steps - 1) * ratio + 1]))
            assert float(sigmas[-1]) == pytest.approx(float(ms.sigmas[0]))  # the reference's last step: t = 0
        else:
            assert float(sigmas[0]) == pytest.approx(float(ms.sigma_max), rel=1e-5)
            assert float(sigmas[-1]) == 0.0
    if kind == "vp":  # 50 steps: 981, 961, ..., 1, as diffusers' DDIM with steps_offset=1
        sigmas = families.sampling_sigmas(fam.model, 50)
        assert float(sigmas[0]) == pytest.approx(float(ms.sigmas[981]))
        assert float(sigmas[-2]) == pytest.approx(float(ms.sigmas[1]))
    if kind == "flow":
        assert float(ms.sigma_max) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["sd15", "sdxl_edm", "flux", "qwen_image"])
def test_start_state_and_final_latent(fm, families, name):
    fam = _family(fm, name)
    ms = fam.model.get_model_object("model_sampling")
    kind = families.schedule_kind(ms)
    sigmas = families.sampling_sigmas(fam.model, 10)
    g = torch.Generator().manual_seed(0)
    shape = fam.latent(32, 32).shape
    noise, latent = torch.randn(shape, generator=g), torch.zeros(shape)
    at_max = math.isclose(float(ms.sigma_max), float(sigmas[0]), rel_tol=1e-5)  # as ComfyUI's Sampler.max_denoise
    x = families.start_state(ms, sigmas, noise, latent, at_max)
    if kind == "flow":
        assert torch.equal(x, noise)  # (1 - σ)·x0 + σ·ε at σ = 1
        image = torch.randn(shape, generator=g)
        noised = ms.noise_scaling(torch.tensor(0.25), noise, image)
        assert torch.allclose(noised, 0.75 * image + 0.25 * noise)
    else:  # unit-variance noise in the model's input space
        s0 = float(sigmas[0])
        assert torch.allclose(x, noise * math.sqrt(1 + s0 ** 2), rtol=1e-5)
    final = families.final_latent(ms, sigmas, x)
    if kind == "vp":
        s = float(sigmas[-1])
        assert torch.allclose(final, x / math.sqrt(1 + s ** 2), rtol=1e-6)
    else:
        assert torch.equal(final, x)  # σ = 0: nothing to undo (no 1/√(σ_min²+σ_data²) for EDM)


def test_input_scale_per_family(fm, families):
    """The sync step is taken in the model's input space: VP 1/√(1+σ²), flow 1, EDM 1/√(σ²+σ_data²)."""
    for name, expect in (("sd15", lambda s: 1 / math.sqrt(1 + s * s)), ("flux", lambda s: 1.0),
                         ("sdxl_edm", lambda s: 1 / math.sqrt(s * s + 0.25))):
        fam = _family(fm, name)
        ms = fam.model.get_model_object("model_sampling")
        for sigma in (0.5, float(families.sampling_sigmas(fam.model, 10)[0])):
            assert families.input_scale(ms, sigma) == pytest.approx(expect(sigma), rel=1e-5)


def test_unsupported_models_are_refused_by_name(fm, families):
    import comfy.supported_models as sm
    fam = _family(fm, "qwen_image")
    five_d = fam.latent(32, 32)
    assert families.check_supported(fam.model, five_d, sync=True, vae=fam.vae).latent_dims == 3
    video = torch.zeros(1, 16, 5, 4, 4)
    with pytest.raises(families.UnsupportedModelError, match="QwenImage.*5 frames"):
        families.check_supported(fam.model, video, sync=True)
    families.check_supported(fam.model, video, sync=False)  # windows over H, W without sync
    with pytest.raises(families.UnsupportedModelError, match=r"expects latents of shape \(batch, 16, frames"):
        families.check_supported(fam.model, torch.zeros(1, 16, 4, 4), sync=False)
    with pytest.raises(families.UnsupportedModelError, match="VAE has 4 latent channels"):
        families.check_supported(fam.model, five_d, sync=True, vae=_family(fm, "sd15").vae)
    # an audio model (ACE-Step's latents are 2-D, so only its family tells): refused before any sampling
    cfg = sm.ACEStep({"audio_model": "ace"})
    audio = type("M", (), {"model": type("Inner", (), {"model_config": cfg, "latent_format": cfg.latent_format})()})()
    with pytest.raises(families.UnsupportedModelError, match="ACEStep makes audio"):
        families.check_supported(audio, torch.zeros(1, 8, 16, 64), sync=False)


@pytest.mark.parametrize("name", ["flux", "flux2", "lumina2", "qwen_image", "sd3"])
def test_canvas_positions(fm, fc, families, name):
    """With canvas positions a window's RoPE positions are shifted by its place on the canvas (ComfyUI's
    ``rope_options`` hook); at the canvas origin nothing changes; families without the hook ignore it."""
    fam = _family(fm, name)
    patch = families.patch_size(fam.model)

    def run(ctx):
        sigma = ctx.sigmas[1:2]
        x = ctx.model_sampling.noise_scaling(sigma, ctx.noise, ctx.latent)
        with torch.no_grad():
            local = ctx.denoise(x, sigma)
            origin = ctx.denoise(x, sigma, families.with_canvas_positions(ctx.model_options, 0, 0, patch))
            placed = ctx.denoise(x, sigma, families.with_canvas_positions(ctx.model_options, 8, 40, patch))
        return local, origin, placed

    local, origin, placed = fc.in_sampler(fam, run)
    assert torch.equal(local, origin)
    moved = (placed - local).abs().max() / local.abs().max()
    if families.rope_shift_supported(fam.model):
        assert moved > 1e-4
    else:
        assert moved == 0


def test_canvas_positions_add_to_user_rope_options(families):
    options = {"transformer_options": {"rope_options": {"shift_x": 3.0, "scale_x": 2.0}}, "other": 1}
    out = families.with_canvas_positions(options, 4, 10, 2)
    assert out["transformer_options"]["rope_options"] == {"shift_x": 8.0, "shift_y": 2.0, "scale_x": 2.0}
    assert options["transformer_options"]["rope_options"] == {"shift_x": 3.0, "scale_x": 2.0}  # not modified
    assert out["other"] == 1


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_GRADIENTS else n
                                  for n in sorted(IN_PLACE_BLOCKS)])
def test_in_place_blocks_need_the_remedy(fm, fc, name):
    """Documents ComfyUI: plain autograd through these families' blocks fails. If this starts failing, ComfyUI
    stopped adding into saved activations and the copies / recompute may be unnecessary there."""
    fam = _family(fm, name, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        fc.in_sampler(fam, lambda ctx: fc.gradient_vs_finite_differences(ctx, mechanism="plain", directions=0))


def _check_gradient(fc, fam, mechanism):
    r = fc.in_sampler(fam, lambda ctx: fc.gradient_vs_finite_differences(ctx, mechanism=mechanism))
    g = float(r["grad"].norm())
    assert g > 1e-4 and math.isfinite(g)
    # ComfyUI casts the model output to float32 (BaseModel._apply_model), so differences are good to ~1e-4 |g|
    for analytic, numeric in r["pairs"]:
        assert abs(analytic - numeric) <= 2e-3 * g, (analytic, numeric, g)
    return r


def _gradient_params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_GRADIENTS else n for n in FAMILY_NAMES]


@pytest.mark.parametrize("name", _gradient_params())
def test_sync_gradient_matches_finite_differences(fm, fc, name):
    """The gradient of an LPIPS-like loss through CFG-guided x0 = D(x, σ), process_latent_out and the family's VAE
    decoder w.r.t. the window latent equals central finite differences (float64 models built under inference
    mode, the pack's trainable_weights + gradient_section, activations saved as copies)."""
    fam = _family(fm, name, dtype=torch.float64)
    r = _check_gradient(fc, fam, "copies")
    assert r["stats"].copies > 0


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n != "flux" else n
                                  for n in ["flux", "flux2", "chroma", "hunyuan_image", "qwen_image", "sd3"]])
def test_checkpointed_blocks_gradient_matches_finite_differences(fm, fc, name):
    """Block checkpointing through ``patches_replace["dit"]`` (recompute in backward) gives the same gradient, and
    its patches were really used."""
    fam = _family(fm, name, dtype=torch.float64)
    r = _check_gradient(fc, fam, "checkpoint")
    assert r["patches"] and r["patches"][0].calls >= 1
    assert r["stats"].copies == 0


def test_float32_gradient_agrees_with_float64(fm, fc):
    """The realistic case (float32 weights made under inference mode): same gradient as the float64 twin."""
    r32 = fc.in_sampler(_family(fm, "flux"), lambda c: fc.gradient_vs_finite_differences(c, directions=0))
    r64 = fc.in_sampler(_family(fm, "flux", dtype=torch.float64),
                        lambda c: fc.gradient_vs_finite_differences(c, directions=0))
    a, b = r32["grad"].double(), r64["grad"]
    assert (a - b).norm() <= 1e-3 * b.norm()


def test_five_d_decoder_output_becomes_images(fm, families):
    fam = _family(fm, "qwen_image")
    with torch.inference_mode():
        decoded = fam.vae.first_stage_model.decode(torch.zeros(1, 16, 1, 4, 6))
    assert decoded.shape == (1, 3, 1, 32, 48)
    assert families.images_for_loss(decoded).shape == (1, 3, 32, 48)
    assert families.images_for_loss(torch.zeros(2, 3, 3, 8, 8)).shape == (6, 3, 8, 8)
    with pytest.raises(ValueError, match="not images"):
        families.images_for_loss(torch.zeros(3, 8, 8))


@pytest.mark.parametrize("name", ["sd15", "flux", "flux2"])
def test_decoder_input_is_comfyuis_prefix(fm, families, name):
    """The decoder module's input, taken from ComfyUI's own decode: for every KL-type VAE (with or without
    post_quant_conv, with Flux.2's batch-norm latent) decoding it equals the VAE's decode, with gradients."""
    fam = _family(fm, name)
    fsm = fam.vae.first_stage_model
    z = torch.randn(fam.latent(32, 32).shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(False), fc_weights(fsm):
        z = z.clone().requires_grad_(True)
        h = families.decoder_input(fsm, z)
        assert h.requires_grad and h.shape[1] == fsm.decoder.conv_in.in_channels
        assert torch.allclose(fsm.decoder(h), fsm.decode(z), atol=1e-6)
        # the pack's block-checkpointed walk (loss_decoder vae_checkpointed) starts there: same images
        from syncdiff_core.decoders import checkpointed_decode, is_walkable
        assert is_walkable(fsm)
        assert torch.allclose(checkpointed_decode(fsm.decoder, h), fsm.decode(z), atol=1e-6)
    assert not fsm.decoder._forward_pre_hooks


def fc_weights(module):
    from family_checks import trainable_weights
    return trainable_weights(module)


def test_prepare_latent_resizes_empty_latents_to_the_models_grid(fm, families):
    """An empty LATENT made at 8 px (EmptyLatentImage, Panorama Latent) is resized to the model's own grid: by
    ComfyUI 0.33's fix_empty_latent_channels, by ``prepare_latent`` itself on 0.3.75 (which cannot). A latent without
    the ratio key, or with content, keeps its shape."""
    fam = _family(fm, "flux2")
    empty = {"samples": torch.zeros(1, 4, 16, 24), "downscale_ratio_spacial": 8}
    assert families.prepare_latent(fam.model, empty).shape == (1, 128, 8, 12)  # 128 x 192 px at 16 px per latent px
    assert families.prepare_latent(fam.model, {"samples": torch.zeros(1, 4, 16, 24)}).shape == (1, 128, 16, 24)
    full = {"samples": torch.ones(1, 128, 16, 24), "downscale_ratio_spacial": 8}
    assert families.prepare_latent(fam.model, full).shape == (1, 128, 16, 24)
    qwen = families.prepare_latent(_family(fm, "qwen_image").model, {"samples": torch.zeros(1, 4, 16, 24)})
    assert qwen.shape == (1, 16, 1, 16, 24)
