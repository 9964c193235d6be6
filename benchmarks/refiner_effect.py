"""What the generator's refiner stage changes in the synthetic cases (fidelity issue, design (a)); no training.

Takes two study runs whose ``catphishing`` arms sampled the *same* generator artifacts, one with the refiner
(``[catphishing] refiner = true``, the default) and one without (``refiner = false``; copy the first run's
``catphishing/artifacts`` and ``catphishing/holdout`` into the second run's folder before running it, so that no
generator is trained again). The same seed draws the same latents, so case ``syn-<class>-<k>`` of a site is one
sample decoded, then refined or not.

Prints, per class, the mean z-scored intensity inside the tumour of each sequence and the tumour's voxels on the
task grid (:func:`synthetic_gap.tumour_stats`) for the unrefined and refined synthetic cases, the real training
cases and the real test cases; and how much the refiner moved the images inside and outside the tumour's crop.
Writes ``--out``/refiner_effect.png (plain vs refined T1c and T2 at each case's largest tumour slice) and
``--out``/refiner_effect.json.

Run (seconds)::

    PYTHONPATH=src python benchmarks/refiner_effect.py --refined runs/rp_ref --plain runs/rp_noref \\
        --config configs/demo.toml --study data/phantom --out /tmp/refiner_effect
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _syn_sites(run: Path) -> dict[str, Path]:
    root = run / "catphishing" / "synthetic"
    sites = {p.name: p for p in sorted(root.iterdir()) if (p / "synthesis.json").is_file()} if root.is_dir() else {}
    if not sites:
        raise SystemExit(f"{run}: expected a run with a catphishing arm's synthetic sites under {root}, found none")
    return sites


def main(argv: list[str] | None = None) -> dict:
    from synthetic_gap import tumour_stats

    from synthlearn.data.io import load_nifti
    from synthlearn.data.layouts import open_study
    from synthlearn.study import load_study_config
    from synthlearn.tasks import get_task

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refined", type=Path, required=True, help="run whose catphishing arm sampled with the refiner")
    ap.add_argument("--plain", type=Path, required=True, help="run of the same artifacts sampled without it")
    ap.add_argument("--config", type=Path, required=True, help="the study config of the runs (TOML)")
    ap.add_argument("--study", type=Path, required=True, help="the real study")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", type=int, default=3, help="cases per class in the figure")
    args = ap.parse_args(argv)
    if args.cases < 1:
        raise SystemExit(f"--cases: expected at least 1 case per class in the figure, found {args.cases}")

    refined, plain = _syn_sites(args.refined), _syn_sites(args.plain)
    if set(refined) != set(plain):
        raise SystemExit(f"--refined has sites {sorted(refined)}, --plain {sorted(plain)}: expected the same")
    for name in refined:
        applied = [json.loads((runs[name] / "synthesis.json").read_text()).get("refiner", {}).get("applied", False)
                   for runs in (refined, plain)]
        if applied != [True, False]:
            raise SystemExit(f"site {name}: expected the refiner applied in --refined and not in --plain, found "
                             f"{applied}")
    scfg = load_study_config(args.config)
    task = get_task(scfg.task)
    study = open_study(args.study)
    rows: dict[str, dict] = {}
    for label, sites in (("synthetic, unrefined", plain), ("synthetic, refined", refined)):
        cases = [c for p in sites.values() for s in open_study(p).sites for c in s.cases]
        rows[label] = tumour_stats(cases, task, scfg.preprocess)
    rows["real training sites"] = tumour_stats([c for s in study.sites if s.role == "train" for c in s.cases], task,
                                               scfg.preprocess)
    rows["real test sites"] = tumour_stats([c for s in study.sites if s.role == "test" for c in s.cases], task,
                                           scfg.preprocess)

    # how far the refiner moved each case, inside the decoded tumour and elsewhere (generator scale)
    moved_in, moved_out, pairs = [], [], []
    for name in sorted(refined):
        for case in sorted(p.name for p in refined[name].iterdir() if p.is_dir()):
            a = np.stack([load_nifti(plain[name] / case / f"{q}.nii.gz")[0] for q in ("t1", "t1c", "t2", "flair")])
            b = np.stack([load_nifti(refined[name] / case / f"{q}.nii.gz")[0] for q in ("t1", "t1c", "t2", "flair")])
            seg = load_nifti(plain[name] / case / "seg.nii.gz")[0] > 0
            d = np.abs(b - a)
            if seg.any():
                moved_in.append(float(d[:, seg].mean()))
            moved_out.append(float(d[:, ~seg].mean()))
            pairs.append((name, case, a, b, seg))
    summary = {"tumour_stats": rows, "mean_abs_change_in_tumour": float(np.mean(moved_in)),
               "mean_abs_change_elsewhere": float(np.mean(moved_out)), "cases": len(pairs)}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for cls in ("wildtype", "mutant"):
        picks += [p for p in pairs if f"syn-{cls}-" in p[1]][: args.cases]
    fig, axes = plt.subplots(len(picks), 4, figsize=(8, 2.1 * len(picks)), squeeze=False)
    for row, (name, case, a, b, seg) in zip(axes, picks):
        z = int(np.argmax(seg.sum(axis=(0, 1)))) if seg.any() else a.shape[-1] // 2
        for ax, img, title in zip(row, (a[1], b[1], a[2], b[2]), ("T1c", "T1c refined", "T2", "T2 refined")):
            ax.imshow(img[:, :, z].T, cmap="gray", origin="lower")
            ax.contour(seg[:, :, z].T, levels=[0.5], colors="r", linewidths=0.6, origin="lower")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        row[0].text(-2, a.shape[2] // 2, f"{name}\n{case}", fontsize=7, ha="right", va="center")
    fig.suptitle("the refiner on the same decoded samples (tumour outlined)", fontsize=10)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "refiner_effect.png", dpi=100)
    (args.out / "refiner_effect.json").write_text(json.dumps(summary, indent=2))
    for label, stats in rows.items():
        print(f"{label:24s}", "; ".join(f"{k}: " + ", ".join(f"{v[q]:+.2f}" for q in ("t1", "t1c", "t2", "flair"))
                                        + f", {v['tumour_voxels']} vox (n {v['n']})" for k, v in stats.items()))
    print(f"mean |refined - unrefined| in the tumour {summary['mean_abs_change_in_tumour']:.4f}, elsewhere "
          f"{summary['mean_abs_change_elsewhere']:.4f} ({len(pairs)} cases); figure {args.out / 'refiner_effect.png'}")
    return summary


if __name__ == "__main__":
    main()
