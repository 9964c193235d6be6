"""The CATphishing diversity filter: drop near-duplicate synthetic cases within a site.

Paper 000, "Methods": "we extracted radiomics features from the whole tumor and calculated the distances
between the radiomics features for all sample pairs within each site. Samples exhibiting high similarity,
those with distances below the 20th percentile of the distance distribution among synthetic samples at
each site, were excluded." (1600 + 1600 generated per site; 2087 mutant + 2527 wildtype kept over three
sites.)

What synthlearn does, exactly:

1. Features: whole-tumour (``seg > 0``) radiomics of every synthetic case of the site
   (:func:`synthlearn.evaluate.radiomics.radiomics_matrix`: shape once, first-order + GLCM per sequence).
   A case whose tumour is too small for radiomics (empty or a few voxels: the generator drew no usable
   tumour) cannot be compared; it is reported in ``failed_case_ids`` and **not kept** (a voxel-wise task
   model has no tumour voxels to learn from in it anyway).
2. Each feature is standardised over the site's cases (z-score; constant features are dropped).
3. Euclidean distances between all pairs (classes pooled, as in the paper); the threshold is the
   ``percentile``-th percentile of those distances (numpy's linear interpolation). With
   ``threshold_from="nearest"`` it is instead the percentile of each case's nearest-neighbour distance
   (a much lower threshold; see the note below).
4. Greedy removal, deterministic: the close pairs (distance strictly below the threshold) are visited in
   order of increasing distance (ties by case order). For a pair whose two cases are both still kept, the
   case with more close partners among the still-kept cases is dropped; on a tie, the one later in case
   order (sorted case ids for :func:`filter_site`). After the pass no two kept cases are closer than the
   threshold. Only one case of each close pair goes: the one with more close partners.

Note on kept counts: read literally ("pairs closer than the 20th percentile of all pairwise distances"),
a fifth of all pairs are close, so every case has on average 0.2 (N - 1) close partners and the greedy
pass keeps an independent set of that graph: on i.i.d. Gaussian features it keeps about 30 % of 200
cases and 10 % of 1600, and far fewer on clustered features. The paper kept 48 % (4614 of 9600). The
percentile and ``threshold_from`` are therefore settings, and the report records the kept counts.

The filter never deletes or changes a case: :func:`filter_site` writes ``diversity.json`` (the report,
with the kept case ids) and leaves using the subset to the caller.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.spatial.distance import pdist, squareform

from synthlearn.data.contract import LABEL_COLUMNS, CaseRecord
from synthlearn.data.io import write_json
from synthlearn.data.layouts import open_study
from synthlearn.evaluate.radiomics import RadiomicsSettings, radiomics_matrix

log = logging.getLogger(__name__)

REPORT_NAME = "diversity.json"
UNKNOWN_CLASS = "unknown"


@dataclasses.dataclass(frozen=True)
class DiversityReport:
    """Outcome of the diversity filter on one site.

    Attributes:
        kept_case_ids: cases kept, in input order.
        dropped_case_ids: cases dropped as near-duplicates, in the order they were dropped.
        failed_case_ids: cases without usable tumour features (not kept; see the module docstring).
        n_before: number of cases given.
        n_after: ``len(kept_case_ids)``.
        percentile: the percentile used.
        threshold_from: ``pairs`` or ``nearest`` (see :func:`diversity_keep_mask`).
        threshold: the distance threshold (standardised-feature units); NaN when fewer than 2 usable cases.
        per_class: class value -> ``{"before": n, "after": n}`` over ``label_column`` (``unknown`` for cases
            without that label).
        label_column: the label the per-class counts use.
        n_features: number of standardised features the distances use.
        n_close_pairs: number of pairs closer than the threshold.
    """

    kept_case_ids: tuple[str, ...]
    dropped_case_ids: tuple[str, ...]
    failed_case_ids: tuple[str, ...]
    n_before: int
    n_after: int
    percentile: float
    threshold_from: str
    threshold: float
    per_class: dict[str, dict[str, int]]
    label_column: str
    n_features: int
    n_close_pairs: int

    def to_dict(self) -> dict:
        """JSON-ready dict (lists instead of tuples; NaN threshold as None)."""
        d = dataclasses.asdict(self)
        for k in ("kept_case_ids", "dropped_case_ids", "failed_case_ids"):
            d[k] = list(d[k])
        d["threshold"] = None if not np.isfinite(self.threshold) else float(self.threshold)
        return d


def standardize_features(features: np.ndarray) -> np.ndarray:
    """Z-score the columns of ``(N, F)`` features; constant (or non-finite) columns are dropped.

    Returns:
        ``(N, F')`` float64 with ``F' <= F``.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, F), found shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN/inf; drop those rows first")
    sd = features.std(axis=0)
    keep = sd > 1e-12 * np.maximum(1.0, np.abs(features).max(axis=0))
    return (features[:, keep] - features[:, keep].mean(axis=0)) / sd[keep]


