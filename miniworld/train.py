"""Train the miniature world's models, seeded and reproducible, and write them as safetensors plus checksums.

    python -m miniworld.train --out miniworld/assets                 # what the committed assets came from
    python -m miniworld.train --out /tmp/w --device cpu --quick      # a smoke run of every stage (minutes)
    python -m miniworld.train --out /tmp/w --stages flow             # one stage; the others' files are copied

Stages (each seeded from ``--seed``): (1) the attribute classifier on window crops; (2) the KL VAE on window-size
crops (L1 + MSE + a small KL term; its GroupNorms normalise over the whole image, so it is trained at the size
it decodes), then its latents rescaled so that SD1.x's latent scale gives them unit
variance; (3) the SD1.x UNet on latent crops of encoded scenes with eps prediction on SD's schedule, conditioned
on CLIP-L embeddings of prompts that name the scene's attributes (10 % of samples get an empty or a negative
prompt, for classifier-free guidance), with an EMA of its weights saved; (4) the flow model (AuraFlow's MMDiT)
on the same latent crops, prompts and embeddings, as a rectified flow: noised as ComfyUI's CONST sampling does
(sigma * noise + (1 - sigma) * latent, sigma from its shifted schedule), velocity target noise - latent, EMA
saved. ``--stages`` picks which stages run; a stage not run has its file copied from ``--base`` (the VAE is
loaded from there when a denoiser needs it), so ``--out`` always holds a complete set. ComfyUI's tree comes from
``$COMFYUI_PATH`` or ``.comfyui/ComfyUI``; only its model classes are used (no server).

Same seed, same device kind and same torch give the same weights; GPU kernels are not bit-reproducible across
cards, so the checksums are of the files this run wrote.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miniworld import comfy_env, world  # noqa: E402

WINDOW_PX = 128
SCENE_W = 512
STAGES = ("classifier", "vae", "unet", "flow")
#: Shares of the time budget of the stages that have one.
BUDGET_SHARE = {"vae": 1.0, "unet": 2.0, "flow": 2.0}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the .safetensors files and checksums.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=1500, help="training scenes (512x128 px each)")
    ap.add_argument("--clf-steps", type=int, default=600)
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--unet-steps", type=int, default=12000)
    ap.add_argument("--flow-steps", type=int, default=12000)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated subset of {','.join(STAGES)}; the others are copied from --base")
    ap.add_argument("--base", type=Path, default=None,
                    help="folder with the files of the stages not run (default: the committed assets)")
    ap.add_argument("--workers", type=int, default=0, help="processes that draw the scenes (0 = one per CPU core)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vae-crop", type=int, default=128, help="VAE training crop side in px (a multiple of 8)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test of every stage")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="wall-clock seconds for the whole run, from drawing the scenes to the last file (0 = "
                         "none): the VAE, UNet and flow stages share what is left when each starts (1 : 2 : 2), "
                         "a stage ends at its step count or its share, whichever comes first, with its learning "
                         "rate annealed to the end either way; the steps reached go into train_report.json")
    opts = ap.parse_args(argv)
    stages = [x.strip() for x in opts.stages.split(",") if x.strip()]
    bad = [x for x in stages if x not in STAGES]
    if bad or not stages:
        ap.error(f"--stages: unknown stage(s) {bad} in {opts.stages!r}; allowed: {','.join(STAGES)}")
    opts.stages = [x for x in STAGES if x in stages]
    return opts


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _render(seed: int):
    sc = world.render(seed, width=SCENE_W, height=WINDOW_PX)
    return (sc.image * 255).round().to(torch.uint8).numpy(), sc.labels, (sc.time, sc.season, sc.foreground)


def _render_worker_init():
    torch.set_num_threads(1)


def make_pool(n: int, seed0: int, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, list]:
    """n scenes as uint8 (n, 3, 128, 512), their labels (n, 2) and attribute tuples. Drawn in ``workers``
    processes (0: one per core); every scene comes from its own seed, so the pool is the same either way."""
    import multiprocessing as mp
    import os
    workers = workers or min(os.cpu_count() or 1, 32)
    seeds = range(seed0, seed0 + n)
    if workers > 1 and n >= 4 * workers:
        with mp.get_context("fork").Pool(workers, initializer=_render_worker_init) as pool:
            out = pool.map(_render, seeds, chunksize=max(1, n // (4 * workers)))
    else:
        out = [_render(s) for s in seeds]
    imgs = torch.stack([torch.from_numpy(o[0]) for o in out])
    return imgs, torch.tensor([o[1] for o in out]), [o[2] for o in out]


def random_crops(pool: torch.Tensor, idx: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Float crops in 0..1 (len(idx), 3, size, size) at random places (any row/column offset)."""
    H, W = pool.shape[2], pool.shape[3]
    xs = torch.randint(0, W - size + 1, (len(idx),), generator=g)
    ys = torch.randint(0, H - size + 1, (len(idx),), generator=g)
    return torch.stack([pool[i, :, y:y + size, x:x + size] for i, x, y in zip(idx.tolist(), xs.tolist(),
                                                                            ys.tolist())]).float() / 255


