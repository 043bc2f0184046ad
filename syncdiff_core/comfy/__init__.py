"""The only package of the pack that touches ComfyUI internals; one job a module.

- ``model``: facts about a MODEL (latent scale, native window, schedule) and the gradient section;
- ``compile``: ``torch.compile`` of the diffusion model through ComfyUI's own compile wrapper;
- ``conds``: ComfyUI's processed conditioning cropped to windows (masks, areas, ControlNet hints);
- ``loss_decoders``: x0 -> image in [-1, 1] for the synchronization loss (VAE, checkpointed VAE, TAESD);
- ``assets``: the LPIPS trunk folder (``models/lpips``) and the perceptual networks on ComfyUI's device;
- ``layout``: layout regions and their bootstrapping;
- ``sampling``: the guider/sampler glue and ``sample_panorama``, the entry point of the sampler node;
- ``decode``: the seam-free panorama decode;
- ``output``: saving panoramas into ComfyUI's output folder.
"""
