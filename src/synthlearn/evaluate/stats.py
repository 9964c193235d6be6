"""Paired tests between two models' predictions on the same cases (paper 000: McNemar vs centralized;
Stuart-Maxwell for the 3-class tumour type), with statsmodels.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def mcnemar_table(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> np.ndarray:
    """2x2 table ``[[both right, a right b wrong], [a wrong b right, both wrong]]``."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"correct_a and correct_b must be (N,) of the same cases, found {a.shape} and {b.shape}")
    return np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=np.int64)


def mcnemar_p(correct_a: Sequence[bool], correct_b: Sequence[bool], *, exact_below: int = 25) -> float:
    """McNemar's test of two classifiers on the same cases.

    Uses the exact binomial test when the discordant count ``b + c`` is below ``exact_below`` (statsmodels'
    recommendation), else the chi-square with continuity correction. Identical correctness gives p = 1.

    Args:
        correct_a: ``(N,)`` whether model A classified each case correctly.
        correct_b: ``(N,)`` the same for model B.

    Returns:
        The two-sided p-value.
    """
    from statsmodels.stats.contingency_tables import mcnemar

    table = mcnemar_table(correct_a, correct_b)
    discordant = int(table[0, 1] + table[1, 0])
    if discordant == 0:
        return 1.0
    result = mcnemar(table, exact=discordant < exact_below, correction=True)
    return float(min(1.0, result.pvalue))


def stuart_maxwell_p(pred_a: Sequence[int], pred_b: Sequence[int], num_classes: int) -> float:
    """Stuart-Maxwell test of marginal homogeneity between two K-class prediction sets on the same cases
    (statsmodels ``SquareTable.homogeneity``). Identical predictions give p = 1.

    Args:
        pred_a: ``(N,)`` predicted class of model A.
        pred_b: ``(N,)`` predicted class of model B.
        num_classes: K.

    Returns:
        The p-value (1.0 when the off-diagonal part of the table is empty). NaN, with a logged warning, when the
        statistic is undefined: its covariance matrix (of the margins' differences) is singular, e.g. when the only
        disagreements swap two classes both ways as often; the report shows it as "-".
    """
    from statsmodels.stats.contingency_tables import SquareTable

    a = np.asarray(pred_a, dtype=np.int64)
    b = np.asarray(pred_b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"pred_a and pred_b must be (N,) of the same cases, found {a.shape} and {b.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, found {num_classes}")
    table = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(table, (a, b), 1)
    off = table - np.diag(np.diag(table))
    if off.sum() == 0:
        return 1.0
    # classes never predicted by either model make the covariance singular: drop them
    keep = (table.sum(0) + table.sum(1)) > 0
    table = table[np.ix_(keep, keep)]
    if table.shape[0] < 2:
        return 1.0
    try:
        with warnings.catch_warnings():  # statsmodels warns, then returns NaN: reported once, below, in our words
            warnings.simplefilter("ignore")
            res = SquareTable(table, shift_zeros=False).homogeneity(method="stuart_maxwell")
        p = float(res.pvalue)
    except np.linalg.LinAlgError:
        p = float("nan")
    if not np.isfinite(p):
        log.warning("Stuart-Maxwell test undefined (singular covariance of the %dx%d table %s): p reported as NaN",
                    *table.shape, table.astype(int).tolist())
        return float("nan")
    return p
