"""Measure the size of one synchronization step per model family on tiny random-weight models (CPU).

    python scripts/family_sync_step.py [--px 128] [--weight 20] [--families flux sd15 ...]

For each family (``tests/family_models.py``): a window of ``--px`` pixels, the family's schedule
(``syncdiff_core.comfy.families.sampling_sigmas``, 50 steps), the anchor = the decoded x0 of another noise window,
LPIPS-VGG (the pack's ``perceptual.build_lpips``, random VGG16 trunk) between the window's decoded x0 and the
anchor, the gradient w.r.t. the window latent in the model's input space u = s·x (s = ``input_scale``), and the
step Δu = −w_i·∇_u L at steps 0 and 9 (w_i = w·0.95^i). Prints a markdown table of rms(u), rms(Δu), their ratio and
rms(Δx) in ComfyUI's sampler space. Random weights: the numbers show how latent scaling, channels and pixel scale
change the step, not how a trained model responds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts", ROOT / "tests"):
    sys.path.insert(0, str(p))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--px", type=int, default=128, help="window size in pixels (default 128)")
    ap.add_argument("--weight", type=float, default=20.0, help="sync_weight w (default 20, the paper's)")
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--families", nargs="*", default=None)
    args = ap.parse_args(argv)

    import comfy_headless
    comfy_headless.bootstrap()
    import torch

    import family_checks as fc
    import family_models as fm
    from syncdiff_core import gradients, perceptual
    from syncdiff_core.comfy import families

    torch.manual_seed(0)
    with torch.inference_mode(False):
        lpips = perceptual.build_lpips(perceptual.vgg_features("vgg16").state_dict())
    names = args.families or fm.available()
    print(f"| family | schedule | σ0 | s(σ0) | step | rms u | rms Δu (w={args.weight:g}) | Δu/u | rms Δx | time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        fam = fm.build(name)
        sigmas = families.sampling_sigmas(fam.model, 50)
        t0 = time.time()

        def run(ctx):
            import comfy.model_management as mm
            ms = ctx.model_sampling
            mm.load_models_gpu([ctx.guider.model_patcher, fam.vae.patcher])
            decode = families.gradient_decoder(fam.vae, ctx.guider.inner_model)
            g = torch.Generator().manual_seed(7)
            other = torch.randn(ctx.noise.shape, generator=g)
            rows = []
            with fc.trainable_weights(ctx.guider.inner_model, fam.vae.first_stage_model), fc.gradient_section():
                for step in (0, 9):
                    sigma = sigmas[step:step + 1]
                    s = families.input_scale(ms, sigma)
                    x = ms.noise_scaling(sigma, ctx.noise, ctx.latent, max_denoise=step == 0)
                    xa = ms.noise_scaling(sigma, other, ctx.latent, max_denoise=step == 0)
                    with torch.no_grad():
                        anchor = decode(ctx.denoise(xa, sigma)).float().clamp(-1, 1)
                    u = (x * s).detach().requires_grad_(True)
                    with gradients.saved_activation_copies():
                        x0 = ctx.denoise(u / s, sigma)
                    img = decode(x0).float().clamp(-1, 1)
                    loss = lpips(img, anchor).sum()
                    (grad,) = torch.autograd.grad(loss, u)
                    w = args.weight * 0.95 ** step
                    du = w * grad
                    rms = lambda t: float(t.detach().float().pow(2).mean().sqrt())  # noqa: E731
                    rows.append((step, float(sigma), s, rms(u), rms(du), rms(du) / rms(u), rms(du / s)))
            return rows

        rows = fc.in_sampler(fam, run, height_px=args.px, width_px=args.px, cfg=args.cfg, sigmas=sigmas)
        kind = families.schedule_kind(fam.model.get_model_object("model_sampling"))
        for step, sigma, s, ru, rdu, ratio, rdx in rows:
            print(f"| {name} | {kind} | {sigma:.3g} | {s:.3g} | {step} | {ru:.3g} | {rdu:.3g} | {ratio:.3g} | "
                  f"{rdx:.3g} | {time.time() - t0:.0f} s |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
