"""Classification figures as PNG (matplotlib, Agg backend, no display needed): ROC curves of several
arms on one plot (paper 000 Fig. 3) and confusion matrices (Fig. 4)."""

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