THRESHOLD_FROM = ("pairs", "nearest")


def diversity_keep_mask(features: np.ndarray, percentile: float = 20.0, *,
                        threshold_from: str = "pairs") -> tuple[np.ndarray, float, int]:
    """The greedy near-duplicate removal on standardised features (steps 3 and 4 of the module docstring).

    Args:
        features: ``(N, F)`` finite features, already standardised (or in any metric you want distances in).
        percentile: pairs closer than this percentile of the distances are near-duplicates
            (0 keeps everything).
        threshold_from: ``"pairs"`` (percentile of all pairwise distances, the paper's wording) or
            ``"nearest"`` (percentile of every case's nearest-neighbour distance).

    Returns:
        ``(keep, threshold, n_close_pairs)``: ``(N,)`` bool mask of kept cases, the distance threshold
        (NaN when N < 2) and the number of close pairs.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, F), found shape {features.shape}")
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], found {percentile}")
    if threshold_from not in THRESHOLD_FROM:
        raise ValueError(f"threshold_from must be one of {THRESHOLD_FROM}, found {threshold_from!r}")
    n = features.shape[0]
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep, float("nan"), 0
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN/inf; drop those rows first")
    dist = pdist(features) if features.shape[1] else np.zeros(n * (n - 1) // 2)
    if threshold_from == "pairs":
        threshold = float(np.percentile(dist, percentile))
    else:
        square = squareform(dist)
        np.fill_diagonal(square, np.inf)
        threshold = float(np.percentile(square.min(axis=1), percentile))
    ii, jj = np.triu_indices(n, k=1)  # same order as pdist
    close = np.flatnonzero(dist < threshold)
    if close.size == 0:
        return keep, threshold, 0
    # visit close pairs by increasing distance; ties by (i, j) (stable sort of the pdist order)
    close = close[np.argsort(dist[close], kind="stable")]
    ci, cj = ii[close], jj[close]
    degree = np.bincount(np.concatenate([ci, cj]), minlength=n)
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(ci.tolist(), cj.tolist()):
        neighbours[a].append(b)
        neighbours[b].append(a)
    for a, b in zip(ci.tolist(), cj.tolist()):
        if not (keep[a] and keep[b]):
            continue
        drop = a if degree[a] > degree[b] else b  # b is later in case order (a < b): drop it on a tie
        keep[drop] = False
        for m in neighbours[drop]:
            degree[m] -= 1
    return keep, threshold, int(close.size)


def filter_features(
    case_ids: Sequence[str],
    features: np.ndarray,
    *,
    classes: Sequence[str | None] | None = None,
    percentile: float = 20.0,
    threshold_from: str = "pairs",
    label_column: str = "idh",
) -> DiversityReport:
    """The diversity filter on precomputed features (rows with NaN are reported as failed, not kept).

    Args:
        case_ids: N case ids.
        features: ``(N, F)`` raw features (standardised here).
        classes: N class values for the per-class counts (None = unknown).
        percentile, threshold_from: see :func:`diversity_keep_mask`.
        label_column: name recorded in the report for the classes.

    Returns:
        The :class:`DiversityReport`.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] != len(case_ids):
        raise ValueError(f"features must be ({len(case_ids)}, F) for {len(case_ids)} cases, "
                         f"found shape {features.shape}")
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case_ids must be unique")
    if classes is not None and len(classes) != len(case_ids):
        raise ValueError(f"classes has {len(classes)} values for {len(case_ids)} cases")
    valid = np.isfinite(features).all(axis=1)
    usable = np.flatnonzero(valid)
    std = standardize_features(features[usable]) if usable.size else np.zeros((0, 0))
    keep_usable, threshold, n_close = diversity_keep_mask(std, percentile, threshold_from=threshold_from)
    keep = np.zeros(len(case_ids), dtype=bool)
    keep[usable[keep_usable]] = True
    kept = tuple(case_ids[i] for i in np.flatnonzero(keep))
    dropped = tuple(case_ids[i] for i in usable[~keep_usable])
    failed = tuple(case_ids[i] for i in np.flatnonzero(~valid))
    cls = [(c if c is not None else UNKNOWN_CLASS) for c in classes] if classes is not None \
        else [UNKNOWN_CLASS] * len(case_ids)
    per_class: dict[str, dict[str, int]] = {}
    for c, k in zip(cls, keep):
        entry = per_class.setdefault(c, {"before": 0, "after": 0})
        entry["before"] += 1
        entry["after"] += int(k)
    if failed:
        log.warning("diversity filter: %d case(s) without usable tumour features, not kept: %s",
                    len(failed), ", ".join(failed[:10]) + (" ..." if len(failed) > 10 else ""))
    return DiversityReport(
        kept_case_ids=kept, dropped_case_ids=dropped, failed_case_ids=failed, n_before=len(case_ids),
        n_after=len(kept), percentile=float(percentile), threshold_from=threshold_from, threshold=threshold,
        per_class=dict(sorted(per_class.items())), label_column=label_column, n_features=int(std.shape[1]),
        n_close_pairs=n_close,
    )


