"""Recognition: does a model trained on real cases read synthetic cases as the class they were conditioned on?

A generator that carries the class puts it into its samples in a form a model of real scans reads: the share of
synthetic cases a real-trained task model (a study's ``centralized`` arm) classifies as their conditioned class,
per class (chance = 1 / classes), and the AUC of its probabilities against the conditioned classes. Any arm that
ends in synthetic cases (CATphishing, AsynDGAN, FedGAN) can run it on its synthetic site folders.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from synthlearn.data.contract import CaseRecord
from synthlearn.evaluate.classification import bootstrap_auc_ci, roc_auc


def recognition_audit(model, synthetic: dict[str, list[CaseRecord]], *, reference: str = "centralized",
                      seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """How often a model trained on real cases classifies synthetic cases as the class they were conditioned on.

    Args:
        model: a :class:`synthlearn.tasks.model.TaskModel` trained on real cases (the study's
            ``centralized`` arm), whose task's label is the one the generators were conditioned on.
        synthetic: site -> synthetic case records (their label column holds the conditioned class).
        reference: name of the arm the model comes from (recorded).
        seed: seed of the bootstrap CI of the AUC.
        progress: progress bar over prediction batches.

    Returns:
        ``{"reference", "n", "balanced", "chance", "per_class": {class: share recognised}, "auc", "auc_ci",
        "per_site": {site: {"n", "balanced", "per_class"}}}``; ``balanced`` is the mean over classes of the share
        of cases predicted as their conditioned class (None where a class has no case).

    Raises:
        ValueError: no synthetic case, or a case whose conditioned class the model's task does not know.
    """
    task = model.task
    cases = [(site, c) for site, cs in synthetic.items() for c in cs]
    if not cases:
        raise ValueError("recognition_audit: no synthetic case to classify")
    y = []
    for site, c in cases:
        k = task.label(c.labels)
        if k is None:
            raise ValueError(f"recognition_audit: synthetic case {c.case_id} of site {site} has no "
                             f"{task.name} class (expected one of {list(task.class_names)} in its labels)")
        y.append(k)
    y_arr = np.asarray(y)
    probs = model.predict_cases([c for _, c in cases], progress=progress)
    hit = probs.argmax(axis=1) == y_arr
    sites = np.asarray([site for site, _ in cases])

    def shares(mask: np.ndarray) -> dict[str, Any]:
        per_class = {name: (float(hit[mask & (y_arr == k)].mean()) if (mask & (y_arr == k)).any() else None)
                     for k, name in enumerate(task.class_names)}
        known = [v for v in per_class.values() if v is not None]
        return {"n": int(mask.sum()), "per_class": per_class, "balanced": float(np.mean(known)) if known else None}

    positive = task.positive_class if task.num_classes == 2 else None
    ci = bootstrap_auc_ci(y_arr, probs, positive, n_bootstrap=1000, rng=np.random.default_rng(seed))
    result: dict[str, Any] = {"reference": reference, "chance": 1.0 / task.num_classes,
                              **shares(np.ones(len(cases), bool)), "auc": roc_auc(y_arr, probs, positive),
                              "auc_ci": list(ci) if ci is not None else None}
    result["per_site"] = {site: shares(sites == site) for site in synthetic if synthetic[site]}
    return result


__all__ = ["recognition_audit"]
