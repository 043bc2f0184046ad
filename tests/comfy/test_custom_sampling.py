"""SyncDiffusion as a SAMPLER in ComfyUI's custom sampling graphs (SamplerCustomAdvanced / SamplerCustom), and
img2img at denoise < 1 with the sampler node (issue 13, parts 1 and 2).

Every graph runs through ComfyUI's executor on the micro SD1.x UNet (conftest ``micro``). The expected values come
from stock ComfyUI: the sampler node's own result on the same schedule, and stock Euler (KSAMPLER) on a canvas of
one window, where windowing must change nothing.
"""
import math

import pytest
import torch

from devtools import harness as h

H, W, WIN, STRIDE = 8, 24, 8, 4  # latent px: 5 windows of 64 px every 32 px
CFG = 5.0
SEED = 17


def widgets(comfy, class_type: str, given: dict) -> dict:
    """``given`` plus the defaults of the node's other required widgets (inputs differ between ComfyUI versions)."""
    spec = comfy.nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()["required"]
    out = dict(given)
    for name, value in spec.items():
        if name in out or not isinstance(value, (list, tuple)) or len(value) < 1:
            continue
        kind, opts = value[0], (value[1] if len(value) > 1 else {})
        if "default" in opts:
            out[name] = opts["default"]
        elif isinstance(kind, (list, tuple)):  # a combo written as its list of options
            out[name] = kind[0]
        elif opts.get("options"):  # a V3 combo
            out[name] = opts["options"][0]
    return out


def sampler_node(**kw) -> dict:
    """The SyncDiffusion SAMPLER node's widgets (micro-sized windows)."""
    inputs = {"window_size": WIN * 8, "stride": STRIDE * 8, "sync_weight": 0.0, "sync_decay": 0.95, "sync_steps": 1,
              "sync_every": 1, "wrap": False, "window_batch": 8}
    inputs.update(kw)
    return {"class_type": "SyncDiffusionCustomSampler", "inputs": inputs}


def custom_graph(comfy, object_node, micro, *, guider: dict, sigmas: dict, sampler: dict, latent, noise=None,
                 vae=None) -> dict:
    """SamplerCustomAdvanced with the given guider / sigmas / sampler nodes; node "9" is the sampler node."""
    prompt = {
        "1": object_node(micro.model, "MODEL"),
        "2": object_node(micro.positive, "CONDITIONING"),
        "3": object_node(micro.negative, "CONDITIONING"),
        "4": object_node(latent, "LATENT"),
        "5": noise or {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "6": guider,
        "7": sigmas,
        "8": sampler,
        "9": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["5", 0], "guider": ["6", 0], "sampler": ["8", 0], "sigmas": ["7", 0], "latent_image": ["4", 0]}},
    }
    if vae is not None:
        prompt["10"] = object_node(vae, "VAE")
        prompt["8"]["inputs"]["vae"] = ["10", 0]
    return prompt


def cfg_guider(cfg=CFG) -> dict:
    return {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                  "cfg": cfg}}


def scheduler(comfy, steps=3, denoise=1.0, name="normal") -> dict:
    return {"class_type": "BasicScheduler",
            "inputs": widgets(comfy, "BasicScheduler", {"model": ["1", 0], "scheduler": name, "steps": steps,
                                                        "denoise": denoise})}


def zeros(h=H, w=W) -> dict:
    return {"samples": torch.zeros(1, 4, h, w)}


