"""K-fold splits of a task's cases, per stage.

Folds are assigned per (site, stage label) group, so the fold of a case is the same in every arm: centralized
fold ``k`` is the union of every site's fold ``k``, which is what FedAvg site ``s`` trains without in fold ``k``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from synthlearn.data.contract import CaseRecord
from synthlearn.tasks.definitions import Stage
from synthlearn.tasks.setup import TrainingSetup
from synthlearn.training.seeding import numpy_generator


def assign_folds(cases: Sequence[CaseRecord], labels: Sequence[int], n_folds: int, seed: int,
                 stage: str) -> list[int]:
    """Stratified fold of every case: within each (site, label) group, cases sorted by id are shuffled
    with a seeded generator and dealt round-robin, starting where the previous group stopped.

    The fold of a case depends only on its own site's cases, so centralized and per-site arms agree.

    Returns:
        fold index in ``[0, n_folds)`` per case (all 0 when ``n_folds == 1``).
    """
    if len(cases) != len(labels):
        raise ValueError(f"{len(cases)} cases but {len(labels)} labels")
    folds = [0] * len(cases)
    if n_folds == 1:
        return folds
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (case, label) in enumerate(zip(cases, labels)):
        groups.setdefault((case.site, int(label)), []).append(i)
    starts: dict[str, int] = {}
    for (site, label), members in sorted(groups.items()):
        members = sorted(members, key=lambda i: cases[i].case_id)
        order = numpy_generator(seed, "folds", stage, site, label).permutation(len(members))
        offset = starts.get(site, 0)
        for rank, j in enumerate(order):
            folds[members[j]] = (offset + rank) % n_folds
        starts[site] = (offset + len(members)) % n_folds
    return folds


@dataclasses.dataclass(frozen=True)
class StageData:
    """The labelled cases of one stage and their folds (a multi-task stage: every case, and per case a tuple of one
    class index per head, -1 = unknown)."""

    stage: Stage
    cases: tuple[CaseRecord, ...]
    targets: tuple[Any, ...]
    folds: tuple[int, ...]

    def training_indices(self, fold: int, n_folds: int) -> list[int]:
        """Indices of the cases fold-``fold`` trains on (all cases when ``n_folds == 1``)."""
        if n_folds == 1:
            return list(range(len(self.cases)))
        return [i for i, f in enumerate(self.folds) if f != fold]


def stage_data(cases: Sequence[CaseRecord], setup: TrainingSetup) -> dict[str, StageData]:
    """Per stage, the cases whose stage label is known (unknown ones are masked), and their folds."""
    out = {}
    for stage in setup.task_spec.stages:
        if stage.heads:  # multi-task: every case; per head its class or -1 (unknown), folds stratified on head 1
            sel = tuple(cases)
            head_targets = tuple(stage.head_targets(c.labels) for c in sel)
            folds = tuple(assign_folds(sel, [t[0] for t in head_targets], setup.n_folds, setup.seed, stage.name))
            out[stage.name] = StageData(stage, sel, head_targets, folds)
            continue
        kept = [(c, stage.label(c.labels)) for c in cases]
        kept = [(c, y) for c, y in kept if y is not None]
        sel = tuple(c for c, _ in kept)
        targets = tuple(int(y) for _, y in kept)
        folds = tuple(assign_folds(sel, targets, setup.n_folds, setup.seed, stage.name))
        out[stage.name] = StageData(stage, sel, targets, folds)
    return out


__all__ = ["StageData", "assign_folds", "stage_data"]
