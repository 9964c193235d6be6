"""The task model over seeds: does it learn on every seed, and how far does its AUC move? (task-model issue)

Runs ``synthlearn study run`` once per seed (``seed = k``, ``threads = 1``, one process per job) with the given
study config and arms, then reads every model's combined test AUC and every network's learning check
(final training loss against the loss's chance level, predictions on its own training cases:
:mod:`synthlearn.training.learning_check`) and prints one row per model: AUC per seed, mean, SD, max - min,
final loss / chance per seed and how many of its networks did not learn.

Run (about 2-4 minutes per seed and arm on two cores, two jobs at a time)::

    PYTHONPATH=src python benchmarks/task_seeds.py --config configs/study_cpu.toml --study data/phantom \\
        --arms centralized,local --seeds 0 1 2 3 4 --out /tmp/task_seeds/before

A study of synthetic training sites beside the real test sites (``benchmarks/synthetic_gap.py``'s
``write_study``) measures the task model on one fixed synthetic set the same way (``--arms centralized``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _run_seed(config: Path, study: str, arms: list[str], seed: int, out: Path, extra: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "config.toml"
    cfg.write_text(f'base = "{config.resolve()}"\nseed = {seed}\nthreads = 1\narms = {json.dumps(arms)}\n{extra}\n')
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "synthlearn.cli", "study", "run", "--config", str(cfg), "--out", str(out / "run"),
           "--study", study]
    with open(out / "log.txt", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    return {"seed": seed, "rc": rc, "wall_s": time.perf_counter() - t0}


def _collect(run: Path) -> dict[str, dict]:
    """model label -> {"auc", "checks": {network: check}} for every model of the run."""
    results = json.loads((run / "results.json").read_text())
    out = {}
    for arm, block in results["arms"].items():
        models = block.get("site_models") or {arm: block}
        info = json.loads((run / arm / "arm.json").read_text())
        for label, b in models.items():
            name = arm if label == arm else f"{arm}:{label}"
            model_json = json.loads((run / info["models"][label] / "model.json").read_text())
            out[name] = {"auc": b["test"]["combined"]["auc"], "checks": model_json["info"].get("learning_check", {})}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, type=Path, help="study config TOML")
    ap.add_argument("--study", required=True)
    ap.add_argument("--arms", default="centralized,local")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--extra", default="", help="TOML lines appended to each seed's config (e.g. '[train]\\nlr = 0.1')")
    args = ap.parse_args(argv)
    if not args.config.is_file():
        ap.error(f"--config {args.config}: no such file")
    if args.jobs < 1 or not args.seeds:
        ap.error("--jobs must be >= 1 and --seeds non-empty")
    arms = [a for a in args.arms.split(",") if a]
    extra = args.extra.replace("\\n", "\n")
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda k: _run_seed(args.config, args.study, arms, k, args.out / f"seed-{k}", extra),
                             args.seeds))
    failed = [r for r in runs if r["rc"] != 0]
    if failed:
        print(f"failed seeds: {[r['seed'] for r in failed]} (see {args.out}/seed-K/log.txt)", file=sys.stderr)
    per_seed = {r["seed"]: _collect(args.out / f"seed-{r['seed']}" / "run") for r in runs if r["rc"] == 0}
    seeds = sorted(per_seed)
    models = sorted({m for d in per_seed.values() for m in d})
    table = {}
    lines = ["| model | AUC per seed (" + ", ".join(map(str, seeds)) + ") | mean | SD | max - min | "
             "final loss / chance per seed | networks not learned |", "|---|---|---|---|---|---|---|"]
    for m in models:
        aucs = [per_seed[k][m]["auc"] for k in seeds if m in per_seed[k]]
        checks = [c for k in seeds if m in per_seed[k] for c in per_seed[k][m]["checks"].values()]
        ratios = [[c.get("loss_ratio") for c in per_seed[k][m]["checks"].values()] for k in seeds if m in per_seed[k]]
        not_learned = sum(not c.get("learned", True) for c in checks)
        sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        table[m] = {"auc": aucs, "mean": statistics.mean(aucs), "sd": sd, "range": max(aucs) - min(aucs),
                    "loss_ratio": ratios, "not_learned": not_learned, "networks": len(checks)}
        ratio_txt = " / ".join("+".join(f"{r:.2f}" if r is not None else "?" for r in rs) for rs in ratios)
        lines.append(f"| {m} | {', '.join(f'{a:.3f}' for a in aucs)} | {table[m]['mean']:.3f} | {sd:.3f} | "
                     f"{table[m]['range']:.3f} | {ratio_txt} | {not_learned} of {len(checks)} |")
    print("\n".join(lines))
    print("wall: " + ", ".join(f"seed {r['seed']} {r['wall_s']:.0f} s" for r in runs))
    (args.out / "summary.json").write_text(json.dumps({"config": str(args.config), "arms": arms, "seeds": seeds,
                                                       "extra": extra, "models": table, "runs": runs}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
