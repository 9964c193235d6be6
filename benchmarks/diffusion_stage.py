"""Which diffusion-stage setting keeps the tumour's class contrast: the diffusion model alone, on one autoencoder.

Section 33 of docs/benchmarks.md found the class (the mutant tumour's T1/T1c darkness) kept by the demo
generator's autoencoder and lost in its diffusion samples; section 34 holds what this probe measured. It takes a
finished artifact's autoencoder (frozen), encodes the site's cases exactly as training does (posterior means and
sigmas, mirror images, the artifact's latent normalisation and tumour map), trains the diffusion model again under
each ``--variant`` (``name:key=value;key=value`` of ``[diffusion]``, or ``artifact`` for the artifact's own weights,
untrained) from the artifact's seed (``--train-seed`` for another), draws 2 x ``--per-class`` samples with each
``--sample`` setting and prints, per class and sequence, the tumour-minus-brain contrast of the decoded samples
(``generator_content.contrast_rows``), their class gap (last class minus first: mutant minus wildtype) beside the
real cases' and the reconstructions', and the latents' tumour signature (per channel, the tumour's latent positions
minus the rest, and how many positions). ``--sdedit`` also noises the site's own latents to those fractions of the
schedule and lets the model bring them back (``--swap``: asking for the other class), and reports the decoder's
tolerance of jittered latents. ``compand=s`` (probe only, not a package setting) trains on ``s * asinh(z / s)`` of
the normalised latents and inverts it after sampling.

Run (one core; a variant of the demo's diffusion model trains in ~5 minutes, sampling ~1 minute a setting)::

    PYTHONPATH=src python benchmarks/diffusion_stage.py --artifact <artifact> --site data/phantom/tcga \\
        --variant artifact --variant "ema:ema_decay=0.995" --variant "c2:compand=2" --per-class 32
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_variant(text: str, known: set[str]) -> tuple[str, dict[str, str]]:
    """``name:key=value;key=value`` -> ``(name, {key: value})``; ``artifact`` -> ``("artifact", {})``."""
    if text == "artifact":
        return text, {}
    name, _, body = text.partition(":")
    if not name or not body:
        raise ValueError(f"--variant {text!r}: expected name:key=value;key=value or 'artifact'")
    settings = {}
    for item in body.split(";"):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in known:
            raise ValueError(f"--variant {text!r}: {key.strip()!r} is not a [diffusion] key "
                             f"({', '.join(sorted(known))})")
        settings[key.strip()] = value.strip()
    return name, settings


def coerce(current, value: str):
    """``value`` as the type of ``current`` (tuples as comma-separated lists)."""
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple):
        items = [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
        if current and isinstance(current[0], bool):
            return tuple(v.lower() == "true" for v in items)
        return tuple(int(v) for v in items)
    return value


def compand_inverse(z, s: float, spread: float):
    """Undo the probe's companding: ``s * sinh(z * spread / s)``."""
    import torch

    return s * torch.sinh(z * spread / s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, type=Path)
    ap.add_argument("--site", required=True, type=Path, help="the site folder the artifact was trained on")
    ap.add_argument("--variant", action="append", default=[], help="name:key=value;... of [diffusion], or artifact")
    ap.add_argument("--per-class", type=int, default=32)
    ap.add_argument("--sdedit", default="", help="comma-separated noise fractions, e.g. 0.2,0.4,0.6")
    ap.add_argument("--sample", action="append", default=[],
                    help="sampling settings to draw with, e.g. eta=1,steps=50 or guidance_scale=1 (repeatable; "
                         "default: the artifact's)")
    ap.add_argument("--swap", action="store_true", help="SDEdit also with the other class asked (2 classes)")
    ap.add_argument("--seed", type=int, default=7, help="sampling seed")
    ap.add_argument("--train-seed", type=int, default=None, help="seed of the retrained variants (default: the "
                                                                   "artifact's)")
    args = ap.parse_args(argv)
    if args.per_class < 1:
        print("--per-class must be >= 1", file=sys.stderr)
        return 2
    for path in (args.artifact, args.site):
        if not path.exists():
            print(f"{path}: not found", file=sys.stderr)
            return 2

    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    from generator_content import SEQUENCES, class_contrasts as class_gap, contrast_rows
    from synthlearn.generators.ldm.data import load_site_tensors, open_site
    from synthlearn.generators.ldm.sample import guided_noise, load_generator, sample_latents
    from synthlearn.generators.ldm.stages import (_train_diffusion, encode_site, latent_normalisation,
                                                   latent_tumour_map, setup_runtime)
    from synthlearn.training.seeding import torch_generator
    from synthlearn.models.diffusion import ClassConditionedUNet, build_scheduler

    gen = load_generator(args.artifact)
    cfg = gen.cfg
    names = list(cfg.class_names)
    known = {f.name for f in dataclasses.fields(cfg.diffusion)} | {"compand"}
    try:
        variants = [parse_variant(v, known) for v in (args.variant or ["artifact"])]
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    samplings: list[dict] = []
    for text in args.sample or [""]:
        extra: dict = {}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key not in ("steps", "eta", "guidance_scale", "guidance_interval"):
                print(f"--sample {text!r}: {key!r} is not steps, eta, guidance_scale or guidance_interval",
                      file=sys.stderr)
                return 2
            try:
                extra[key] = (int(value) if key == "steps" else tuple(float(v) for v in value.split("-"))
                              if key == "guidance_interval" else float(value))
            except ValueError:
                print(f"--sample {text!r}: {key} = {value!r} is not a number (guidance_interval: lo-hi)",
                      file=sys.stderr)
                return 2
        samplings.append(extra)
    seed = int(gen.manifest["seed"]) if args.train_seed is None else args.train_seed
    data = load_site_tensors(open_site(args.site, cfg, None), cfg)
    real_gap = class_gap(data.x, data.class_index, len(names))
    for line in contrast_rows(data.x, data.class_index, names, "real cases"):
        print(line, flush=True)
    rt = setup_runtime(dataclasses.replace(cfg, device="cpu"))
    gen.autoencoder.eval()
    with torch.no_grad():
        mu, sigma = encode_site(gen.autoencoder, data.x, rt, flips=cfg.augment_flip)
        recon = gen.decode(mu[: data.x.shape[0]], data.class_index)
    rec_gap = class_gap(recon, data.class_index, len(names))
    for line in contrast_rows(recon, data.class_index, names, "reconstructions"):
        print(line, flush=True)
    classes = torch.cat([data.class_index] * (2 if cfg.augment_flip else 1))
    tumour = latent_tumour_map(data.x, cfg.latent_shape, flips=cfg.augment_flip, mode=cfg.diffusion.tumour_weighting)
    shift, scale = gen.latent_norm
    fracs = [float(f) for f in args.sdedit.split(",") if f.strip()]
    labels = torch.arange(len(names)).repeat_interleave(args.per_class)

    def report(tag: str, x, cls) -> None:
        gap = class_gap(x, cls, len(names))
        for line in contrast_rows(x, cls, names, tag):
            print(line, flush=True)
        d, dr = gap[-1] - gap[0], real_gap[-1] - real_gap[0]
        print(f"{'':34s} class gap " + " ".join(f"{s} {v:+.3f}" for s, v in zip(SEQUENCES, d.tolist()))
              + "  (real " + " ".join(f"{v:+.3f}" for v in dr.tolist()) + "; reconstructions "
              + " ".join(f"{v:+.3f}" for v in (rec_gap[-1] - rec_gap[0]).tolist()) + ")", flush=True)

    if fracs:  # the decoder's tolerance: the posterior means jittered by a share of each channel's spread
        n = data.x.shape[0]
        spread = mu[:n].transpose(0, 1).flatten(1).std(1).view(1, -1, 1, 1, 1)
        for share in (0.1, 0.3):
            jitter = torch.randn(mu[:n].shape, generator=torch.Generator().manual_seed(args.seed)) * spread * share
            with torch.no_grad():
                report(f"decoded posterior means + {share:g} SD", gen.decode(mu[:n] + jitter, data.class_index),
                       data.class_index)

    def latent_rows(tag: str, lat, cases, cls) -> None:
        """Per channel: the latents' SD, and per class the tumour positions' mean minus the rest's (the tumour is
        where the case's mask, average-pooled to the latent grid, exceeds 0.5) and the tumour's latent positions."""
        from synthlearn.models.autoencoder import MASK_CHANNEL

        factor = [a // b for a, b in zip(cases.shape[2:], lat.shape[2:])]
        where = torch.nn.functional.avg_pool3d(cases[:, MASK_CHANNEL:MASK_CHANNEL + 1].float(), factor) > 0.5
        print(f"{tag:34s} SD per channel " + " ".join(f"{v:.2f}" for v in lat.transpose(0, 1).flatten(1).std(1)),
              flush=True)
        for c, cname in enumerate(names):
            idx = cls == c
            m = where[idx].expand(-1, lat.shape[1], -1, -1, -1)
            part = lat[idx]
            inside = (part * m).flatten(2).sum(2) / m.flatten(2).sum(2).clamp(min=1)
            outside = (part * ~m).flatten(2).sum(2) / (~m).flatten(2).sum(2).clamp(min=1)
            print(f"{'':34s} {cname:9s} tumour - rest per channel "
                  + " ".join(f"{v:+.1f}" for v in (inside - outside).mean(0).tolist())
                  + f"; {float(where[idx].flatten(1).sum(1).float().mean()):.0f} positions", flush=True)

    latent_rows("real latents (posterior means)", mu[: data.x.shape[0]], data.x, data.class_index)
    for name, settings in variants:
        if name == "artifact":
            model, dcfg, norm = gen.diffusion, cfg.diffusion, (shift, scale)
        else:
            compand = float(settings.get("compand", 0.0))
            dcfg = dataclasses.replace(cfg.diffusion, **{k: coerce(getattr(cfg.diffusion, k), v)
                                                         for k, v in settings.items() if k != "compand"})
            vcfg = dataclasses.replace(cfg, diffusion=dcfg, device="cpu")
            norm = (shift, scale)
            if dcfg.latent_scaling != cfg.diffusion.latent_scaling:  # the variant's own normalisation, as training
                got = latent_normalisation(mu, sigma, torch_generator(seed, "latent-scale"), dcfg.latent_scaling)
                norm = (torch.tensor(got["latent_shift"]), torch.tensor(got["latent_scale"]))
            train_mu, train_sigma, train_norm = mu, sigma, norm
            if compand:  # probe only: the model sees s * asinh(z / s) of the normalised latents, re-standardised,
                # so that the tumour's outliers (10-20 SD) come within a few SD; sampling inverts it
                sh0 = norm[0].view(1, -1, 1, 1, 1)
                sc0 = norm[1].view(1, -1, 1, 1, 1) if norm[1].numel() > 1 else norm[1]
                zn = (mu - sh0) * sc0
                zc = compand * torch.asinh(zn / compand)
                spread = float(zc.std())
                train_mu = zc / spread
                train_sigma = sigma * sc0 / torch.sqrt(1 + (zn / compand) ** 2) / spread
                train_norm = (torch.zeros(mu.shape[1]), torch.ones(mu.shape[1]))

                def expand(z, sh0=sh0, sc0=sc0, spread=spread, s=compand):
                    return compand_inverse(z, s, spread) / sc0 + sh0
            torch.manual_seed(seed)
            model = ClassConditionedUNet(dcfg, cfg.autoencoder.latent_channels, len(names))
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                history, ema = _train_diffusion(model, train_mu, train_sigma, classes, train_norm, vcfg, rt, seed=seed,
                                                ckpt=Path(tmp) / "diffusion.pt", progress=False, tumour=tumour)
            if ema is not None:
                model.load_state_dict(ema)
            print(f"variant {name} {settings}: trained in {time.perf_counter() - t0:.0f} s, final mse "
                  f"{history['mse'][-1]:.4f}", flush=True)
        model.eval()
        vshift, vscale = norm
        if name != "artifact" and compand:
            vshift, vscale = train_norm
        for extra in samplings:
            opts = {"steps": cfg.sampling.steps, "guidance_scale": cfg.sampling.guidance_scale,
                    "guidance_interval": tuple(cfg.sampling.guidance_interval), "eta": 0.0, **extra}
            generator = torch.Generator().manual_seed(args.seed)
            t0 = time.perf_counter()
            with torch.no_grad():
                z = torch.cat([sample_latents(model, dcfg, labels[i:i + 16], cfg.latent_shape,
                                              cfg.autoencoder.latent_channels, generator=generator,
                                              scale_factor=vscale, shift=vshift, num_inference_steps=opts["steps"],
                                              guidance_scale=opts["guidance_scale"], eta=opts["eta"],
                                              guidance_interval=opts["guidance_interval"])
                               for i in range(0, len(labels), 16)])
                if name != "artifact" and compand:
                    z = expand(z)
                decoded = gen.decode(z, labels)
            report(f"{name}: samples {extra or ''} ({time.perf_counter() - t0:.0f} s)", decoded, labels)
            latent_rows("  their latents", z, decoded, labels)
        sdedit = [] if name != "artifact" and compand else fracs  # (companded variants: samples only)
        for frac in sdedit:  # SDEdit: the site's own latents noised to frac of the schedule, then denoised
            sched = build_scheduler(dcfg, "ddim")
            sched.set_timesteps(cfg.sampling.steps)
            steps = [int(t) for t in sched.timesteps if int(t) <= frac * dcfg.num_train_timesteps]
            n = data.x.shape[0]
            sh = vshift.view(1, -1, 1, 1, 1)
            sc = vscale.view(1, -1, 1, 1, 1) if vscale.numel() > 1 else vscale
            z0 = (mu[:n] - sh) * sc
            noise = torch.randn(z0.shape, generator=generator)
            x = sched.add_noise(original_samples=z0, noise=noise, timesteps=torch.full((n,), steps[0]))
            start = x
            for swap in (False, True) if args.swap else (False,):
                # swapped: the model is asked for the other class (the decoder still gets the case's own), so
                # what changes is what the diffusion model itself makes of the class at these noise levels
                asked = (len(names) - 1 - data.class_index).clamp(max=len(names) - 1) if swap else data.class_index
                x = start
                with torch.no_grad():
                    for t in steps:
                        eps = guided_noise(model, x, t, asked, int(model.null_class), 1.0)
                        x, _ = sched.step(eps, t, x)
                    back = gen.decode(x / sc + sh, data.class_index)
                report(f"{name}: SDEdit from {frac:g} (t={steps[0]}){' swapped' if swap else ''}", back,
                       data.class_index)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
