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

from synthlearn.data.contract import LABEL_COLUMNS, SEQUENCES, CaseRecord, Labels, Problem

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
        images: ``(C, X, Y, Z)`` float32, channels in the case's sequence order (:data:`SEQUENCES` by default).
        seg: ``(X, Y, Z)`` int64 in contract values (0 bg, 1 necrosis/core, 2 oedema, 3 enhancing), or None.
        affine: ``(4, 4)`` voxel-to-world affine of the first sequence.
    """

    images: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray


# ------------------------------------------------------------------------------------ the checked reader
#: mm; headers written by different tools differ in float rounding
AFFINE_ATOL = 1e-3


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes in mm along the three array axes of a ``(4, 4)`` affine (its columns' norms), ``(3,)`` float64.

    The one place synthlearn computes a voxel size (reader, preprocessing, generators, radiomics, summaries).

    Raises:
        ValueError: the affine is not ``(4, 4)``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4), found shape {affine.shape}")
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


class CaseRefused(ValueError):
    """A case that cannot be used, with the file at fault and what was expected and found.

    Attributes:
        file: the file (or case folder) at fault.
        reason: ``expected ...; found ...``.
        problem: the :class:`~synthlearn.data.contract.Problem` (check name included), when one was found by
            :func:`inspect_case`.
    """

    def __init__(self, file: str | Path, expected: str, found: str, problem: Problem | None = None):
        self.file = str(file)
        self.reason = f"expected {expected}; found {found}"
        self.problem = problem
        super().__init__(f"{self.file}: {self.reason}")


class CaseFileMissing(CaseRefused, FileNotFoundError):
    """A case file that does not exist (also a :class:`FileNotFoundError`)."""


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _value_problems(site: str, case: CaseRecord, key: str, file, data: np.ndarray) -> list[Problem]:
    """Non-finite values, segmentation values outside the allowed set, all-zero images."""
    out = []
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int((~finite).sum()) - n_nan
        out.append(Problem(site, case.case_id, str(file), "non-finite", "finite values",
                           f"{n_nan} NaN and {n_inf} inf voxels"))
    if key == "seg":
        values = np.unique(data[finite])
        allowed = set(case.seg_values)
        bad = [v for v in values.tolist() if v not in allowed]
        if bad:
            shown = ", ".join(f"{v:g}" for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
            out.append(Problem(site, case.case_id, str(file), "seg-values", f"values in {sorted(allowed)}",
                               f"values {shown}"))
    elif finite.any() and not np.any(data[finite]):
        out.append(Problem(site, case.case_id, str(file), "empty-image", f"a non-zero {key} image", "all voxels zero"))
    return out


def _reference(loaded):
    """The file whose shape and affine most of the case's files share (ties: contract order)."""
    def agree(a, b):
        return a[2] == b[2] and np.allclose(a[3], b[3], atol=AFFINE_ATOL)

    return max(loaded, key=lambda item: sum(agree(item, other) for other in loaded))


def _geometry_problems(site: str, case_id: str, loaded) -> list[Problem]:
    """Shape and affine mismatches against the majority of the case's files (so the odd file is named), and an
    affine that maps no volume (non-invertible, zero or non-finite voxel size)."""
    if not loaded:
        return []
    ref = _reference(loaded)
    out = []
    for key, file, shape, affine in loaded:
        if shape != ref[2]:
            out.append(Problem(site, case_id, str(file), "shape",
                               f"shape {_fmt_shape(ref[2])} (as {ref[1].name})", f"shape {_fmt_shape(shape)}"))
        elif not np.allclose(affine, ref[3], atol=AFFINE_ATOL):
            diff = float(np.abs(affine - ref[3]).max())
            out.append(Problem(site, case_id, str(file), "affine", f"the affine of {ref[1].name}",
                               f"an affine differing by up to {diff:.4g} mm"))
    affine = ref[3]
    spacing = voxel_spacing(affine)
    det = float(np.linalg.det(affine[:3, :3])) if np.isfinite(affine).all() else float("nan")
    if not np.isfinite(det) or abs(det) < 1e-12 or not np.all(spacing > 0):
        out.append(Problem(site, case_id, str(ref[1]), "affine",
                           "an invertible voxel-to-world affine with positive voxel sizes",
                           f"voxel sizes {np.round(spacing, 4).tolist()}, determinant {det:.3g}"))
    return out


