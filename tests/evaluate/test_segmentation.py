"""Segmentation metrics: Dice and HD95 per BraTS region, the empty-region convention, site and combined means."""

import numpy as np
import pytest

from synthlearn.evaluate.segmentation import (
    BLOCK_METRICS,
    CASE_METRICS,
    case_scores,
    mean_segmentation_block,
    segmentation_block,
)


def _case():
    truth = np.zeros((16, 16, 16), np.int64)
    truth[4:10, 4:10, 4:10] = 2
    truth[6:8, 6:8, 6:8] = 3
    return truth


def test_a_perfect_prediction_and_a_shifted_one():
    truth = _case()
    perfect = case_scores(truth, truth, (1.0, 1.0, 1.0))
    assert perfect == {k: (1.0 if k.startswith(("dice", "sen", "spe", "aji")) else 0.0) for k in CASE_METRICS}
    shifted = np.zeros_like(truth)
    shifted[5:11, 4:10, 4:10] = 2  # the whole tumour one voxel along x, its core and enhancing part missed
    s = case_scores(shifted, truth, (2.0, 2.0, 2.0))
    assert s["dice_wt"] == pytest.approx(2 * 180 / 432)  # 5 x 6 x 6 shared voxels of two 216-voxel cubes
    assert s["hd95_wt"] == pytest.approx(2.0)  # one voxel of 2 mm
    diagonal = np.sqrt(3 * (16 * 2.0) ** 2)
    assert s["dice_tc"] == s["dice_et"] == 0.0  # present in the truth only: Dice 0, HD95 the grid's diagonal
    assert s["hd95_tc"] == s["hd95_et"] == pytest.approx(diagonal)
    assert s["sen_wt"] == pytest.approx(180 / 216)  # 36 true voxels missed
    assert s["spe_wt"] == pytest.approx(1 - 36 / (16 ** 3 - 216))  # 36 background voxels marked tumour


def test_regions_absent_from_both_score_one_and_zero():
    truth = np.zeros((8, 8, 8), np.int64)
    truth[2:5, 2:5, 2:5] = 2  # oedema only: no tumour core, no enhancing tumour
    s = case_scores(truth, truth, (1.0, 1.0, 1.0))
    assert (s["dice_tc"], s["hd95_tc"], s["dice_et"], s["hd95_et"]) == (1.0, 0.0, 1.0, 0.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="differs"):
        case_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="positive voxel sizes"):
        case_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1))


def test_blocks_average_cases_per_site_and_combined():
    def row(site, case_id, d):
        return {"site": site, "case_id": case_id, **{k: (d if k.startswith("dice") else 10 * d) for k in CASE_METRICS}}

    rows = [row("a", "1", 0.2), row("a", "2", 0.4), row("b", "3", 0.9)]
    ref = [row("a", "1", 0.5), row("a", "2", 0.6), row("b", "3", 0.95)]
    block = segmentation_block(rows, ["a", "b"], reference=ref)
    assert block["test"]["a"]["dice_wt"] == pytest.approx(0.3) and block["test"]["a"]["n"] == 2
    assert block["test"]["combined"]["dice_mean"] == pytest.approx(0.5)
    assert block["test"]["b"]["hd95_et"] == pytest.approx(9.0)
    assert set(block["test"]["a"]) == {*BLOCK_METRICS, "n"}
    assert 0 < block["wilcoxon_p_vs_centralized"] <= 1
    assert segmentation_block(ref, ["a", "b"], reference=ref)["wilcoxon_p_vs_centralized"] is None
    mean = mean_segmentation_block({"x": block, "y": segmentation_block(ref, ["a", "b"])})
    assert mean["test"]["combined"]["dice_wt"] == pytest.approx((0.5 + (0.5 + 0.6 + 0.95) / 3) / 2)


def test_aggregated_jaccard_matches_instances_and_charges_the_unmatched():
    from synthlearn.evaluate.segmentation import aggregated_jaccard

    truth = np.zeros((20, 20), bool)
    truth[2:6, 2:6] = truth[10:14, 10:14] = True  # two nuclei of 16 pixels
    assert aggregated_jaccard(truth, truth) == 1.0 and aggregated_jaccard(truth & False, truth & False) == 1.0
    pred = truth.copy()
    pred[10:14, 10:14] = False  # one nucleus missed
    assert aggregated_jaccard(pred, truth) == pytest.approx(16 / 32)
    pred[16:18, 16:18] = True  # and a false one of 4 pixels, never matched: it only adds to the denominator
    assert aggregated_jaccard(pred, truth) == pytest.approx(16 / 36)
    merged = truth.copy()
    merged[2:14, 5:11] = True  # one blob over both: the second true nucleus matches it too
    assert 0 < aggregated_jaccard(merged, truth) < 0.5
