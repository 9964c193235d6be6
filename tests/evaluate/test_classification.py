"""ACC/SEN/SPE/AUC with bootstrap CI, and the 3-class extras."""

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from synthlearn.evaluate.classification import (
    bootstrap_auc_ci,
    classification_metrics,
    confusion_matrix,
    roc_auc,
)


def _binary(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.25, n), 0, 1)
    return y, np.stack([1 - p1, p1], 1)


def test_binary_metrics_against_hand_counts_and_sklearn():
    y, p = _binary()
    m = classification_metrics(y, p, positive=1, n_bootstrap=200, seed=1)
    pred = p.argmax(1)
    assert m["acc"] == pytest.approx(np.mean(pred == y))
    assert m["sen"] == pytest.approx(np.mean(pred[y == 1] == 1))
    assert m["spe"] == pytest.approx(np.mean(pred[y == 0] == 0))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    lo, hi = m["auc_ci"]
    assert 0 <= lo <= m["auc"] <= hi <= 1
    assert np.array(m["confusion_matrix"]).sum() == len(y)
    assert classification_metrics(y, p, n_bootstrap=200, seed=1)["auc_ci"] == m["auc_ci"]  # seeded


def test_perfect_and_undefined_cases():
    y = np.array([0, 1, 0, 1])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    m = classification_metrics(y, p, n_bootstrap=50)
    assert m["acc"] == 1 and m["auc"] == 1 and m["auc_ci"] == [1.0, 1.0]
    one = classification_metrics(np.zeros(3, int), p[:3], n_bootstrap=50)
    assert one["auc"] is None and one["auc_ci"] is None and one["sen"] is None and one["spe"] is not None
    empty = classification_metrics(np.zeros(0, int), np.zeros((0, 2)), n_bootstrap=10)
    assert empty["n"] == 0 and empty["acc"] is None


def test_three_classes():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .7, .2], [.1, .2, .7], [.6, .1, .3]])
    m = classification_metrics(y, p, positive=None, class_names=["gbm", "astro", "oligo"], n_bootstrap=100)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class_acc"] == {"gbm": 0.5, "astro": 1.0, "oligo": 0.5}
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert 0 <= m["sen"] <= 1 and 0 <= m["spe"] <= 1


def test_checks():
    with pytest.raises(ValueError, match="probs"):
        classification_metrics([0, 1], np.array([0.1, 0.9]))
    with pytest.raises(ValueError, match="y_true"):
        classification_metrics([0, 2], np.array([[0.1, 0.9], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="ci"):
        bootstrap_auc_ci([0, 1], np.eye(2), ci=1.5)
    assert confusion_matrix([0, 1, 1], [1, 1, 0], 2).tolist() == [[0, 1], [1, 1]]
    assert roc_auc([1, 1], np.eye(2)) is None


def test_fast_auc_equals_sklearn_with_ties_and_bootstrap_is_fast():
    import time

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) * 5) / 5  # many ties
    p = np.stack([1 - s, s], 1)
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, s))
    y3 = rng.integers(0, 3, 200)
    p3 = rng.dirichlet([1, 1, 1], 200)
    assert roc_auc(y3, p3, positive=None) == pytest.approx(roc_auc_score(y3, p3, multi_class="ovr"))
    t0 = time.perf_counter()
    lo, hi = bootstrap_auc_ci(y3, p3, positive=None, n_bootstrap=1000)
    assert time.perf_counter() - t0 < 2.0 and lo < hi


def test_the_local_arms_interval_is_a_bootstrap_of_the_mean_auc():
    """The mean of several models' AUCs gets a bootstrap interval of that mean (the same case resamples scored by
    every model), not the mean of their intervals; for one model it is that model's own bootstrap interval."""
    from synthlearn.evaluate.classification import bootstrap_auc_ci, bootstrap_mean_auc_ci, roc_auc

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    models = [np.stack([1 - s, s], 1) for s in (np.clip(y * 0.3 + rng.random(120) * 0.7, 0, 1),
                                                  np.clip(y * 0.1 + rng.random(120) * 0.9, 0, 1))]
    one = bootstrap_mean_auc_ci(y, models[:1], 1, n_bootstrap=400, rng=np.random.default_rng(0))
    assert one == bootstrap_auc_ci(y, models[0], 1, n_bootstrap=400, rng=np.random.default_rng(0))
    lo, hi = bootstrap_mean_auc_ci(y, models, 1, n_bootstrap=400, rng=np.random.default_rng(0))
    mean = np.mean([roc_auc(y, m, 1) for m in models])
    assert lo < mean < hi
    bounds = [bootstrap_auc_ci(y, m, 1, n_bootstrap=400, rng=np.random.default_rng(0)) for m in models]
    averaged = (np.mean([b[0] for b in bounds]), np.mean([b[1] for b in bounds]))
    assert hi - lo < averaged[1] - averaged[0]  # a mean over models varies less than each model alone
    assert bootstrap_mean_auc_ci(np.zeros(5, int), [np.full((5, 2), 0.5)], 1) is None


def test_quadratic_weighted_kappa_matches_the_definition_and_its_bounds():
    import numpy as np

    from synthlearn.evaluate.classification import classification_metrics, quadratic_weighted_kappa

    assert quadratic_weighted_kappa(np.diag([3, 2, 4, 1, 5])) == pytest.approx(1.0)
    # a hand-computed 3-class case: O = [[2,1,0],[0,2,1],[1,0,3]], w = [[0,.25,1],[.25,0,.25],[1,.25,0]]
    o = np.array([[2, 1, 0], [0, 2, 1], [1, 0, 3]])
    e = np.outer(o.sum(1), o.sum(0)) / o.sum()
    w = np.array([[0, .25, 1], [.25, 0, .25], [1, .25, 0]])
    assert quadratic_weighted_kappa(o) == pytest.approx(1 - (w * o).sum() / (w * e).sum())
    # off by one grade everywhere costs less than swapping the extremes
    near = np.array([[0, 4, 0], [0, 0, 4], [0, 4, 0]])
    far = np.array([[0, 0, 4], [0, 4, 0], [4, 0, 0]])
    assert quadratic_weighted_kappa(far) < quadratic_weighted_kappa(near)
    assert quadratic_weighted_kappa(np.zeros((3, 3))) is None
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 5, 60), rng.integers(0, 5, 60)
    cm = np.zeros((5, 5), int)
    np.add.at(cm, (t, p), 1)
    assert quadratic_weighted_kappa(cm) == pytest.approx(cohen_kappa_score(t, p, weights="quadratic"))
    y = [0, 1, 2, 2]
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert classification_metrics(y, probs, positive=None, n_bootstrap=10)["quadratic_kappa"] == pytest.approx(
        quadratic_weighted_kappa(np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1]])))