@pytest.mark.slow
def test_the_sampler_as_a_SAMPLER_equals_the_sampler_node_on_the_reference_schedule(
        comfy, pack, run_prompt, object_node, micro, tiny_kl_vae, lpips):
    steps = 3
    sigmas = pack.families.sampling_sigmas(micro.model, steps)
    custom = run_prompt(custom_graph(comfy, object_node, micro, guider=cfg_guider(),
                                     sigmas=object_node(sigmas, "SIGMAS"), latent=zeros(), vae=tiny_kl_vae,
                                     sampler=sampler_node(sync_weight=20.0, sync_steps=1)))
    output, denoised = custom["9"]
    job = h.make_job(pack, w=20.0, sync_steps=1, seed=SEED, steps=steps, cfg=CFG, window_px=WIN * 8,
                     stride_px=STRIDE * 8)
    node = h.sample(pack, micro.model, micro.positive, micro.negative, (1, 4, H, W), job, vae=tiny_kl_vae, loss=lpips)
    assert torch.isfinite(output["samples"]).all()
    rel = float((output["samples"] - node).norm() / node.norm())
    assert rel < 1e-5, rel
    free = h.sample(pack, micro.model, micro.positive, micro.negative, (1, 4, H, W),
                    h.make_job(pack, seed=SEED, steps=steps, cfg=CFG, window_px=WIN * 8, stride_px=STRIDE * 8),
                    vae=tiny_kl_vae)
    assert float((free - node).abs().max()) > 1e-4, "sync must have changed the result"
    assert not torch.equal(denoised["samples"], output["samples"])  # the last x0, not the last x at sigma_min > 0


@pytest.mark.slow
@pytest.mark.parametrize("guider", ["BasicGuider", "DualCFGGuider"])
def test_other_guiders_and_a_scheduler_schedule(comfy, run_prompt, object_node, micro, guider):
    """Any guider, BasicScheduler's sigmas (3 steps, ending at 0): the last fused x is the last fused x0, so
    SamplerCustomAdvanced's two outputs agree exactly."""
    inputs = {"model": ["1", 0]}
    if guider == "BasicGuider":
        inputs["conditioning"] = ["2", 0]
    else:
        inputs.update(cond1=["2", 0], cond2=["3", 0], negative=["3", 0], cfg_conds=CFG, cfg_cond2_negative=2.0)
    g = {"class_type": guider, "inputs": widgets(comfy, guider, inputs)}
    result = run_prompt(custom_graph(comfy, object_node, micro, guider=g, sigmas=scheduler(comfy, 3),
                                     sampler=sampler_node(), latent=zeros()))
    output, denoised = result["9"]
    assert output["samples"].shape == (1, 4, H, W) and torch.isfinite(output["samples"]).all()
    assert torch.allclose(output["samples"], denoised["samples"], rtol=0, atol=1e-6)
    assert float(output["samples"].std()) > 1e-3


@pytest.mark.slow
def test_one_window_at_denoise_half_equals_stock_euler(comfy, run_prompt, object_node, micro):
    """img2img: on a canvas of one window the windowed sampler is stock Euler (KSampler's sampler object),
    from the same start state (the input latent plus sigma0 times the noise) over the same sigmas."""
    latent = {"samples": torch.randn(1, 4, WIN, WIN, generator=torch.Generator().manual_seed(3))}
    out = {}
    for name, sampler in (("windowed", sampler_node()),
                          ("stock", {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}})):
        result = run_prompt(custom_graph(comfy, object_node, micro, guider=cfg_guider(), latent=latent,
                                         sigmas=scheduler(comfy, 4, denoise=0.5), sampler=sampler))
        out[name] = result["9"][0]["samples"]
    # float32 over |x| up to ~20: summation order (batched windows, threads) moves single elements by ~1e-4
    rel = float((out["windowed"] - out["stock"]).norm() / out["stock"].norm())
    assert rel < 1e-5, rel
    assert float((out["windowed"] - latent["samples"]).abs().max()) > 1e-3  # it did denoise


