#!/usr/bin/env python3
"""GPU speed and memory of the pack against a one-window-at-a-time baseline, on random-weight models of the real
sizes built through ComfyUI's own classes (``devtools.models.build_real_size``; timing does not depend on weights).

``--family`` (canvas and schedule in ``FAMILIES``): ``sd2`` (865 M, fp16; 512 x 3072 px, 50 steps), ``sdxl`` (2.57 B,
fp16; 1024 x 4096 px, 30 steps), ``flux`` (Flux.1 [dev], 11.9 B, bf16; 1024 x 4096 px, 20 steps, synchronized runs
with ``checkpoint_model``). Every timed run is a whole panorama through ``sample_panorama`` at the pack's defaults,
MultiDiffusion and SyncDiffusion (``--sync-steps``, w = 20), ``--repeats`` times after a warm-up; per-step times from
ComfyUI's progress hook, peaks from torch's allocator.

* The baseline: for sd2 the method read literally (:func:`baseline_run`), one window at a time like the public
  reference code; for sdxl and flux the pack with one window per model call on a 4-step run, extrapolated per step.
* The floor: the FLOPs of one plain and one synchronized step (``FlopCounterMode``) at the card's matmul rate.
* ``--plan compile`` adds the runs with ``compile`` on: the first of each mode (with torch's compile phases) and
  ``--repeats`` timed runs.

``--tiny``: the CPU, tiny models, a small canvas. Results: ``results.json`` in ``--out`` and a table at the end.
"""
import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {"sd2": {"height": 512, "width": 3072, "steps": 50, "cfg": 7.5},
            "sdxl": {"height": 1024, "width": 4096, "steps": 30, "cfg": 7.5},
            "flux": {"height": 1024, "width": 4096, "steps": 20, "cfg": 1.0, "checkpoint_model": True}}
TINY = {"height": 32, "width": 128, "window_px": 32, "stride": 16, "steps": 3, "sync_steps": 2, "repeats": 1,
        "baseline_repeats": 1, "budget_s": 1e9}
W = 20.0  # the synchronization weight of every sync run
SHORT, SHORT_SYNCED = 4, 2  # the extrapolated baseline's run: steps, of them synchronized


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sd2", choices=list(FAMILIES))
    p.add_argument("--plan", default="final", choices=["final", "compile"],
                   help="final: eager runs and the baseline; compile: the same, then the runs with compile on")
    for name, default, what in (
            ("repeats", 3, "timed runs of each mode after the warm-up"), ("baseline-repeats", 1, ""),
            ("steps", 0, "0: the family's"), ("sync-steps", 10, ""), ("height", 0, "pixels; 0: the family's"),
            ("width", 0, "pixels; 0: the family's"), ("stride", 0, "pixels; 0: the model's default"),
            ("window-px", 0, "0: the model's native window"), ("window-batch", 0, "0: the memory plan's"),
            ("sync-batch", 0, "0: the memory plan's"), ("seed", 0, "")):
        p.add_argument(f"--{name}", type=int, default=default, help=what)
    p.add_argument("--loss-decoder", default="", help="empty: the pack's default")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip runs that would end after this")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="folder for results.json")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models, small canvas: checks the script")
    a = p.parse_args(argv)
    for k, v in FAMILIES[a.family].items():
        if not getattr(a, k, None):
            setattr(a, k, v)
    if a.tiny:
        vars(a).update(TINY)
    return a


