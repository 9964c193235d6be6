"""Speed and memory of the CATphishing generator on this CPU (issue 4, "Benchmark").

1. **Training-step overhead**: synthlearn's autoencoder and diffusion training loops (one epoch of
   ``_train_autoencoder`` / ``_train_diffusion``: seeded batching, flips, patches, losses, gradient clipping,
   per-epoch atomic checkpoint) against the bare MONAI network forward + backward + Adam step on tensors of
   the same size. Target: under 10 % overhead. The two are interleaved ``--repeats`` times and the medians
   compared (timings on a shared machine vary by +/-30 %).
2. **Sampling throughput** in cases per minute, full pipeline (DDIM sampling with classifier-free guidance,
   decode + stage 2, post-processing, NIfTI writing), at 32^3 (latent 8^3) and 64^3 (latent 16^3) with the
   ``generator_cpu.toml`` networks (untrained: speed does not depend on the weights). DDPM with 1000 steps is
   **estimated** from the measured per-step time (1000 x step + decode), not run.
3. **Peak memory**: every workload runs in a fresh process; its ``ru_maxrss`` is reported.

Run (about 6-10 minutes)::

    PYTHONPATH=src python benchmarks/bench_generator.py --threads 1 --json /tmp/bench_generator.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup(threads: int):
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from synthlearn.runtime import configure_threads

    configure_threads(threads)
    return torch


def _cfg(shape: int):
    from synthlearn.generators.ldm.config import load_generator_config

    cfg = load_generator_config(ROOT / "configs" / "generator_cpu.toml")
    lat = shape // cfg.autoencoder.downsample_factor
    return dataclasses.replace(cfg, shape=(shape,) * 3, latent_shape=(lat,) * 3, device="cpu")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_ae_overhead(threads: int, repeats: int, n_cases: int) -> dict:
    torch = _setup(threads)
    from synthlearn.models.autoencoder import GeneratorAutoencoder, kl_loss
    from synthlearn.generators.ldm.stages import Runtime, _train_autoencoder

    cfg = _cfg(64)
    # the comparison is the reconstruction step (no discriminator), as the bare network has none
    acfg = dataclasses.replace(cfg.autoencoder, adv_weight=0.0, epochs=1)
    cfg = dataclasses.replace(cfg, autoencoder=acfg)
    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    x = torch.rand(n_cases, 5, 64, 64, 64)
    steps = -(-n_cases // acfg.batch_size)
    ours, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats + 1):
            torch.manual_seed(0)
            ae = GeneratorAutoencoder(acfg, cfg.shape, cfg.latent_shape)
            ckpt = Path(tmp) / f"ae{r}.pt"
            t0 = time.perf_counter()
            _train_autoencoder(ae, x, cfg, rt, seed=r, ckpt=ckpt, progress=False)
            t_ours = (time.perf_counter() - t0) / steps
            # the same memory layout as the loop's on CPU (channels-last): the overhead compares like with like
            net = GeneratorAutoencoder(acfg, cfg.shape, cfg.latent_shape).ae.to(memory_format=torch.channels_last_3d)
            opt = torch.optim.Adam(net.parameters(), lr=1e-4)
            p = acfg.patch_size or tuple(x.shape[-3:])  # no patches configured: whole volumes
            t0 = time.perf_counter()
            for i in range(steps):
                xb = x[i * acfg.batch_size : (i + 1) * acfg.batch_size, :, : p[0], : p[1], : p[2]]
                xb = xb.contiguous(memory_format=torch.channels_last_3d)
                recon, mu, sigma = net(xb)
                loss = (recon - xb).abs().mean() + 1e-6 * kl_loss(mu, sigma)
                opt.zero_grad()
                loss.backward()
                opt.step()
            t_bare = (time.perf_counter() - t0) / steps
            if r > 0:  # the first round warms up
                ours.append(t_ours)
                bare.append(t_bare)
    mo, mb = statistics.median(ours), statistics.median(bare)
    p = acfg.patch_size or tuple(x.shape[-3:])
    return {"workload": f"autoencoder step, 64^3 cases, {p[0]}^3 patches, batch {acfg.batch_size}, "
                        f"channels {acfg.channels}", "synthlearn_s": mo, "bare_monai_s": mb,
            "overhead_pct": 100 * (mo / mb - 1), "peak_rss_mb": _peak_mb()}


def bench_diffusion_overhead(threads: int, repeats: int, n_latents: int) -> dict:
    torch = _setup(threads)
    from synthlearn.models.diffusion import ClassConditionedUNet, build_scheduler
    from synthlearn.generators.ldm.stages import Runtime, _train_diffusion

    cfg = _cfg(64)
    dcfg = dataclasses.replace(cfg.diffusion, epochs=1)
    cfg = dataclasses.replace(cfg, diffusion=dcfg)
    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    c = cfg.autoencoder.latent_channels
    mu = torch.randn(n_latents, c, *cfg.latent_shape)
    sigma = torch.full_like(mu, 0.1)
    classes = torch.arange(n_latents) % 2
    steps = -(-n_latents // dcfg.batch_size)
    ours, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats + 1):
            torch.manual_seed(0)
            model = ClassConditionedUNet(dcfg, c, 2)
            t0 = time.perf_counter()
            _train_diffusion(model, mu, sigma, classes, 1.0, cfg, rt, seed=r, ckpt=Path(tmp) / f"d{r}.pt",
                             progress=False)
            t_ours = (time.perf_counter() - t0) / steps
            model = ClassConditionedUNet(dcfg, c, 2)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            sched = build_scheduler(dcfg, "ddpm")
            t0 = time.perf_counter()
            for i in range(steps):
                z = mu[i * dcfg.batch_size : (i + 1) * dcfg.batch_size]
                noise = torch.randn_like(z)
                t = torch.randint(0, 1000, (z.shape[0],))
                pred = model(sched.add_noise(z, noise, t), t, classes[: z.shape[0]])
                loss = torch.nn.functional.mse_loss(pred, noise)
                opt.zero_grad()
                loss.backward()
                opt.step()
            t_bare = (time.perf_counter() - t0) / steps
            if r > 0:
                ours.append(t_ours)
                bare.append(t_bare)
    mo, mb = statistics.median(ours), statistics.median(bare)
    return {"workload": f"diffusion step, latent {c}x{cfg.latent_shape[0]}^3, batch {dcfg.batch_size}, "
                        f"channels {dcfg.channels}", "synthlearn_s": mo, "bare_monai_s": mb,
            "overhead_pct": 100 * (mo / mb - 1), "peak_rss_mb": _peak_mb()}


def bench_sampling(threads: int, shape: int, n_cases: int, steps: int) -> dict:
    torch = _setup(threads)
    from synthlearn.config import to_dict
    from synthlearn.models.autoencoder import GeneratorAutoencoder
    from synthlearn.models.diffusion import ClassConditionedUNet
    from synthlearn.models.superres import SuperResolution
    from synthlearn.generators.artifact import write_artifact
    from synthlearn.generators.ldm.sample import synthesize
    from synthlearn.generators.ldm.sample import guided_noise

    cfg = _cfg(shape)
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, min_tumour_voxels=0, batch_size=4))
    torch.manual_seed(0)
    ae = GeneratorAutoencoder(cfg.autoencoder, cfg.shape, cfg.latent_shape)
    sr = SuperResolution(cfg.superres, cfg.shape)
    dm = ClassConditionedUNet(cfg.diffusion, cfg.autoencoder.latent_channels, 2)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = {"config": to_dict(cfg), "class_names": ["wildtype", "mutant"], "label": "idh",
                    "class_counts": {"wildtype": 1, "mutant": 1}, "latent_scale_factor": 1.0,
                    "voxel_size_mm": [3.0, 3.0, 3.0]}
        art = write_artifact(Path(tmp) / "art", weights={"autoencoder.safetensors": ae.ae.state_dict(),
                                                         "superres.safetensors": sr.state_dict(),
                                                         "diffusion.safetensors": dm.state_dict()},
                             manifest=manifest)
        per_class = max(1, n_cases // 2)
        synthesize(art, 1, Path(tmp) / "warm", seed=0, steps=2, progress=False)
        t0 = time.perf_counter()
        synthesize(art, per_class, Path(tmp) / "out", seed=0, steps=steps, progress=False)
        wall = time.perf_counter() - t0
    # per-step cost of one guided denoising step (batch 4) and of decoding, to estimate DDPM-1000
    x = torch.randn(4, cfg.autoencoder.latent_channels, *cfg.latent_shape)
    cls = torch.tensor([0, 1, 0, 1])
    dm.eval()
    t0 = time.perf_counter()
    for _ in range(5):
        guided_noise(dm, x, 500, cls, 2, cfg.sampling.guidance_scale)
    step_s = (time.perf_counter() - t0) / 5 / 4
    with torch.no_grad():
        t0 = time.perf_counter()
        sr(ae.decode(x))
        decode_s = (time.perf_counter() - t0) / 4
    n = 2 * per_class
    ddim_per_case = wall / n
    ddpm_per_case = 1000 * step_s + decode_s
    return {"workload": f"synthesize {shape}^3 (latent {cfg.autoencoder.latent_channels}x{cfg.latent_shape[0]}^3), "
                        f"guidance {cfg.sampling.guidance_scale}, batch 4", "cases": n,
            f"ddim{steps}_cases_per_min": 60 / ddim_per_case, "ddim_s_per_case": ddim_per_case,
            "guided_step_s_per_case": step_s, "decode_s_per_case": decode_s,
            "ddpm1000_cases_per_min_estimated": 60 / ddpm_per_case, "peak_rss_mb": _peak_mb()}


def _worker(args):
    name, kwargs = args
    fn = {"ae": bench_ae_overhead, "diffusion": bench_diffusion_overhead, "sampling": bench_sampling}[name]
    return fn(**kwargs)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", type=int, default=8, help="cases per sampling measurement")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", choices=("ae", "diffusion", "sampling"), default=None)
    args = parser.parse_args(argv)
    jobs = [
        ("ae", dict(threads=args.threads, repeats=args.repeats, n_cases=8)),
        ("diffusion", dict(threads=args.threads, repeats=args.repeats, n_latents=48)),
        ("sampling", dict(threads=args.threads, shape=32, n_cases=args.cases, steps=50)),
        ("sampling", dict(threads=args.threads, shape=64, n_cases=args.cases, steps=50)),
    ]
    if args.only:
        jobs = [j for j in jobs if j[0] == args.only]
    results = []
    ctx = mp.get_context("spawn")
    for job in jobs:
        with ctx.Pool(1) as pool:  # a fresh process per workload: its ru_maxrss is that workload's peak
            res = pool.map(_worker, [job])[0]
        print(json.dumps(res), flush=True)
        results.append(res)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