class Progress:
    """Where a stage is in [0, 1]: steps done over steps, or seconds spent over its budget, whichever is ahead.
    The learning rate follows it (a short warm-up, then a cosine to zero), so a stage cut by its time budget
    still ends annealed. Without a budget the run is reproducible step for step."""

    def __init__(self, opt, max_lr: float, steps: int, budget_s: float = 0.0, warmup: float = 0.05):
        self.opt, self.max_lr, self.steps, self.budget_s, self.warmup = opt, max_lr, max(steps, 1), budget_s, warmup
        self.t0, self.step = time.time(), 0

    def fraction(self) -> float:
        p = self.step / self.steps
        if self.budget_s > 0:
            p = max(p, (time.time() - self.t0) / self.budget_s)
        return min(p, 1.0)

    def __iter__(self):
        while (p := self.fraction()) < 1.0:
            cos = 0.5 * (1 + math.cos(math.pi * (p - self.warmup) / (1 - self.warmup)))
            lr = self.max_lr * (p / self.warmup if p < self.warmup else cos)
            for group in self.opt.param_groups:
                group["lr"] = lr
            yield self.step
            self.step += 1


def train_classifier(pool, labels, steps, batch, device, g):
    from miniworld.classifier import AttributeNet
    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=g)))
    net = AttributeNet().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        idx = torch.randint(len(pool), (batch,), generator=g)
        x = random_crops(pool, idx, WINDOW_PX, g).to(device)
        t, s = net(x)
        y = labels[idx].to(device)
        loss = F.cross_entropy(t, y[:, 0]) + F.cross_entropy(s, y[:, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"classifier {step}/{steps} loss {loss.item():.4f}")
    return net.eval()


def vae_moments(net, x):
    m = net.quant_conv(net.encoder(x))
    mean, logvar = m.chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)


def train_vae(pool, steps, batch, device, g, seed, crop=64, budget_s=0.0):
    from miniworld import models
    net = models.vae_net(seed).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    progress = Progress(opt, 1e-3, steps, budget_s)
    for step in progress:
        idx = torch.randint(len(pool), (batch,), generator=g)
        x = random_crops(pool, idx, crop, g).to(device) * 2 - 1
        mean, logvar = vae_moments(net, x)
        z = mean + torch.randn(mean.shape, generator=g).to(device) * (0.5 * logvar).exp()
        rec = net.decode(z)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 10) == 0:
            log(f"vae {step}/{steps} loss {loss.item():.4f} kl {kl.item():.3f}")
    log(f"vae ended at step {progress.step} loss {loss.item():.4f}")
    net.eval()
    return net, progress.step


@torch.no_grad()
def rescale_latents_(net, pool, device) -> float:
    """Scale the latent space by c (exactly: mean rows of quant_conv by c, log-variance +2 log c, post_quant_conv's
    input by 1/c) so that latents have std 1/0.18215, what SD1.x's latent format expects. Returns c."""
    from miniworld import models
    x = pool[: min(len(pool), 64)].float().to(device) / 255 * 2 - 1
    mean, _ = vae_moments(net, x)
    c = (1.0 / models.SD_SCALE) / mean.std().item()
    models.scale_latent_space_(net.state_dict(), c)  # the state dict's tensors are the parameters themselves
    return c


