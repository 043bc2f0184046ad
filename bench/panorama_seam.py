"""Seam error of the circular (wrap) panorama decode versus its padding, on random-weight KL VAE decoders.

For each padding p (latent px of circular context on each side) it decodes a periodic-in-width latent with
``syncdiff_core.comfy.decode.decode_panorama_image`` and compares it with a reference decode whose context is two
whole periods (p = W/2: the decoder's GroupNorm statistics and attention then see each column equally often, and
every column has W/2 columns of true context on each side). Reported per p:

* ``seam``: the largest per-column mean |error| within 4 latent px of the seam, after removing each row's mean
  error (the global tone shift that the decoder's normalisation causes everywhere and that is no seam);
* ``middle``: the same in the middle of the image, for scale: where ``seam`` reaches ``middle`` the seam is gone;
* ``jump``: the mean |difference| between the last and the first pixel column (``ref``: the reference's jump);
* ``time``: seconds for the decode on this machine (cost grows as (W + 2p) / W).

Random weights are not a trained VAE: they show the decoder architecture's reach, not a trained decoder's effective
receptive field. Run: ``.venv/bin/python bench/panorama_seam.py [--full] [--height 16 --width 64]``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]


def build_vae(full: bool, seed: int = 0):
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ch, mult, blocks = (128, [1, 2, 4, 4], 2) if full else (32, [1, 1, 1, 1], 1)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
                "ch_mult": mult, "num_res_blocks": blocks, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"embed_dim": 4, "ddconfig": ddconfig}}
    net = AutoencoderKL(**config["params"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        net.decoder.conv_out.weight.mul_(0.6)  # keep most pixels inside [0, 1] (no clipping hides errors)
    return comfy.sd.VAE(sd=net.state_dict(), config=config)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="SD's decoder size (128 channels, 2 res blocks)")
    ap.add_argument("--height", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--paddings", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6, 8, 12, 16])
    args = ap.parse_args()

    import comfy_headless
    comfy_headless.bootstrap()
    import torch
    from syncdiff_core.comfy.decode import decode_panorama_image

    torch.set_grad_enabled(False)
    vae = build_vae(args.full)
    h, w = args.height, args.width
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, h, w, generator=g)
    z = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(z, (1, 1, 1, 1), mode="circular"), 3, 1)
    z = z / z.std()  # spatially correlated, periodic in width

    def decode(p, wrap=True):
        start = time.perf_counter()
        image = decode_panorama_image(vae, z, wrap=wrap, padding=p).double()
        return image, time.perf_counter() - start

    ref, _ = decode(w // 2)

    def jump(image):
        return (image[:, :, 0] - image[:, :, -1]).abs().mean().item()

    def local(image):
        d = (image - ref).mean(dim=-1)
        d = d - d.mean(dim=2, keepdim=True)  # drop each row's tone shift
        col = d.abs().mean(dim=(0, 1))
        n = col.numel()
        return torch.cat([col[:32], col[-32:]]).max().item(), col[n // 2 - 32: n // 2 + 32].max().item()

    print(f"{'full' if args.full else 'tiny'} random KL decoder, latent {h}x{w}; reference jump {jump(ref):.4f}")
    print(f"{'padding':>8} {'seam':>9} {'middle':>9} {'jump':>8} {'time s':>7}")
    plain, t = decode(0, wrap=False)
    print(f"{'no wrap':>8} {local(plain)[0]:9.2e} {local(plain)[1]:9.2e} {jump(plain):8.4f} {t:7.2f}")
    for p in args.paddings:
        image, t = decode(p)
        seam, middle = local(image)
        print(f"{p:8d} {seam:9.2e} {middle:9.2e} {jump(image):8.4f} {t:7.2f}")


if __name__ == "__main__":
    main()
