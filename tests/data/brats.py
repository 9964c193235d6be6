"""Write a BraTS-2021 style copy of a contract site (used by several tests)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

BRATS_NAMES = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}


def write_brats_copy(site_dir: Path, dst: Path, max_cases: int | None = None) -> list[str]:
    """Copy the cases of contract ``site_dir`` to ``dst`` in BraTS-2021 layout (seg 3 -> 4) with labels.csv."""
    dst.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader((site_dir / "labels.csv").open()))[:max_cases]
    ids = []
    for row in rows:
        case_id = row["case_id"]
        ids.append(case_id)
        case_dst = dst / case_id
        case_dst.mkdir()
        for key, name in BRATS_NAMES.items():
            img = nib.load(str(site_dir / case_id / f"{key}.nii.gz"))
            data = np.asarray(img.dataobj)
            if key == "seg":
                data = np.where(data == 3, 4, data).astype(np.int16)
            nib.save(nib.Nifti1Image(data, img.affine), str(case_dst / f"{case_id}_{name}.nii.gz"))
    with (dst / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return ids
