"""Segmentation metrics: Dice and HD95 per BraTS region (whole tumour, tumour core, enhancing tumour), per case,
per test site and combined, with MONAI's ``DiceMetric`` and ``HausdorffDistanceMetric`` (95th percentile,
Euclidean, in mm from each case's voxel size).

Empty regions follow the BraTS evaluation's convention: a region absent from both the truth and the prediction
scores Dice 1 and HD95 0; absent from only one of them, Dice 0 and HD95 the grid's diagonal in mm (the largest
distance possible on it), so that a missed or invented region is penalised rather than dropped.

A per-case row is ``{"model", "site", "case_id", "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc",
"hd95_et", "sen_wt", "spe_wt"}``; a block (one model) is ``{"test": {SITE | "combined": {"dice_wt", ...,
"dice_mean", "hd95_wt", ..., "sen_wt", "spe_wt", "n"}}, "wilcoxon_p_vs_<reference>"}``: the means over the cases,
``dice_mean`` the mean of the three regions'. ``sen_wt`` / ``spe_wt`` are the whole tumour's voxel sensitivity
(recall; 1 when the case has no tumour) and specificity over the whole grid (AsynDGAN's Table 2 reports both);
``aji_wt`` the Aggregated Jaccard Index of the whole region's connected components (:func:`aggregated_jaccard`;
AsynDGAN's nuclei Table 3; for one tumour it is close to the Jaccard index).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from synthlearn.training.segmentation import REGIONS

#: the per-case metrics, in column order
CASE_METRICS = (*(f"{m}_{r.lower()}" for m in ("dice", "hd95") for r in REGIONS), "sen_wt", "spe_wt", "aji_wt")
#: the metrics of a block's site entry (``n`` aside)
BLOCK_METRICS = ("dice_wt", "dice_tc", "dice_et", "dice_mean", "hd95_wt", "hd95_tc", "hd95_et", "sen_wt", "spe_wt",
                 "aji_wt")


def aggregated_jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017; paper 003 eq. 8) of two binary masks whose connected components
    are the instances: every true instance ``G_i`` is matched to the predicted instance of highest Jaccard with it
    (``S(G_i)``; none when nothing overlaps), ``AJI = sum |G_i & S(G_i)| / (sum |G_i | S(G_i)| + sum of the
    never-matched predicted instances' areas)``. 1 when both masks are empty."""
    from scipy import ndimage

    g, n_g = ndimage.label(np.asarray(truth, bool))
    p, n_p = ndimage.label(np.asarray(pred, bool))
    if n_g == 0 and n_p == 0:
        return 1.0
    inter = np.bincount(g.ravel() * (n_p + 1) + p.ravel(), minlength=(n_g + 1) * (n_p + 1)).reshape(n_g + 1, n_p + 1)
    area_g, area_p = inter.sum(1), inter.sum(0)
    num = den = 0.0
    used = np.zeros(n_p + 1, bool)
    for i in range(1, n_g + 1):
        overlap = inter[i, 1:]
        union = area_g[i] + area_p[1:] - overlap
        jac = np.where(union > 0, overlap / np.maximum(union, 1), 0.0)
        j = int(np.argmax(jac)) + 1 if n_p else 0
        if n_p and overlap[j - 1] > 0:
            num += overlap[j - 1]
            den += union[j - 1]
            used[j] = True
        else:
            den += area_g[i]
    den += area_p[1:][~used[1:]].sum()
    return float(num / den) if den > 0 else 1.0


