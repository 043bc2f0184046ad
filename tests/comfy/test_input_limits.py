"""Huge or non-finite inputs are refused before any work (issue 15): the canvas pixel limit on every node that makes,
samples, decodes or encodes a canvas, a finite cfg, and the coherence metric's crop limit. The oversized tensors here
are expanded views of one element: nothing of their size is ever allocated, so a refusal is the only way to pass."""
import pytest
import torch

from devtools import harness as h


def huge(*shape) -> torch.Tensor:
    """A tensor of ``shape`` that takes 4 bytes of memory (an expanded view)."""
    return torch.zeros([1] * len(shape)).expand(*shape)


def test_the_limit_is_a_pixel_count_in_the_widgets_units(pack):
    job = pack.job
    job.check_canvas_pixels(32768, 8192, 1)  # exactly the limit: one 32768x8192 px panorama
    job.check_canvas_pixels(2048, 2048, 64)
    with pytest.raises(ValueError) as info:
        job.check_canvas_pixels(32768, 8192, 2, "PanoramaLatent")
    message = str(info.value)
    assert message.startswith("PanoramaLatent: batch_size 2 x width 32768 x height 8192 px = 537 megapixels")
    assert "268 megapixels" in message and "lower width, height or batch_size" in message


def test_panorama_latent_refuses_a_canvas_beyond_the_limit(pack):
    node = pack.sampler_nodes.PanoramaLatent
    with pytest.raises(ValueError, match=r"PanoramaLatent: batch_size 64 x width 32768 x height 32768 px"):
        node.execute(width=32768, height=32768, batch_size=64)
    out = node.execute(width=128, height=64, batch_size=1).args[0]["samples"]
    assert out.shape == (1, 4, 8, 16)


def test_the_sampler_refuses_a_latent_beyond_the_limit_before_any_model_call(comfy, pack, micro, tiny_kl_vae):
    calls = []
    model = micro.model.clone()
    model.set_model_unet_function_wrapper(lambda apply, args: calls.append(1))
    job = h.make_job(pack, w=20.0, steps=1, window_px=64, stride_px=32)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"latent_image: batch 1 x width 65536 x height 8192"):
        pack.sampling.sample_panorama(model, micro.positive, micro.negative, {"samples": huge(1, 4, 1024, 8192)}, job,
                                      vae=tiny_kl_vae, loss=lambda a, b: calls.append(1))
    assert not calls


def test_decode_and_encode_refuse_pictures_beyond_the_limit(comfy, pack, tiny_kl_vae):
    decode = pack.decode
    with pytest.raises(ValueError, match=r"PanoramaDecode: the decoded image: batch 4 x width 16384 x height 8192"):
        decode.decode_panorama_image(tiny_kl_vae, huge(4, 4, 1024, 2048), wrap=True, padding=16)
    # a small canvas whose circular padding makes one decoded piece too large
    with pytest.raises(ValueError, match=r"one decoded piece with its padding: batch 64 x width 65664"):
        decode.decode_panorama_image(tiny_kl_vae, huge(64, 4, 1024, 16), wrap=True, padding=4096)
    with pytest.raises(ValueError, match=r"pixels \(with the circular padding\): batch 2 x width 32768 x height 8192"):
        decode.encode_panorama_image(tiny_kl_vae, huge(2, 8192, 32768 - 256, 3), wrap=True, padding=16)


