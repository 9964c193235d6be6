"""A study with channels and label columns of its own, made from the tiny phantom (used by several tests)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

#: the copy's sequences (two of the four, in another order) and label columns (none of the glioma names)
SEQUENCES = ("flair", "t1")
LABELS = {"response": ["no", "yes"], "risk": ["low", "high"]}


def write_custom_copy(src: Path, dst: Path) -> Path:
    """Copy study ``src`` to ``dst`` keeping only flair and t1 (t1c and t2 deleted), with ``study.json`` naming them
    and the label columns ``response`` (yes = IDH-mutant, so it has the phantom's signal) and ``risk`` (high = grade
    4); labels.csv holds only ``case_id``, ``response`` (written ``Yes``/``NO``: values match case-insensitively) and
    ``risk``."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "study.json").read_text())
    meta.update(sequences=list(SEQUENCES), labels=LABELS)
    (dst / "study.json").write_text(json.dumps(meta))
    for site in meta["sites"]:
        rows = list(csv.DictReader((dst / site / "labels.csv").open()))
        with (dst / site / "labels.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["case_id", "response", "risk"])
            for r in rows:
                writer.writerow([r["case_id"], "Yes" if r["idh"] == "mutant" else "NO",
                                 "high" if r["grade"] == "4" else "low"])
                for seq in ("t1c", "t2"):
                    (dst / site / r["case_id"] / f"{seq}.nii.gz").unlink()
    return dst
