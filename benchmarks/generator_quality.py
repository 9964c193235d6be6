"""Quality of the CATphishing generator on the default phantom (issue 4, "Quality checks").

Measures, for one training site of a study (default: the ``paper`` phantom, site ``tcga``):

1. **Autoencoder reconstruction of held-out cases**: the generator is trained on the site minus its last
   ``--holdout`` cases; those are encoded (posterior mean), decoded (decoder + stage 2) and compared with
   their input in the generator's intensity scale: per-sequence MAE over the brain and SSIM (MONAI
   ``SSIMMetric``, 3D, data range 1.5), and the Dice of the thresholded mask channel with the real whole
   tumour.
2. **Generated masks**: ``--per-class`` cases per class are synthesized (DDIM, the config's steps and
   guidance); reported: the share whose thresholded mask is one connected component *before* keeping the
   largest, and the share that is "plausible": one component with a volume inside
   [0.5 x min, 2 x max] of the real tumour volumes of the site.
3. **Conditional recognition**: a classifier trained on *real* cases of every training site of the study
   (logistic regression, standardised features: tumour volume, centroid and extent, surface/volume ratio,
   and mean / std / 10th / 90th percentile of each z-scored sequence inside the tumour and in a 2-voxel
   shell around it; features computed after :func:`synthlearn.data.preprocess.preprocess_case`, the same
   function for real and synthetic cases) is applied to the synthetic cases; the recognition rate is the
   share classified as the class they were conditioned on (chance = 1 / number of classes, balanced per
   class). Its accuracy on the real test sites is reported as a sanity check.
4. A picture of synthetic cases beside real ones (mid-tumour axial slices, every sequence, mask contour).

Run (about 10-15 minutes on 2 busy cores)::

    PYTHONPATH=src python benchmarks/generator_quality.py --study /tmp/phantom_paper --site tcga \
        --config configs/generator_cpu.toml --work /tmp/genq --picture /tmp/synth_vs_real.png

(``--make-phantom`` writes the default phantom to ``--study`` first when it is missing.)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("generator_quality")


def _subset_site(site_dir: Path, keep: list[str], out: Path) -> Path:
    """A site folder holding only the ``keep`` cases (symlinked) and their labels.csv rows."""
    from synthlearn.data.io import read_labels_csv

    out.mkdir(parents=True, exist_ok=True)
    for case_id in keep:
        (out / case_id).symlink_to((site_dir / case_id).resolve(), target_is_directory=True)
    rows, header = read_labels_csv(site_dir / "labels.csv")
    lines = [",".join(header)] + [",".join(r.get(h, "") for h in header) for r in rows if r["case_id"] in keep]
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return out


def reconstruction_metrics(artifact: Path, cases, cfg) -> dict:
    """Per-sequence MAE (brain) and SSIM, and mask Dice, of held-out cases through the autoencoder."""
    from monai.metrics import SSIMMetric

    from synthlearn.data.contract import SEQUENCES
    from synthlearn.generators.ldm.sample import load_generator
    from synthlearn.generators.ldm.data import load_site_tensors

    gen = load_generator(artifact)
    data = load_site_tensors(tuple(cases), cfg)
    ssim = SSIMMetric(spatial_dims=3, data_range=1.5, win_size=7)
    mae = {s: [] for s in SEQUENCES}
    ssims = {s: [] for s in SEQUENCES}
    dice = []
    with torch.no_grad():
        for i in range(data.x.shape[0]):
            x = data.x[i : i + 1]
            mu, _ = gen.autoencoder.encode(x)
            recon = gen.decode(mu, data.class_index[i : i + 1])
            brain = (x[0, :4] != 0).any(0)
            for c, s in enumerate(SEQUENCES):
                mae[s].append(float((recon[0, c] - x[0, c]).abs()[brain].mean()))
                ssims[s].append(float(ssim(recon[:, c : c + 1].clamp(0, 1.5), x[:, c : c + 1]).mean()))
            pred = recon[0, 4] > cfg.sampling.mask_threshold
            real = x[0, 4] > 0.5
            denom = pred.sum() + real.sum()
            dice.append(float(2 * (pred & real).sum() / denom) if denom > 0 else 1.0)
    return {"n_cases": int(data.x.shape[0]),
            "mae": {s: float(np.mean(v)) for s, v in mae.items()},
            "ssim": {s: float(np.mean(v)) for s, v in ssims.items()},
            "mask_dice_mean": float(np.mean(dice)), "mask_dice_median": float(np.median(dice))}


def tumour_features(images: np.ndarray, seg: np.ndarray) -> np.ndarray | None:
    """Features of the whole tumour of a preprocessed case (z-scored ``(4, X, Y, Z)`` images, seg)."""
    from scipy import ndimage

    mask = seg > 0
    n = int(mask.sum())
    if n < 5:
        return None
    shape = np.asarray(mask.shape, dtype=float)
    coords = np.argwhere(mask) / shape
    centroid = coords.mean(0)
    extent = coords.std(0)
    eroded = ndimage.binary_erosion(mask)
    surface = (mask & ~eroded).sum() / n
    shell = ndimage.binary_dilation(mask, iterations=2) & ~mask & np.any(images != 0, axis=0)
    feats = [np.log(n), *centroid, abs(centroid[0] - 0.5), *extent, surface]
    for c in range(images.shape[0]):
        inside = images[c][mask]
        feats += [inside.mean(), inside.std(), *np.percentile(inside, [10, 90])]
        around = images[c][shell] if shell.any() else np.zeros(1)
        feats += [around.mean(), inside.mean() - around.mean()]
    return np.asarray(feats, dtype=np.float64)


def case_features(cases, shape, label):
    """Feature matrix and class labels of cases with a tumour (others skipped)."""
    from synthlearn.data.contract import LABEL_VALUES
    from synthlearn.data.io import read_case
    from synthlearn.data.preprocess import PreprocessConfig, preprocess_case

    pre = PreprocessConfig(shape=tuple(shape))
    xs, ys = [], []
    for case in cases:
        value = case.labels.get(label)
        if value is None:
            continue
        arrays = read_case(case)
        images, seg = preprocess_case(arrays.images, arrays.seg, pre)
        f = tumour_features(images, seg)
        if f is None:
            continue
        xs.append(f)
        ys.append(LABEL_VALUES[label].index(value))
    return np.stack(xs), np.asarray(ys)


def recognition(study_dir: Path, synthetic: Path, cfg) -> dict:
    """Train a logistic regression on real training-site cases; recognition rate on synthetic cases."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from synthlearn.data.layouts import open_study

    study = open_study(study_dir)
    train = [c for s in study.sites_with_role("train") for c in s.cases]
    test = [c for s in study.sites_with_role("test") for c in s.cases]
    x_tr, y_tr = case_features(train, cfg.shape, cfg.label)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    clf.fit(x_tr, y_tr)
    out = {"classifier": "logistic regression on tumour shape/location/intensity features (real training sites)",
           "n_train_real": int(len(y_tr))}
    if test:
        x_te, y_te = case_features(test, cfg.shape, cfg.label)
        out["real_test_balanced_accuracy"] = float(balanced_accuracy_score(y_te, clf.predict(x_te)))
        out["n_test_real"] = int(len(y_te))
    syn = open_study(synthetic).sites[0].cases
    x_sy, y_sy = case_features(syn, cfg.shape, cfg.label)
    pred = clf.predict(x_sy)
    names = cfg.class_names
    per_class = {names[k]: float(np.mean(pred[y_sy == k] == k)) for k in np.unique(y_sy)}
    out.update(n_synthetic_with_tumour=int(len(y_sy)), recognition_per_class=per_class,
               recognition_balanced=float(np.mean(list(per_class.values()))), chance=1.0 / len(names))
    return out


