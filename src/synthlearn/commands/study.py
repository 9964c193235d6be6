"""Study verbs: ``synthlearn study run --config FILE.toml --out RUN_DIR``, ``study show RUN_DIR``,
``study report RUN_DIR``."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from synthlearn.commands import check_output
from synthlearn.strategies.registry import known_arms

log = logging.getLogger(__name__)


def cmd_run(args: argparse.Namespace) -> int:
    from synthlearn.study import load_study_config, run_study

    overrides: dict = {}
    if args.study:
        overrides["study"] = args.study
    if args.arms is not None:
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        if not arms:
            raise ValueError(f"--arms {args.arms!r}: expected one or more arm names separated by commas, e.g. "
                             f"centralized,fedavg; known arms: {', '.join(known_arms())}")
        overrides["arms"] = arms
    cfg = load_study_config(args.config, overrides)
    check_output(args.out, "folder")
    results = run_study(cfg, args.out, progress=not args.quiet, force=args.force)
    print(format_summary(results))
    print(f"results: {args.out}/results.json")
    return 0


def fmt(v, w=7, d=3) -> str:
    """A number right-aligned in ``w`` characters with ``d`` decimals; ``-`` when it is missing or not finite."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return f"{v:>{w}.{d}f}" if ok else f"{'-':>{w}}"


def _rows(results: dict, row) -> list[str]:
    """One line per arm (``(mean)`` for an arm of several models) and one per site model of such an arm."""
    lines = []
    for arm, block in results["arms"].items():
        lines.append(row(arm + (" (mean)" if "site_models" in block else ""), block, block))
        for site, sub in block.get("site_models", {}).items():
            lines.append(row(f"  {arm}:{site}", sub, {"bytes_from_sites": 0, "wall_s": None}))
    return lines


def _vs_text(vs: dict | None, metric: str) -> str:
    """An arm's ``vs_reference_over_seeds`` in words: the mean and SD of its ``metric`` minus the reference's, and
    the paired t-test's p."""
    if not vs:
        return "-"
    text = f"{vs[f'{metric}_difference_mean']:+.3f} +/- {vs[f'{metric}_difference_sd']:.3f}"
    return text + (f" (p {vs['paired_t_p']:.3g})" if vs.get("paired_t_p") is not None else "")


def format_segmentation_summary(results: dict) -> str:
    """:func:`format_summary` of a segmentation run: Dice and HD95 per region, then the mean Dice over seeds."""
    lines = [f"task {results['task']}, test sites {', '.join(results.get('test_sites', []))}",
             f"{'arm':<22}{'Dice WT':>8}{'TC':>7}{'ET':>7}{'mean':>7}{'HD95 WT':>9}{'TC':>7}{'ET':>7}"
             f"{'Wilcoxon p':>11}{'MB from sites':>15}{'wall s':>9}"]

    def row(name, block, info):
        c = block["test"]["combined"]
        return (f"{name:<22}{fmt(c.get('dice_wt'), 8)}{fmt(c.get('dice_tc'))}{fmt(c.get('dice_et'))}"
                f"{fmt(c.get('dice_mean'))}{fmt(c.get('hd95_wt'), 9, 1)}{fmt(c.get('hd95_tc'), 7, 1)}"
                f"{fmt(c.get('hd95_et'), 7, 1)}{fmt(block.get('wilcoxon_p_vs_centralized'), 11)}"
                f"{fmt(info['bytes_from_sites'] / 1e6, 15, 2)}{fmt(info['wall_s'], 9, 0)}")

    lines += _rows(results, row)
    seeds = results.get("seeds") or []
    lines += ["", f"over task-model seeds {', '.join(map(str, seeds))}:",
              f"{'arm':<22}{'Dice mean':>10}{'SD':>7}{'min':>7}{'max':>7}  {'not learned':<16}"
              "Dice mean - centralized (paired t p)"]
    for arm, block in results["arms"].items():
        over = block.get("over_seeds") or {}
        d = over.get("dice_mean") or {}
        vs = block.get("vs_reference_over_seeds")
        vs_text = _vs_text(vs, "dice_mean")
        collapsed = over.get("seeds_with_collapse")
        collapsed_text = f"{len(collapsed)} of {over.get('n_seeds', 0)} seeds" if collapsed is not None else "-"
        lines.append(f"{arm:<22}{fmt(d.get('mean'), 10)}{fmt(d.get('sd'))}{fmt(d.get('min'))}{fmt(d.get('max'))}  "
                     f"{collapsed_text:<16}{vs_text}")
    return "\n".join(lines)


def format_heads_summary(results: dict) -> str:
    """A multi-task run's classification heads: per head and arm the combined ACC, SEN, SPE, F1, AUC and the AUC over
    seeds."""
    lines = [f"{'head':<18}{'arm':<22}{'ACC':>7}{'SEN':>7}{'SPE':>7}{'F1':>7}{'AUC':>7}{'AUC seeds':>11}{'SD':>7}"]
    for head in results.get("heads") or {}:
        for arm, block in results["arms"].items():
            hb = (block.get("heads") or {}).get(head) or {}
            c = (hb.get("test") or {}).get("combined", {})
            over = (hb.get("over_seeds") or {}).get("auc") or {}
            lines.append(f"{head:<18}{arm:<22}{fmt(c.get('acc'))}{fmt(c.get('sen'))}{fmt(c.get('spe'))}"
                         f"{fmt(c.get('f1'))}{fmt(c.get('auc'))}{fmt(over.get('mean'), 11)}{fmt(over.get('sd'))}")
    return "\n".join(lines)