def filter_cases(
    cases: Sequence[CaseRecord],
    *,
    percentile: float = 20.0,
    threshold_from: str = "pairs",
    label_column: str = "idh",
    settings: RadiomicsSettings | None = None,
    progress: bool = False,
) -> DiversityReport:
    """The diversity filter on one site's synthetic cases (whole-tumour radiomics, classes pooled).

    Args:
        cases: the site's cases; ids in the report are the cases' ``case_id`` (must be unique).
        percentile, threshold_from: see :func:`diversity_keep_mask` (paper: 20, pairs).
        label_column: label used for the per-class counts (one of the contract's label columns).
        settings: radiomics settings (default first-order + shape + GLCM, 32 bins).
        progress: show a progress bar while computing features.

    Returns:
        The :class:`DiversityReport`.
    """
    if label_column not in LABEL_COLUMNS:
        raise ValueError(f"label_column must be one of {LABEL_COLUMNS}, found {label_column!r}")
    ids = [c.case_id for c in cases]
    matrix = radiomics_matrix(cases, region="tumour", settings=settings, case_ids=ids, progress=progress)
    return filter_features(ids, matrix.features, classes=[c.labels.get(label_column) for c in cases],
                           percentile=percentile, threshold_from=threshold_from, label_column=label_column)


def filter_site(
    site_dir: str | Path,
    percentile: float = 20.0,
    *,
    threshold_from: str = "pairs",
    label_column: str = "idh",
    out: str | Path | None = None,
    settings: RadiomicsSettings | None = None,
    progress: bool = False,
) -> DiversityReport:
    """Apply the diversity filter to a synthetic site folder and write the report (nothing is deleted).

    Args:
        site_dir: one site folder (case folders + ``labels.csv``, what ``synthesize`` writes) in any layout
            :func:`~synthlearn.data.layouts.open_study` reads as a single site.
        percentile, threshold_from: see :func:`diversity_keep_mask` (paper: 20, pairs).
        label_column: label used for the per-class counts.
        out: where to write the JSON report (default ``<site_dir>/diversity.json``).
        settings: radiomics settings.
        progress: show a progress bar.

    Returns:
        The :class:`DiversityReport`; ``report.kept_case_ids`` is the subset to train on.
    """
    study = open_study(site_dir)
    if len(study.sites) != 1:
        raise ValueError(f"{site_dir}: expected one site folder, found a study with sites "
                         f"{[s.name for s in study.sites]}; call filter_site on each site folder")
    cases = sorted(study.sites[0].cases, key=lambda c: c.case_id)
    if not cases:
        raise ValueError(f"{site_dir}: no cases to filter")
    missing = [p for p in study.problems if p.check == "missing-file"]
    if missing:
        raise ValueError(f"{site_dir}: {len(missing)} missing file(s), e.g. {missing[0]}")
    report = filter_cases(cases, percentile=percentile, threshold_from=threshold_from, label_column=label_column,
                          settings=settings, progress=progress)
    target = Path(out) if out is not None else Path(site_dir) / REPORT_NAME
    write_json(target, {"site": study.sites[0].name, **report.to_dict()})
    log.info("diversity filter %s: kept %d of %d (threshold %.3g at the %gth percentile) -> %s",
             study.sites[0].name, report.n_after, report.n_before, report.threshold, percentile, target)
    return report


def read_kept_case_ids(path: str | Path) -> list[str]:
    """Kept case ids from a ``diversity.json`` written by :func:`filter_site` (or its site folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no diversity report; run filter_site on the site folder first")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("kept_case_ids"), list):
        raise ValueError(f"{path}: expected a diversity report with a kept_case_ids list")
    return [str(x) for x in data["kept_case_ids"]]
