"""Study figures as PNG (matplotlib, Agg backend, no display needed): ROC curves of several
arms on one plot (paper 000 Fig. 3), confusion matrices (Fig. 4) and per-site Dice violin and box plots (segmentation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_roc_curves(curves: Mapping[str, tuple[Sequence[int], np.ndarray]], path: str | Path, *,
                    positive: int | None = 1, title: str = "ROC, combined test sites",
                    aucs: Mapping[str, tuple[float | None, Sequence[float] | None]] | None = None) -> Path:
    """One ROC curve per arm.

    Args:
        curves: arm -> ``(y_true (N,), probs (N, K))``.
        path: PNG to write.
        positive: positive class; None = one-vs-rest micro-average curve over all classes.
        title: figure title.
        aucs: arm -> ``(auc, [lo, hi])`` shown in the legend (default: computed without CI).

    Returns:
        ``path``.
    """
    from sklearn.metrics import roc_curve

    from synthlearn.evaluate.classification import roc_auc

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=120)
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1)
    for arm, (y, p) in curves.items():
        y = np.asarray(y)
        p = np.asarray(p)
        if np.unique(y).size < 2:
            continue
        if positive is not None:
            fpr, tpr, _ = roc_curve(y == positive, p[:, positive])
        else:
            onehot = np.eye(p.shape[1], dtype=bool)[y]
            fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
        auc, ci = (aucs or {}).get(arm, (roc_auc(y, p, positive), None))
        label = arm if auc is None else f"{arm}: AUC {auc:.3f}"
        if ci:
            label += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        ax.plot(fpr, tpr, lw=1.6, label=label)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion_matrices(matrices: Mapping[str, np.ndarray], class_names: Sequence[str], path: str | Path, *,
                            title: str = "confusion matrices, combined test sites") -> Path:
    """Confusion matrices of several arms side by side (rows = true class, columns = predicted), with
    counts and row percentages in the cells.

    Args:
        matrices: arm -> ``(K, K)`` counts.
        class_names: K names.
        path: PNG to write.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    n = max(1, len(matrices))
    k = len(class_names)
    fig, axes = plt.subplots(1, n, figsize=(2.2 + 1.0 * k * n, 1.4 + 0.9 * k), dpi=120, squeeze=False)
    for ax, (arm, cm) in zip(axes[0], matrices.items()):
        cm = np.asarray(cm, dtype=np.float64)
        if cm.shape != (k, k):
            raise ValueError(f"{arm}: confusion matrix must be ({k}, {k}), found {cm.shape}")
        rows = cm.sum(1, keepdims=True)
        frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        ax.imshow(frac, vmin=0, vmax=1, cmap="Blues")
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(cm[i, j])}\n{frac[i, j]:.0%}", ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.6 else "black")
        ax.set_xticks(range(k), class_names, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(k), class_names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_title(arm, fontsize=9)
    axes[0][0].set_ylabel("true", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_segmentation_boxes(rows: Mapping[str, Sequence[Mapping[str, float | str]]], sites: Sequence[str],
                            path: str | Path, *, title: str = "per-case Dice per test site") -> Path:
    """Violin and box plots of the per-case Dice of every model, one panel per region (WT, TC, ET), grouped by test
    site.

    Args:
        rows: model (``arm`` or ``arm:site``) -> its per-case rows (``site``, ``dice_wt``, ``dice_tc``, ``dice_et``).
        sites: the test sites, in order.
        path: PNG to write.
        title: figure title.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    regions = ("wt", "tc", "et")
    names = list(rows)
    if not names or not sites:
        raise ValueError("plot_segmentation_boxes needs at least one model and one test site")
    width = 0.8 / len(names)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(regions), 1, figsize=(max(6.0, 1.2 * len(sites) * max(1, len(names)) / 2 + 2),
                                                       2.3 * len(regions) + 0.6), dpi=110, squeeze=False)
    for ax, region in zip(axes[:, 0], regions):
        for m, name in enumerate(names):
            data = [[float(r[f"dice_{region}"]) for r in rows[name] if r["site"] == site] for site in sites]
            pos = [s + (m - (len(names) - 1) / 2) * width for s in range(len(sites))]
            for values, x in zip(data, pos):  # the distribution's shape (Ren et al. show violins), the box on top
                if len(values) >= 2 and np.ptp(values) > 0:
                    violin = ax.violinplot([values], positions=[x], widths=width * 0.95, showextrema=False)
                    for body in violin["bodies"]:
                        body.set_facecolor(colours[m % len(colours)])
                        body.set_alpha(0.25)
            box = ax.boxplot(data, positions=pos, widths=width * 0.35, patch_artist=True, showfliers=True,
                             flierprops={"markersize": 2})
            for patch in box["boxes"]:
                patch.set_facecolor(colours[m % len(colours)])
                patch.set_alpha(0.6)
            ax.plot([], [], color=colours[m % len(colours)], lw=6, alpha=0.6, label=name)
        ax.set_xticks(range(len(sites)), sites, fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(f"Dice {region.upper()}", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=min(5, len(names)), loc="upper center", bbox_to_anchor=(0.5, 0.965))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
