"""Re-run the SSIM membership audit of a finished CATphishing run with its reference control (issue 5 item 3).

Runs made before the reference control existed have no ``reference_control`` block in their privacy results.
This reads the run's privacy holdouts (``<run>/catphishing/holdout/<site>.json``) and written synthetic sites
(``<run>/catphishing/synthetic/<site>``) and the real study, and audits each site as the arm does
(:func:`synthlearn.audits.privacy.audit_site`, the study config's preprocessing and seed, all written
synthetic cases of the site unless the config's ``privacy_n_synthetic`` subsamples them), with the other sites'
synthetic cases as the reference. Prints one line per site and writes the results as JSON with ``--out``.
About 1 minute per site at 32^3 on one core (the noisy-copy positive control included).

Run::

    PYTHONPATH=src python benchmarks/privacy_reference.py --run runs/demo --config configs/demo.toml \\
        --study data/phantom [--out /tmp/privacy_reference.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a study run folder with a catphishing arm")
    parser.add_argument("--config", type=Path, required=True, help="the study config the run used")
    parser.add_argument("--study", type=Path, required=True, help="the real study the run read")
    parser.add_argument("--out", type=Path, default=None, help="write the per-site results as JSON here")
    args = parser.parse_args()

    from synthlearn.data.layouts import open_study
    from synthlearn.audits.privacy import audit_site
    from synthlearn.runtime import configure_threads
    from synthlearn.strategies.catphishing import privacy_attack_set
    from synthlearn.study import load_study_config

    configure_threads(1)
    cfg = load_study_config(args.config)
    arm = args.run / "catphishing"
    holdout_dir, synthetic_dir = arm / "holdout", arm / "synthetic"
    if not holdout_dir.is_dir() or not synthetic_dir.is_dir():
        raise SystemExit(f"{arm}: expected the catphishing arm's holdout/ and synthetic/ folders, found "
                         f"{sorted(p.name for p in arm.iterdir()) if arm.is_dir() else 'no arm folder'}")
    sites = sorted(p.stem for p in holdout_dir.glob("*.json"))
    study = open_study(args.study)
    by_id = {s.name: {c.case_id: c for c in s.cases} for s in study.sites if s.name in sites}
    synthetic = {site: privacy_attack_set(list(open_study(synthetic_dir / site).sites[0].cases),
                                          cfg.arm_config("catphishing").privacy_n_synthetic, cfg.seed, site) for site in sites}
    results = {}
    for site in sites:
        split = json.loads((holdout_dir / f"{site}.json").read_text())
        missing = [c for c in split["members"] + split["holdout"] if c not in by_id.get(site, {})]
        if missing:
            raise SystemExit(f"{args.study}: site {site} lacks cases the run's holdout names: {missing[:5]}")
        r = audit_site([by_id[site][c] for c in split["members"]], [by_id[site][c] for c in split["holdout"]],
                       synthetic[site], preprocess=cfg.preprocess, seed=cfg.seed,
                       reference_synthetic={o: synthetic[o] for o in sites if o != site} or None)
        results[site] = r
        m, ref = r["membership"], r.get("reference_control")
        line = f"{site}: membership {m['auc']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
        if ref:
            line += ("; reference " + ", ".join(f"{g} {v['auc']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
                                                for g, v in ref["by_generator"].items())
                     + f"; mean {ref['auc_mean']:.3f}; excess {ref['excess_auc']:.3f} "
                       f"[{ref['excess_ci_low']:.3f}, {ref['excess_ci_high']:.3f}]")
        print(line, flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