@torch.no_grad()
def encode_pool(net, pool, device, batch=32) -> torch.Tensor:
    """Whole scenes encoded (latent means): (n, 4, 16, 64)."""
    out = []
    for i in range(0, len(pool), batch):
        x = pool[i:i + batch].float().to(device) / 255 * 2 - 1
        out.append(vae_moments(net, x)[0].cpu())
    return torch.cat(out)


def prompt_table(text_encoder, attrs_all):
    """Embeddings of every prompt variant of every attribute combination, and of the unconditional prompts."""
    from miniworld import models
    keys = sorted({a for a in attrs_all})
    prompts = [world.prompt(*k, variant=v) for k in keys for v in range(world.N_PROMPT_VARIANTS)]
    emb = models.encode_prompts(text_encoder, prompts).view(len(keys), world.N_PROMPT_VARIANTS, 77, -1)
    uncond = models.encode_prompts(text_encoder, ["", "blurry, low quality, watermark, text"])
    return {k: i for i, k in enumerate(keys)}, emb, uncond


def train_denoiser(name, latents, attrs, table, steps, batch, device, g, seed, budget_s=0.0, lr=4e-4):
    """Train the world's ``name`` denoiser ("sd1" or "flow") on window crops of the encoded scenes, through
    ComfyUI's own path: ``model_sampling.noise_scaling`` noises the latent at a level drawn from the model's own
    sigma table, ``apply_model`` returns the denoised latent, and the loss is the mean squared error of the model's
    native output -- the noise for SD1.x's eps prediction, the velocity noise - latent for the flow model's CONST
    prediction -- recovered as (x - denoised) / sigma. Returns (EMA network, steps done)."""
    import comfy.model_sampling as cms
    from miniworld import models
    key_index, emb, uncond = table
    emb, uncond = emb.to(device), uncond.to(device)
    model = models.denoiser(name, seed).to(device)
    model.train()
    net = model.diffusion_model
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    progress = Progress(opt, lr, steps, budget_s, warmup=0.03)
    ms = model.model_sampling
    sigmas = ms.sigmas.to(device)
    velocity = isinstance(ms, cms.CONST)
    # the stored latents (std 1 / SD_SCALE) in the model's own input space, which has unit variance for both
    gain = models.latent_gain(model)
    fmt = model.latent_format
    akey = torch.tensor([key_index[a] for a in attrs])
    n, _, lh, lw = latents.shape
    win = WINDOW_PX // 8
    ema_decay = 0.999 if steps > 2000 else 0.99
    for step in progress:
        idx = torch.randint(n, (batch,), generator=g)
        xs = torch.randint(0, lw - win + 1, (batch,), generator=g)
        x0 = torch.stack([latents[i, :, :, x:x + win] for i, x in zip(idx.tolist(), xs.tolist())]).to(device)
        flip = torch.rand(batch, generator=g) < 0.5  # mirrored scenes are scenes of the world too
        x0[flip.to(device)] = x0[flip.to(device)].flip(-1)
        x0 = fmt.process_in(x0 * gain if gain != 1.0 else x0)
        var = torch.randint(world.N_PROMPT_VARIANTS, (batch,), generator=g)
        cond = emb[akey[idx].to(device), var.to(device)]
        drop = torch.rand(batch, generator=g) < 0.1
        if drop.any():
            which = torch.randint(2, (int(drop.sum()),), generator=g).to(device)
            cond[drop.to(device)] = uncond[which]
        t = torch.randint(0, len(sigmas), (batch,), generator=g).to(device)
        sigma = sigmas[t]
        eps = torch.randn(x0.shape, generator=g).to(device)
        x = ms.noise_scaling(sigma, eps, x0)
        denoised = model.apply_model(x, sigma, c_crossattn=cond)
        pred = (x - denoised) / sigma.view(-1, 1, 1, 1)
        loss = F.mse_loss(pred, eps - x0 if velocity else eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - ema_decay)
        if step % max(1, steps // 20) == 0:
            log(f"{name} {step}/{steps} loss {loss.item():.4f}")
    log(f"{name} ended at step {progress.step} loss {loss.item():.4f}")
    return ema, progress.step


def save(module_or_sd, path: Path, dtype=torch.float16):
    from safetensors.torch import save_file
    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    sd = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
          for k, v in sd.items()}
    save_file(sd, str(path))