class Bench:
    """One bench process: its options, the device, the clock the budget counts from, and the results (saved to
    ``out/results.json`` after every run and section)."""

    def __init__(self, args: argparse.Namespace):
        import torch

        import comfy.model_management as mm

        self.args, self.torch = args, torch
        self.device = mm.get_torch_device()
        self.cuda = self.device.type == "cuda"
        self.t0 = time.monotonic()
        self.results = {"runs": {}, "sections": {}, "errors": [], "skipped": []}

    def sync(self):
        self.torch.cuda.synchronize() if self.cuda else None

    def save(self):
        out = Path(self.args.out) / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.results, indent=1, default=str))

    def allow(self, name: str, estimate_s: float) -> bool:
        """Whether ``name`` (about ``estimate_s`` s) ends within the budget; a skip is printed and recorded."""
        left = self.args.budget_s - (time.monotonic() - self.t0)
        if estimate_s <= left:
            return True
        self.results["skipped"].append(f"{name}: estimated {estimate_s:.0f} s, {left:.0f} s left")
        print("skipped", self.results["skipped"][-1], flush=True)
        return False

    @contextlib.contextmanager
    def section(self, name: str):
        """A part of the run: its seconds are recorded; an exception is printed and recorded, and the sections after
        it still run."""
        t0 = time.monotonic()
        print(f"\n== {name} (t={t0 - self.t0:.0f} s)", flush=True)
        try:
            yield
        except Exception as e:  # noqa: BLE001 - a failing section must not lose the others
            traceback.print_exc()
            self.results["errors"].append(f"{name}: {type(e).__name__}: {str(e)[:1500]}")
            if self.cuda:
                self.torch.cuda.empty_cache()
        finally:
            self.results["sections"][name] = round(time.monotonic() - t0, 1)
            self.save()

    def add(self, key: str, rec: dict) -> dict:
        self.results["runs"].setdefault(key, []).append(rec)
        steps = [round(s, 3) for s in rec.get("step_s", [])[:4]]
        print(f"{key}: {rec['time_s']:.3f} s, peak {rec.get('peak_alloc_gib')} / {rec.get('peak_reserved_gib')} GiB,"
              f" steps {steps} {rec.get('notes') or ''}", flush=True)
        self.save()
        return rec

    @contextlib.contextmanager
    def measured(self, rec: dict):
        """Wall time, per-step times (ComfyUI's progress hook, or the ``tick`` it yields; CUDA events on the GPU),
        peak memory and the pack's log lines of the block, into ``rec``; the hook and the handler are put back."""
        import comfy.utils

        torch, marks, notes = self.torch, [], []
        mark = (lambda: torch.cuda.Event(enable_timing=True)) if self.cuda else None

        def point():
            if mark is None:
                return time.perf_counter()
            ev = mark()
            ev.record()
            return ev

        handler = logging.Handler()
        handler.emit = lambda r: notes.append(r.getMessage())
        log = logging.getLogger("syncdiffusion")
        log.addHandler(handler)
        previous = comfy.utils.PROGRESS_BAR_HOOK
        tick = lambda *a, **k: marks.append(point())  # noqa: E731
        comfy.utils.set_progress_bar_global_hook(tick)
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        start, t0 = point(), time.perf_counter()
        try:
            yield tick
            self.sync()
            rec["time_s"] = round(time.perf_counter() - t0, 4)
        finally:
            comfy.utils.set_progress_bar_global_hook(previous)
            log.removeHandler(handler)
        pairs = zip([start] + marks[:-1], marks)
        rec["step_s"] = [round(a.elapsed_time(b) / 1e3 if mark else b - a, 4) for a, b in pairs]
        rec["notes"] = notes
        if self.cuda:
            rec["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)


def job(b: Bench, *, w: float, steps=None, sync_steps=None, **kw):
    from syncdiff_core.job import PanoramaJob
    from syncdiff_core.sync import SyncSettings

    a = b.args
    fields = {"window_px": a.window_px, "stride_px": a.stride, "window_batch": a.window_batch,
              "sync_batch": a.sync_batch, "checkpoint_model": bool(w and FAMILIES[a.family].get("checkpoint_model")),
              **({"loss_decoder": a.loss_decoder} if a.loss_decoder else {}), **kw}
    sync = SyncSettings(weight=w, decay=0.95, steps=a.sync_steps if sync_steps is None else sync_steps)
    return PanoramaJob(seed=a.seed, steps=steps or a.steps, cfg=a.cfg, sync=sync, **fields)


def pack_run(b: Bench, m, label: str, **kw) -> dict:
    """One panorama through the pack's ``sample_panorama``; ``kw`` go to :func:`job`."""
    from syncdiff_core.comfy.sampling import sample_panorama

    j = job(b, **kw)
    rec = {"label": label, "steps": j.steps, "w": j.sync.weight, "sync_steps": j.sync.steps if j.sync.weight else 0,
           "compile": j.compile, "window_batch": j.window_batch, "sync_batch": j.sync_batch}
    with b.measured(rec), b.torch.inference_mode():
        out = sample_panorama(m.model, m.positive, m.negative, {"samples": m.latent.clone()}, j, vae=m.vae)["samples"]
    rec["finite"] = bool(b.torch.isfinite(out).all())
    if not rec["finite"]:
        b.results["errors"].append(f"non-finite output: {label}")
    return rec


def baseline_run(b: Bench, m, *, w: float, label: str) -> dict:
    """SD 2: the method read literally, one window at a time: per window the UNet with CFG as a batch of 2 and a DDIM
    step (VP space, diffusers' schedule); on sync steps first the anchor's image (no grad), then every window's
    gradient (UNet + VAE decoder + LPIPS, the anchor's too) and the step x <- x - w_i dL/dx; MultiDiffusion fusion."""
    from syncdiff_core.comfy.assets import get_lpips
    from syncdiff_core.weights import trainable_weights

    torch, a, dev = b.torch, b.args, b.device
    unet, first = m.model.model.diffusion_model, m.vae.first_stage_model
    dt, loss = next(unet.parameters()).dtype, get_lpips(dev)
    ac = (1.0 / (1.0 + m.model.model.model_sampling.sigmas.double() ** 2)).float().to(dev)
    ts = [t * (1000 // a.steps) + 1 for t in range(a.steps)][::-1]  # 981, 961, ..., 1 for 50 steps
    h, wl, win, stride = m.latent.shape[-2], m.latent.shape[-1], m.window, m.stride
    views = [(r, c) for r in range(0, h - win + 1, stride) for c in range(0, wl - win + 1, stride)]
    ctx = torch.cat([m.negative[0][0], m.positive[0][0]]).to(dev, dt)
    scale = m.model.model.latent_format.scale_factor
    x = torch.randn(m.latent.shape, generator=torch.Generator().manual_seed(a.seed)).to(dev)

    def x0_of(lat, t):
        e = unet(torch.cat([lat, lat]).to(dt), timesteps=torch.full((2,), float(t), device=dev), context=ctx)
        e_u, e_c = e.float().chunk(2)
        e = e_u + a.cfg * (e_c - e_u)
        return (lat - (1 - ac[t]).sqrt() * e) / ac[t].sqrt(), e

    def decode(x0):
        return first.decode((x0 / scale).to(dt)).float().clamp(-1, 1)

    rec = {"label": label, "steps": a.steps, "w": w, "sync_steps": a.sync_steps if w else 0, "windows": len(views)}
    with b.measured(rec) as tick, (trainable_weights(unet, first) if w else contextlib.nullcontext()):
        for i, t in enumerate(ts):
            a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
            value, count = torch.zeros_like(x), torch.zeros_like(x)
            syncing = w > 0 and i < a.sync_steps
            if syncing:
                with torch.no_grad():
                    r, c = views[len(views) // 2]
                    target = decode(x0_of(x[..., r:r + win, c:c + win], t)[0])
            for r, c in views:
                lat = x[..., r:r + win, c:c + win].clone()
                if syncing:
                    with torch.enable_grad():
                        lat.requires_grad_(True)
                        (grad,) = torch.autograd.grad(loss(decode(x0_of(lat, t)[0]), target).sum(), lat)
                    lat = (lat - w * 0.95**i * grad).detach()
                with torch.no_grad():
                    x0, e = x0_of(lat, t)
                    value[..., r:r + win, c:c + win] += a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
                    count[..., r:r + win, c:c + win] += 1
            x = torch.where(count > 0, value / count, x)
            tick()
    rec["finite"] = bool(torch.isfinite(x).all())
    return rec


def matmul_tflops(b: Bench, dtype) -> float:
    """The card's matmul rate (TFLOP/s) in the models' dtype: median of 5 timings of 30 products of 8192³."""
    torch = b.torch
    n, reps = (8192, 30) if b.cuda else (512, 3)
    x = torch.randn(n, n, device=b.device, dtype=dtype if b.cuda else torch.float32)
    for _ in range(3):
        x @ x
    times = []
    for _ in range(5):
        b.sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ x
        b.sync()
        times.append((time.perf_counter() - t0) / reps)
    return 2 * n**3 / statistics.median(times) / 1e12


def step_flops(b: Bench, m) -> dict:
    """FLOPs of one plain and one synchronized step of the pack's run (a one-step panorama of each kind)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for kind, w in (("plain", 0.0), ("sync", W)):
        with FlopCounterMode(display=False) as fc:
            pack_run(b, m, f"flops {kind}", w=w, steps=1, sync_steps=1)
        out[kind] = fc.get_total_flops()
    return out


def compile_phases() -> dict:
    """torch's own table of the process's compile phases (seconds), and the number of graphs dynamo compiled."""
    try:  # private APIs: their absence must not end the run
        from torch._dynamo.utils import compile_times, counters

        return {"graphs": int(counters["stats"]["unique_graphs"]),
                "phases": compile_times(repr="str", aggregate=True)}
    except Exception as e:  # noqa: BLE001
        return {"unavailable": str(e)}


def run(b: Bench, m) -> None:
    """Warm-up, the eager runs, the baseline, the floor, the compiled runs (``--plan compile``), the summary."""
    a, R = b.args, b.results
    modes = (("md", 0.0), ("sync", W))
    est = {}
    with b.section("warmup"):
        for key, w in modes:
            rec = b.add(f"warm_{key}", pack_run(b, m, "warm", w=w, steps=2, sync_steps=2))
            est[key] = statistics.median(rec["step_s"] or [rec["time_s"]])
    total = {"md": a.steps * est.get("md", 1.0),
             "sync": a.sync_steps * est.get("sync", 1.0) + (a.steps - a.sync_steps) * est.get("md", 1.0)}
    with b.section("eager"):
        for k in range(a.repeats):
            for key, w in modes:
                if b.allow(f"{key} run {k + 1}", 1.3 * total[key]):
                    b.add(key, pack_run(b, m, key, w=w))
    with b.section("baseline"):
        for k in range(a.baseline_repeats):
            for key, w in modes:
                if a.family == "sd2":
                    if b.allow(f"baseline {key}", 4 * total[key]):
                        b.add(f"baseline_{key}", baseline_run(b, m, w=w, label=f"baseline {key}"))
                    continue
                short = pack_run(b, m, f"baseline {key}, short", w=w, steps=SHORT, sync_steps=SHORT_SYNCED,
                                 window_batch=1, sync_batch=1)
                steps = short["step_s"]
                plain = statistics.median(steps[SHORT_SYNCED:]) if w else statistics.median(steps)
                synced = statistics.median(steps[:SHORT_SYNCED]) if w else plain
                k_sync = a.sync_steps if w else 0
                short["time_s"] = round(k_sync * synced + (a.steps - k_sync) * plain, 3)
                short["extrapolated"] = f"per-step times of a {SHORT}-step run, extrapolated to {a.steps} steps"
                b.add(f"baseline_{key}", short)
    with b.section("floor"):
        R["matmul_tflops"] = matmul_tflops(b, m.dtype)
        R["step_flops"] = step_flops(b, m)
        rate = R["matmul_tflops"] * 1e12
        f = R["step_flops"]
        R["floor_s"] = {"md": a.steps * f["plain"] / rate,
                        "sync": (a.sync_steps * f["sync"] + (a.steps - a.sync_steps) * f["plain"]) / rate}
    if a.plan == "compile":
        backend = "aot_eager" if a.tiny else "inductor"  # tiny: dynamo + AOTAutograd, no inductor compile time
        with b.section("compile_first_run"):  # every graph of this schedule: what a user's first run costs
            for key, w in modes:
                b.add(f"first_compiled_{key}", pack_run(b, m, f"{key} compiled, first run", w=w, compile=backend))
            R["compile"] = compile_phases()
            print(R["compile"].get("phases"), "\ngraphs compiled:", R["compile"].get("graphs"), flush=True)
        with b.section("compiled"):
            for k in range(a.repeats):
                for key, w in modes:
                    b.add(f"{key}_compiled", pack_run(b, m, f"{key} compiled", w=w, compile=backend))
    summarize(b)


def summarize(b: Bench) -> None:
    """The table (also ``results["table"]``): median seconds, peak memory and the multiple of the floor per mode."""
    R, floor = b.results, b.results.get("floor_s", {})
    R["table"] = rows = []
    for key in ("baseline_md", "baseline_sync", "md", "sync", "md_compiled", "sync_compiled"):
        recs = R["runs"].get(key) or []
        if recs:
            t = statistics.median(r["time_s"] for r in recs)
            fs = floor.get(key.split("_")[-1] if key.startswith("baseline") else key.split("_")[0])
            rows.append([key, round(t, 3), len(recs), *(max(r.get(k) or 0 for r in recs) for k in
                                                        ("peak_alloc_gib", "peak_reserved_gib")),
                         round(t / fs, 1) if fs else None])
    R["elapsed_s"] = round(time.monotonic() - b.t0, 1)
    b.save()
    env = R["env"]
    print("\n" + "=" * 96 + f"\n{env['device']}, {env['date_utc']} UTC, commit {env['commit']}, torch {env['torch']}, "
          f"{b.args.family}: {R.get('windows')} windows, {b.args.steps} steps; matmul {R.get('matmul_tflops', 0):.3g} "
          f"TFLOP/s; floor (s) {({k: round(v, 2) for k, v in floor.items()})}")
    print(f"{'mode':16s} {'median s':>9s} {'runs':>5s} {'alloc GiB':>10s} {'resv GiB':>9s} {'x floor':>8s}")
    for r in rows:
        print(f"{r[0]:16s} {r[1]:9.2f} {r[2]:5d} {r[3]:10.2f} {r[4]:9.2f} {str(r[5]):>8s}")
    print("sections (s)", R["sections"], "total", R["elapsed_s"], "s", *(f"\n{k.upper()} {R[k]}" for k in
                                                                       ("skipped", "errors") if R[k]))


class Models:
    """The bench's models on the device, their canvas (an empty LATENT of the family's layout) and its windows."""

    def __init__(self, b: Bench, models_dir: Path):
        from devtools import models
        from syncdiff_core.comfy import families
        from syncdiff_core.job import plan_canvas

        import comfy.model_management as mm

        t0 = time.perf_counter()
        a = b.args
        self.model, self.vae, self.positive, self.negative = models.build_real_size(a.family, a.seed, tiny=a.tiny)
        models.install_random_trunk(models_dir, "vgg16", a.seed + 3, file_name="vgg16.safetensors")
        with b.torch.inference_mode():  # as ComfyUI's executor loads them: the weights are inference tensors
            mm.load_models_gpu([self.model, self.vae.patcher])
        facts = families.facts(self.model, self.vae)
        s = facts.pixel_scale
        shape = (1, facts.latent_channels) + ((1,) if facts.latent_dims == 3 else ()) + (a.height // s, a.width // s)
        self.latent = b.torch.zeros(shape)
        self.dtype = next(self.model.model.diffusion_model.parameters()).dtype
        plan = plan_canvas(job(b, w=0.0), shape[-2], shape[-1], s, facts.native_latent, facts.default_stride_px)
        self.window, self.stride = plan.window_height, (a.stride or facts.default_stride_px) // s
        b.results["windows"] = len(plan)
        b.results["models"] = {"params": sum(p.numel() for p in self.model.model.diffusion_model.parameters()),
                               "dtype": str(self.dtype), "vae_dtype": str(self.vae.vae_dtype),
                               "build_s": round(time.perf_counter() - t0, 1), "facts": vars(facts)}
        print("models", b.results["models"], flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.tiny:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    logging.basicConfig(level=logging.WARNING)
    from devtools import headless

    with tempfile.TemporaryDirectory(prefix="syncdiff-bench-") as base:
        headless.bootstrap(base, cpu=a.tiny, pytorch_attention=False, log_level=None)
        logging.getLogger("syncdiffusion").setLevel(logging.INFO)
        b = Bench(a)
        torch = b.torch
        commit = ROOT / "bench" / ".commit"  # written by run_on_device.sh's caller: .git may not travel
        b.results["env"] = {
            "device": torch.cuda.get_device_name() if b.cuda else platform.processor() or "cpu",
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__,
            "commit": os.environ.get("BENCH_COMMIT") or (commit.read_text().strip() if commit.exists() else "unknown"),
            "cuda": torch.version.cuda, "python": platform.python_version(), "args": vars(a)}
        print(json.dumps(b.results["env"]), flush=True)
        m = None
        try:
            with b.section("build"):
                m = Models(b, Path(base) / "models")
            if m is not None:
                run(b, m)
        finally:
            b.save()
    return 1 if b.results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
