"""Verify a study: read every array in full and collect every problem before reporting.

nibabel opens a truncated ``.nii.gz`` and a NaN volume without complaint, so every check here reads the
data. Nothing is written and the input is never modified. Checks per case:

- ``missing-file``: the four sequences and the segmentation exist;
- ``unreadable``: each file reads in full (truncated gzip, not NIfTI, empty file);
- ``dimensions``: each file is a 3D volume;
- ``non-finite``: no NaN or inf;
- ``empty-image``: a sequence is not all zeros;
- ``shape`` / ``affine``: the same across a case's files;
- ``seg-values``: segmentation values in the layout's allowed set (contract 0/1/2/3, BraTS 0/1/2/4);
- ``labels`` / ``label-value``: labels.csv present with its columns, one row per case, valid values.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from synthlearn.data.contract import LABEL_COLUMNS, Problem, Study
from synthlearn.data.io import load_nifti
from synthlearn.data.layouts import open_study

AFFINE_ATOL = 1e-3  # mm; headers written by different tools differ in float rounding


@dataclasses.dataclass(frozen=True)
class SiteSummary:
    name: str
    role: str
    n_cases: int
    shapes: dict[str, int]
    spacings: dict[str, int]
    label_counts: dict[str, dict[str, int]]


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify_study`: every problem found, and a per-site summary."""

    study: Study
    problems: tuple[Problem, ...]
    sites: tuple[SiteSummary, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """Human-readable report: problems (if any), then the per-site summary."""
        lines = []
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s) in {self.study.root} ({self.study.layout} layout):")
            lines.extend(f"  {p}" for p in self.problems)
            lines.append("")
        lines.append(f"study {self.study.root} ({self.study.layout} layout): {len(self.sites)} site(s), "
                     f"{sum(s.n_cases for s in self.sites)} case(s)")
        for s in self.sites:
            shapes = ", ".join(f"{k} x{v}" for k, v in s.shapes.items()) or "-"
            spacings = ", ".join(f"{k} mm x{v}" for k, v in s.spacings.items()) or "-"
            lines.append(f"  {s.name} [{s.role}]: {s.n_cases} cases; shapes {shapes}; spacing {spacings}")
            for col in LABEL_COLUMNS:
                counts = s.label_counts.get(col, {})
                lines.append(f"      {col:<17} " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        lines.append("OK: no problems found" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _value_problems(site: str, case, key: str, file, data: np.ndarray) -> list[Problem]:
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
        out.append(Problem(site, case.case_id, str(file), "empty-image", "a non-zero image", "all voxels zero"))
    return out


def _reference(loaded):
    """The file whose shape and affine most of the case's files share (ties: contract order)."""
    def agree(a, b):
        return a[2] == b[2] and np.allclose(a[3], b[3], atol=AFFINE_ATOL)

    return max(loaded, key=lambda item: sum(agree(item, other) for other in loaded))


def _geometry_problems(site: str, case_id: str, loaded) -> list[Problem]:
    """Shape and affine mismatches against the majority of the case's files (so the odd file is named)."""
    if len(loaded) < 2:
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
    return out


def verify_study(path: str | Path, progress: bool = True) -> VerifyReport:
    """Check a study (any supported layout) and gather every problem.

    Args:
        path: study folder, site folder or BraTS-2021 folder.
        progress: show a progress bar over cases.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is True when nothing was found.

    Raises:
        FileNotFoundError / synthlearn.data.layouts.StudyLayoutError: the folder is no study at all.
    """
    study = open_study(path)
    problems, summaries = check_sites(study.sites, study.problems, progress=progress)
    return VerifyReport(study=study, problems=tuple(problems), sites=tuple(summaries))


def check_sites(sites, known: tuple[Problem, ...] = (), progress: bool = True) -> tuple[list[Problem], list[SiteSummary]]:
    """Read every file of every case of ``sites`` in full (the checked reader of ``verify-data``; ``study run`` uses
    it before anything trains) and gather every problem with its file, expected and found.

    Args:
        sites: :class:`synthlearn.data.contract.SiteRecord` s of an opened study.
        known: problems already found while opening the study (kept first; their missing files are not reported
            twice).
        progress: a progress bar over cases.

    Returns:
        ``(problems, per-site summaries)``.
    """
    problems: list[Problem] = list(known)
    missing = {(p.site, p.case_id, p.file) for p in problems if p.check == "missing-file"}
    summaries = []
    total = sum(len(s.cases) for s in sites)
    bar = tqdm(total=total, desc="verify", unit="case", disable=not progress, leave=False)
    for site in sites:
        shapes: Counter[str] = Counter()
        spacings: Counter[str] = Counter()
        for case in site.cases:
            loaded: list[tuple[str, Path, tuple[int, ...], np.ndarray]] = []
            for key, file in case.files().items():
                if (site.name, case.case_id, str(file)) in missing:
                    continue
                if not Path(file).is_file():
                    problems.append(Problem(site.name, case.case_id, str(file), "missing-file",
                                            f"{key} file", "no such file"))
                    continue
                try:
                    data, affine = load_nifti(file, dtype=np.float32)
                except (ValueError, OSError) as exc:
                    problems.append(Problem(site.name, case.case_id, str(file), "unreadable",
                                            "a NIfTI file that reads in full", str(exc).split(": ", 1)[-1]))
                    continue
                if data.ndim == 4 and data.shape[-1] == 1:
                    data = data[..., 0]
                if data.ndim != 3:
                    problems.append(Problem(site.name, case.case_id, str(file), "dimensions", "a 3D volume",
                                            f"{data.ndim}D, shape {_fmt_shape(data.shape)}"))
                    continue
                problems.extend(_value_problems(site.name, case, key, file, data))
                loaded.append((key, Path(file), data.shape, affine))
            problems.extend(_geometry_problems(site.name, case.case_id, loaded))
            if loaded:
                ref = _reference(loaded)
                shapes[_fmt_shape(ref[2])] += 1
                spacings["x".join(f"{z:.3g}" for z in np.sqrt((ref[3][:3, :3] ** 2).sum(0)))] += 1
            bar.update(1)
        label_counts = {col: dict(sorted(Counter(c.labels.get(col) or "unknown" for c in site.cases).items()))
                        for col in LABEL_COLUMNS}
        summaries.append(SiteSummary(site.name, site.role, len(site.cases), dict(shapes), dict(spacings),
                                     label_counts))
    bar.close()
    return problems, summaries
