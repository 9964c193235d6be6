"""``synthlearn demo`` (what ``make demo`` runs): the CATphishing study on the default phantom, end to end.

Makes the default phantom study if it is absent, runs the ``local``, ``centralized``, ``fedavg`` and
``catphishing`` arms with a CPU-sized config (``configs/demo.toml``; ``--paper`` for the paper-scale config
on GPUs), writes ``report.md`` and the self-contained ``report.html`` and prints where they are. A run
that was interrupted resumes: finished arms, generators and synthetic sites are kept.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from synthlearn.commands import check_output

log = logging.getLogger(__name__)

#: the repository's configs folder (the demo configs ship there, beside the other configs)
CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def default_config(paper: bool) -> Path:
    """``configs/demo.toml`` (or ``demo_paper.toml``) of the working directory, else of the repository."""
    name = "demo_paper.toml" if paper else "demo.toml"
    for candidate in (Path("configs") / name, CONFIGS / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"configs/{name}: not found in {Path.cwd()} nor in {CONFIGS}; pass --config FILE")


def cmd_demo(args: argparse.Namespace) -> int:
    from synthlearn.commands.study import format_summary
    from synthlearn.data.phantom import make_phantom_study
    from synthlearn.report.html import write_report
    from synthlearn.study import load_study_config, run_study

    t0 = time.perf_counter()
    config = Path(args.config) if args.config else default_config(args.paper)
    overrides = {"study": args.study} if args.study else None
    cfg = load_study_config(config, overrides)
    check_output(args.out, "folder")
    study = Path(cfg.study)
    if not (study / "study.json").is_file():
        if study.exists() and any(study.iterdir()):
            raise ValueError(f"--study {study}: the folder exists but holds no study.json; give an empty or new "
                             f"folder for the phantom, or a study of the data contract")
        print(f"making the default phantom study in {study} (8 sites x 48 cases; a few minutes)")
        make_phantom_study(study, preset="paper", seed=0, progress=not args.quiet)
    results = run_study(cfg, args.out, progress=not args.quiet)
    html_path, md_path = write_report(args.out)
    print(format_summary(results))
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    print(f"report: {html_path}  (also {md_path}; results: {Path(args.out) / 'results.json'})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the CATphishing study on the default phantom: all four arms and the report",
        description="Makes the default phantom study if absent, runs local, centralized, fedavg and catphishing "
                    "on the same splits with a CPU-sized config, and writes report.html. Re-running resumes.")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--study", help="study folder (default: the config's, data/phantom; made if absent)")
    p.add_argument("--config", help="study config (default configs/demo.toml)")
    p.add_argument("--paper", action="store_true",
                   help="paper-scale config (configs/demo_paper.toml: 5 folds, 1000 epochs, 100 FedAvg rounds, "
                        "paper-scale generators; for GPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_demo)
