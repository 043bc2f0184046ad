"""The only package of the pack that touches ComfyUI internals; one job a module.

- ``run_plan``: a run prepared once (``prepare_run``): every rule that needs the model and the canvas, the window
  plan, the gradient patcher and LPIPS;
- ``sampling``: ``WindowedSampler`` (a ComfyUI sampler over the core's loop) and ``sample_panorama``, the sampler
  node's entry point;
- ``window_denoiser``: the guided x0 of a batch of windows, with ComfyUI's own inpaint step for noise masks;
- ``conds``: ComfyUI's processed conditioning cropped to windows (masks, areas, ControlNet hints);
- ``families``: facts about a MODEL (latent layout, pixel scale, native window, schedule) and its start/end states;
- ``model``: the gradient section, out-of-memory errors, a patcher whose weights can carry gradients;
- ``autograd_patches``: the diffusion model's blocks recomputed in the backward pass (block-replace patches);
- ``compile``: ``torch.compile`` of the diffusion model through ComfyUI's own compile wrapper;
- ``loss_decoders``: x0 -> image in [-1, 1] for the synchronization loss (VAE, checkpointed VAE, TAESD);
- ``assets``: the LPIPS trunk folder (``models/lpips``) and the perceptual networks on ComfyUI's device;
- ``layout``: layout regions and their bootstrapping;
- ``multigpu``: ComfyUI's MultiGPU clones as the core's lanes;
- ``decode``: the seam-free panorama decode and encode; ``seam_repair``: redoing a 360° image's seam;
- ``output``: saving panoramas into ComfyUI's output folder.

Shared ComfyUI state the pack changes, and where each is put back:

- ``comfy.model_management.in_training`` and ``comfy.cli_args.args.disable_comfy_compiler`` (where they exist): set
  for the gradient section by ``model.gradient_section``, restored in its ``finally``;
- the guider's ``conds`` and ``inner_model``: set per batch of windows (``window_denoiser``) and for the gradient
  pass (``sampling``), restored in ``WindowedSampler.sample``'s ``finally``;
- ControlNet / T2I adapter ``cond_hint_original`` and ``cond_hint``: set to each batch's crop by
  ``conds.WindowConds``, restored by its ``restore()`` in the same ``finally``;
- the parameters and buffers of the diffusion model, the VAE decoder and ControlNets: replaced by stand-ins over the
  same storage for the loop (``weights.trainable_weights``), put back when it exits, however it exits;
- ``folder_paths``' ``lpips`` folder: registered once (``assets.register_lpips_folder``) and kept, like any model
  folder a custom node declares.
"""
