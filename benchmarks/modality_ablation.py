"""Modality ablation of the multi-task model (Ren et al., paper 001): which sequences carry each marker?

Runs ``synthlearn study run`` with the centralized arm of a multi-task study config once per sequence set (T1; T1 +
T2; T1 + T2 + T1c; all four, the paper's order), every set with the same seeds, splits and settings (the config's
``sequences``), then tabulates per set the combined test AUC of each head (mean +/- SD over seeds) and the mean Dice,
and draws them as one figure.

Run (about 2-3 minutes per set and seed on two cores)::

    PYTHONPATH=src python benchmarks/modality_ablation.py --config configs/study_multitask.toml --study data/phantom \\
        --seeds 0 1 2 --out /tmp/ablation --figure docs/images/modality_ablation.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETS = (("t1",), ("t1", "t2"), ("t1", "t2", "t1c"), ("t1", "t2", "t1c", "flair"))


def _run(config: Path, study: str, sequences: tuple[str, ...], seeds: list[int], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "config.toml"
    cfg.write_text(f'base = "{config.resolve()}"\narms = ["centralized"]\nseeds = {json.dumps(seeds)}\n'
                   f'sequences = {json.dumps(list(sequences))}\n')
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "synthlearn.cli", "study", "run", "--config", str(cfg), "--out", str(out / "run"),
           "--study", study, "-q"]
    with open(out / "log.txt", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); see {out / 'log.txt'}")
    return {"wall_s": time.perf_counter() - t0, "results": json.loads((out / "run" / "results.json").read_text())}


def _stat(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, type=Path, help="a multi-task study config TOML")
    ap.add_argument("--study", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--figure", type=Path, default=None, help="PNG of AUC per head and Dice per sequence set")
    args = ap.parse_args(argv)
    from synthlearn.study import load_study_config

    task = load_study_config(args.config).task  # a missing or malformed config is refused here, before any training
    if task != "multitask":
        raise SystemExit(f"{args.config}: expected a multi-task study config (task = \"multitask\"), found task = "
                         f"{task!r}")
    rows = {}
    for seqs in SETS:
        name = "+".join(seqs)
        run = _run(args.config, args.study, seqs, args.seeds, args.out / name)
        block = run["results"]["arms"]["centralized"]
        per_head = {h: _stat([e["test"]["combined"]["auc"] for e in hb["per_seed"].values()
                              if e["test"]["combined"]["auc"] is not None])
                    for h, hb in block["heads"].items()}
        dice = _stat([e["test"]["combined"]["dice_mean"] for e in block["per_seed"].values()])
        rows[name] = {"heads": per_head, "dice_mean": dice, "wall_s": run["wall_s"]}
        print(f"{name:<18}" + "".join(f"{h} {m:.3f}+/-{s:.3f}  " for h, (m, s) in per_head.items())
              + f"Dice {dice[0]:.3f}+/-{dice[1]:.3f}  ({run['wall_s']:.0f} s)", flush=True)
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=1))
    if args.figure is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(rows)
        heads = list(next(iter(rows.values()))["heads"])
        fig, ax = plt.subplots(figsize=(7.5, 4))
        x = range(len(names))
        for h in heads:
            m = [rows[n]["heads"][h][0] for n in names]
            s = [rows[n]["heads"][h][1] for n in names]
            ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=f"AUC {h}")
        ax.errorbar(x, [rows[n]["dice_mean"][0] for n in names], yerr=[rows[n]["dice_mean"][1] for n in names],
                    marker="s", linestyle="--", color="black", capsize=3, label="Dice (mean of WT/TC/ET)")
        ax.set_xticks(list(x), [n.replace("+", " + ").upper() for n in names], fontsize=8)
        ax.set_ylim(0.0, 1.0)
        ax.axhline(0.5, color="grey", linewidth=0.5)
        ax.set_ylabel(f"combined test sites, mean +/- SD over seeds {args.seeds}")
        ax.set_title("Modality ablation of the multi-task model (centralized)")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure, dpi=110)
        print(f"figure written to {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
