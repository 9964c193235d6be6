"""Where AsynDGAN's 2D slices check loses Dice: are the generated tumours unlike real ones, or is it the rest of the
image? (AsynDGAN issue; docs/benchmarks.md section 26)

On finished runs of the slices check (``synthlearn paper-check asyndgan-slices`` or a study run of its config with
the ``asyndgan`` / ``asyndgan_pooled`` arms), for each synthetic set ``<run>/<arm>/synthetic``:

- **the real-trained reader**: the run's ``centralized`` (Real-All) model segments the synthetic images; its whole-
  tumour Dice and sensitivity against the masks they were drawn for. Near its Dice on the real test sites means
  the generated tumours look like real tumours to a model that learned from real ones (the converse of what the
  check measures, a model trained on the synthetic images read on real ones);
- **the tumour's contrast** in each image, T2 z-scored over the brain: (mean inside the tumour - mean of the rest
  of the brain) / SD of the rest, its mean and spread over the set, beside the real training and test slices;
- **the brain's texture**: the mean absolute 4-neighbour Laplacian of the z-scored image inside the brain.

Usage (the real slices study first, then any number of synthetic sets; the reader comes from ``--reader-run``):

    PYTHONPATH=src .venv/bin/python benchmarks/asyndgan_slices_gap.py --study data/phantom_slices2d \
        --reader-run runs/check_slices --synthetic runs/check_slices/asyndgan/synthetic \
        runs/check_slices/asyndgan_pooled/synthetic
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np


def slice_stats(files: Sequence[tuple[Path, Path]]) -> dict[str, float]:
    """Tumour contrast (mean and SD over the cases) and brain texture of a set of 2D cases (module docstring), from
    ``(image, segmentation)`` NIfTI paths."""
    contrast, texture = [], []
    for image, seg_path in files:
        x = np.asarray(nib.load(image).dataobj, np.float32).squeeze()
        seg = np.asarray(nib.load(seg_path).dataobj).squeeze()
        brain = x != 0
        tumour, rest = brain & (seg > 0), brain & (seg == 0)
        if tumour.sum() < 5 or rest.sum() < 50:
            continue
        z = (x - x[brain].mean()) / x[brain].std()
        contrast.append((z[tumour].mean() - z[rest].mean()) / z[rest].std())
        lap = np.abs(4 * z[1:-1, 1:-1] - z[:-2, 1:-1] - z[2:, 1:-1] - z[1:-1, :-2] - z[1:-1, 2:])
        inside = brain[1:-1, 1:-1] & brain[:-2, 1:-1] & brain[2:, 1:-1] & brain[1:-1, :-2] & brain[1:-1, 2:]
        texture.append(lap[inside].mean())
    if not contrast:
        raise ValueError(f"no case with >= 5 tumour and >= 50 other brain voxels among {len(files)} cases")
    return {"cases": len(contrast), "contrast": float(np.mean(contrast)), "contrast_sd": float(np.std(contrast)),
            "texture": float(np.mean(texture))}


def case_files(study: Path, roles: Sequence[str] | None, sequence: str = "t2") -> list[tuple[Path, Path]]:
    """``(image, segmentation)`` paths of the cases of the study's sites with one of ``roles`` (None: every site)."""
    from synthlearn.data.layouts import open_study

    return [(c.images[sequence], c.seg) for s in open_study(study).sites if roles is None or s.role in roles
            for c in s.cases if c.seg is not None]


def reader_dice(reader_run: Path, synthetic: Path) -> dict[str, float]:
    """The run's centralized model on a synthetic set: whole-tumour Dice and sensitivity (means over images)."""
    from synthlearn.data.layouts import open_study
    from synthlearn.study import segment_test_cases
    from synthlearn.tasks.cache import DatasetCache
    from synthlearn.tasks.model import TaskModel

    model = TaskModel.load(reader_run / "centralized" / "model")
    cases = [c for s in open_study(synthetic).sites for c in s.cases]
    rows, _ = segment_test_cases({"reader": model}, cases, DatasetCache(model.preprocess))
    return {"reader_dice": float(np.mean([float(r["dice_wt"]) for r in rows])),
            "reader_sen": float(np.mean([float(r["sen_wt"]) for r in rows]))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="the real slices study (data/phantom_slices2d)")
    parser.add_argument("--reader-run", type=Path, required=True, help="a run of the check with a centralized arm")
    parser.add_argument("--synthetic", type=Path, nargs="+", required=True, help="<run>/<arm>/synthetic folders")
    args = parser.parse_args(argv)
    model = args.reader_run / "centralized" / "model" / "model.json"
    if not model.is_file():
        parser.error(f"--reader-run {args.reader_run}: expected a run of the check with a finished centralized arm "
                     f"({model}), found none")
    for folder in args.synthetic:
        if not (folder / "study.json").is_file():
            parser.error(f"--synthetic {folder}: expected a synthetic study (<run>/<arm>/synthetic with study.json), "
                         "found none")
    print("| set | images | reader Dice | reader sensitivity | tumour contrast (SD over images) | brain texture |")
    print("|---|---|---|---|---|---|")
    for label, roles in (("real training slices", ("train",)), ("real test slices", ("test",))):
        s = slice_stats(case_files(args.study, roles))
        print(f"| {label} | {s['cases']} | | | {s['contrast']:.2f} ({s['contrast_sd']:.2f}) | {s['texture']:.2f} |")
    for folder in args.synthetic:
        s = slice_stats(case_files(folder, None))
        r = reader_dice(args.reader_run, folder)
        print(f"| {folder} | {s['cases']} | {r['reader_dice']:.3f} | {r['reader_sen']:.3f} | "
              f"{s['contrast']:.2f} ({s['contrast_sd']:.2f}) | {s['texture']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