def mask_plausibility(synthetic: Path, real_cases) -> dict:
    """Share of generated masks that are one component, and one component of a plausible volume."""
    from synthlearn.data.io import load_nifti
    from synthlearn.data.layouts import open_study

    info = json.loads((synthetic / "synthesis.json").read_text())
    real_vol = []
    for case in real_cases:
        seg, aff = load_nifti(case.seg)
        real_vol.append((seg > 0).sum() * abs(np.linalg.det(aff[:3, :3])))
    lo, hi = 0.5 * min(real_vol), 2.0 * max(real_vol)
    plausible, n = 0, 0
    syn = open_study(synthetic).sites[0].cases
    for case in syn:
        seg, aff = load_nifti(case.seg)
        vol = (seg > 0).sum() * abs(np.linalg.det(aff[:3, :3]))
        n += 1
        plausible += int(lo <= vol <= hi)
    shares = [v["one_component_share"] for v in info["classes"].values() if v["one_component_share"] is not None]
    counts = [v["cases"] for v in info["classes"].values() if v["one_component_share"] is not None]
    one = float(np.average(shares, weights=counts)) if shares else float("nan")
    draws = sum(v["draws"] for v in info["classes"].values())
    rejected = sum(v["rejected_no_tumour"] for v in info["classes"].values())
    return {"one_component_share": one, "plausible_volume_share": plausible / max(n, 1),
            "real_volume_range_ml": [float(min(real_vol)) / 1000, float(max(real_vol)) / 1000],
            "draws": draws, "rejected_without_tumour": rejected, "cases": n}