@pytest.mark.parametrize("cfg", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_cfg_is_refused(pack, cfg):
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        h.make_job(pack, cfg=cfg)


@pytest.mark.parametrize("kw,match", [
    (dict(w=float("nan")), "sync_weight must be a finite number"),
    (dict(w=1.0, decay=float("nan")), "sync_decay"),
    (dict(denoise=float("nan")), "denoise"),
])
def test_nan_in_the_other_float_widgets_is_refused(pack, kw, match):
    with pytest.raises(ValueError, match=match):
        h.make_job(pack, **kw)


@pytest.mark.parametrize("fraction", [float("nan"), -0.1, 1.5])
def test_layout_region_refuses_a_bootstrap_fraction_outside_0_1(pack, micro, fraction):
    """NaN passes ComfyUI's range check; it used to fail later, inside the sampler, as 'cannot convert float NaN to
    integer'."""
    with pytest.raises(ValueError, match=r"bootstrap_fraction must be in \[0, 1\], got"):
        pack.layout_nodes.LayoutMaskRegion.execute(conditioning=micro.positive, mask=torch.ones(8, 16),
                                                   bootstrap_fraction=fraction, soft_mask=False)


def test_coherence_refuses_more_crops_than_it_compares(pack):
    metrics = pack.module("syncdiff_core.perceptual.metrics")
    assert metrics.crop_counts(512, 3072, 512) == (1, 6)
    with pytest.raises(ValueError, match=r"window_size 16 px cuts this 4096x4096 px image into 65536 crops "
                                         r"\(2,147,450,880 pairs\); at most 256 crops .* at least 248 px"):
        metrics.crop_counts(4096, 4096, 16)


def test_style_loss_in_chunks_of_pairs_equals_all_pairs_at_once(pack):
    """Intra-Style-L takes the pairs' Gram differences in bounded chunks (all at once they take 1 MB a pair at
    relu5_1): the mean is the same."""
    metrics = pack.module("syncdiff_core.perceptual.metrics")
    g = torch.Generator().manual_seed(0)
    feats = [torch.nn.Conv2d(3, c, 3, padding=1) for c in (4, 6)]
    style = lambda x: [torch.relu(f(x)) for f in feats]  # noqa: E731
    image = torch.rand(1, 3, 16, 16 * 20, generator=g) * 2 - 1  # 20 crops, 190 pairs: several chunks
    with torch.no_grad():
        got = metrics.intra_style_l(image, 16, style, chunk=2)
        crops = metrics.crop_grid(image, 16)[0]
        grams = [metrics.gram(f) for f in style(crops)]
        ii, jj = zip(*[(i, j) for i in range(20) for j in range(i + 1, 20)])
        want = sum(((gm[list(ii)] - gm[list(jj)]) ** 2).mean(dim=(1, 2)).mean() for gm in grams)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-9)


def _node_calls(pack, micro, vae):
    """Each node's execute with valid values for every input (the linked ones as a graph would pass them)."""
    image, latent = torch.rand(1, 64, 128, 3), {"samples": torch.zeros(1, 4, 8, 16)}
    mask, anchor = torch.ones(1, 8, 16), pack.sync.Anchor()
    sampler = dict(seed=1, steps=1, cfg=5.0, window_size=64, stride=32, sync_weight=0.0, sync_decay=0.95, sync_steps=0,
                   sync_every=1, wrap=False, window_batch=2)
    sn, dn, ln, mn = pack.sampler_nodes, pack.decode_nodes, pack.layout_nodes, pack.module("nodes.seam_nodes")
    return [
        (sn.SyncDiffusionSampler, dict(model=micro.model, positive=micro.positive, negative=micro.negative, vae=vae,
                                       latent_image=latent, anchor=anchor, **sampler)),
        (sn.SyncDiffusionCustomSampler, dict(vae=vae, anchor=anchor, **{k: v for k, v in sampler.items()
                                                                          if k not in ("seed", "steps", "cfg")})),
        (sn.AnchorSelector, dict(mode="reference image", index=0, image=image)),
        (ln.LayoutMaskRegion, dict(conditioning=micro.positive, mask=mask, bootstrap_fraction=0.2, soft_mask=False,
                                   regions=micro.negative)),
        (dn.PanoramaDecode, dict(samples=latent, vae=vae, wrap=True, padding=4, tile_width=0, tile_overlap=0)),
        (dn.PanoramaEncode, dict(pixels=image, vae=vae, wrap=True, padding=4)),
        (dn.SavePanorama360, dict(images=image, filename_prefix="never", format="png", jpeg_quality=95)),
        (mn.PanoramaSeamScore, dict(image=image)),
        (mn.PanoramaSeamRepair, dict(model=micro.model, positive=micro.positive, negative=micro.negative, vae=vae,
                                     image=image, seed=1, steps=1, cfg=5.0, denoise=0.5, band_width=32, feather=8,
                                     window_size=64, stride=32, window_batch=2)),
    ]


