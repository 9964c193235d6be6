import json
import shutil

import numpy as np
import pytest
from scipy.spatial.distance import pdist, squareform

from synthlearn.data.layouts import open_study
from synthlearn.synthesis.diversity import (
    diversity_keep_mask,
    filter_features,
    filter_site,
    read_kept_case_ids,
    standardize_features,
)


def _points_with_duplicates(seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(12, 5)) * 10
    dups = base[[2, 5, 7]] + rng.normal(size=(3, 5)) * 0.01
    return np.concatenate([base, dups])  # rows 12, 13, 14 near-duplicate rows 2, 5, 7


def test_near_duplicates_lose_one_member_and_no_close_pair_survives():
    x = _points_with_duplicates()
    # 105 pairs: the 2.5th percentile lies between the 3rd and 4th smallest distance
    keep, threshold, n_close = diversity_keep_mask(x, percentile=2.5)
    d = squareform(pdist(x))
    assert threshold == pytest.approx(np.percentile(pdist(x), 2.5))
    assert n_close == 3
    for a, b in ((2, 12), (5, 13), (7, 14)):
        assert keep[a] != keep[b]  # exactly one of each duplicate pair goes
    kept = np.flatnonzero(keep)
    sub = d[np.ix_(kept, kept)][np.triu_indices(len(kept), 1)]
    assert (sub >= threshold).all()
    assert n_close == int((pdist(x) < threshold).sum())
    # the later case of an isolated pair (same number of close partners) is dropped
    assert keep[[2, 5, 7]].all() and not keep[[12, 13, 14]].any()


def test_filter_is_deterministic_and_percentile_zero_keeps_all():
    x = np.random.default_rng(1).normal(size=(40, 6))
    a, ta, _ = diversity_keep_mask(x, 20.0)
    b, tb, _ = diversity_keep_mask(x.copy(), 20.0)
    np.testing.assert_array_equal(a, b)
    assert ta == tb
    assert 0 < a.sum() < 40
    keep0, _, n0 = diversity_keep_mask(x, 0.0)
    assert keep0.all() and n0 == 0
    # a higher percentile never keeps more here
    assert diversity_keep_mask(x, 50.0)[0].sum() <= a.sum()


def test_nearest_neighbour_threshold_keeps_more():
    x = np.random.default_rng(2).normal(size=(200, 30))
    pairs, t_pairs, _ = diversity_keep_mask(x, 20.0)
    nearest, t_nearest, _ = diversity_keep_mask(x, 20.0, threshold_from="nearest")
    d = squareform(pdist(x))
    np.fill_diagonal(d, np.inf)
    assert t_nearest == pytest.approx(np.percentile(d.min(1), 20.0)) and t_nearest < t_pairs
    assert nearest.sum() > 0.8 * 200 > pairs.sum()
    with pytest.raises(ValueError, match="threshold_from"):
        diversity_keep_mask(x, 20.0, threshold_from="mean")


def test_hub_is_dropped_rather_than_its_neighbours():
    # case 0 sits between cases 1, 2, 3 (all close to it) which are far from one another
    h = np.sqrt(3) / 2
    x = np.array([[0.0, 0.0], [1.0, 0.0], [-0.5, h], [-0.5, -h], [10, 10], [-10, 10], [10, -10], [-10, -10],
                  [20, 0], [0, 20]])
    keep, threshold, n_close = diversity_keep_mask(x, 5.0)  # 45 pairs: between the 3rd and 4th smallest
    assert 1.0 < threshold < np.sqrt(3) and n_close == 3
    assert not keep[0] and keep[[1, 2, 3]].all()


def test_bad_input():
    with pytest.raises(ValueError, match="percentile"):
        diversity_keep_mask(np.zeros((3, 2)), 120)
    with pytest.raises(ValueError, match="NaN"):
        diversity_keep_mask(np.array([[0.0], [np.nan]]), 20)
    with pytest.raises(ValueError, match="unique"):
        filter_features(["a", "a"], np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\(3, F\)"):
        filter_features(["a", "b", "c"], np.zeros((2, 2)))


def test_standardize_drops_constant_columns():
    x = np.array([[1.0, 5.0, 0.0], [2.0, 5.0, 1.0], [3.0, 5.0, 5.0]])
    z = standardize_features(x)
    assert z.shape == (3, 2)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(0), 1)


def test_report_counts_classes_and_failed_cases():
    x = _points_with_duplicates()
    x[0] = np.nan  # a case without usable tumour features
    ids = [f"syn_{i:03d}" for i in range(len(x))]
    classes = ["mutant" if i % 2 else "wildtype" for i in range(len(x))]
    classes[3] = None
    rep = filter_features(ids, x, classes=classes, percentile=2.5)
    assert rep.failed_case_ids == ("syn_000",)
    assert rep.n_before == 15 and rep.n_after == len(rep.kept_case_ids) == 15 - 1 - len(rep.dropped_case_ids)
    assert set(rep.kept_case_ids) | set(rep.dropped_case_ids) | set(rep.failed_case_ids) == set(ids)
    assert rep.per_class["unknown"] == {"before": 1, "after": 1}
    assert sum(v["before"] for v in rep.per_class.values()) == 15
    assert sum(v["after"] for v in rep.per_class.values()) == rep.n_after
    d = rep.to_dict()
    json.dumps(d)
    assert d["kept_case_ids"] == list(rep.kept_case_ids) and d["percentile"] == 2.5


def test_filter_site_drops_a_copied_case_and_deletes_nothing(tiny_study, tmp_path):
    site = tmp_path / "synthetic_tcga"
    shutil.copytree(tiny_study / "tcga", site)
    shutil.copytree(site / "tcga_000", site / "tcga_zcopy")
    labels = (site / "labels.csv").read_text().splitlines()
    row0 = next(r for r in labels if r.startswith("tcga_000,"))
    (site / "labels.csv").write_text("\n".join(labels + [row0.replace("tcga_000", "tcga_zcopy", 1)]) + "\n")
    before = sorted(p.name for p in site.iterdir())

    rep = filter_site(site, percentile=20.0)
    assert rep.n_before == 7
    assert not {"tcga_000", "tcga_zcopy"} <= set(rep.kept_case_ids)  # the copy pair lost one member
    assert rep.dropped_case_ids and rep.threshold > 0
    assert sum(v["before"] for v in rep.per_class.values()) == 7
    assert set(rep.per_class) <= {"mutant", "wildtype"}
    # inputs untouched, report written beside them
    assert sorted(p.name for p in site.iterdir() if p.name != "diversity.json") == before
    assert read_kept_case_ids(site) == list(rep.kept_case_ids)
    data = json.loads((site / "diversity.json").read_text())
    assert data["site"] == "synthetic_tcga" and data["n_after"] == rep.n_after
    # the same folder gives the same result
    assert filter_site(site, 20.0, out=tmp_path / "again.json").kept_case_ids == rep.kept_case_ids
    assert open_study(site).sites[0].name == "synthetic_tcga"  # still a readable site


def test_filter_site_refuses_a_study_root(tiny_study):
    with pytest.raises(ValueError, match="one site"):
        filter_site(tiny_study)
    with pytest.raises(FileNotFoundError):
        read_kept_case_ids(tiny_study / "tcga")
