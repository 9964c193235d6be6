"""Case grids: cases (rows) by sequences (columns) at the axial slice of largest tumour area.

Used by ``synthlearn show`` for real, phantom and synthetic studies alike, and by the study report
(synthetic beside real, CATphishing Fig. 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from synthlearn.data.contract import SEQUENCES, CaseRecord
from synthlearn.data.io import CaseArrays, read_case
from synthlearn.data.layouts import open_study

SEQUENCE_TITLES = {"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR"}
_LABEL_SHORT = {"idh": "IDH", "codeletion_1p19q": "1p/19q", "mgmt": "MGMT", "grade": "grade", "tumor_type": ""}


def largest_tumour_slice(seg: np.ndarray | None, images: np.ndarray) -> int:
    """Axial (last-axis) index with the largest tumour area; the brain's widest slice without a tumour.

    Args:
        seg: ``(X, Y, Z)`` segmentation or None.
        images: ``(C, X, Y, Z)``.
    """
    if seg is not None and (seg > 0).any():
        return int(np.argmax((seg > 0).sum(axis=(0, 1))))
    return int(np.argmax((images != 0).any(axis=0).sum(axis=(0, 1))))


def case_title(case: CaseRecord) -> str:
    """``site/case`` and its known labels, e.g. ``tcga/tcga-003 | glioblastoma, IDH wildtype, grade 4``."""
    parts = []
    for col, short in _LABEL_SHORT.items():
        value = case.labels.get(col)
        if value is not None:
            parts.append(f"{short} {value}".strip())
    parts += [f"{col} {value}" for col, value in case.labels.items() if col not in _LABEL_SHORT]
    return f"{case.site}/{case.case_id}" + (" | " + ", ".join(parts) if parts else " | labels unknown")


def _interleave_classes(cases: list[CaseRecord]) -> list[CaseRecord]:
    """Reorder a site's cases so tumour types alternate (stable within a type)."""
    by_type: dict[str, list[CaseRecord]] = {}
    for c in cases:
        by_type.setdefault(str(c.labels.tumor_type), []).append(c)
    out: list[CaseRecord] = []
    queues = [list(v) for v in by_type.values()]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def pick_cases(cases: Sequence[CaseRecord], max_cases: int) -> list[CaseRecord]:
    """Up to ``max_cases`` cases taken round-robin over sites (so every site shows) and, within a site,
    alternating tumour types, in a stable order."""
    by_site: dict[str, list[CaseRecord]] = {}
    for c in cases:
        by_site.setdefault(c.site, []).append(c)
    by_site = {k: _interleave_classes(v) for k, v in by_site.items()}
    picked: list[CaseRecord] = []
    i = 0
    while len(picked) < max_cases and any(i < len(v) for v in by_site.values()):
        for site_cases in by_site.values():
            if i < len(site_cases) and len(picked) < max_cases:
                picked.append(site_cases[i])
        i += 1
    return picked