@pytest.mark.slow
def test_the_sampler_node_at_denoise_half_starts_and_steps_as_stock_euler(comfy, pack, run_prompt, object_node, micro):
    """The sampler node with denoise 0.5 on one window: stock Euler over the pack's reference schedule for 0.5
    (the last 4 of 8 DDIM steps), started as KSampler starts, gives the same latent up to the reference's last
    scaling to timestep 0 (x / sqrt(1 + sigma_min^2))."""
    latent = {"samples": torch.randn(1, 4, WIN, WIN, generator=torch.Generator().manual_seed(4))}
    sigmas = pack.families.sampling_sigmas(micro.model, 4, denoise=0.5)
    assert len(sigmas) == 5 and float(sigmas[0]) < float(pack.families.sampling_sigmas(micro.model, 8)[0])
    stock = run_prompt(custom_graph(comfy, object_node, micro, guider=cfg_guider(), latent=latent,
                                    sigmas=object_node(sigmas, "SIGMAS"),
                                    sampler={"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}))
    job = h.make_job(pack, seed=SEED, steps=4, cfg=CFG, window_px=WIN * 8, stride_px=STRIDE * 8, denoise=0.5)
    with torch.inference_mode():
        node = pack.sampling.sample_panorama(micro.model, micro.positive, micro.negative, latent, job)["samples"]
    want = stock["9"][0]["samples"] / math.sqrt(1 + float(sigmas[-1]) ** 2)
    rel = float((node - want).norm() / want.norm())
    assert rel < 1e-5, rel


@pytest.mark.slow
def test_a_latent_noise_mask_keeps_the_unmasked_part(comfy, run_prompt, object_node, micro):
    latent = torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, H * 8, W * 8)
    mask[..., W * 4:] = 1.0  # the right half of the canvas is redone
    result = run_prompt(custom_graph(comfy, object_node, micro, guider=cfg_guider(), sigmas=scheduler(comfy, 3, 0.6),
                                     sampler=sampler_node(), latent={"samples": latent, "noise_mask": mask}))
    out = result["9"][0]["samples"]
    assert torch.allclose(out[..., : W // 2], latent[..., : W // 2], rtol=0, atol=1e-5)
    assert float((out[..., W // 2 + 1:] - latent[..., W // 2 + 1:]).abs().max()) > 1e-2


def soft_mask(h=H, w=W) -> torch.Tensor:
    """A MASK that ramps from 0 (keep) on the left to 1 (redo) on the right: Differential Diffusion's input."""
    return torch.linspace(0.0, 1.0, w * 8).reshape(1, 1, w * 8).expand(1, h * 8, w * 8).contiguous()


def differential(comfy, graph: dict) -> dict:
    """``graph`` with ComfyUI's Differential Diffusion node between the model and the guider."""
    graph["11"] = {"class_type": "DifferentialDiffusion",
                   "inputs": widgets(comfy, "DifferentialDiffusion", {"model": ["1", 0]})}
    graph["6"]["inputs"]["model"] = ["11", 0]
    return graph


@pytest.mark.slow
def test_differential_diffusion_changes_the_result_and_matches_ksampler_on_one_window(
        comfy, run_prompt, object_node, micro):
    """A soft noise mask under ComfyUI's Differential Diffusion (``denoise_mask_function``): the windowed sampler
    applies it per window as KSampler's inpaint step does, so on a one-window canvas it equals stock Euler with the
    same mask and seed, and on a wide canvas it changes the result against the same mask without the node."""
    def run(h, w, sampler, dd):
        latent = {"samples": torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(6)),
                  "noise_mask": soft_mask(h, w)}
        graph = custom_graph(comfy, object_node, micro, guider=cfg_guider(), sigmas=scheduler(comfy, 4, 0.8),
                             sampler=sampler, latent=latent)
        return run_prompt(differential(comfy, graph) if dd else graph)["9"][0]["samples"]

    stock = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    windowed, want = run(WIN, WIN, sampler_node(), True), run(WIN, WIN, stock, True)
    rel = float((windowed - want).norm() / want.norm())
    assert rel < 1e-5, rel
    assert float((windowed - run(WIN, WIN, sampler_node(), False)).abs().max()) > 1e-3
    wide_dd, wide = run(H, W, sampler_node(), True), run(H, W, sampler_node(), False)
    assert float((wide_dd - wide).abs().max()) > 1e-3


def test_flipped_sigmas_are_refused_before_any_model_call(comfy, run_prompt, object_node, micro):
    calls = []
    model = micro.model.clone()
    model.set_model_unet_function_wrapper(lambda apply, args: calls.append(1) or apply(args["input"], args["timestep"],
                                                                                      **args["c"]))
    prompt = custom_graph(comfy, object_node, micro, guider=cfg_guider(), sampler=sampler_node(), latent=zeros(),
                          sigmas={"class_type": "FlipSigmas", "inputs": {"sigmas": ["11", 0]}})
    prompt["1"] = object_node(model, "MODEL")
    prompt["11"] = scheduler(comfy, 3)
    with pytest.raises(h.PromptExecutionError) as info:
        run_prompt(prompt)
    assert "sigmas must be strictly decreasing" in info.value.exception_message
    assert calls == []


def test_layout_regions_are_refused_by_the_SAMPLER_with_a_pointer_to_the_sampler_node(
        comfy, pack, run_prompt, object_node, micro):
    region = pack.layout_nodes.LayoutMaskRegion.execute(micro.positive, torch.ones(1, H * 8, W * 8), 0.0, False,
                                                        micro.negative).result[0]
    prompt = custom_graph(comfy, object_node, micro, guider=cfg_guider(), sigmas=scheduler(comfy, 2),
                          sampler=sampler_node(), latent=zeros())
    prompt["2"] = object_node(region, "CONDITIONING")
    with pytest.raises(h.PromptExecutionError) as info:
        run_prompt(prompt)
    assert "SyncDiffusion Sampler node" in info.value.exception_message


def test_sync_without_a_vae_is_refused_naming_the_input(comfy, run_prompt, object_node, micro):
    prompt = custom_graph(comfy, object_node, micro, guider=cfg_guider(), sigmas=scheduler(comfy, 2),
                          sampler=sampler_node(sync_weight=20.0), latent=zeros())
    with pytest.raises(h.PromptExecutionError) as info:
        run_prompt(prompt)
    assert "vae is required" in info.value.exception_message


def test_stride_errors_speak_pixels(comfy, run_prompt, object_node, micro):
    prompt = custom_graph(comfy, object_node, micro, guider=cfg_guider(), sigmas=scheduler(comfy, 2),
                          sampler=sampler_node(stride=WIN * 8 + 8), latent=zeros())
    with pytest.raises(h.PromptExecutionError) as info:
        run_prompt(prompt)
    message = info.value.exception_message
    assert "stride (72 px)" in message and "window size (64 px)" in message and "latent px" not in message


@pytest.mark.slow
def test_a_flux_graph_with_basic_guider_and_flux_guidance(comfy, run_prompt, object_node, lpips):
    """The graph Flux users build: FluxGuidance -> BasicGuider -> SamplerCustomAdvanced with the SyncDiffusion
    SAMPLER, BasicScheduler's sigmas for the model; synchronized, on a tiny Flux.1 (devtools/families.py)."""
    from devtools import families as family_models
    if "flux" not in family_models.available():
        pytest.skip("this ComfyUI has no Flux family")
    fam = family_models.build("flux")
    latent = {"samples": fam.latent(32, 96)}
    prompt = {
        "1": object_node(fam.model, "MODEL"), "2": object_node(fam.positive, "CONDITIONING"),
        "4": object_node(latent, "LATENT"), "5": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "12": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 3.5}},
        "6": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["12", 0]}},
        "7": scheduler(comfy, 2, name="simple"),
        "8": sampler_node(window_size=32, stride=16, sync_weight=20.0, sync_steps=1),
        "9": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["5", 0], "guider": ["6", 0], "sampler": ["8", 0], "sigmas": ["7", 0], "latent_image": ["4", 0]}},
        "10": object_node(fam.vae, "VAE"),
    }
    prompt["8"]["inputs"]["vae"] = ["10", 0]
    output, denoised = run_prompt(prompt)["9"]
    assert output["samples"].shape == latent["samples"].shape and torch.isfinite(output["samples"]).all()
    assert torch.allclose(output["samples"], denoised["samples"], rtol=0, atol=1e-5)  # the schedule ends at 0
