"""Panorama From Photo in real ComfyUI graphs: photo -> canvas -> VAE Encode + Set Latent Noise Mask (or
InpaintModelConditioning) -> SyncDiffusion Sampler, on the micro SD1.x UNet, a micro SD1.5 inpainting UNet, a tiny
Flux.1 Fill and the small KL VAE.

The kept part of the final latent is the encoded photo wherever the noise mask is 0 (also across the 360° seam),
within the rounding of ``process_latent_in``/``out`` (stock KSampler carries the same); with the photo as the anchor,
sync brings the generated windows closer to it by LPIPS; a 'kept region' anchor is the window the photo covers most;
an inpainting model's concatenated mask and masked-image latent reach the model cropped to each window.
"""
import pytest
import torch

from layout_helpers import MICRO_UNET

pytestmark = pytest.mark.slow  # every test executes graphs

W_PX, H_PX, WIN_PX, STRIDE_PX = 256, 64, 64, 32  # 7 windows of 8 latent px every 4
SEED = 11


def make_photo(h_px: int = 64, w_px: int = 64, seed: int = 0) -> torch.Tensor:
    """A structured photo: smooth colour ramps with a few stripes (what a perceptual distance can tell apart from a
    random model's output)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h_px)[:, None].expand(h_px, w_px)
    x = torch.linspace(0, 1, w_px)[None].expand(h_px, w_px)
    stripes = (torch.sin(x * 18.0 + y * 6.0) > 0.3).float()
    rgb = torch.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y * (1 - stripes * 0.6), 0.8 - 0.5 * x * y], -1)
    return (rgb + 0.02 * torch.rand(h_px, w_px, 3, generator=g)).clamp(0, 1)[None]


def canvas_node(image, **kw) -> dict:
    inputs = {"image": image, "width": W_PX, "height": H_PX, "projection": "flat", "placement": "left",
              "offset_x": 0, "offset_y": 0, "fov": 90.0, "yaw": 0.0, "pitch": 0.0, "feather": 8}
    inputs.update(kw)
    return {"class_type": "PanoramaPhotoCanvas", "inputs": inputs}


def sampler_node(latent, *, sync: float, anchor=None, wrap=False, steps=3, positive=("2", 0), negative=("3", 0),
                 **kw) -> dict:
    inputs = {"model": ["1", 0], "positive": list(positive), "negative": list(negative), "vae": ["4", 0],
              "latent_image": latent, "seed": SEED, "steps": steps, "cfg": 5.0, "window_size": WIN_PX,
              "stride": STRIDE_PX, "sync_weight": sync, "sync_decay": 0.95, "sync_steps": steps, "sync_every": 1,
              "wrap": wrap, "window_batch": 8, "loss_decoder": "vae"}
    if anchor is not None:
        inputs["anchor"] = anchor
    inputs.update(kw)
    return {"class_type": "SyncDiffusionSampler", "inputs": inputs}


def custom_sampler_nodes(comfy, latent, *, sync: float, anchor=None, wrap=False, steps=3) -> dict:
    """SamplerCustomAdvanced (node "10") with CFG, BasicScheduler's 'normal' sigmas (ending at 0) and the
    SyncDiffusion SAMPLER: the path on which the last x is the last (masked) x0."""
    from test_custom_sampling import widgets
    sampler = {"window_size": WIN_PX, "stride": STRIDE_PX, "sync_weight": sync, "sync_decay": 0.95,
               "sync_steps": steps, "sync_every": 1, "wrap": wrap, "window_batch": 8, "loss_decoder": "vae",
               "vae": ["4", 0]}
    if anchor is not None:
        sampler["anchor"] = anchor
    return {
        "12": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 5.0}},
        "13": {"class_type": "BasicScheduler", "inputs": widgets(comfy, "BasicScheduler", {
            "model": ["1", 0], "scheduler": "normal", "steps": steps, "denoise": 1.0})},
        "14": {"class_type": "SyncDiffusionCustomSampler", "inputs": sampler},
        "15": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["15", 0], "guider": ["12", 0], "sampler": ["14", 0], "sigmas": ["13", 0],
            "latent_image": latent}},
    }


def noise_mask_graph(object_node, model, vae, micro, photo, *, sync: float, reference: bool, canvas: dict | None = None,
                     wrap: bool = False, steps: int = 3, comfy=None, anchor: dict | None = None) -> dict:
    """photo -> canvas -> VAE Encode + Set Latent Noise Mask -> the SyncDiffusion Sampler node (node "10"), or,
    given ``comfy``, the SyncDiffusion SAMPLER in SamplerCustomAdvanced. ``reference``: the photo as the Anchor
    Selector's reference image; ``anchor``: the Anchor Selector's inputs instead."""
    prompt = {
        "1": object_node(model, "MODEL"), "2": object_node(micro.positive, "CONDITIONING"),
        "3": object_node(micro.negative, "CONDITIONING"), "4": object_node(vae, "VAE"),
        "5": object_node(photo, "IMAGE"),
        "6": canvas or canvas_node(["5", 0]),
        "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["6", 0], "vae": ["4", 0]}},
        "8": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["7", 0], "mask": ["6", 1]}},
    }
    if reference:
        anchor = {"mode": "reference image", "index": 0, "image": ["5", 0]}
    link = None if anchor is None else ["9", 0]
    if comfy is None:
        prompt["10"] = sampler_node(["8", 0], sync=sync, anchor=link, wrap=wrap, steps=steps)
    else:
        prompt.update(custom_sampler_nodes(comfy, ["8", 0], sync=sync, anchor=link, wrap=wrap, steps=steps))
    if anchor is not None:
        prompt["9"] = {"class_type": "AnchorSelector", "inputs": anchor}
    return prompt


def latent_noise_mask(mask: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The noise mask at the latent's size, as ComfyUI's sampler resizes it."""
    import comfy.sampler_helpers
    return comfy.sampler_helpers.prepare_mask(mask, latent.shape, latent.device)


