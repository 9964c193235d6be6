"""McNemar and Stuart-Maxwell."""

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar

from synthlearn.evaluate.stats import mcnemar_p, mcnemar_table, stuart_maxwell_p


def test_mcnemar_identical_predictions_give_one():
    c = np.array([True, False, True, True])
    assert mcnemar_p(c, c) == 1.0


def test_mcnemar_exact_for_few_discordant_pairs_and_chi2_otherwise():
    a = np.array([True] * 10 + [False] * 2)
    b = np.array([False] * 8 + [True] * 4)
    table = mcnemar_table(a, b)
    assert table.tolist() == [[2, 8], [2, 0]]
    assert mcnemar_p(a, b) == pytest.approx(mcnemar(table, exact=True).pvalue)
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.8
    b = rng.random(400) < 0.6
    t = mcnemar_table(a, b)
    assert t[0, 1] + t[1, 0] >= 25
    assert mcnemar_p(a, b) == pytest.approx(mcnemar(t, exact=False, correction=True).pvalue)
    assert mcnemar_p(a, b) < 0.01
    with pytest.raises(ValueError, match="same cases"):
        mcnemar_table([True], [True, False])


def test_stuart_maxwell():
    p = np.array([0, 1, 2, 1, 0, 2, 2])
    assert stuart_maxwell_p(p, p, 3) == 1.0
    rng = np.random.default_rng(1)
    a = rng.integers(0, 3, 300)
    b = np.where(rng.random(300) < 0.5, 0, a)  # b shifts half the cases to class 0
    assert stuart_maxwell_p(a, b, 3) < 1e-3
    similar = np.where(rng.random(300) < 0.05, (a + 1) % 3, a)
    assert stuart_maxwell_p(a, similar, 3) > 0.01
    with pytest.raises(ValueError, match="num_classes"):
        stuart_maxwell_p(p, p, 1)


def _predictions_of(table):
    """Prediction pairs whose 3x3 cross-table is ``table``."""
    a, b = [], []
    for i in range(3):
        for j in range(3):
            a += [i] * table[i][j]
            b += [j] * table[i][j]
    return np.array(a), np.array(b)


def test_stuart_maxwell_matches_the_textbook_statistic_and_reports_an_undefined_one(caplog):
    """An independent reference: chi2 = d' S^-1 d over the first K-1 margins, with d_i = n_i. - n_.i,
    S_ii = n_i. + n_.i - 2 n_ii, S_ij = -(n_ij + n_ji) (Stuart 1955), df = K - 1."""
    from scipy import stats

    table = [[20, 10, 5], [3, 30, 15], [0, 5, 40]]
    n = np.array(table, dtype=float)
    d = (n.sum(1) - n.sum(0))[:2]
    s = -(n + n.T)
    np.fill_diagonal(s, n.sum(1) + n.sum(0) - 2 * np.diag(n))
    chi2 = float(d @ np.linalg.solve(s[:2, :2], d))
    assert stuart_maxwell_p(*_predictions_of(table), 3) == pytest.approx(stats.chi2.sf(chi2, 2), rel=1e-9)
    assert chi2 == pytest.approx(13.7647, rel=1e-4) and stats.chi2.sf(chi2, 2) == pytest.approx(0.0010257, rel=1e-4)
    # the only disagreements swap classes 0 and 2 both ways: the covariance is singular, the test undefined, it says so
    with caplog.at_level("WARNING"):
        assert np.isnan(stuart_maxwell_p(*_predictions_of([[3, 0, 2], [0, 1, 0], [2, 0, 0]]), 3))
    assert "undefined" in caplog.text
