"""Timings of the CATphishing audits' building blocks on phantom cases (CPU, torch at 1 thread).

Measures, at 32^3 and 64^3:

* radiomics features of one case (whole tumour: shape + first-order + GLCM of 4 sequences; and whole
  brain first-order + GLCM of 4 sequences, the Frechet Radiomics Distance's default);
* the diversity filter's distance + greedy step on N feature rows;
* one 3D SSIM pair (4 sequences) with cached statistics;
* :func:`synthlearn.audits.privacy.audit_site` on N training, N held-out and N synthetic cases.

Run: ``.venv/bin/python benchmarks/bench_audits.py [--sizes 32 64] [--n 12]``. Timings vary about +/-30 %
between runs on the 2-core machine; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from synthlearn.data.io import CaseArrays
from synthlearn.data.phantom.generate import generate_case
from synthlearn.audits.privacy import SSIMVolumes, audit_site, normalize_for_ssim
from synthlearn.evaluate.radiomics import RadiomicsSettings, radiomics_matrix
from synthlearn.synthesis.diversity import diversity_keep_mask, standardize_features


def _cases(site: str, n: int, size: int, start: int = 0) -> list[CaseArrays]:
    out = []
    for i in range(start, start + n):
        c = generate_case(site, i, seed=0, shape=size)
        out.append(CaseArrays(images=c.images, seg=c.seg.astype(np.int64), affine=c.affine))
    return out


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--n", type=int, default=12, help="cases per role in the audit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    rows = []
    for size in args.sizes:
        train = _cases("tcga", args.n, size)
        holdout = _cases("tcga", args.n, size, start=args.n)
        synthetic = _cases("utsw", args.n, size)
        k = min(4, args.n)
        t_tumour = _time(lambda: radiomics_matrix(train[:k], region="tumour"), 2) / k
        t_brain = _time(lambda: radiomics_matrix(
            train[:k], region="brain", settings=RadiomicsSettings(feature_classes=("firstorder", "glcm"))), 2) / k
        vols = np.stack([normalize_for_ssim(c.images) for c in train[:8]])
        t_stats = _time(lambda: SSIMVolumes(vols), 2) / len(vols)
        v = SSIMVolumes(vols)
        t_pair = _time(lambda: v.ssim_to(v, 0), 3) / len(vols)
        t_audit = _time(lambda: audit_site(train, holdout, synthetic, n_bootstrap=1000))
        rows += [
            (f"radiomics, whole tumour, shape+firstorder+GLCM x4 sequences, {size}^3", f"{t_tumour:.3f} s/case"),
            (f"radiomics, whole brain, firstorder+GLCM x4 sequences, {size}^3", f"{t_brain:.3f} s/case"),
            (f"SSIM statistics (cached once per case), {size}^3", f"{1000 * t_stats:.1f} ms/case"),
            (f"SSIM one pair (4 sequences, cached statistics), {size}^3", f"{1000 * t_pair:.2f} ms/pair"),
            (f"audit_site, {args.n} train + {args.n} held-out + {args.n} synthetic, {size}^3, 1000 bootstraps",
             f"{t_audit:.2f} s"),
        ]
    for n in (400, 1600, 3200):
        x = standardize_features(np.random.default_rng(0).normal(size=(n, 182)))
        rows.append((f"diversity distances + greedy pass, {n} cases x 182 features",
                     f"{_time(lambda: diversity_keep_mask(x, 20.0)):.2f} s"))
    width = max(len(r[0]) for r in rows)
    print(f"| {'what'.ljust(width)} | time |\n|{'-' * (width + 2)}|------|")
    for what, value in rows:
        print(f"| {what.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