LINKED = ("model", "positive", "negative", "vae", "latent_image", "anchor", "image", "conditioning", "mask",
          "regions", "samples", "pixels", "images")


@pytest.mark.parametrize("literal", ["p_ckpt", 3, ["no_such_node"], {"samples": "x"}])
def test_a_literal_in_place_of_a_link_is_refused_by_name(comfy, pack, micro, tiny_kl_vae, literal):
    """ComfyUI hands a node whatever literal an API prompt puts where a link belongs; each pack node names the input
    and the type it needs, before any work (the valid calls are never made: every case here fails first)."""
    checked = 0
    for node, kwargs in _node_calls(pack, micro, tiny_kl_vae):
        for name in [n for n in kwargs if n in LINKED]:
            if literal == {"samples": "x"} and name != "samples" and name != "latent_image":
                continue
            bad = {**kwargs, name: literal}
            with pytest.raises(ValueError, match=rf"^{name} must be "):
                node.execute(**bad)
            checked += 1
    assert checked >= (2 if isinstance(literal, dict) else 20)


@pytest.mark.parametrize("window,decoder,sync,ok", [
    (8, "vae_checkpointed", True, False), (16, "vae_checkpointed", True, True), (8, "vae_checkpointed", False, True),
    (24, "vae_half", True, False), (32, "vae_half", True, True), (8, "taesd", True, False),
])
def test_windows_too_small_for_the_loss_decoder_are_refused_while_synchronizing(pack, window, decoder, sync, ok):
    """Found by the fuzzed prompts: an 8 px window ended in a GroupNorm ValueError or a torch RuntimeError inside the
    loss decoder; now the window_size widget is named, in pixels."""
    job = h.make_job(pack, w=20.0 if sync else 0.0, window_px=window, stride_px=8, loss_decoder=decoder)
    if ok:
        assert len(pack.job.plan_canvas(job, 8, 16, 8, 64, 8)) > 1
    else:
        with pytest.raises(ValueError, match=rf"window_size must be at least {32 if decoder == 'vae_half' else 16} px "
                                             rf"while synchronizing .* got {window} px"):
            pack.job.plan_canvas(job, 8, 16, 8, 64, 8)


@pytest.mark.parametrize("value", ["bogus", 0, None, "PNG"])
def test_combo_values_outside_the_options_are_refused(comfy, pack, value):
    """ComfyUI 0.3.75 does not check the options of V3 Combo inputs: the value reaches the node, which names it
    (before: an unknown format was saved as JPEG, an unknown anchor mode named the core's internal modes)."""
    ok, _, _, errors = comfy.validate({
        "1": h.object_node(torch.rand(1, 32, 64, 3), "IMAGE"),
        "2": {"class_type": "SavePanorama360", "inputs": {"images": ["1", 0], "filename_prefix": "combo",
                                                         "format": value, "jpeg_quality": 90}}})
    if ok:  # this ComfyUI lets it through; the node must refuse it
        with pytest.raises(ValueError, match=r"^format must be one of 'png', 'jpeg'; got"):
            pack.decode_nodes.SavePanorama360.execute(images=torch.rand(1, 32, 64, 3), filename_prefix="combo",
                                                      format=value, jpeg_quality=90)
    with pytest.raises(ValueError, match=r"^mode must be one of 'center', 'index', 'reference image', 'kept region'; "
                                         r"got"):
        pack.sampler_nodes.AnchorSelector.execute(mode=value, index=0)
    job = pack.job
    with pytest.raises(ValueError, match="loss_decoder must be one of"):
        job.Windowing(loss_decoder=value)
