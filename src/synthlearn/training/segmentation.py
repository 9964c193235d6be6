"""Tumour segmentation with the task model's network: its labels and regions, Dice and its learning check (its loss,
:func:`segmentation_loss`, and its ensemble prediction, :func:`predict_label_maps`, live beside the classification
ones in :mod:`synthlearn.training.trainer` and are re-exported here).

The network is the same voxel-wise UNet (MONAI blocks) as the classification task's, with one output channel per
contract label (0 background, 1 necrosis / non-enhancing core, 2 oedema, 3 enhancing). It is trained with MONAI's
Dice + cross-entropy loss over every voxel (softmax over the four labels), and evaluated on the BraTS regions:

- ``WT`` whole tumour: labels 1, 2, 3;
- ``TC`` tumour core: labels 1, 3;
- ``ET`` enhancing tumour: label 3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from synthlearn.training.trainer import predict_label_maps, segmentation_loss

#: the contract's segmentation labels, index = network output channel
SEG_CLASSES = ("background", "necrosis", "oedema", "enhancing")
#: BraTS evaluation regions: name -> the contract labels they hold
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def region_masks(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(*S)`` contract labels -> ``(3, *S)`` boolean masks of :data:`REGIONS` (WT, TC, ET order)."""
    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return np.stack([np.isin(arr, values) for values in REGIONS.values()], axis=0)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (the BraTS convention)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * float((p & t).sum()) / total


def check_segmentation_learning(model: nn.Module, dataset, losses: Sequence[float] | None, cfg,
                                min_dice: float = 0.1) -> dict[str, Any]:
    """Whether a segmentation network learned: its whole-tumour Dice on its own training cases.

    "Not learned" = it draws no tumour voxel on any training case, or its mean whole-tumour Dice there is below
    ``min_dice`` (a network that only learned the background). The loss has no class-frequency chance level here, so
    ``chance_loss`` and ``loss_ratio`` hold the first epoch's loss and the final loss's ratio to it.

    Returns:
        The keys of :func:`synthlearn.training.learning_check.check_learning` (``learned``, ``reasons``,
        ``final_loss``, ``chance_loss``, ``loss_ratio``) and ``train_dice`` (mean per region over the training cases).
    """
    maps = predict_label_maps([model], dataset, batch_size=cfg.batch_size, bf16=cfg.bf16, device=cfg.device)
    truths = [dataset.arrays(i)[1] for i in range(len(dataset))]
    scores = {name: float(np.mean([dice(np.isin(p, v), np.isin(t, v)) for p, t in zip(maps, truths)]))
              for name, v in REGIONS.items()}
    final = float(losses[-1]) if losses else None
    first = float(losses[0]) if losses else None
    ratio = final / first if final is not None and first and math.isfinite(first) else None
    reasons = []
    if not any(np.any(m > 0) for m in maps):
        reasons.append(f"draws no tumour voxel on any of its {len(maps)} training cases")
    elif scores["WT"] < min_dice:
        reasons.append(f"whole-tumour Dice {scores['WT']:.3f} on its training cases (learned means >= {min_dice})")
    return {"learned": not reasons, "reasons": reasons, "final_loss": final, "chance_loss": first,
            "loss_ratio": ratio, "train_dice": scores}


def check_multitask_learning(model: nn.Module, dataset, targets: Sequence[Sequence[int]], losses: Sequence[float] | None,
                             cfg, stage) -> dict[str, Any]:
    """Whether a multi-task network learned: :func:`check_segmentation_learning` of its segmentation, and for each
    classification head whether it tells its classes apart on its own training cases (not learned: it predicts one
    class for every case whose label is known while they hold two or more). ``heads`` gives per head the training
    cases with a known label, the classes predicted and the accuracy there.

    Args:
        targets: per case one class per head (-1 = unknown), in ``stage.heads`` order.
        stage: the multi-task stage (:class:`synthlearn.tasks.Stage` with ``heads``).
    """
    from synthlearn.training.trainer import predict_head_probabilities

    out = check_segmentation_learning(model, dataset, losses, cfg)
    probs = predict_head_probabilities([model], dataset, batch_size=cfg.batch_size, bf16=cfg.bf16, device=cfg.device)
    y = np.asarray(targets, dtype=np.int64).reshape(len(dataset), len(stage.heads))
    heads = {}
    for h, (head, p) in enumerate(zip(stage.heads, probs)):
        known = y[:, h] >= 0
        pred = p.argmax(1)[known]
        true = y[known, h]
        heads[head.name] = {"n_known": int(known.sum()), "predicted_classes": sorted({head.class_names[int(k)] for k in pred}),
                            "train_accuracy": float((pred == true).mean()) if known.any() else None}
        if len(set(true.tolist())) > 1 and len(set(pred.tolist())) == 1:
            out["reasons"].append(f"head {head.name} predicts {head.class_names[int(pred[0])]} for all "
                                  f"{int(known.sum())} training cases with a known label")
    out["heads"] = heads
    out["learned"] = not out["reasons"]
    return out


__all__ = ["REGIONS", "SEG_CLASSES", "check_multitask_learning", "check_segmentation_learning", "dice", "predict_label_maps", "region_masks",
           "segmentation_loss"]
