"""NIfTI and table I/O for the data contract.

Reading always loads the whole array (nibabel opens a truncated ``.nii.gz`` and a NaN volume without
complaint; only reading the data finds them). Writing is atomic (temporary file + rename) so that a
killed process never leaves a half-written case behind.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from synthlearn.data.contract import LABEL_COLUMNS, SEQUENCES, CaseRecord, Labels

NIFTI_SUFFIXES = (".nii.gz", ".nii")



def json_safe(obj):
    """JSON-safe copy of nested dicts/lists: NaN/inf -> None, numpy scalars -> Python, keys -> str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj

def find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii`` if either exists, else None."""
    for suffix in NIFTI_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def load_nifti(path: str | Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file in full.

    Returns:
        ``(array, affine)``: the data array as ``dtype`` (3D for images) and the 4x4 affine.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file cannot be read in full (truncated, not NIfTI), naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for corrupt files (EOFError, zlib.error, ...)
        raise ValueError(f"{path}: cannot be read in full ({type(exc).__name__}: {exc})") from exc
    return data, affine


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write_bytes(path: Path, writer) -> None:
    """Write ``path`` through a temporary sibling (``writer(tmp)``) renamed into place; the file ends with the mode
    a plain ``open(path, "w")`` would give it (0666 minus the umask), not the temporary file's private 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, *, description: str = "") -> None:
    """Write ``array`` (3D, or 4D with a trailing channel axis) with ``affine`` to ``path`` atomically; dtype is
    kept (float32, int8...). ``description`` goes into the header's ``descrip`` field (at most 80 bytes)."""
    path = Path(path)
    if len(description.encode()) > 80:
        raise ValueError(f"NIfTI description must be at most 80 bytes, found {len(description.encode())}: "
                         f"{description!r}")
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)

    def _write(tmp: Path) -> None:
        # nibabel picks compression from the suffix: write under the real suffix inside a temp folder
        target = tmp.with_name(tmp.name + "".join(path.suffixes))
        nib.save(img, str(target))
        os.replace(target, tmp)

    _atomic_write_bytes(path, _write)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to ``path`` atomically."""
    _atomic_write_bytes(Path(path), lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@dataclasses.dataclass(frozen=True)
class CaseArrays:
    """A case loaded into memory.

    Attributes:
        images: ``(4, X, Y, Z)`` float32, channels in :data:`SEQUENCES` order.
        seg: ``(X, Y, Z)`` int64 in contract values (0 bg, 1 necrosis/core, 2 oedema, 3 enhancing), or None.
        affine: ``(4, 4)`` voxel-to-world affine of the first sequence.
    """

    images: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray


def read_case(case: CaseRecord) -> CaseArrays:
    """Load a case's four sequences and segmentation (mapped to contract values).

    Raises:
        FileNotFoundError / ValueError: naming the file that is missing or unreadable.
    """
    arrays = []
    affine = None
    for seq in SEQUENCES:
        data, aff = load_nifti(case.images[seq])
        if data.ndim != 3:
            raise ValueError(f"{case.images[seq]}: expected a 3D volume, found shape {data.shape}")
        if arrays and data.shape != arrays[0].shape:
            raise ValueError(
                f"{case.images[seq]}: shape {data.shape} differs from {case.images[SEQUENCES[0]]} {arrays[0].shape}"
            )
        arrays.append(data)
        affine = aff if affine is None else affine
    seg = None
    if case.seg is not None:
        raw, _ = load_nifti(case.seg, dtype=np.float32)
        seg = np.rint(raw).astype(np.int64)
        for src, dst in case.seg_map:
            seg[seg == src] = dst
    return CaseArrays(images=np.stack(arrays).astype(np.float32), seg=seg, affine=affine)


def write_case(
    site_dir: str | Path,
    case_id: str,
    images: np.ndarray,
    seg: np.ndarray,
    affine: np.ndarray,
) -> Path:
    """Write one case in the data contract layout.

    Args:
        site_dir: the site folder.
        case_id: folder name of the case.
        images: ``(4, X, Y, Z)`` float, channels in :data:`SEQUENCES` order (written as float32).
        seg: ``(X, Y, Z)`` integer segmentation in contract values (written as int8).
        affine: ``(4, 4)`` voxel-to-world affine (mm).

    Returns:
        The case folder.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] != len(SEQUENCES):
        raise ValueError(f"images must be (4, X, Y, Z), found shape {images.shape}")
    if seg.shape != images.shape[1:]:
        raise ValueError(f"seg shape {seg.shape} differs from image shape {images.shape[1:]}")
    case_dir = Path(site_dir) / case_id
    for i, seq in enumerate(SEQUENCES):
        save_nifti(case_dir / f"{seq}.nii.gz", images[i].astype(np.float32), affine)
    save_nifti(case_dir / "seg.nii.gz", seg.astype(np.int8), affine)
    return case_dir


def read_labels_csv(path: str | Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of a labels.csv as dicts of raw strings, and the header. Case-id column: ``case_id``
    (``ID``, ``BraTS21ID``, ``subject`` also accepted and renamed)."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    for alias in ("ID", "id", "BraTS21ID", "subject", "subject_id", "case"):
        if "case_id" not in header and alias in header:
            header = ["case_id" if h == alias else h for h in header]
            for row in rows:
                row["case_id"] = row.pop(alias)
    return rows, header


def write_labels_csv(path: str | Path, rows: list[tuple[str, Labels]]) -> None:
    """Write ``labels.csv`` (case_id + every label column; unknown = blank) atomically."""
    lines = [",".join(("case_id",) + LABEL_COLUMNS)]
    for case_id, labels in rows:
        row = labels.as_row()
        lines.append(",".join([case_id] + [row[c] for c in LABEL_COLUMNS]))
    atomic_write_text(path, "\n".join(lines) + "\n")