def inspect_case(case: CaseRecord, site: str = "", *, keep: bool = False, seg_optional: bool = False,
                 skip: frozenset[str] = frozenset()) -> tuple[list[Problem], CaseArrays | None]:
    """Read every file of a case in full and gather every problem (the checks of ``verify-data``).

    Checks: ``missing-file``, ``unreadable`` (does not read in full), ``dimensions`` (not 3D, or 2D for a 2D
    study; a trailing singleton 4th axis is dropped), ``non-finite``, ``empty-image`` (a sequence all zeros), ``seg-values`` (outside
    the layout's allowed set), ``shape`` / ``affine`` (against the majority of the case's files), ``affine`` (not
    invertible or a zero voxel size).

    Args:
        case: the case.
        site: its site's name (for the problems).
        keep: also return the arrays (only when no problem was found).
        seg_optional: a segmentation file that does not exist is no problem (the case is read without one).
        skip: files (as ``str``) already reported missing, not checked again.

    Returns:
        ``(problems, arrays)``: ``arrays`` is a :class:`CaseArrays` (images ``(C, X, Y, Z)`` float32 in the case's
        sequence order, :data:`SEQUENCES` by default, seg ``(X, Y, Z)`` int64 in contract values or None, the first sequence's affine)
        when ``keep`` and no problem, else None.
    """
    problems: list[Problem] = []
    loaded: list[tuple[str, Path, tuple[int, ...], np.ndarray]] = []
    data_by_key: dict[str, np.ndarray] = {}
    affine_first: np.ndarray | None = None
    for key, file in case.files().items():
        if str(file) in skip:
            continue
        if not Path(file).is_file():
            if not (key == "seg" and seg_optional):
                what = "a segmentation" if key == "seg" else f"sequence {key}"
                problems.append(Problem(site, case.case_id, str(file), "missing-file", f"{what} ({Path(file).name})",
                                        "no such file"))
            continue
        try:
            data, affine = load_nifti(file, dtype=np.float32)
        except (ValueError, OSError) as exc:
            problems.append(Problem(site, case.case_id, str(file), "unreadable", "a NIfTI file that reads in full",
                                    str(exc).split(": ", 1)[-1]))
            continue
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim not in (2, 3):
            problems.append(Problem(site, case.case_id, str(file), "dimensions", "a 3D volume (or a 2D image)",
                                    f"{data.ndim}D, shape {_fmt_shape(data.shape)}"))
            continue
        problems.extend(_value_problems(site, case, key, file, data))
        loaded.append((key, Path(file), data.shape, affine))
        if affine_first is None and key != "seg":
            affine_first = affine
        if keep:
            data_by_key[key] = data
    problems.extend(_geometry_problems(site, case.case_id, loaded))
    if not keep or problems:
        return problems, None
    seg = None
    if "seg" in data_by_key:
        seg = np.rint(data_by_key["seg"]).astype(np.int64)
        for src, dst in case.seg_map:
            seg[seg == src] = dst
    images = np.stack([data_by_key[seq] for seq in case.images]).astype(np.float32)
    return problems, CaseArrays(images=images, seg=seg, affine=affine_first)


def read_case(case: CaseRecord, *, seg_optional: bool = False) -> CaseArrays:
    """Load a case's four sequences and segmentation (mapped to contract values), refusing it on the first
    problem :func:`inspect_case` finds (the same checks as ``verify-data``): one checked reader for the
    trainers, ``evaluate``, the generators and the audits.

    Args:
        case: the case.
        seg_optional: read a case whose segmentation file does not exist, with ``seg=None`` (``evaluate``).

    Returns:
        :class:`CaseArrays`.

    Raises:
        CaseRefused: naming the file, what was expected and what was found (:class:`CaseFileMissing`, also a
            ``FileNotFoundError``, for a missing file).
    """
    problems, arrays = inspect_case(case, keep=True, seg_optional=seg_optional)
    if problems:
        p = problems[0]
        kind = CaseFileMissing if p.check == "missing-file" else CaseRefused
        raise kind(p.file, p.expected, p.found, p)
    assert arrays is not None
    return arrays


def write_case(
    site_dir: str | Path,
    case_id: str,
    images: np.ndarray,
    seg: np.ndarray,
    affine: np.ndarray,
    sequences: tuple[str, ...] = SEQUENCES,
) -> Path:
    """Write one case in the data contract layout.

    Args:
        site_dir: the site folder.
        case_id: folder name of the case.
        images: ``(C, X, Y, Z)`` float, channels in ``sequences`` order (written as float32); ``(C, X, Y)``
            for a 2D study.
        seg: ``(X, Y, Z)`` (or ``(X, Y)``) integer segmentation in contract values (written as int8).
        affine: ``(4, 4)`` voxel-to-world affine (mm).
        sequences: the study's sequences (file stems), :data:`SEQUENCES` by default.

    Returns:
        The case folder.
    """
    images = np.asarray(images)
    c = len(sequences)
    if images.ndim not in (3, 4) or images.shape[0] != c:
        raise ValueError(f"images must be ({c}, X, Y, Z) or ({c}, X, Y) for sequences {list(sequences)}, "
                         f"found shape {images.shape}")
    if seg.shape != images.shape[1:]:
        raise ValueError(f"seg shape {seg.shape} differs from image shape {images.shape[1:]}")
    case_dir = Path(site_dir) / case_id
    for i, seq in enumerate(sequences):
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


def write_labels_csv(path: str | Path, rows: list[tuple[str, Labels]],
                     columns: tuple[str, ...] = LABEL_COLUMNS) -> None:
    """Write ``labels.csv`` (case_id + every label column of the study, :data:`LABEL_COLUMNS` by default; unknown =
    blank) atomically."""
    lines = [",".join(("case_id", *columns))]
    for case_id, labels in rows:
        row = labels.as_row(columns)
        lines.append(",".join([case_id] + [row[c] for c in columns]))
    atomic_write_text(path, "\n".join(lines) + "\n")
