"""The real model sizes the GPU benchmarks build with random weights, in one place.

Importing this module needs neither torch nor ComfyUI: scripts that hand a configuration to a child process read it
before ComfyUI starts. ``write_sd2_base_checkpoint`` imports ComfyUI when called (after ``comfy_headless.bootstrap``).
"""
from __future__ import annotations

#: SD 2.0-base's UNet (865 M parameters), as ``comfy.supported_models.SD20`` takes it.
SD2_BASE_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False, "context_dim": 1024,
    "use_linear_in_transformer": True, "num_head_channels": 64, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
#: SDXL's UNet (2.57 B parameters).
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
#: Flux.1 [dev] (11.9 B parameters).
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
            "txt_ids_dims": []}
#: SD's KL VAE (4 latent channels), the ``ddconfig`` of ``AutoencoderKL``.
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def write_sd2_base_checkpoint(path, seed: int = 0) -> None:
    """A random-weight checkpoint of SD 2.0-base's size (the UNet in fp16, the KL VAE) written with ComfyUI's own
    ``save_checkpoint``, for graphs that load it with ``CheckpointLoaderSimple`` as a user's would be loaded.
    Needs ComfyUI started and ``scripts/`` on ``sys.path`` (``tiny_models``)."""
    import torch

    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from tiny_models import init_weights_

    mc = comfy.supported_models.SD20(dict(SD2_BASE_UNET))
    mc.set_inference_dtype(torch.float16, None)
    base = mc.get_model({})
    init_weights_(base.diffusion_model, seed)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    params = {"embed_dim": 4, "ddconfig": SD_VAE}
    net = AutoencoderKL(**params)
    init_weights_(net, seed + 1)
    vae = comfy.sd.VAE(sd=net.state_dict(), config={"params": params})
    comfy.sd.save_checkpoint(str(path), model, vae=vae, metadata={"syncdiffusion": "random SD2-base-size"})
