"""Is it the refiner's content or only its texture? A control for the generator's refiner stage (fidelity issue).

The refiner (:mod:`synthlearn.models.refiner`) adds a residual to the crop around each decoded tumour. This probe
separates what that residual carries from how much it roughens the crop: on one synthetic draw sampled twice from
the same artifacts (``--refined``: a run whose catphishing arm sampled with the refiner; ``--plain``: the same
artifacts without it, ``[catphishing] refiner = false``; see ``refiner_effect.py``), it trains the study's task
model (``synthlearn study run --arms centralized``, the config's seeds) on three training sets beside the real test
sites:

- ``plain``: the plain run's kept cases (its diversity filter), as decoded;
- ``refined``: the refined run's kept cases;
- ``noise``: the plain run's kept cases plus, in place of each case's refiner residual (refined - plain, same case
  id: the same latents), Gaussian noise of the same standard deviation per sequence on the same voxels, with the
  plain case's tumour mask. It keeps how much the refiner roughens the crop and drops where and what it draws.

If ``noise`` recovers what ``refined`` gains over ``plain``, the refiner's gain is texture the decoder lacks,
not class content. The table gives each set's AUC per seed and its mean and SD.

Run (about 4-5 minutes per set and seed on two cores)::

    PYTHONPATH=src python benchmarks/refiner_noise_control.py --refined runs/rp_ref --plain runs/rp_noref \\
        --config configs/demo.toml --study data/phantom --out /tmp/refiner_noise
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

SEQUENCES = ("t1", "t1c", "t2", "flair")


def _kept(site: Path) -> list[str]:
    """The site's case ids in labels.csv order, those its diversity filter kept when it ran."""
    from synthlearn.synthesis.diversity import REPORT_NAME, read_kept_case_ids

    lines = (site / "labels.csv").read_text().splitlines()
    ids = [ln.split(",")[0] for ln in lines[1:] if ln.strip()]
    if (site / REPORT_NAME).is_file():
        keep = set(read_kept_case_ids(site))
        ids = [i for i in ids if i in keep]
    return ids


def _labels(site: Path, ids: list[str]) -> str:
    lines = (site / "labels.csv").read_text().splitlines()
    keep = set(ids)
    return "\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] in keep]) + "\n"


def build(refined: Path, plain: Path, out: Path, study_dir: Path, seed: int) -> dict[str, Path]:
    from synthetic_gap import write_study

    from synthlearn.data.io import load_nifti, save_nifti
    from synthlearn.data.layouts import open_study

    meta = json.loads((study_dir / "study.json").read_text())
    tests = [s for s in open_study(study_dir).sites if s.role == "test"]
    ref_sites = {p.name: p for p in sorted((refined / "catphishing" / "synthetic").iterdir()) if p.is_dir()}
    plain_sites = {p.name: p for p in sorted((plain / "catphishing" / "synthetic").iterdir()) if p.is_dir()}
    if not ref_sites or set(ref_sites) != set(plain_sites):
        raise SystemExit(f"expected the same synthetic sites in both runs, found {sorted(ref_sites)} and "
                         f"{sorted(plain_sites)}")
    rng = np.random.default_rng(seed)
    studies = {}
    for kind in ("plain", "refined", "noise"):
        root = out / "studies" / kind
        studies[kind] = root
        if (root / "study.json").is_file():
            continue
        root.mkdir(parents=True, exist_ok=True)
        names = []
        for name in sorted(ref_sites):
            src = ref_sites[name] if kind == "refined" else plain_sites[name]
            ids = _kept(src)
            dest = root / f"{kind}_{name}"
            dest.mkdir(exist_ok=True)
            for case_id in ids:
                if kind != "noise":
                    if not (dest / case_id).exists():
                        os.symlink((src / case_id).resolve(), dest / case_id)
                    continue
                (dest / case_id).mkdir(exist_ok=True)
                for q in SEQUENCES:
                    a, affine = load_nifti(plain_sites[name] / case_id / f"{q}.nii.gz")
                    b, _ = load_nifti(ref_sites[name] / case_id / f"{q}.nii.gz")
                    moved = (b != a) & (a != 0)  # the refiner's voxels inside the brain
                    noisy = a.copy()
                    if moved.any():
                        sd = float((b - a)[moved].std())
                        noisy[moved] = a[moved] + rng.normal(0.0, sd, int(moved.sum())).astype(a.dtype)
                    save_nifti(dest / case_id / f"{q}.nii.gz", noisy, affine)
                seg, affine = load_nifti(plain_sites[name] / case_id / "seg.nii.gz")
                save_nifti(dest / case_id / "seg.nii.gz", seg.astype(np.uint8), affine)
            (dest / "labels.csv").write_text(_labels(src, ids))
            names.append(dest.name)
        write_study(root, meta, names, tests)
    return studies


def main(argv: list[str] | None = None) -> list[dict]:
    import subprocess

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refined", type=Path, required=True)
    ap.add_argument("--plain", type=Path, required=True)
    ap.add_argument("--config", type=Path, required=True, help="study config (its seeds and task schedule)")
    ap.add_argument("--study", type=Path, required=True, help="the real study (its test sites)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise")
    ap.add_argument("--kinds", default="plain,refined,noise", help="which sets to train on, in this order")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - {"plain", "refined", "noise"}:
        raise SystemExit(f"--kinds: expected a subset of plain,refined,noise, found {args.kinds!r}")
    for run in (args.refined, args.plain):
        if not (run / "catphishing" / "synthetic").is_dir():
            raise SystemExit(f"{run}: expected a study run with a catphishing arm's synthetic sites, found none")
    studies = build(args.refined, args.plain, args.out, args.study, args.seed)
    rows = []
    for kind in kinds:
        root = studies[kind]
        run_dir = args.out / "runs" / kind
        if not (run_dir / "results.json").is_file():
            subprocess.run([sys.executable, "-m", "synthlearn.cli", "study", "run", "--config", str(args.config),
                            "--study", str(root), "--arms", "centralized", "--out", str(run_dir), "-q"], check=True)
        arm = json.loads((run_dir / "results.json").read_text())["arms"]["centralized"]
        per_seed = {s: round(v["test"]["combined"]["auc"], 3) for s, v in arm.get("per_seed", {}).items()}
        over = arm.get("over_seeds", {}).get("auc", {})
        rows.append({"kind": kind, "auc_per_seed": per_seed, "auc_mean": over.get("mean"), "auc_sd": over.get("sd")})
        print(f"{kind:8s} AUC per seed {per_seed}  mean {over.get('mean', float('nan')):.3f} ± "
              f"{over.get('sd', float('nan')):.3f}")
    (args.out / "refiner_noise_control.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
