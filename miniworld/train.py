"""Train the miniature world's models, seeded and reproducible, and write them as safetensors plus checksums.

    python -m miniworld.train --out miniworld/assets                 # what the committed assets came from
    python -m miniworld.train --out /tmp/w --device cpu --quick      # a smoke run of every stage (minutes)

Stages (each seeded from ``--seed``): (1) the attribute classifier on window crops; (2) the KL VAE on window-size
crops (L1 + MSE + a small KL term; its GroupNorms normalise over the whole image, so it is trained at the size
it decodes), then its latents rescaled so that SD1.x's latent scale gives them unit
variance; (3) the SD1.x UNet on latent crops of encoded scenes with eps prediction on SD's schedule, conditioned
on CLIP-L embeddings of prompts that name the scene's attributes (10 % of samples get an empty or a negative
prompt, for classifier-free guidance), with an EMA of its weights saved. ComfyUI's tree comes from
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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the .safetensors files and checksums.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=1500, help="training scenes (512x128 px each)")
    ap.add_argument("--clf-steps", type=int, default=600)
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--unet-steps", type=int, default=12000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vae-crop", type=int, default=128, help="VAE training crop side in px (a multiple of 8)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test of every stage")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="wall-clock seconds for the VAE and UNet stages together (0 = none): a stage ends at its "
                         "step count or its share of the budget, whichever comes first, with its learning rate "
                         "annealed to the end either way; the steps reached go into train_report.json")
    return ap.parse_args(argv)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_pool(n: int, seed0: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """n scenes as uint8 (n, 3, 128, 512), their labels (n, 2) and attribute tuples."""
    imgs, labels, attrs = [], [], []
    for i in range(n):
        sc = world.render(seed0 + i, width=SCENE_W, height=WINDOW_PX)
        imgs.append((sc.image * 255).round().to(torch.uint8))
        labels.append(sc.labels)
        attrs.append((sc.time, sc.season, sc.foreground))
    return torch.stack(imgs), torch.tensor(labels), attrs


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
    q = net.quant_conv
    q.weight[:4] *= c
    q.bias[:4] *= c
    q.bias[4:] += 2 * math.log(c)
    net.post_quant_conv.weight /= c
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


def train_unet(latents, attrs, table, steps, batch, device, g, seed, budget_s=0.0):
    from miniworld import models
    key_index, emb, uncond = table
    emb, uncond = emb.to(device), uncond.to(device)
    model = models.base_model(seed).to(device)
    model.train()
    net = model.diffusion_model
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=4e-4, weight_decay=0.01)
    progress = Progress(opt, 4e-4, steps, budget_s, warmup=0.03)
    sigmas = model.model_sampling.sigmas.to(device)
    scale = models.SD_SCALE  # what SD1.x's latent format multiplies the VAE's latents by
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
        x0 = x0 * scale
        var = torch.randint(world.N_PROMPT_VARIANTS, (batch,), generator=g)
        cond = emb[akey[idx].to(device), var.to(device)]
        drop = torch.rand(batch, generator=g) < 0.1
        if drop.any():
            which = torch.randint(2, (int(drop.sum()),), generator=g).to(device)
            cond[drop.to(device)] = uncond[which]
        t = torch.randint(0, len(sigmas), (batch,), generator=g).to(device)
        sigma = sigmas[t]
        eps = torch.randn(x0.shape, generator=g).to(device)
        x = x0 + eps * sigma.view(-1, 1, 1, 1)
        # ComfyUI's own path: apply_model scales the input (1/sqrt(1+σ²)) and returns x - σ·eps_pred
        denoised = model.apply_model(x, sigma, c_crossattn=cond)
        eps_pred = (x - denoised) / sigma.view(-1, 1, 1, 1)
        loss = F.mse_loss(eps_pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - ema_decay)
        if step % max(1, steps // 20) == 0:
            log(f"unet {step}/{steps} loss {loss.item():.4f}")
    log(f"unet ended at step {progress.step} loss {loss.item():.4f}")
    return ema, progress.step


def save(module_or_sd, path: Path, dtype=torch.float16):
    from safetensors.torch import save_file
    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    sd = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
          for k, v in sd.items()}
    save_file(sd, str(path))


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.quick:
        opts.scenes, opts.clf_steps, opts.vae_steps, opts.unet_steps, opts.batch = 24, 3, 3, 3, 4
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    comfy_env.setup(cpu=device.type == "cpu")
    from miniworld import models
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    g = torch.Generator().manual_seed(opts.seed)
    opts.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = {"args": {k: str(v) for k, v in vars(opts).items()}, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}

    log(f"world: {opts.scenes} scenes of {SCENE_W}x{WINDOW_PX} px")
    pool, labels, attrs = make_pool(opts.scenes, 100_000 + opts.seed * 1_000_000)
    clf = train_classifier(pool, labels, opts.clf_steps, opts.batch, device, g)
    save(clf, opts.out / "classifier.safetensors")
    report["t_classifier_s"] = round(time.time() - t0, 1)

    vae, report["vae_steps_done"] = train_vae(pool, opts.vae_steps, opts.batch, device, g, opts.seed + 1,
                                              opts.vae_crop, opts.budget_s * 0.25)
    report["latent_rescale"] = rescale_latents_(vae, pool, device)
    save(vae, opts.out / "vae.safetensors")
    report["t_vae_s"] = round(time.time() - t0, 1)

    log("text encoder (random CLIP-L from a fixed seed) and prompt embeddings")
    te = models.clip()
    table = prompt_table(te, attrs)
    del te
    latents = encode_pool(vae, pool, device)
    log(f"latents {tuple(latents.shape)} std {latents.std():.3f} (x{models.SD_SCALE} -> "
        f"{latents.std() * models.SD_SCALE:.3f})")
    unet_budget = max(opts.budget_s - (time.time() - t0), 1.0) if opts.budget_s else 0.0
    unet, report["unet_steps_done"] = train_unet(latents, attrs, table, opts.unet_steps, opts.batch, device, g,
                                                 opts.seed + 2, unet_budget)
    save(unet, opts.out / "unet.safetensors")
    report["t_total_s"] = round(time.time() - t0, 1)
    models.write_checksums(opts.out)
    (opts.out / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"done in {report['t_total_s']} s: {sorted(p.name for p in opts.out.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
