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
