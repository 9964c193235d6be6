"""Verify a study: read every array in full and collect every problem before reporting.

nibabel opens a truncated ``.nii.gz`` and a NaN volume without complaint, so every check here reads the
data. Nothing is written and the input is never modified. Checks per case:

- ``missing-file``: the four sequences and the segmentation exist;
- ``unreadable``: each file reads in full (truncated gzip, not NIfTI, empty file);
- ``dimensions``: each file is a 3D volume (or a 2D image, in a 2D study);
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
from synthlearn.data.io import AFFINE_ATOL, _fmt_shape, inspect_case, voxel_spacing
from synthlearn.data.layouts import open_study

__all__ = ["AFFINE_ATOL", "SiteSummary", "VerifyReport", "check_sites", "verify_study"]


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
            for col in self.study.labels.names:
                counts = s.label_counts.get(col, {})
                lines.append(f"      {col:<17} " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        lines.append("OK: no problems found" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


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
    problems, summaries = check_sites(study.sites, study.problems, progress=progress, label_columns=study.labels.names)
    return VerifyReport(study=study, problems=tuple(problems), sites=tuple(summaries))


def _case_reference(case, skip) -> tuple[tuple[int, ...], np.ndarray] | None:
    """Shape and affine of a case's first readable file, from its header only (for the site summary)."""
    import nibabel as nib

    for file in case.files().values():
        if str(file) in skip or not Path(file).is_file():
            continue
        try:
            img = nib.load(str(file))
            return tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)
        except Exception:  # noqa: BLE001, S112 (nibabel raises many types; inspect_case reports the file)
            continue
    return None


def check_sites(sites, known: tuple[Problem, ...] = (), progress: bool = True,
                label_columns: tuple[str, ...] = LABEL_COLUMNS) -> tuple[list[Problem], list[SiteSummary]]:
    """Read every file of every case of ``sites`` in full (the checked reader of ``verify-data``; ``study run`` uses
    it before anything trains) and gather every problem with its file, expected and found.

    Args:
        sites: :class:`synthlearn.data.contract.SiteRecord` s of an opened study.
        known: problems already found while opening the study (kept first; their missing files are not reported
            twice).
        progress: a progress bar over cases.
        label_columns: the study's label columns (counted per site).

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
            skip = frozenset(f for (st, cid, f) in missing if st == site.name and cid == case.case_id)
            found, _ = inspect_case(case, site.name, skip=skip)
            problems.extend(found)
            ref = _case_reference(case, skip)
            if ref is not None:
                shapes[_fmt_shape(ref[0])] += 1
                spacings["x".join(f"{z:.3g}" for z in voxel_spacing(ref[1]))] += 1
            bar.update(1)
        label_counts = {col: dict(sorted(Counter(c.labels.get(col) or "unknown" for c in site.cases).items()))
                        for col in label_columns}
        summaries.append(SiteSummary(site.name, site.role, len(site.cases), dict(shapes), dict(spacings),
                                     label_counts))
    bar.close()
    return problems, summaries