#: The float rounding of ``x * scale_factor / scale_factor`` on latents of magnitude up to a few units (SD1.x's
#: scale factor 0.18215); stock KSampler's kept region is off by about 2e-7 here.
ROUNDING = 2e-6


def assert_kept_is_the_encoded_photo(encoded: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    lm = latent_noise_mask(mask, encoded)
    keep = lm == 0
    assert keep.any() and (~keep).any()
    off = float((out - encoded)[keep].abs().max())
    assert off <= ROUNDING, f"the kept part of the final latent is {off:.3g} away from the encoded photo"
    moved = (out - encoded).abs()[lm == 1]
    assert float(moved.max()) > 1e-2, "the part to generate did not change"
    return keep


@pytest.fixture(scope="module")
def graphs(comfy, micro, tiny_kl_vae, lpips_trunk):
    return comfy, micro, tiny_kl_vae


@pytest.mark.parametrize("sync", [0.0, 20.0], ids=["sync_off", "sync_on"])
def test_the_kept_region_is_the_encoded_photo(graphs, run_prompt, object_node, sync):
    comfy, micro, vae = graphs
    prompt = noise_mask_graph(object_node, micro.model, vae, micro, make_photo(), sync=sync, reference=sync > 0,
                              steps=2, comfy=comfy)
    prompt["11"] = {"class_type": "KSampler", "inputs": {  # stock ComfyUI on the same masked latent
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["8", 0], "seed": SEED,
        "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    result = run_prompt(prompt)
    encoded, out, mask = result["7"][0]["samples"], result["10"][0]["samples"], result["6"][1]
    assert mask.shape == (1, H_PX, W_PX)
    keep = assert_kept_is_the_encoded_photo(encoded, out, mask)
    assert keep[..., :6].all() and not keep[..., 8:].any()  # the photo's 64 px = 8 latent px, less its feather
    stock = result["11"][0]["samples"]
    assert float((stock - encoded)[keep].abs().max()) <= ROUNDING  # what stock KSampler achieves: the same


def test_the_sampler_node_keeps_the_encoded_photo(graphs, run_prompt, object_node):
    comfy, micro, vae = graphs
    result = run_prompt(noise_mask_graph(object_node, micro.model, vae, micro, make_photo(), sync=0.0,
                                         reference=False, steps=2))
    assert_kept_is_the_encoded_photo(result["7"][0]["samples"], result["10"][0]["samples"], result["6"][1])


def test_360_canvas_wraps_and_keeps_the_photo_across_the_seam(graphs, run_prompt, object_node):
    comfy, micro, vae = graphs
    canvas = canvas_node(["5", 0], width=256, height=128, projection="equirectangular", fov=80.0, yaw=180.0,
                         pitch=0.0, feather=4)
    result = run_prompt(noise_mask_graph(object_node, micro.model, vae, micro, make_photo(48, 64), sync=20.0,
                                         reference=True, canvas=canvas, wrap=True, steps=2, comfy=comfy))
    encoded, out, mask = result["7"][0]["samples"], result["10"][0]["samples"], result["6"][1]
    keep = assert_kept_is_the_encoded_photo(encoded, out, mask)
    assert keep[..., 0].any() and keep[..., -1].any()  # the photo straddles the seam: kept on both sides
    assert not keep[..., keep.shape[-1] // 2].any()


@pytest.mark.parametrize("case", ["flat_mask_input", "360_noise_mask"])
def test_a_kept_region_anchor_is_the_window_the_photo_covers_most(graphs, pack, run_prompt, object_node, case):
    """The Anchor Selector's 'kept region' mode samples exactly as the index anchor of the window the photo covers
    most, found here from the geometry. A flat photo at the canvas' right edge: the last window (6 of 7; the
    centre anchor, 3, gives another result), from the mask input, through the sampler node. A 360° photo looking
    across the seam (yaw 180) on the wrapped 24-window canvas: the middle row's window centred on the seam (row 1,
    column 7: index 15), from the latent's noise mask, through the SAMPLER and ComfyUI's denoise mask."""
    comfy, micro, vae = graphs
    kept = {"mode": "kept region", "index": 0}
    if case == "flat_mask_input":
        canvas, photo, wrap, custom, expected = canvas_node(["5", 0], placement="right"), make_photo(), False, None, 6
        kept["mask"] = ["6", 1]
    else:
        canvas = canvas_node(["5", 0], width=256, height=128, projection="equirectangular", fov=80.0, yaw=180.0,
                             pitch=0.0, feather=4)
        photo, wrap, custom, expected = make_photo(48, 64), True, comfy, 15
        window = pack.windows.plan_windows(16, 32, WIN_PX // 8, STRIDE_PX // 8, wrap=True)[expected]
        assert (window.top, window.left, window.wraps) == (4, 28, True)  # rows 4..12, columns 28..36 (mod 32)

    def sampled(anchor: dict) -> torch.Tensor:
        result = run_prompt(noise_mask_graph(object_node, micro.model, vae, micro, photo, sync=20.0, reference=False,
                                             canvas=canvas, wrap=wrap, steps=2, comfy=custom, anchor=anchor))
        return result["10"][0]["samples"]

    by_kept = sampled(kept)
    assert torch.equal(by_kept, sampled({"mode": "index", "index": expected}))
    if case == "flat_mask_input":
        assert not torch.equal(by_kept, sampled({"mode": "center", "index": 0}))


def decoded_windows(pack, vae, latent: torch.Tensor, windows) -> torch.Tensor:
    """The windows of ``latent`` decoded, (len(windows), 3, h, w) in [-1, 1]."""
    crop = pack.windows.crop
    with torch.no_grad():
        crops = torch.cat([crop(latent, w) for w in windows])
        return vae.decode(crops).movedim(-1, 1) * 2.0 - 1.0


def test_sync_toward_the_photo_brings_the_generated_windows_closer_to_it(graphs, pack, run_prompt, object_node, lpips):
    """The tiny-model proxy of the coherence benchmark: LPIPS (the random-trunk VGG the sync uses) between each
    window that is mostly generated and the photo fitted to the window, sync on vs off, same seed."""
    comfy, micro, vae = graphs
    photo = make_photo()
    off = run_prompt(noise_mask_graph(object_node, micro.model, vae, micro, photo, sync=0.0, reference=False,
                                      steps=4))
    on = run_prompt(noise_mask_graph(object_node, micro.model, vae, micro, photo, sync=20.0, reference=True,
                                     steps=4))
    plan = pack.windows.plan_windows(H_PX // 8, W_PX // 8, WIN_PX // 8, STRIDE_PX // 8)
    keep = pack.photo.keep_mask_for_latent(on["6"][1], H_PX // 8, W_PX // 8)
    generated = [w for w in plan if float(pack.windows.crop(keep, w).mean()) < 0.25]
    assert len(generated) >= 4
    target = pack.sync.Anchor(mode="image", image=photo.movedim(-1, 1) * 2 - 1).fitted(WIN_PX, WIN_PX).image
    dist = {}
    for name, result in (("off", off), ("on", on)):
        images = decoded_windows(pack, vae, result["10"][0]["samples"], generated)
        with torch.no_grad():
            dist[name] = lpips(images, target.expand(len(generated), -1, -1, -1)).flatten()
    assert float(dist["on"].mean()) < float(dist["off"].mean()), dist
    assert int((dist["on"] < dist["off"]).sum()) >= len(generated) - 1, dist  # nearly every window, not one


# ----------------------------------------------------------------------------- an inpainting model

@pytest.fixture(scope="module")
def inpaint_model(comfy):
    """A micro SD1.5 inpainting UNet: 9 input channels (the latent, the mask, the masked photo's latent), which
    ComfyUI's model config recognises as an inpainting model."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from devtools import models as tm
    mc = tm.model_config("sd15")
    mc.unet_config.update({**MICRO_UNET, "in_channels": 9})
    mc.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():
        model = mc.get_model({})
        tm.init_weights_(model.diffusion_model, 21)
    assert model.concat_keys == ("mask", "masked_image")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def capturing(model, seen: list):
    """A clone of ``model`` whose UNet wrapper records each call's (x, c_concat)."""
    m = model.clone()

    def wrapper(apply, args):
        c = args["c"]
        seen.append((args["input"].detach().clone(), c["c_concat"].detach().clone()))
        return apply(args["input"], args["timestep"], **c)

    m.set_model_unet_function_wrapper(wrapper)
    return m


def inpaint_graph(object_node, model, vae, micro, photo, sampler: dict) -> dict:
    return {
        "1": object_node(model, "MODEL"), "2": object_node(micro.positive, "CONDITIONING"),
        "3": object_node(micro.negative, "CONDITIONING"), "4": object_node(vae, "VAE"),
        "5": object_node(photo, "IMAGE"), "6": canvas_node(["5", 0]),
        "7": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "vae": ["4", 0], "pixels": ["6", 0], "mask": ["6", 1],
            "noise_mask": True}},
        "10": sampler,
    }


@pytest.fixture(scope="module")
def inpainting_models(graphs, inpaint_model):
    """name -> (model, VAE, conditioning, channels of its concat conditioning): the micro SD1.5 inpainting UNet
    (mask 1 + masked latent 4) and a tiny Flux.1 Fill (masked latent 16 + the mask's 8x8 pixels as 64 channels;
    its first layer takes 4 x 96 = 384 features per 2x2 patch)."""
    from devtools import families as fm
    _, micro, vae = graphs
    fill = fm.build("flux_fill")
    assert fill.model.model.diffusion_model.img_in.in_features == 384
    fill_vae = fm.build_vae("kl16", encoder=True)  # the photo's latent differs from the grey's
    return {"sd15_inpaint": (inpaint_model, vae, micro, 5), "flux_fill": (fill.model, fill_vae, fill, 80)}


@pytest.mark.parametrize("sync", [0.0, 20.0], ids=["sync_off", "sync_on"])
@pytest.mark.parametrize("name", ["sd15_inpaint", "flux_fill"])
def test_an_inpainting_model_sees_its_concat_conditioning_cropped_to_each_window(graphs, pack, run_prompt,
                                                                                 object_node, inpainting_models,
                                                                                 name, sync):
    """InpaintModelConditioning's concat_latent_image and concat_mask reach the model as each window's own crop of
    what stock KSampler gives it for the whole canvas (the crop equal to the canvas' slice), sync off and on."""
    model, vae, conds, channels = inpainting_models[name]
    photo = make_photo()
    # the whole canvas' concat conditioning, as stock KSampler gives it to the model (one step)
    full_seen = []
    ks = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "positive": ["7", 0], "negative": ["7", 1], "latent_image": ["7", 2], "seed": SEED,
        "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    run_prompt(inpaint_graph(object_node, capturing(model, full_seen), vae, conds, photo, ks))
    full = full_seen[0][1][:1]
    assert full.shape == (1, channels, H_PX // 8, W_PX // 8)
    mask = full[:, 0] if name == "sd15_inpaint" else full[:, 16:].mean(1)  # the mask channel(s)
    assert mask.min() == 0 and mask.max() == 1  # the photo kept, the rest generated

    seen = []
    sampler = sampler_node(["7", 2], sync=sync, positive=("7", 0), negative=("7", 1), steps=2)
    result = run_prompt(inpaint_graph(object_node, capturing(model, seen), vae, conds, photo, sampler))
    plan = pack.windows.plan_windows(H_PX // 8, W_PX // 8, WIN_PX // 8, STRIDE_PX // 8)
    crops = [pack.windows.crop(full, w) for w in plan]
    assert len({tuple(c.flatten().tolist()) for c in crops}) == len(plan)  # the windows' crops all differ
    matched = set()
    for x, concat in seen:
        assert concat.shape[-2:] == (WIN_PX // 8, WIN_PX // 8) and concat.shape[0] == x.shape[0]
        for row in concat:
            hits = [i for i, c in enumerate(crops) if torch.equal(row[None], c)]
            assert hits, "a window's concat conditioning is no crop of the canvas'"
            matched.update(hits)
    assert matched == set(range(len(plan)))  # every window got its own crop
    assert torch.isfinite(result["10"][0]["samples"]).all()


def test_the_node_refuses_bad_input_by_name_before_any_work(pack):
    node = pack.photo_nodes.PanoramaPhotoCanvas
    good = dict(image=make_photo(), width=256, height=64, projection="flat", placement="left", offset_x=0, offset_y=0,
                fov=70.0, yaw=0.0, pitch=0.0, feather=8)
    canvas, mask = node.execute(**good).args
    assert canvas.shape == (1, 64, 256, 3) and mask.shape == (1, 64, 256)
    for change, message in ((dict(image="photo.png"), "image must be an IMAGE"),
                            (dict(projection="cubemap"), "projection must be one of 'flat', 'equirectangular'"),
                            (dict(placement="middle"), "placement must be one of"),
                            (dict(width=32768, height=32768), "Panorama From Photo"),
                            (dict(fov=float("nan")), "fov must be"),
                            (dict(projection="equirectangular", pitch=float("nan")), "pitch must be")):
        with pytest.raises(ValueError, match=message):
            node.execute(**{**good, **change})
