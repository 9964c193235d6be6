"""External-validation verbs: ``evaluate`` (a run's arms on a new study) and ``predict`` (one case)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from synthlearn.commands import check_output, positive_int

log = logging.getLogger(__name__)


def _arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    if not arms:
        raise argparse.ArgumentTypeError(f"--arms must name at least one arm (e.g. centralized,local), found {text!r}")
    return arms


def format_external_summary(results: dict) -> str:
    """Plain-text table of the combined metrics of every arm (and site model) of an evaluate run."""
    ref = results.get("reference_arm", "")
    key = f"mcnemar_p_vs_{ref}"
    lines = [f"task {results['task']}, study {results['study']} ({results['layout']} layout): "
             f"{results['n_predicted']} of {results['n_cases']} case(s) predicted, {results['n_labelled']} labelled, "
             f"{len(results['skipped'])} skipped"]
    overlap = results.get("training_overlap") or {}
    if overlap.get("n_cases"):
        lines.append(f"WARNING: {overlap['n_cases']} case(s) are this run's own training cases (the same scans): "
                     f"{', '.join(overlap['cases'][:5])}{' ...' if overlap['n_cases'] > 5 else ''}; the metrics "
                     f"below are not an external validation")
    if not any("test" in b for b in results["arms"].values()):
        lines.append(results.get("note", "no metrics"))
        return "\n".join(lines)
    lines.append(f"{'arm':<22}{'n':>5}{'ACC':>7}{'SEN':>7}{'SPE':>7}{'AUC':>7}  {'95% CI':<15}"
                 f"{'McNemar p vs ' + ref:>24}")

    def fmt(v, w=7, d=3):
        return f"{v:>{w}.{d}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

    def row(name, block):
        c = block["test"]["combined"]
        ci = c.get("auc_ci")
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        return (f"{name:<22}{c['n']:>5}{fmt(c['acc'])}{fmt(c['sen'])}{fmt(c['spe'])}{fmt(c['auc'])}  {ci_text:<15}"
                f"{fmt(block.get(key), 24)}")

    for arm, block in results["arms"].items():
        lines.append(row(arm + (" (mean)" if "site_models" in block else ""), block))
        for site, sub in block.get("site_models", {}).items():
            lines.append(row(f"  {arm}:{site}", sub))
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from synthlearn.evaluate.external import evaluate_run

    check_output(args.out, "folder")
    results = evaluate_run(args.run, args.study, args.out, arms=args.arms, device=args.device,
                           n_bootstrap=args.n_bootstrap, progress=not args.quiet)
    print(format_external_summary(results))
    for s in results["skipped"]:
        print(f"skipped {s['site']}/{s['case']}: {s['file']}: {s['reason']}")
    print(f"results: {Path(args.out) / 'results.json'}, predictions: {Path(args.out) / 'predictions.csv'}")
    return 0 if results["n_predicted"] else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from synthlearn.evaluate.external import predict_case

    case_dir = Path(args.case)
    out = Path(args.out) if args.out else Path(f"{case_dir.name}_{args.arm}" + (f"-{args.model}" if args.model else ""))
    check_output(out, "folder")
    info = predict_case(args.run, args.arm, case_dir, out, model_label=args.model, device=args.device)
    name = info["arm"] + (f":{info['model']}" if info["model"] != info["arm"] else "")
    print(f"case {info['case']}, {name} (mean over {info['region']} voxels):")
    for c, p in info["probabilities"].items():
        print(f"  p({c}) = {p:.4f}")
    print(f"  predicted: {info['pred']}")
    print(f"probability map (stage {info['map']['stage']}, classes {info['map']['classes']}, preprocessed grid): "
          f"{out / info['map']['file']}")
    print(f"overlay: {out / info['overlay']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="apply a study run's trained arms to a new study (external validation)",
        description="Load the trained task models of a study run folder, apply each with the preprocessing stored "
                    "with it to every case of another study (contract, BraTS-2021 folder, site folder or folder "
                    "of sites; every site whatever its role), and write OUT/results.json (per-site and combined "
                    "metrics, McNemar vs centralized, when labels exist), OUT/predictions.csv and the run info. "
                    "Unreadable or incomplete cases are skipped and listed, never fatal.")
    p.add_argument("--run", required=True, type=Path, help="study run folder (written by `synthlearn study run`)")
    p.add_argument("--study", required=True, type=Path, help="the new study, in any supported layout")
    p.add_argument("--out", required=True, type=Path, help="output folder (not the run folder itself)")
    p.add_argument("--arms", type=_arms, default=None, help="comma-separated arms (default: every complete arm)")
    p.add_argument("--device", default=None, help="torch device (default: the one stored with the models)")
    p.add_argument("--n-bootstrap", type=positive_int, default=None,
                   help="bootstrap resamples of the AUC CI (default: the run's [evaluate] setting)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser(
        "predict", help="apply one arm's model to one case: class probabilities, voxel map, overlay PNG",
        description="Apply a trained arm of a study run to one case folder (t1/t1c/t2/flair[/seg].nii.gz or BraTS "
                    "names <case>_t1ce.nii.gz ...). Prints the case's class probabilities (mean over tumour voxels; "
                    "over the brain when the case has no segmentation) and writes the fold-ensemble voxel "
                    "probability map as NIfTI on the model's preprocessed grid, an overlay PNG on t1c and a JSON.")
    p.add_argument("--run", required=True, type=Path, help="study run folder")
    p.add_argument("--arm", required=True, help="the arm whose model to apply (e.g. centralized)")
    p.add_argument("--case", required=True, type=Path, help="the case folder")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: ./<case>_<arm>[-<model>])")
    p.add_argument("--model", default=None, help="model label for arms with several models (local: the site)")
    p.add_argument("--device", default=None, help="torch device (default: the one stored with the model)")
    p.set_defaults(handler=cmd_predict)
