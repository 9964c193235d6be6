"""``paper-check``: the papers' own small experiments (:mod:`synthlearn.checks`), each one command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from synthlearn.commands import check_output, positive_int, seed_int

#: check name -> one line for --help
CHECKS = {
    "asyndgan-mog": "AsynDGAN Fig. 3: three sites each hold one Gaussian; one generator from three discriminators "
                    "covers all three modes, a GAN at one site only its own (W1 distance, modes, histograms)",
    "asyndgan-slices": "AsynDGAN Table 2: tumour segmentation on 2D phantom slices, Real-All / Real-Subset / Syn-All "
                       "/ AsynDGAN (Dice, sensitivity, specificity, HD95 over task seeds)",
    "asyndgan-nuclei": "AsynDGAN Table 3: nuclei segmentation on the four-organ histology phantom (Dice, AJI)",
    "fedgan-sweep": "FedGAN's federation sizes: 3, 5, 7 and 10 fundus sites, non-IID and IID grade splits; realism, "
                    "Frechet distance, per-grade coverage and the grade model's accuracy and kappa per size",
}


def cmd_paper_check(args: argparse.Namespace) -> int:
    out = check_output(args.out, "folder")
    if args.name == "asyndgan-mog":
        import dataclasses

        from synthlearn.checks.asyndgan_mog import MoGConfig, run_check

        cfg = MoGConfig()
        if args.seeds:
            cfg = dataclasses.replace(cfg, seeds=tuple(args.seeds))
        if args.iterations:
            cfg = dataclasses.replace(cfg, iterations=args.iterations)
        result = run_check(out, cfg, progress=not args.quiet)
        print(f"{'method':<10} {'W1 to the mixture':>20} {'modes recovered (of 3)':>24}")
        for name, m in result["methods"].items():
            print(f"{name:<10} {m['w1_mean']:>12.3f} +/- {m['w1_sd']:.3f} {m['modes_mean']:>20.2f}")
        print(f"results: {out / 'results.json'}; histograms: {out / 'histograms.png'}")
        return 0
    if args.iterations:
        raise ValueError("--iterations applies to asyndgan-mog; set [asyndgan] iterations in the config instead")
    if args.name == "fedgan-sweep":
        import dataclasses

        from synthlearn.checks.fedgan_sweep import (
            SweepConfig,
            format_over_seeds,
            format_table,
            run_sweep,
            run_sweep_seeds,
        )

        if args.study:
            raise ValueError("fedgan-sweep writes its own phantoms (no --study)")
        cfg = SweepConfig()
        changes = {}
        if args.config:
            changes["config"] = Path(args.config)
        if args.sizes:
            changes["sizes"] = tuple(args.sizes)
        if args.seeds and len(args.seeds) == 1:
            changes["seed"] = args.seeds[0]
        cfg = dataclasses.replace(cfg, **changes)
        if not cfg.config.is_file():
            raise FileNotFoundError(f"--config {cfg.config}: no such config file")
        if args.seeds and len(args.seeds) > 1:  # one sweep per seed in OUT/seed-K, then mean +/- SD over them
            summary = run_sweep_seeds(out, cfg, args.seeds, progress=not args.quiet)
            print(format_over_seeds(summary), end="")
            print(f"results: {out / 'check.json'}; figure: {out / 'sweep.png'}; each seed's in {out}/seed-K")
            return 0
        summary = run_sweep(out, cfg, progress=not args.quiet)
        print(format_table(summary), end="")
        print(f"results: {out / 'check.json'}; figure: {out / 'sweep.png'} ({summary['wall_s'] / 60:.1f} min)")
        return 0
    if args.sizes:
        raise ValueError("--sizes applies to fedgan-sweep")
    from synthlearn.checks.asyndgan_tables import CHECKS as TABLES
    from synthlearn.checks.asyndgan_tables import format_table, run_check

    config = Path(args.config) if args.config else TABLES[args.name].config
    if not config.is_file():
        raise FileNotFoundError(f"--config {config}: no such config file")
    summary = run_check(args.name, out, config, study=args.study, seeds=args.seeds, progress=not args.quiet)
    print(format_table(summary), end="")
    print(f"results: {out / 'check.json'} (verdict: {json.dumps(summary['verdict'])})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "paper-check", help="run one of the papers' own checks (e.g. AsynDGAN's mixture of Gaussians)",
        description="Reproduce a figure or table of a paper on phantom data, with its figures and pictures: "
                    + "; ".join(f"{k}: {v}" for k, v in CHECKS.items())
                    + ". Documented times on 2 CPU cores: docs/benchmarks.md.")
    p.add_argument("name", choices=sorted(CHECKS), help="the check")
    p.add_argument("--out", required=True, help="folder to write results, tables and figures into")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=None,
                   help="seeds (default: the check's, 0 1 2; fedgan-sweep: 0, and several run one sweep each, "
                        "OUT/seed-K, combined as mean +/- SD)")
    p.add_argument("--iterations", type=positive_int, default=None, help="asyndgan-mog: generator steps (default 2000)")
    p.add_argument("--study", default=None, help="asyndgan-slices / -nuclei: the 2D study (default: the config's, "
                                                 "data/phantom_slices2d / data/phantom_nuclei)")
    p.add_argument("--config", default=None, help="asyndgan-slices / -nuclei / fedgan-sweep: study config "
                                                  "(default configs/check_<name>.toml)")
    p.add_argument("--sizes", type=positive_int, nargs="+", default=None,
                   help="fedgan-sweep: numbers of sites (default 3 5 7 10)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_paper_check)
