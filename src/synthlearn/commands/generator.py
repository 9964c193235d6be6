"""Generator verbs: ``train-generator`` (runs at a site) and ``synthesize`` (runs at the server)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from synthlearn.commands import check_output, positive_int, seed_int

log = logging.getLogger(__name__)


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"guidance must be a number >= 0, found {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"guidance must be a number >= 0, found {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a guidance interval end must be a number in [0, 1], found {text!r}") \
            from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a guidance interval end must be a number in [0, 1], found {value}")
    return value


def cmd_train_generator(args: argparse.Namespace) -> int:
    from synthlearn.generators.ldm.config import load_generator_config
    from synthlearn.generators.ldm.train import train_generator

    site = Path(args.site)
    if not site.is_dir():
        raise FileNotFoundError(f"--site {site}: no such site folder (expected case folders + labels.csv)")
    cfg = load_generator_config(args.config)
    check_output(args.out, "folder")
    out = train_generator(site, cfg, Path(args.out), seed=args.seed, progress=not args.quiet)
    print(f"generator artifact written to {out}")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from synthlearn.generators.ldm.sample import synthesize

    check_output(args.out, "folder")
    out = synthesize(Path(args.artifact), args.per_class, Path(args.out), seed=args.seed, steps=args.steps,
                     guidance=args.guidance, guidance_interval=args.guidance_interval, scheduler=args.scheduler,
                     batch_size=args.batch_size, refine=not args.no_refiner, device=args.device,
                     progress=not args.quiet)
    print(f"synthetic site written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-generator", help="train a site's CATphishing generator (autoencoder, stage 2, diffusion)",
        description="Runs at a site, on that site's data only: trains the autoencoder (4 sequences + whole-tumour "
                    "mask), the super-resolution stage and the class-conditional latent diffusion model (and, when "
                    "the config asks, the tumour refiner), then writes the artifact the site ships once (safetensors weights, manifest.json with the SHA-256 "
                    "of every file, loss curves). A killed run resumes when started again with the same "
                    "arguments.")
    p.add_argument("--site", required=True, help="the site folder (case folders + labels.csv)")
    p.add_argument("--config", required=True, help="generator config TOML (e.g. configs/generator_cpu.toml)")
    p.add_argument("--out", required=True, help="artifact folder to write (new, empty or an unfinished run)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed (default 0): same seed, same artifact")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_train_generator)

    p = sub.add_parser(
        "synthesize", help="generate synthetic cases per class from a generator artifact",
        description="Runs at the server: verifies the artifact (a tampered or incomplete one is refused), samples "
                    "N cases per class with DDIM and classifier-free guidance, and writes them as a site folder of "
                    "the data contract (NIfTI cases + labels.csv with the conditioned class).")
    p.add_argument("--artifact", required=True, help="artifact folder written by train-generator")
    p.add_argument("--per-class", required=True, type=positive_int, help="cases to generate per class")
    p.add_argument("--out", required=True, help="site folder to write (must not exist or be empty)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed (default 0): same seed, same cases")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the artifact's, DDIM 50)")
    p.add_argument("--guidance", type=_guidance, default=None,
                   help="classifier-free guidance scale (1 = conditional only; default: the artifact's)")
    p.add_argument("--guidance-interval", type=_fraction, nargs=2, default=None, metavar=("LO", "HI"),
                   help="apply the guidance only at timesteps t with LO <= t/T <= HI, conditional only elsewhere "
                        "(default: the artifact's; 0 1 = every step)")
    p.add_argument("--scheduler", choices=("ddim", "ddpm"), default=None,
                   help="sampler (default: the artifact's, ddim); ddpm uses all training timesteps unless --steps")
    p.add_argument("--batch-size", type=positive_int, default=None, help="samples per batch")
    p.add_argument("--no-refiner", action="store_true",
                   help="skip the artifact's refiner stage (when it has one): the decoded cases as they are")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_synthesize)
