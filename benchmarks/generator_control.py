"""Is the generator positive control of the privacy audit caught? (issue 5 item 3)

Takes the artifacts and privacy holdouts of a catphishing arm run (``<run>/catphishing``), and for one site
over-fits its generator to a few members (:func:`synthlearn.generators.ldm.memorising.train_memorising_generator`),
samples it (:func:`synthlearn.generators.ldm.sample.synthesize`) and runs the arm's SSIM attack on it
(:func:`synthlearn.audits.privacy.audit_site` with ``control_synthetic``): the memorised cases against the
site's held-out cases, best SSIM to the control's samples. Also reports the ceiling a perfectly memorising
diffusion model could reach with the *shipped* decoder: the SSIM of each memorised case to its own
reconstruction (posterior mean, decoded) against the held-out cases' best SSIM to those reconstructions.

Run (one variant per process; about 3 minutes each with three processes on two cores)::

    PYTHONPATH=src python benchmarks/generator_control.py --arm runs/demo/catphishing --site utsw \\
        --cases 2 --decoder-steps 60 --steps 300 --per-class 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", type=Path, required=True, help="<run>/catphishing of a catphishing arm run")
    parser.add_argument("--study", type=Path, default=Path("data/phantom"))
    parser.add_argument("--site", required=True)
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--decoder-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=None, help="default: the artifact's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from synthlearn.runtime import configure_threads

    configure_threads(args.threads)
    import torch

    from synthlearn.data.layouts import open_study
    from synthlearn.data.preprocess import PreprocessConfig
    from synthlearn.audits.privacy import SSIMVolumes, _load, _normalised, audit_site, normalize_for_ssim, ssim_matrix
    from synthlearn.strategies.catphishing import control_cases
    from synthlearn.generators.ldm.sample import load_generator
    from synthlearn.generators.ldm.sample import synthesize
    from synthlearn.synthesis.cases import postprocess_sample
    from synthlearn.generators.ldm.data import load_site_tensors, open_site
    from synthlearn.generators.ldm.stages import encode_site, setup_runtime
    from synthlearn.generators.ldm.memorising import train_memorising_generator

    holdout_file = args.arm / "holdout" / f"{args.site}.json"
    artifact = args.arm / "artifacts" / args.site
    synthetic_dir = args.arm / "synthetic" / args.site
    for path in (holdout_file, artifact / "manifest.json", synthetic_dir / "synthesis.json"):
        if not path.is_file():
            raise SystemExit(f"{path}: missing; expected a catphishing arm folder with site {args.site!r} "
                             f"(holdout/, artifacts/ and synthetic/ of `synthlearn study run`)")
    holdout = json.loads(holdout_file.read_text())
    site = open_study(args.study).site(args.site)
    by_id = {c.case_id: c for c in site.cases}
    shipped = load_generator(artifact)
    memorised = control_cases(holdout["members"], site, shipped.cfg.label, args.cases, args.seed)
    pre = PreprocessConfig(shape=tuple(shipped.cfg.shape))
    row: dict = {"site": args.site, "cases": args.cases, "decoder_steps": args.decoder_steps, "steps": args.steps,
                 "per_class": args.per_class, "guidance": args.guidance}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        control = train_memorising_generator(artifact, site.path, memorised, Path(tmp) / "artifact", steps=args.steps,
                                             decoder_steps=args.decoder_steps, seed=args.seed)
        row["train_s"] = round(time.perf_counter() - t0, 1)
        syn = synthesize(control, args.per_class, Path(tmp) / "syn", seed=args.seed, guidance=args.guidance,
                         progress=False)
        row["total_s"] = round(time.perf_counter() - t0, 1)
        result = audit_site([by_id[i] for i in holdout["members"]], [by_id[i] for i in holdout["holdout"]],
                            list(open_study(synthetic_dir).sites[0].cases), preprocess=pre, seed=args.seed,
                            control_synthetic=list(open_study(syn).sites[0].cases), control_case_ids=memorised)
    gen = result["positive_control_generator"]
    row.update(auc=gen["auc"], ci=[gen["ci_low"], gen["ci_high"]], caught=gen["caught"],
               memorised_ssim=gen["member_score_mean"], holdout_ssim=gen["nonmember_score_mean"])

    # ceiling with the shipped decoder: a memorised case vs its own reconstruction
    data = load_site_tensors(open_site(site.path, shipped.cfg, memorised), shipped.cfg)
    mu, _ = encode_site(shipped.autoencoder, data.x, setup_runtime(shipped.cfg), flips=False)
    with torch.no_grad():
        decoded = shipped.decode(mu).float().numpy()
    recon = SSIMVolumes(np.stack([normalize_for_ssim(postprocess_sample(d).images) for d in decoded]))

    def volumes(ids):
        arrays, _ = _load([by_id[i] for i in ids], "case", pre)
        return SSIMVolumes(np.stack([a.images for a in _normalised(arrays)]))

    own = np.diag(ssim_matrix(volumes(memorised), recon))
    held = ssim_matrix(volumes(holdout["holdout"]), recon).max(axis=1)
    row["shipped_decoder_ceiling"] = {"memorised_vs_own_reconstruction": [round(float(v), 3) for v in own],
                                      "holdout_best": round(float(held.max()), 3),
                                      "holdout_mean": round(float(held.mean()), 3)}
    print(json.dumps(row))
    if args.json is not None:
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
