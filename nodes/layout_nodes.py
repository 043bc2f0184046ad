"""Layout-guided panoramas: prompts bound to masks (MultiDiffusion's region-based generation)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from .inputs import expect
from ..syncdiff_core.regions import REGION_KEY, RegionSpec, as_mask
from .common import CATEGORY


class LayoutMaskRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayoutMaskRegion",
            display_name="Layout Mask Region",
            category=CATEGORY,
            description="Binds a prompt to a mask of the panorama. Chain regions, starting from the background "
                        "prompt, and connect the last one to the SyncDiffusion Sampler's positive input: each "
                        "region is denoised with its own prompt inside its mask, the background fills the rest.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The prompt of this region."),
                io.Mask.Input("mask", tooltip="Where the region goes; any size (it is resized to the canvas), "
                                              "white = inside. Binarized at 0.5 unless soft_mask is on."),
                io.Float.Input("bootstrap_fraction", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps during which the region's surroundings are "
                                       "replaced by a noised flat colour, so the object fits its mask tightly "
                                       "(MultiDiffusion: 20 of 50 steps). 0 = off."),
                io.Boolean.Input("soft_mask", default=False,
                                 tooltip="Keep the mask's grey levels as blending weights instead of "
                                         "binarizing it at 0.5."),
                io.Conditioning.Input("regions", optional=True,
                                      tooltip="The chain so far: the background prompt and/or earlier regions. "
                                              "An unmasked prompt in the chain is the background; it covers "
                                              "whatever no region covers."),
            ],
            outputs=[io.Conditioning.Output(display_name="regions",
                                            tooltip="The chain with this region added; connect to the next "
                                                    "region or to the sampler's positive input.")],
        )

    @classmethod
    def execute(cls, conditioning, mask: torch.Tensor, bootstrap_fraction: float, soft_mask: bool,
                regions=None) -> io.NodeOutput:
        expect(conditioning=(conditioning, "CONDITIONING"), mask=(mask, "MASK"), regions=(regions, "CONDITIONING?"))
        mask = as_mask(mask)
        spec = RegionSpec(bootstrap_fraction=bootstrap_fraction, soft=soft_mask)
        region = [[emb, {**opts, "mask": mask, "set_area_to_bounds": False, "mask_strength": 1.0, REGION_KEY: spec}]
                  for emb, opts in conditioning]
        return io.NodeOutput(list(regions or []) + region)


NODES = [LayoutMaskRegion]
