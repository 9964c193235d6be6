"""Did a trained task network learn? The check every arm runs after training, so a collapse is never silent.

A voxel-wise classifier trained for a few epochs can end where it started: predicting the training set's
class frequencies everywhere. Its loss then sits at the **chance level of the loss**, the cross-entropy of the
best constant prediction, which is the entropy of the class distribution the loss sees (tumour voxels per
class with ``loss_normalisation = "voxel"``, cases per class with ``"case"``, each times its class weight);
and on its own training cases it calls every case the same class. On the default phantom the 10-epoch
nnU-Net recipe did this on some seeds (training loss 0.68 against ln 2 = 0.69, every test case called
wildtype; docs/benchmarks.md, section 20).

:func:`check_learning` reads both signs: the final training loss against ``(1 - margin)`` times the chance
level, and the spread of the network's predictions on its own training cases. What it returns goes into
``model.json``, the run log, ``results.json`` and the report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from synthlearn.training.trainer import TrainConfig, class_weights_for, predict_probabilities

log = logging.getLogger(__name__)


def tumour_voxel_counts(dataset) -> np.ndarray:
    """Tumour voxels (seg > 0) of every case of ``dataset`` (anything with ``len`` and ``arrays(i)``), ``(N,)``."""
    return np.asarray([int((dataset.arrays(i)[1] > 0).sum()) for i in range(len(dataset))], dtype=np.int64)


def chance_loss(targets: Sequence[int], tumour_voxels: Sequence[int], cfg: TrainConfig, num_classes: int) -> float:
    """The training loss of the best constant prediction: the entropy (nats) of the class mass the loss sees.

    Args:
        targets: class index per training case.
        tumour_voxels: tumour voxels per training case (a case without any does not count in the loss).
        cfg: the training settings (``loss_normalisation``, ``class_weighting``).
        num_classes: K.

    Returns:
        ``-sum_k q_k log q_k`` with ``q_k`` proportional to ``w_k`` times the tumour voxels (``voxel``) or the
        cases (``case``) of class ``k``; 0 when only one class has mass.
    """
    y = np.asarray(targets, dtype=np.int64)
    n = np.asarray(tumour_voxels, dtype=np.float64)
    if y.shape != n.shape:
        raise ValueError(f"{len(y)} targets but {len(n)} tumour voxel counts")
    per_case = n if cfg.loss_normalisation == "voxel" else (n > 0).astype(np.float64)
    mass = np.bincount(y, weights=per_case, minlength=num_classes)[:num_classes]
    if cfg.class_weighting == "balanced":
        mass = mass * class_weights_for(y.tolist(), num_classes).numpy()
    if mass.sum() <= 0:
        return 0.0
    q = mass[mass > 0] / mass.sum()
    return float(-(q * np.log(q)).sum())


def check_learning(model: nn.Module, dataset, targets: Sequence[int], losses: Sequence[float] | None,
                   cfg: TrainConfig, num_classes: int, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Whether a trained network learned, from its final training loss and its predictions on its training cases.

    Args:
        model: the trained network (``(B, 4, *S)`` -> ``(B, K, *S)`` logits).
        dataset: its training cases (``len`` and ``arrays(i)``).
        targets: their class indices.
        losses: the per-epoch mean training losses (None or empty: the loss test is skipped).
        cfg: the training settings (``collapse_margin`` and the loss's normalisation and class weights).
        num_classes: K.
        class_names: names for the predicted-class counts (default ``"0"``, ``"1"``...).

    Returns:
        ``{"learned": bool, "reasons": [str], "final_loss", "chance_loss", "loss_ratio", "predicted_classes":
        {class: cases}, "train_accuracy", "classes_in_training"}``; ``learned`` is False when the final loss is
        at or above ``(1 - cfg.collapse_margin) * chance_loss``, when every training case is predicted as the
        same class although the training cases hold several, or when they hold only one class.
    """
    y = np.asarray(targets, dtype=np.int64)
    if len(y) != len(dataset):
        raise ValueError(f"{len(dataset)} cases but {len(y)} targets")
    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    probs = predict_probabilities([model], dataset, batch_size=cfg.batch_size, bf16=cfg.bf16, device=cfg.device)
    pred = probs.argmax(axis=1)
    predicted = {names[k]: int((pred == k).sum()) for k in range(num_classes)}
    present = sorted(set(y.tolist()))
    chance = chance_loss(y, tumour_voxel_counts(dataset), cfg, num_classes)
    final = float(losses[-1]) if losses else None
    ratio = final / chance if final is not None and chance > 0 else None
    reasons = []
    if ratio is not None and math.isfinite(ratio) and ratio >= 1.0 - cfg.collapse_margin:
        reasons.append(f"final training loss {final:.3f} is {ratio:.0%} of the chance level {chance:.3f} "
                       f"(learned means below {1 - cfg.collapse_margin:.0%})")
    if len(present) == 1:
        reasons.append(f"its training cases hold one class ({names[present[0]]}): it cannot tell the classes apart")
    elif len(set(pred.tolist())) == 1:
        reasons.append(f"predicts {names[int(pred[0])]} for all {len(y)} training cases")
    return {"learned": not reasons, "reasons": reasons, "final_loss": final, "chance_loss": chance,
            "loss_ratio": ratio, "predicted_classes": predicted,
            "train_accuracy": float((pred == y).mean()) if len(y) else None,
            "classes_in_training": [names[k] for k in present]}


def summarise_checks(checks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"n_networks", "n_collapsed", "collapsed": [network names], "retrained": {name: seeds tried}}`` of a
    model's per-network checks (``model.json`` ``info["learning_check"]``)."""
    collapsed = sorted(n for n, c in checks.items() if not c.get("learned", True))
    retrained = {n: c["retried_seeds"] for n, c in checks.items() if c.get("retried_seeds")}
    return {"n_networks": len(checks), "n_collapsed": len(collapsed), "collapsed": collapsed, "retrained": retrained}


__all__ = ["chance_loss", "check_learning", "summarise_checks", "tumour_voxel_counts"]
