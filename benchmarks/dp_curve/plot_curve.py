"""The privacy-utility curve of the CATphishing arm (issue 28 item 4; docs/benchmarks.md section 30).

Reads the study runs of ``benchmarks/dp_curve/demo_eps*.toml`` (one folder per epsilon under ``--runs``), and with
``--reference`` the run of the non-DP demo generator (a `make demo` run folder): per run the arm's AUC per seed,
its mean and SD, each site's spent epsilon (from the artifacts' manifests) and the autoencoder's final losses.
Writes ``--out`` (PNG: AUC against the generator's per-patient epsilon, log axis, the no-noise and non-DP points at
the right) and prints a markdown table.

Run::

    PYTHONPATH=src .venv/bin/python benchmarks/dp_curve/plot_curve.py --runs runs/dp_curve \\
        --out docs/images/dp_curve.png [--reference runs/demo]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_run(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    arm = results["arms"]["catphishing"]
    per_seed = {int(k): v["test"]["combined"]["auc"] for k, v in arm.get("per_seed", {}).items()}
    if not per_seed:
        per_seed = {int(results.get("seeds", [0])[0]): arm["test"]["combined"]["auc"]}
    sites = {}
    for manifest in sorted((run / "catphishing" / "artifacts").glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        privacy = m.get("privacy", {"dp_sgd": False})
        losses = m["training"]["final_losses"]["autoencoder"]
        sites[manifest.parent.name] = {"epsilon": privacy.get("epsilon_total") if privacy.get("dp_sgd") else None,
                                       "dp": bool(privacy.get("dp_sgd")), "l1": losses.get("l1"),
                                       "mask_dice": losses.get("mask_dice"),
                                       "noise": {k: v.get("noise_multiplier")
                                                 for k, v in privacy.get("components", {}).items()}}
    aucs = np.array(list(per_seed.values()), dtype=float)
    return {"per_seed": per_seed, "mean": float(aucs.mean()), "sd": float(aucs.std(ddof=1)) if aucs.size > 1 else 0.0,
            "sites": sites}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of eps*/ study runs")
    parser.add_argument("--reference", type=Path, help="a run of the non-DP demo generator (its catphishing arm)")
    parser.add_argument("--non-dp-aucs", type=float, nargs="+", help="the non-DP demo generator's AUC per task seed "
                        "when no --reference run is at hand (docs/benchmarks.md section 22: 0.885 0.804 0.765)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    rows = {}
    for run in sorted(args.runs.glob("eps*")):
        if (run / "results.json").is_file():
            rows[run.name] = read_run(run)
    if args.reference is not None:
        rows["non-DP demo generator"] = read_run(args.reference)
    elif args.non_dp_aucs:
        a = np.array(args.non_dp_aucs)
        rows["non-DP demo generator"] = {"per_seed": dict(enumerate(args.non_dp_aucs)), "mean": float(a.mean()),
                                         "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0, "sites": {}}
    print("| generator | epsilon per patient (sites) | AUC per seed | mean ± SD | autoencoder L1 / mask Dice loss |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        eps = [s["epsilon"] for s in r["sites"].values()]
        eps_text = ("∞ (no noise)" if all(e is None for e in eps) and any(s["dp"] for s in r["sites"].values())
                    else "∞ (no DP)" if all(e is None for e in eps) else ", ".join(f"{e:.2f}" for e in eps))
        fit = ", ".join(f"{s['l1']:.3f} / {s['mask_dice']:.2f}" for s in r["sites"].values()) or "see section 22"
        seeds = " / ".join(f"{v:.3f}" for _, v in sorted(r["per_seed"].items()))
        print(f"| {name} | {eps_text} | {seeds} | {r['mean']:.3f} ± {r['sd']:.3f} | {fit} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def is_finite(r):
        return bool(r["sites"]) and all(s["epsilon"] is not None for s in r["sites"].values())

    fig, ax = plt.subplots(figsize=(6.4, 4))
    finite = sorted(((np.mean([s["epsilon"] for s in r["sites"].values()]), r) for r in rows.values() if is_finite(r)),
                    key=lambda t: t[0])
    ticks, labels = [], []
    if finite:
        xs = [e for e, _ in finite]
        ax.errorbar(xs, [r["mean"] for _, r in finite], yerr=[r["sd"] for _, r in finite], marker="o", capsize=3,
                    label="DP-SGD generators")
        ticks += xs
        labels += [f"{e:.2g}" for e in xs]
    right = max([e for e, _ in finite], default=10) * 3
    for i, (name, r) in enumerate((n, r) for n, r in rows.items() if not is_finite(r)):
        x = right * (2.2 ** i)
        label = "no noise (DP schedule)" if name == "epsinf" else name
        ax.errorbar([x], [r["mean"]], yerr=[r["sd"]], marker="s", capsize=3, label=label)
        ticks.append(x)
        labels.append("∞\n(no noise)" if name == "epsinf" else "∞\n(no DP)")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    ax.set_xlabel("epsilon per patient of each site's generator (delta 1e-5)")
    ax.set_ylabel("IDH AUC, held-out sites (mean ± SD, 3 seeds)")
    ax.set_ylim(0.1, 1.0)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("CATphishing on the demo phantom: privacy vs utility", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
