"""Data verbs: ``verify-data``, ``make-phantoms``, ``show``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from synthlearn.commands import check_output

log = logging.getLogger(__name__)


def _shape(text: str) -> int | tuple[int, int, int]:
    parts = [p for p in text.replace(",", "x").split("x") if p]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be N or XxYxZ (e.g. 64 or 128x192x192), found {text!r}")
    if len(sizes) == 1:
        return sizes[0]
    if len(sizes) == 3:
        return tuple(sizes)  # type: ignore[return-value]
    raise argparse.ArgumentTypeError(f"shape must be N or XxYxZ, found {text!r}")


def cmd_verify(args: argparse.Namespace) -> int:
    from synthlearn.data.verify import verify_study

    report = verify_study(args.path, progress=not args.quiet)
    text = report.format()
    print(text, file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def cmd_make_phantoms(args: argparse.Namespace) -> int:
    import torch

    from synthlearn.data.phantom import make_phantom_study
    from synthlearn.data.phantom.fundus import FUNDUS_PRESETS, make_fundus_study
    from synthlearn.data.phantom.nuclei import NUCLEI_PRESETS, make_nuclei_study

    check_output(args.out, "folder")
    torch.set_num_threads(1)  # generation is fastest single-threaded (2 threads oversubscribe, ENVIRONMENT.md)
    fundus_only = [o for o, v in (("--sites", args.sites), ("--split", args.split)) if v is not None]
    if fundus_only and args.preset not in FUNDUS_PRESETS:
        raise ValueError(f"--preset {args.preset}: {' and '.join(fundus_only)} apply to the fundus presets only "
                         f"({', '.join(FUNDUS_PRESETS)})")
    if args.preset in FUNDUS_PRESETS:
        if args.shape is not None or args.replace:
            raise ValueError(f"--preset {args.preset}: --shape and --replace apply to the glioma phantom only")
        out = make_fundus_study(args.out, args.preset, n_sites=args.sites, split=args.split or "non-iid",
                                cases_per_site=args.cases_per_site, seed=args.seed, progress=not args.quiet)
        print(f"fundus phantom study written to {out}")
        return 0
    if args.preset in NUCLEI_PRESETS:
        if args.shape is not None or args.replace:
            raise ValueError(f"--preset {args.preset}: --shape and --replace apply to the glioma phantom only")
        out = make_nuclei_study(args.out, args.preset, cases_per_site=args.cases_per_site, seed=args.seed,
                                progress=not args.quiet)
        print(f"nuclei phantom study written to {out}")
        return 0
    out = make_phantom_study(args.out, preset=args.preset, cases_per_site=args.cases_per_site, shape=args.shape,
                             seed=args.seed, progress=not args.quiet, replace=args.replace)
    print(f"phantom study written to {out}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from synthlearn.report.grid import show_study

    sites = args.sites.split(",") if args.sites else None
    check_output(args.out, "file")
    out = show_study(args.path, args.out, max_cases=args.max_cases, sites=sites)
    print(f"picture written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify-data", help="check every file of a study; report all problems at once",
                       description="Read every array of a study (data contract, BraTS-2021 folder or site folder) "
                                   "and report every problem with case, file, expected and found. Writes nothing. "
                                   "Exit 0 when clean, 1 when problems were found.")
    p.add_argument("path", type=Path, help="study folder, site folder or BraTS-2021 folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("make-phantoms", help="write an offline multi-site phantom study (glioma MRI, nuclei or fundus)",
                       description="Write the offline multi-site glioma phantom (PHANTOM.md) in the data contract, or "
                                   "(--preset nuclei) the four-organ H&E nuclei phantom of AsynDGAN's nuclei task, or "
                                   "(--preset fundus) the diabetic-retinopathy fundus phantom of FedGAN's setting.")
    p.add_argument("--out", type=Path, required=True,
                   help="output study folder: new or empty (an unfinished study with the same arguments resumes)")
    p.add_argument("--preset", default="paper",
                   choices=("paper", "tiny", "slices2d", "tiny-slices2d", "nuclei", "tiny-nuclei", "fundus",
                            "tiny-fundus"),
                   help="paper: the 8 CATphishing sites at 64^3; tiny: 3 train + 2 test sites at 32^3; slices2d, "
                        "tiny-slices2d: the same as 2D studies (each case's axial slice through its largest tumour); "
                        "nuclei, tiny-nuclei: four organs' H&E tiles (64x64 / 32x32) with nuclei masks, one training "
                        "and one test site per organ; fundus, tiny-fundus: diabetic-retinopathy fundus photographs "
                        "graded 0-4 (64x64, 10 sites x 60 + 200 test / 32x32, 3 sites x 8 + 10 test), one camera "
                        "per site")
    p.add_argument("--cases-per-site", type=int, default=None, help="cases per site (default: the preset's)")
    p.add_argument("--shape", type=_shape, default=None, help="N or XxYxZ, e.g. 64 or 128x192x192")
    p.add_argument("--sites", type=int, default=None,
                   help="fundus presets only: federation sites (default: the preset's)")
    p.add_argument("--split", choices=("iid", "non-iid", "pool"), default=None,
                   help="fundus presets only: iid (every site in the same grade prevalence), non-iid (default: each "
                        "site holds two grades) or pool (one pooled pretraining site, disjoint from the federation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replace", action="store_true",
                   help="overwrite an earlier phantom study in --out made with other arguments")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_make_phantoms)

    p = sub.add_parser("show", help="picture of cases x sequences with tumour contours",
                       description="Draw a grid of cases (rows) by sequences (columns) at the slice of largest "
                                   "tumour area, tumour outlined, labels in the row titles.")
    p.add_argument("path", type=Path, help="study folder, site folder or BraTS-2021 folder")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--max-cases", type=int, default=8)
    p.add_argument("--sites", default=None, help="comma-separated site names to show (default: all)")
    p.set_defaults(handler=cmd_show)