def picture(real_cases, synthetic: Path, out: Path, label: str, per_class: int = 2) -> Path:
    """Mid-tumour axial slices of real and synthetic cases, every sequence, with the mask contour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from synthlearn.data.contract import LABEL_VALUES, SEQUENCES
    from synthlearn.data.io import read_case
    from synthlearn.data.layouts import open_study

    syn = open_study(synthetic).sites[0].cases
    rows = []
    for value in LABEL_VALUES[label]:
        rows += [("real", c) for c in [c for c in real_cases if c.labels.get(label) == value][:per_class]]
        rows += [("synthetic", c) for c in [c for c in syn if c.labels.get(label) == value][:per_class]]
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)), squeeze=False)
    for r, (kind, case) in enumerate(rows):
        arrays = read_case(case)
        mask = arrays.seg > 0
        z = int(np.argmax(mask.sum((0, 1)))) if mask.any() else arrays.images.shape[-1] // 2
        for c, seq in enumerate(SEQUENCES):
            ax = axes[r, c]
            img = arrays.images[c, :, :, z]
            brain = arrays.images[c][arrays.images[c] > 0]
            vmax = np.percentile(brain, 99.5) if brain.size else 1
            ax.imshow(np.rot90(img), cmap="gray", vmin=0, vmax=vmax)
            if mask[:, :, z].any():
                ax.contour(np.rot90(mask[:, :, z]), levels=[0.5], colors="r", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(seq)
            if c == 0:
                ax.set_ylabel(f"{kind}\n{case.labels.get(label)}", fontsize=8,
                              color="tab:blue" if kind == "synthetic" else "black")
    fig.suptitle("real (black) vs synthetic (blue) cases, mid-tumour axial slice, red = whole-tumour mask",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--site", default="tcga")
    parser.add_argument("--config", type=Path, default=Path("configs/generator_cpu.toml"))
    parser.add_argument("--work", type=Path, required=True, help="folder for the artifact and synthetic cases")
    parser.add_argument("--artifact", type=Path, default=None, help="reuse a trained artifact (of --work)")
    parser.add_argument("--holdout", type=int, default=8)
    parser.add_argument("--holdout-file", type=Path, default=None,
                        help="a catphishing arm's holdout/<site>.json (members, holdout): score an artifact of a "
                             "study run on the cases its generator never saw, e.g. with --artifact "
                             "runs/demo/catphishing/artifacts/tcga")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--picture", type=Path, default=Path("/tmp/synth_vs_real.png"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--make-phantom", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from synthlearn.runtime import configure_threads

    configure_threads(args.threads)

    from synthlearn.data.layouts import open_study
    from synthlearn.generators.ldm.sample import synthesize
    from synthlearn.generators.ldm.config import load_generator_config
    from synthlearn.generators.ldm.train import train_generator

    if args.make_phantom and not (args.study / "study.json").exists():
        from synthlearn.data.phantom import make_phantom_study

        make_phantom_study(args.study, preset="paper", seed=0, progress=False)
    cfg = load_generator_config(args.config)
    site = open_study(args.study).site(args.site)
    cases = list(site.cases)
    if args.holdout_file is not None:
        split = json.loads(args.holdout_file.read_text())
        train_ids = list(split["members"])
        held = [c for c in cases if c.case_id in set(split["holdout"])]
        args.holdout = len(held)
    else:
        train_ids = [c.case_id for c in cases[: len(cases) - args.holdout]]
        held = cases[len(cases) - args.holdout :]
    args.work.mkdir(parents=True, exist_ok=True)
    timings = {}
    artifact = args.artifact or args.work / "artifact"
    if args.artifact is None or not (artifact / "manifest.json").exists():
        sub = args.work / "train_site"
        if sub.exists():
            shutil.rmtree(sub)
        _subset_site(site.path, train_ids, sub)
        t0 = time.perf_counter()
        train_generator(sub, cfg, artifact, seed=args.seed, progress=False)
        timings["train_s"] = round(time.perf_counter() - t0, 1)
    cfg = load_generator_config(args.config) if args.artifact is None else cfg
    from synthlearn.generators.ldm.sample import load_generator

    cfg = load_generator(artifact).cfg
    results: dict = {"study": str(args.study), "site": args.site, "config": str(args.config),
                     "n_train_cases": len(train_ids), "holdout": args.holdout}
    results["reconstruction_heldout"] = reconstruction_metrics(artifact, held, cfg)
    synthetic = args.work / "synthetic"
    if synthetic.exists():
        shutil.rmtree(synthetic)
    t0 = time.perf_counter()
    synthesize(artifact, args.per_class, synthetic, seed=args.seed, progress=False)
    timings["synthesize_s"] = round(time.perf_counter() - t0, 1)
    results["masks"] = mask_plausibility(synthetic, [c for c in cases if c.case_id in train_ids])
    results["recognition"] = recognition(args.study, synthetic, cfg)
    results["timings"] = timings
    picture(held + cases[:4], synthetic, args.picture, cfg.label)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