def load_vae_net(folder: Path, device, checked: bool = True):
    """The VAE as stored in ``folder``: an earlier run's (``checked`` against its checksums) or this run's."""
    from miniworld import models
    path = models.check_assets(folder, ("vae.safetensors",))["vae.safetensors"] if checked else \
        folder / "vae.safetensors"
    net = models.vae_net()
    net.load_state_dict(models._load_sd(path))
    return net.to(device).eval()


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.quick:
        opts.scenes, opts.clf_steps, opts.vae_steps, opts.unet_steps, opts.flow_steps, opts.batch = 24, 3, 3, 3, 3, 4
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    comfy_env.setup(cpu=device.type == "cpu")
    from miniworld import models
    base = (opts.base or models.ASSETS).resolve()
    out = opts.out.resolve()
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)

    def gen(stage):  # each stage draws from its own stream: a stage run alone gets what a full run gives it
        return torch.Generator().manual_seed(opts.seed * 1000 + STAGES.index(stage))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = {"args": {k: (",".join(v) if isinstance(v, list) else str(v)) for k, v in vars(opts).items()},
              "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "stages": opts.stages}
    run = set(opts.stages)
    copied = {}
    for stage in STAGES:  # the files of the stages not run come from --base
        name = f"{stage}.safetensors"
        if stage not in run and base != out and (base / name).is_file():
            models.check_assets(base, (name,))
            shutil.copy2(base / name, out / name)
            copied[name] = str(base)
    if copied:
        report["copied_from_base"] = copied
    if copied and (base / "train_report.json").is_file():  # what made the files copied from --base
        report["base_report"] = json.loads((base / "train_report.json").read_text())

    def budget(stage):
        """This stage's share of the time left (0: no budget)."""
        if not opts.budget_s:
            return 0.0
        later = [s for s in STAGES[STAGES.index(stage):] if s in run and s in BUDGET_SHARE]
        left = opts.budget_s - (time.time() - t0)
        return max(left * BUDGET_SHARE[stage] / sum(BUDGET_SHARE[s] for s in later), 1.0)

    log(f"world: {opts.scenes} scenes of {SCENE_W}x{WINDOW_PX} px; stages {','.join(opts.stages)}")
    pool, labels, attrs = make_pool(opts.scenes, 100_000 + opts.seed * 1_000_000, opts.workers)
    report["t_scenes_s"] = round(time.time() - t0, 1)
    if "classifier" in run:
        clf = train_classifier(pool, labels, opts.clf_steps, opts.batch, device, gen("classifier"))
        save(clf, out / "classifier.safetensors")
        report["t_classifier_s"] = round(time.time() - t0, 1)

    if "vae" in run:
        vae, report["vae_steps_done"] = train_vae(pool, opts.vae_steps, opts.batch, device, gen("vae"), opts.seed + 1,
                                                  opts.vae_crop, budget("vae"))
        report["latent_rescale"] = rescale_latents_(vae, pool, device)
        save(vae, out / "vae.safetensors")
        report["t_vae_s"] = round(time.time() - t0, 1)
    if run & {"unet", "flow"}:  # the denoisers learn the latents of the VAE as stored (fp16), as it is used
        vae = load_vae_net(out, device, checked=False) if "vae" in run else load_vae_net(base, device)

    if run & {"unet", "flow"}:
        log("text encoder (random CLIP-L from a fixed seed) and prompt embeddings")
        te = models.clip()
        table = prompt_table(te, attrs)
        del te
        latents = encode_pool(vae, pool, device)
        log(f"latents {tuple(latents.shape)} std {latents.std():.3f} (x{models.SD_SCALE} -> "
            f"{latents.std() * models.SD_SCALE:.3f})")
        for stage, name, steps, lr, seed in (("unet", "sd1", opts.unet_steps, 4e-4, opts.seed + 2),
                                             ("flow", "flow", opts.flow_steps, 3e-4, opts.seed + 3)):
            if stage not in run:
                continue
            net, report[f"{stage}_steps_done"] = train_denoiser(name, latents, attrs, table, steps, opts.batch,
                                                                device, gen(stage), seed, budget(stage), lr)
            save(net, out / models.MODEL_FILES[name])
            report[f"t_{stage}_s"] = round(time.time() - t0, 1)
            del net
    report["t_total_s"] = round(time.time() - t0, 1)
    models.write_checksums(out)
    (out / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"done in {report['t_total_s']} s: {sorted(p.name for p in out.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
