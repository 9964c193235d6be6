"""Classification metrics as CATphishing reports them (paper 000, Tables 4 and 5): ACC, SEN, SPE and
AUC with a bootstrap 95% confidence interval; for three classes also per-class and overall accuracy and
the confusion matrix.

A case's predicted class is the class with the highest probability. For a binary task SEN/SPE refer to
the positive class (IDH-mutant); for more classes they are macro averages of one-vs-rest SEN/SPE and the
AUC is the macro one-vs-rest AUC over the classes present. A metric that is undefined on the data (AUC
with a single class present, SEN without positives) is ``None`` (JSON ``null``), never a made-up number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must be (N, K) with K >= 2, found shape {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true must be (N,) matching probs (N, K), found {y.shape} and {p.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true values must be in [0, {p.shape[1]}), found {sorted(set(y.tolist()))}")
    return y, p


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """``(K, K)`` counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def _auc_rows(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Binary ROC AUC of every row: ``positive`` and ``scores`` are ``(B, N)``; ties count one half
    (Mann-Whitney U from average ranks, equal to ``sklearn.metrics.roc_auc_score``). NaN for rows with a
    single class."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    n_pos = positive.sum(axis=1)
    n_neg = positive.shape[1] - n_pos
    u = np.where(positive, ranks, 0.0).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _auc_resamples(y: np.ndarray, p: np.ndarray, positive: int | None) -> np.ndarray:
    """AUC of each row of ``(B, N)`` labels ``y`` and ``(B, N, K)`` probabilities ``p`` (binary, or macro
    one-vs-rest over the classes present in that row); NaN where fewer than two classes are present."""
    if positive is not None:
        return _auc_rows(y == positive, p[..., positive])
    per_class = np.stack([_auc_rows(y == k, p[..., k]) for k in range(p.shape[-1])], axis=1)
    present = np.stack([(y == k).any(axis=1) for k in range(p.shape[-1])], axis=1)
    n_present = present.sum(axis=1)
    with np.errstate(invalid="ignore"):
        mean = np.where(present, per_class, 0.0).sum(axis=1) / n_present
    return np.where(n_present >= 2, mean, np.nan)


def roc_auc(y_true: Sequence[int], probs: np.ndarray, positive: int | None = 1) -> float | None:
    """AUC of the ROC curve: binary (score = probability of ``positive``) or, with ``positive=None``,
    macro one-vs-rest over the classes present. None when fewer than two classes are present."""
    y, p = _check(np.asarray(y_true), probs)
    if np.unique(y).size < 2:
        return None
    return float(_auc_resamples(y[None], p[None], positive)[0])


def bootstrap_auc_ci(y_true: Sequence[int], probs: np.ndarray, positive: int | None = 1, *, n_bootstrap: int = 1000,
                     ci: float = 0.95, rng: np.random.Generator | None = None) -> tuple[float, float] | None:
    """Percentile bootstrap CI of :func:`roc_auc`: cases are resampled with replacement (``n_bootstrap``
    resamples, vectorised); resamples with a single class are left out. None when the AUC is undefined (one model
    of :func:`bootstrap_mean_auc_ci`)."""
    return bootstrap_mean_auc_ci(y_true, [probs], positive, n_bootstrap=n_bootstrap, ci=ci, rng=rng)


def bootstrap_mean_auc_ci(y_true: Sequence[int], probs: Sequence[np.ndarray], positive: int | None = 1, *,
                          n_bootstrap: int = 1000, ci: float = 0.95,
                          rng: np.random.Generator | None = None) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean AUC of several models on the same cases (e.g. a local arm's site models):
    each resample of the cases is scored by every model and their AUCs averaged, so the interval is of the mean,
    not a mean of intervals. ``probs``: one ``(N, K)`` array per model. None when the AUC is undefined."""
    if not probs:
        raise ValueError("bootstrap_mean_auc_ci needs at least one model's probabilities")
    checked = [_check(np.asarray(y_true), p) for p in probs]
    y = checked[0][0]
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), found {ci}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, found {n_bootstrap}")
    if np.unique(y).size < 2:
        return None
    rng = rng if rng is not None else np.random.default_rng(0)
    values = []
    for start in range(0, n_bootstrap, 256):  # chunks keep memory at 256 x N x K per model
        idx = rng.integers(0, y.size, (min(256, n_bootstrap - start), y.size))
        values.append(np.mean([_auc_resamples(y[idx], p[idx], positive) for _, p in checked], axis=0))
    values = np.concatenate(values)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    alpha = (1.0 - ci) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, *, positive: int | None = 1,
                           class_names: Sequence[str] | None = None, n_bootstrap: int = 1000, ci: float = 0.95,
                           seed: int = 0) -> dict:
    """ACC, SEN, SPE, F1, AUC (+ bootstrap CI) of case probabilities.

    Args:
        y_true: ``(N,)`` true class per case.
        probs: ``(N, K)`` class probabilities.
        positive: positive class for SEN/SPE/F1/AUC of a binary task; None = macro one-vs-rest (K > 2).
        class_names: names for the per-class entries (default ``"0".."K-1"``).
        n_bootstrap: bootstrap resamples for the AUC CI.
        ci: confidence level.
        seed: seed of the bootstrap generator.

    Returns:
        ``{"n", "acc", "sen", "spe", "f1", "auc", "auc_ci": [lo, hi] | None, "confusion_matrix",
        "class_names", "per_class_acc": {class: recall}, "quadratic_kappa"}`` (values None where undefined;
        ``quadratic_kappa`` (:func:`quadratic_weighted_kappa`) treats the classes as ordered, as grades are).
    """
    y, p = _check(np.asarray(y_true), probs)
    k = p.shape[1]
    if positive is not None and not 0 <= positive < k:
        raise ValueError(f"positive must be in [0, {k}), found {positive}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, k)
    n = int(y.size)
    out: dict = {"n": n, "acc": _ratio(np.trace(cm), n)}
    if positive is not None:
        pos, neg = y == positive, y != positive
        out["sen"] = _ratio(np.sum(pred[pos] == positive), pos.sum())
        out["spe"] = _ratio(np.sum(pred[neg] != positive), neg.sum())
        tp = np.sum(pred[pos] == positive)
        out["f1"] = _ratio(2 * tp, pos.sum() + np.sum(pred == positive))
    else:
        sens = [_ratio(cm[c, c], cm[c].sum()) for c in range(k)]
        spes = [_ratio(np.delete(np.delete(cm, c, 0), c, 1).sum(), np.delete(cm, c, 0).sum()) for c in range(k)]
        sens_v = [s for s in sens if s is not None]
        spes_v = [s for s in spes if s is not None]
        out["sen"] = float(np.mean(sens_v)) if sens_v else None
        out["spe"] = float(np.mean(spes_v)) if spes_v else None
        f1s = [_ratio(2 * cm[c, c], cm[c].sum() + cm[:, c].sum()) for c in range(k)]
        f1s_v = [f for f in f1s if f is not None]
        out["f1"] = float(np.mean(f1s_v)) if f1s_v else None
    out["auc"] = roc_auc(y, p, positive)
    ci_pair = bootstrap_auc_ci(y, p, positive, n_bootstrap=n_bootstrap, ci=ci, rng=np.random.default_rng(seed))
    out["auc_ci"] = list(ci_pair) if ci_pair is not None else None
    out["class_names"] = names
    out["confusion_matrix"] = cm.tolist()
    out["per_class_acc"] = {names[c]: _ratio(cm[c, c], cm[c].sum()) for c in range(k)}
    out["quadratic_kappa"] = quadratic_weighted_kappa(cm)
    return out


def quadratic_weighted_kappa(cm: np.ndarray) -> float | None:
    """Cohen's kappa with quadratic weights of a ``(K, K)`` confusion matrix (rows true, columns predicted):
    ``1 - sum(w O) / sum(w E)``, ``w_ij = (i - j)^2 / (K - 1)^2``, ``E`` the outer product of the marginals over
    N (the diabetic-retinopathy grading measure). None when undefined (no cases, one class, or chance agreement
    without any disagreement possible)."""
    o = np.asarray(cm, dtype=np.float64)
    k = o.shape[0]
    n = o.sum()
    if k < 2 or n <= 0:
        return None
    i, j = np.indices((k, k))
    w = (i - j) ** 2 / (k - 1) ** 2
    e = np.outer(o.sum(1), o.sum(0)) / n
    den = float((w * e).sum())
    return None if den <= 0 else float(1.0 - (w * o).sum() / den)
