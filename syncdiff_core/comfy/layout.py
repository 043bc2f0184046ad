"""Layout-guided generation in ComfyUI: LayoutMaskRegion conds resolved on the canvas, and MultiDiffusion's
bootstrapping of the regions' first steps (the plain-torch rules are in ``syncdiff_core.regions``)."""
from __future__ import annotations

import torch

from .. import regions as core_regions
from ..windows import WindowPlan, crop_stack


def prepare_layout(positive: list, latent: torch.Tensor, negative: list = ()) -> tuple[list, list]:
    """Resolve LayoutMaskRegion conds before sampling: their masks at latent size (binarized unless soft),
    empty ones dropped, and the background prompt(s) given the mask ``clip(1 - Σ m_fg, 0)``. Bootstrapping
    calls each prompt on whole windows, so it refuses area conditioning (positive or negative: ComfyUI copies
    an area to the other side).

    Returns the new positive conditioning and the region specs of the kept foreground regions."""
    regions = [i for i, (_, d) in enumerate(positive) if core_regions.REGION_KEY in d]
    if not regions:
        return positive, []
    n, (h, w) = latent.shape[0], latent.shape[-2:]
    masks = []
    for k, i in enumerate(regions):
        spec = positive[i][1][core_regions.REGION_KEY]
        masks.append(core_regions.mask_to_canvas(positive[i][1]["mask"], h, w, spec.soft, f"region {k + 1}'s mask"))
    backgrounds = [i for i, (_, d) in enumerate(positive) if i not in regions and "mask" not in d and "area" not in d]
    keep, bg_mask = core_regions.layout_masks(masks, n, has_background=bool(backgrounds))
    if any(positive[regions[k]][1][core_regions.REGION_KEY].bootstrap_fraction > 0 for k in keep) and any(
            "area" in d for _, d in list(positive) + list(negative or [])):
        raise ValueError("area conditioning (ConditioningSetArea, in a region, the positive or the negative "
                         "prompt) cannot be combined with bootstrapping layout regions; set the regions' "
                         "bootstrap_fraction to 0 or use masks (ConditioningSetMask)")
    out, specs = [], []
    for i, (emb, d) in enumerate(positive):
        if i in regions:
            k = regions.index(i)
            if k not in keep:
                continue
            d = {**d, "mask": masks[k], "set_area_to_bounds": False, "mask_strength": 1.0}
            specs.append(d[core_regions.REGION_KEY])
        elif i in backgrounds:
            d = {**d, "mask": bg_mask, "set_area_to_bounds": False, "mask_strength": 1.0}
        out.append([emb, d])
    return out, specs


class Bootstrap:
    """MultiDiffusion's bootstrapping: during a foreground region's first steps, its input outside its mask
    is a noised latent of a random flat-colour image. The colour latents are VAE-encoded once per run."""

    def __init__(self, model, vae, specs, plan: WindowPlan, n: int, seed: int, scale: int = 8, count: int = 8):
        g = torch.Generator().manual_seed(seed + 1)
        images = core_regions.flat_colour_images(count, plan.window_height * scale, plan.window_width * scale, g)
        self.latents = model.model.process_latent_in(vae.encode(images)).to(torch.float32)
        self.noise = torch.randn((n, self.latents.shape[1], plan.canvas_height, plan.canvas_width), generator=g)
        self.longest = max(spec.bootstrap_fraction for spec in specs)
        self.generator = torch.Generator().manual_seed(seed + 2)
        self.n = n

    def active(self, step: int, steps: int) -> bool:
        return step < int(round(self.longest * steps))

    def denoise(self, guider, window_conds, x, sigma, windows, step, steps, model_options, seed):
        """Per-region predictions (bootstrapped inputs for foreground regions still bootstrapping), fused with
        the regions' masks as weights."""
        pick = torch.randint(len(self.latents), (x.shape[0],), generator=self.generator)
        noise = crop_stack(self.noise, windows, self.n).to(x)
        # noised as the model's sampling noises (x0 + sigma * noise for SD, (1 - sigma) * x0 + sigma * noise for flow)
        background = guider.inner_model.model_sampling.noise_scaling(sigma, noise, self.latents[pick].to(x))
        total = torch.zeros_like(x)
        weight = torch.zeros_like(x[:, :1])
        for conds, mask, strength, spec in window_conds.region_calls(windows):
            inp = x
            if mask is not None and spec is not None and step < spec.bootstrap_steps(steps):
                inp = core_regions.bootstrap_input(x, mask, background)
            guider.conds = conds
            x0 = guider(inp, sigma, model_options=model_options, seed=seed)
            m = (torch.ones_like(weight) if mask is None else mask.to(x)) * strength
            total = total + m * x0
            weight = weight + m
        return total / weight.clamp_min(1e-8)