def draw_case_grid(cases: Sequence[CaseRecord], out: str | Path, title: str | None = None,
                   row_titles: Sequence[str] | None = None) -> Path:
    """Draw ``cases`` (rows) x sequences (columns) with the tumour outlined, and save a PNG.

    The whole tumour (seg > 0) is outlined in yellow and the enhancing part (seg == 3) in red; intensities
    are windowed per image to its 0.5-99.5th brain percentiles. Images are shown in radiological
    orientation (patient left on the right, anterior up) assuming RAS+ voxel axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cases:
        raise ValueError("no cases to draw")
    n = len(cases)
    columns = max(len(c.sequences) for c in cases)
    top_in = 0.55 if title else 0.25
    height = 2.3 * n + 0.28 * n + top_in
    fig, axes = plt.subplots(n, columns, figsize=(2.3 * columns, height), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - top_in / height, wspace=0.03,
                        hspace=0.28 * n / (2.3 * n) * 1.0 + 0.02)
    for r, case in enumerate(cases):
        arrays = read_case(case)
        if arrays.images.ndim == 3:  # a 2D study: each case is one slice
            arrays = CaseArrays(arrays.images[..., None], None if arrays.seg is None else arrays.seg[..., None],
                                arrays.affine)
        z = largest_tumour_slice(arrays.seg, arrays.images)
        for c in range(len(case.sequences), columns):
            axes[r, c].axis("off")
        for c, seq in enumerate(case.sequences):
            ax = axes[r, c]
            img = arrays.images[c][:, :, z]
            brain = img[img != 0]
            lo, hi = (np.percentile(brain, [0.5, 99.5]) if brain.size else (0.0, 1.0))
            ax.imshow(np.rot90(img)[:, ::-1], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
                      interpolation="nearest")
            if arrays.seg is not None:
                sl = arrays.seg[:, :, z]
                for mask, colour in ((sl > 0, "yellow"), (sl == 3, "red")):
                    if mask.any() and not mask.all():
                        ax.contour(np.rot90(mask.astype(float))[:, ::-1], levels=[0.5], colors=colour,
                                   linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.03, 0.97, SEQUENCE_TITLES.get(seq, seq), transform=ax.transAxes, color="white",
                    fontsize=8, ha="left", va="top")
        label = row_titles[r] if row_titles is not None else case_title(case)
        axes[r, 0].text(0.0, 1.02, label, transform=axes[r, 0].transAxes, fontsize=8, ha="left", va="bottom")
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / height)
    out = Path(out)
    if not out.suffix:  # matplotlib would add ".png" itself: name the file that is really written
        out = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def show_study(path: str | Path, out: str | Path, max_cases: int = 8, sites: Sequence[str] | None = None) -> Path:
    """Grid picture of up to ``max_cases`` cases of the study (any layout) at ``path``, saved to ``out``.

    Raises:
        ValueError: no cases (or none at the requested sites).
    """
    study = open_study(path)
    cases = [c for c in study.cases if sites is None or c.site in sites]
    if not cases:
        raise ValueError(f"{path}: no cases to show" + (f" at sites {list(sites)}" if sites else ""))
    broken = {(p.site, p.case_id) for p in study.problems if p.check == "missing-file"}
    cases = [c for c in cases if (c.site, c.case_id) not in broken]
    if not cases:
        raise ValueError(f"{path}: every case misses a file; run `synthlearn verify-data {path}`")
    picked = pick_cases(cases, max_cases)
    return draw_case_grid(picked, out, title=f"{Path(path).name}: {len(picked)} of {len(cases)} cases")


#: colours of the contract labels in overlays (1 necrosis / core, 2 oedema, 3 enhancing)
LABEL_COLOURS = {1: "#3b82f6", 2: "#22c55e", 3: "#ef4444"}


def plot_segmentation_overlay(items: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], out: str | Path,
                              title: str | None = None, sequences: Sequence[str] = SEQUENCES) -> Path:
    """Cases (rows) at the slice of largest true tumour: t1c (or the first sequence of a study without one) alone,
    with the true labels, with the predicted labels.

    Args:
        items: ``(row title, image (C, X, Y, Z) preprocessed, truth (X, Y, Z), prediction (X, Y, Z))`` per case (or
            ``(C, X, Y)``, ``(X, Y)``, ``(X, Y)`` in a 2D study).
        out: PNG to write.
        title: figure title.
        sequences: the images' channels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if not items:
        raise ValueError("no cases to draw")
    shown = "t1c" if "t1c" in sequences else sequences[0]
    n = len(items)
    cmap = ListedColormap([LABEL_COLOURS[k] for k in (1, 2, 3)])
    fig, axes = plt.subplots(n, 3, figsize=(6.9, 2.4 * n + 0.6), squeeze=False)
    for r, (label, image, truth, pred) in enumerate(items):
        if truth.ndim == 2:  # a 2D study: the image itself
            image, truth, pred = image[..., None], truth[..., None], pred[..., None]
        z = largest_tumour_slice(truth, image)
        t1c = image[list(sequences).index(shown)][:, :, z]
        lo, hi = np.percentile(t1c, [0.5, 99.5]) if t1c.size else (0.0, 1.0)
        for c, overlay in enumerate((None, truth, pred)):
            ax = axes[r, c]
            ax.imshow(np.rot90(t1c)[:, ::-1], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
                      interpolation="nearest")
            if overlay is not None:
                sl = np.rot90(overlay[:, :, z])[:, ::-1].astype(float)
                ax.imshow(np.ma.masked_where(sl == 0, sl), cmap=cmap, vmin=0.5, vmax=3.5, alpha=0.55,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title((shown, "truth", "prediction")[c], fontsize=9)
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.text(0.5, 0.005, "blue: necrosis / core, green: oedema, red: enhancing", ha="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97 if title else 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_gradcam(items: Sequence[tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray]]], out: str | Path,
                 title: str | None = None, sequences: Sequence[str] = SEQUENCES) -> Path:
    """Cases (rows) at the slice of largest true tumour: t1c (or the first sequence) with the true tumour outlined,
    then one Grad-CAM map per classification head overlaid.

    Args:
        items: ``(row title, image (C, *S), truth (*S), {head: map (*S) in [0, 1]})`` per case (2D or 3D).
        out: PNG to write.
        title: figure title.
        sequences: the images' channels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not items:
        raise ValueError("no cases to draw")
    heads = list(items[0][3])
    shown = "t1c" if "t1c" in sequences else sequences[0]
    n = len(items)
    fig, axes = plt.subplots(n, 1 + len(heads), figsize=(2.3 * (1 + len(heads)), 2.4 * n + 0.6), squeeze=False)
    for r, (label, image, truth, maps) in enumerate(items):
        if truth.ndim == 2:  # a 2D study
            image, truth = image[..., None], truth[..., None]
            maps = {h: m[..., None] for h, m in maps.items()}
        z = largest_tumour_slice(truth, image)
        back = image[list(sequences).index(shown)][:, :, z]
        lo, hi = np.percentile(back, [0.5, 99.5]) if back.size else (0.0, 1.0)
        for c, head in enumerate([None, *heads]):
            ax = axes[r, c]
            ax.imshow(np.rot90(back)[:, ::-1], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
                      interpolation="nearest")
            if head is not None:
                ax.imshow(np.rot90(maps[head][:, :, z])[:, ::-1], cmap="jet", vmin=0, vmax=1, alpha=0.45,
                          interpolation="bilinear")
            mask = truth[:, :, z] > 0
            if mask.any() and not mask.all():
                ax.contour(np.rot90(mask.astype(float))[:, ::-1], levels=[0.5], colors="white", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(shown if head is None else f"Grad-CAM {head}", fontsize=9)
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.text(0.5, 0.005, "white: true tumour outline; colour: Grad-CAM of each head's predicted class (0-1)",
             ha="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97 if title else 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