def format_summary(results: dict) -> str:
    """A plain-text table of the combined test metrics per arm."""
    if results.get("task_kind") == "segmentation":
        return format_segmentation_summary(results)
    if results.get("task_kind") == "multitask":
        return format_segmentation_summary(results) + "\n\nclassification heads:\n" + format_heads_summary(results)
    lines = [f"task {results['task']}, test sites {', '.join(results.get('test_sites', []))}",
             f"{'arm':<22}{'ACC':>7}{'SEN':>7}{'SPE':>7}{'AUC':>7}  {'95% CI':<15}{'McNemar p':>10}"
             f"{'MB from sites':>15}{'wall s':>9}"]

    def row(name, block, info):
        c = block["test"]["combined"]
        ci = c.get("auc_ci")
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        return (f"{name:<22}{fmt(c['acc'])}{fmt(c['sen'])}{fmt(c['spe'])}{fmt(c['auc'])}  {ci_text:<15}"
                f"{fmt(block.get('mcnemar_p_vs_centralized'), 10)}{fmt(info['bytes_from_sites'] / 1e6, 15, 2)}"
                f"{fmt(info['wall_s'], 9, 0)}")

    lines += _rows(results, row)
    seeds = results.get("seeds") or []
    if len(seeds) > 1:
        lines[0] += f"; the rows are the primary seed's ({seeds[0]})"
    lines += ["", f"over task-model seeds {', '.join(map(str, seeds))}:" if seeds else "over task-model seeds:",
              f"{'arm':<22}{'AUC mean':>9}{'SD':>7}{'min':>7}{'max':>7}  {'seeds':<12}{'not learned':<24}"
              f"{'AUC - centralized (paired t p)'}"]
    for arm, block in results["arms"].items():
        over = block.get("over_seeds") or {}
        auc = over.get("auc") or {}
        vs = block.get("vs_reference_over_seeds")
        vs_text = _vs_text(vs, "auc")
        seeds_text = ",".join(str(k) for k in block.get("seeds", [])) or "-"
        collapsed = over.get("seeds_with_collapse")
        collapsed_text = (f"{len(collapsed)} of {over.get('n_seeds', 0)} seeds" if collapsed is not None else "-")
        lines.append(f"{arm:<22}{fmt(auc.get('mean'), 9)}{fmt(auc.get('sd'))}{fmt(auc.get('min'))}{fmt(auc.get('max'))}"
                     f"  {seeds_text:<12}{collapsed_text:<24}{vs_text}")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    path = Path(args.run) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results (run `synthlearn study run` first)")
    print(format_summary(json.loads(path.read_text())))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from synthlearn.report.html import write_report

    html_path, md_path = write_report(args.run_dir)
    print(f"report written to {html_path} and {md_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study", help="run a multi-site study (all arms, same splits, one evaluation)",
        description="Run every arm of a study config on the same training and test sites and evaluate them alike "
                    "(`run`), print the results table of a run folder (`show`), write its report (`report`).")
    sub = parser.add_subparsers(dest="study_command", metavar="STUDY_COMMAND")
    arms = ", ".join(known_arms())
    run = sub.add_parser(
        "run", help="train and evaluate every arm of a study config; re-runs skip complete arms",
        description="Train every arm of the study config on the training sites, with every seed of its `seeds`, "
                    "apply every model to every test case and write RUN_DIR/results.json (and one folder per arm: "
                    "its config, seed, data fingerprint, version, weights, predictions.csv). A re-run skips "
                    "complete arms and resumes interrupted ones. Exit 0 on success, 2 when an input is refused "
                    f"(nothing written). Arms: {arms}.")
    run.add_argument("--config", required=True, help="study config TOML (e.g. configs/study_cpu.toml)")
    run.add_argument("--out", required=True, help="run folder (results.json, one folder per arm)")
    run.add_argument("--study", help="study folder (overrides the config's `study`)")
    run.add_argument("--arms", help=f"comma-separated arms, overriding the config's `arms`; one or more of: {arms}")
    run.add_argument("--force", action="store_true", help="re-run arms that are already complete")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=cmd_run)
    show = sub.add_parser("show", help="print the results table of a run folder",
                          description="Print the combined test metrics of every arm of a run folder (the primary "
                                      "seed's) and each arm's AUC over its seeds (mean, SD, paired test against "
                                      "centralized). Reads RUN_DIR/results.json; writes nothing.")
    show.add_argument("run", help="run folder")
    show.set_defaults(handler=cmd_show)
    report = sub.add_parser("report", help="write report.html (self-contained) and report.md of a run folder",
                            description="Write RUN_DIR/report.html (self-contained: figures embedded) and "
                                        "RUN_DIR/report.md from a run folder's results.json and figures.")
    report.add_argument("run_dir", type=Path, help="run folder written by `synthlearn study run`")
    report.set_defaults(handler=cmd_report)
    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])