def case_scores(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice and HD95 of every region of one case.

    Args:
        pred: ``(*S)`` predicted contract labels (0-3).
        truth: ``(*S)`` true contract labels.
        spacing: voxel size in mm along each axis of the grid.

    Returns:
        ``{"dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et", "sen_wt", "spe_wt", "aji_wt"}`` (HD95
        in mm).
    """
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the truth's {truth.shape}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != pred.ndim or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must hold {pred.ndim} positive voxel sizes, found {spacing}")
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
    p = torch.from_numpy(np.stack([np.isin(pred, v) for v in REGIONS.values()])[None].astype(np.float32))
    t = torch.from_numpy(np.stack([np.isin(truth, v) for v in REGIONS.values()])[None].astype(np.float32))
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, t)[0].numpy()
    out: dict[str, float] = {}
    for k, region in enumerate(REGIONS):
        has_p, has_t = bool(p[0, k].any()), bool(t[0, k].any())
        key = region.lower()
        if not has_p and not has_t:
            out[f"dice_{key}"], out[f"hd95_{key}"] = 1.0, 0.0
            continue
        out[f"dice_{key}"] = float(dice[k])
        if has_p and has_t:
            with warnings.catch_warnings():  # MONAI 1.6 warns about its own deprecated internal argument
                warnings.simplefilter("ignore", FutureWarning)
                hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
                    p[:, k:k + 1], t[:, k:k + 1], spacing=spacing)
            out[f"hd95_{key}"] = float(hd[0, 0])
        else:
            out[f"hd95_{key}"] = diagonal
    wt_p, wt_t = np.isin(pred, REGIONS["WT"]), np.isin(truth, REGIONS["WT"])
    tp, fn = int((wt_p & wt_t).sum()), int((~wt_p & wt_t).sum())
    tn, fp = int((~wt_p & ~wt_t).sum()), int((wt_p & ~wt_t).sum())
    out["sen_wt"] = tp / (tp + fn) if tp + fn else 1.0
    out["spe_wt"] = tn / (tn + fp) if tn + fp else 1.0
    out["aji_wt"] = aggregated_jaccard(wt_p, wt_t)
    return {k: out[k] for k in CASE_METRICS}


def _mean_entry(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for m in CASE_METRICS:
        vals = [float(r[m]) for r in rows if r.get(m) is not None and np.isfinite(float(r[m]))]
        entry[m] = float(np.mean(vals)) if vals else None
    dices = [entry[f"dice_{r.lower()}"] for r in REGIONS]
    entry["dice_mean"] = float(np.mean(dices)) if all(d is not None for d in dices) else None
    entry["n"] = len(rows)
    return {k: entry[k] for k in (*BLOCK_METRICS, "n")}


def segmentation_block(rows: Sequence[Mapping[str, Any]], sites: Sequence[str], *,
                       reference: Sequence[Mapping[str, Any]] | None = None,
                       reference_name: str = "centralized") -> dict[str, Any]:
    """One model's block: per test site and combined, the mean of each metric over the cases.

    Args:
        rows: the model's per-case rows (:func:`case_scores` plus ``site`` and ``case_id``).
        sites: the test sites, in report order.
        reference: the reference arm's rows on the same cases; the block then holds
            ``wilcoxon_p_vs_<reference_name>``: a two-sided Wilcoxon signed-rank test of the per-case mean Dice
            (over the regions) against the reference's (scipy; None without pairs or without any difference).
    """
    test = {site: _mean_entry([r for r in rows if r["site"] == site]) for site in sites}
    test["combined"] = _mean_entry(list(rows))
    block: dict[str, Any] = {"test": test}
    if reference is not None:
        block[f"wilcoxon_p_vs_{reference_name}"] = _wilcoxon(rows, reference)
    return block


def _case_dice(row: Mapping[str, Any]) -> float:
    return float(np.mean([float(row[f"dice_{r.lower()}"]) for r in REGIONS]))


def _wilcoxon(rows: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]) -> float | None:
    from scipy import stats

    ref = {(r["site"], r["case_id"]): _case_dice(r) for r in reference}
    pairs = [(_case_dice(r), ref[(r["site"], r["case_id"])]) for r in rows if (r["site"], r["case_id"]) in ref]
    diff = np.array([a - b for a, b in pairs])
    if len(diff) == 0 or not np.any(diff != 0):
        return None
    return float(stats.wilcoxon(diff).pvalue)


def mean_segmentation_block(blocks: Mapping[str, Mapping[str, Any]], reference_name: str = "centralized"
                            ) -> dict[str, Any]:
    """Mean of several models' blocks (the ``local`` arm's summary): each metric averaged over the models, per site
    and combined; ``n`` of the first model."""
    first = next(iter(blocks.values()))
    test = {}
    for site in first["test"]:
        entry: dict[str, Any] = {}
        for m in BLOCK_METRICS:
            vals = [b["test"][site][m] for b in blocks.values() if b["test"][site].get(m) is not None]
            entry[m] = float(np.mean(vals)) if vals else None
        entry["n"] = first["test"][site]["n"]
        test[site] = entry
    return {"test": test, f"wilcoxon_p_vs_{reference_name}": None, "summary": "mean over site models"}


__all__ = ["BLOCK_METRICS", "CASE_METRICS", "aggregated_jaccard", "case_scores", "mean_segmentation_block", "segmentation_block"]
