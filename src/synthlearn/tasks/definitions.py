"""Tasks: which label a model learns, its classes, and how stages combine.

A :class:`Task` is one or more :class:`Stage` s, each a classifier over its own classes trained on the
cases whose stage label is known (unknown labels are masked, never guessed):

- ``idh``: one stage, IDH wildtype (0) vs mutant (1). The positive class of SEN/SPE/AUC is ``mutant``.
- ``tumor_type`` (CATphishing's two-stage pipeline, paper 000): stage ``idh`` (IDH-wildtype glioblastoma vs
  IDH-mutant), then stage ``subtype`` (astrocytoma vs oligodendroglioma) trained on IDH-mutant cases only.
  The 3-class probabilities are ``p(gbm) = 1 - p(mut)``, ``p(astro) = p(mut) * p(astro | mut)``,
  ``p(oligo) = p(mut) * p(oligo | mut)``: the arg-max equals "stage 1 says wildtype -> glioblastoma, else
  the stage-2 class" whenever stage 1 is confident, and the probabilities stay a proper distribution for AUC.
- ``segmentation``: one stage, the tumour's labels voxel by voxel (0 background, 1 necrosis / non-enhancing core,
  2 oedema, 3 enhancing; :mod:`synthlearn.training.segmentation`), learned from every case with a segmentation and
  evaluated per region (whole tumour, tumour core, enhancing tumour) with Dice and HD95.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from synthlearn.data.contract import LABEL_VALUES, Labels
from synthlearn.training.segmentation import SEG_CLASSES


def _idh_from_labels(labels: Labels) -> str | None:
    """IDH status, falling back to the WHO 2021 tumour type (glioblastoma = wildtype, else mutant)."""
    if labels.idh is not None:
        return labels.idh
    if labels.tumor_type is not None:
        return "wildtype" if labels.tumor_type == "glioblastoma" else "mutant"
    return None


def _tumor_type_from_labels(labels: Labels) -> str | None:
    """WHO 2021 tumour type, falling back to IDH + 1p/19q (wildtype = glioblastoma; mutant + codeleted =
    oligodendroglioma; mutant + intact = astrocytoma)."""
    if labels.tumor_type is not None:
        return labels.tumor_type
    if labels.idh == "wildtype":
        return "glioblastoma"
    if labels.idh == "mutant" and labels.codeletion_1p19q is not None:
        return "oligodendroglioma" if labels.codeletion_1p19q == "codeleted" else "astrocytoma"
    return None


def _subtype_from_labels(labels: Labels) -> str | None:
    """Astrocytoma / oligodendroglioma of an IDH-mutant case; None for wildtype or unknown."""
    tumor_type = _tumor_type_from_labels(labels)
    return tumor_type if tumor_type in ("astrocytoma", "oligodendroglioma") else None


@dataclasses.dataclass(frozen=True)
class Stage:
    """One classifier of a task.

    Attributes:
        name: stage name (``idh``, ``subtype``); also the folder of its models in a run.
        class_names: the stage's classes, index = network output channel.
        extract: ``Labels -> class name or None`` (None = unknown, the case is left out of this stage).
    """

    name: str
    class_names: tuple[str, ...]
    extract: Callable[[Labels], str | None] = dataclasses.field(compare=False, repr=False)
    segmentation: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def label(self, labels: Labels) -> int | None:
        """Class index of a case for this stage, or None when unknown / not applicable (a segmentation stage
        learns from every case: 0)."""
        if self.segmentation:
            return 0
        value = self.extract(labels)
        return None if value is None else self.class_names.index(value)


@dataclasses.dataclass(frozen=True)
class Task:
    """A classification task: final classes, stages, and how stage probabilities combine.

    Attributes:
        name: ``idh`` or ``tumor_type``.
        class_names: final classes (index order of probability columns everywhere).
        label_column: the contract label column holding the final class.
        stages: the stage classifiers in order.
        extract: ``Labels -> final class name or None`` (unknown).
        positive_class: index of the positive class for SEN/SPE of a binary task; None for multi-class
            tasks (SEN/SPE are then macro averages over one-vs-rest).
        kind: ``classification`` (case classes, AUC...) or ``segmentation`` (voxel labels, Dice and HD95).
    """

    name: str
    class_names: tuple[str, ...]
    label_column: str
    stages: tuple[Stage, ...]
    extract: Callable[[Labels], str | None] = dataclasses.field(compare=False, repr=False)
    positive_class: int | None = 1
    kind: str = "classification"

    @property
    def is_segmentation(self) -> bool:
        return self.kind == "segmentation"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def label(self, labels: Labels) -> int | None:
        """Final class index of a case, or None when unknown (masked)."""
        value = self.extract(labels)
        return None if value is None else self.class_names.index(value)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"task {self.name} has no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def combine(self, stage_probs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Final class probabilities from the stages' probabilities.

        Args:
            stage_probs: stage name -> ``(N, stage.num_classes)`` probabilities for the same N cases.

        Returns:
            ``(N, num_classes)`` probabilities, rows summing to 1.
        """
        missing = [s.name for s in self.stages if s.name not in stage_probs]
        if missing:
            raise ValueError(f"task {self.name}: probabilities of stage(s) {missing} missing; "
                             f"found {sorted(stage_probs)}")
        for s in self.stages:
            p = np.asarray(stage_probs[s.name])
            if p.ndim != 2 or p.shape[1] != s.num_classes:
                raise ValueError(f"stage {s.name}: expected (N, {s.num_classes}) probabilities, found {p.shape}")
        if self.is_segmentation:
            raise ValueError(f"task {self.name} predicts voxel labels, not case probabilities")
        if self.name == "idh":
            return np.asarray(stage_probs["idh"], dtype=np.float64)
        if self.name == "tumor_type":
            p_mut = np.asarray(stage_probs["idh"], dtype=np.float64)[:, 1]
            sub = np.asarray(stage_probs["subtype"], dtype=np.float64)
            astro = sub[:, STAGE_SUBTYPE.class_names.index("astrocytoma")]
            oligo = sub[:, STAGE_SUBTYPE.class_names.index("oligodendroglioma")]
            return np.stack([1.0 - p_mut, p_mut * astro, p_mut * oligo], axis=1)
        raise ValueError(f"no combination rule for task {self.name!r}")


STAGE_IDH = Stage("idh", LABEL_VALUES["idh"], _idh_from_labels)
STAGE_SUBTYPE = Stage("subtype", ("astrocytoma", "oligodendroglioma"), _subtype_from_labels)
STAGE_SEG = Stage("seg", SEG_CLASSES, lambda labels: None, segmentation=True)

TASKS: dict[str, Task] = {
    "idh": Task("idh", LABEL_VALUES["idh"], "idh", (STAGE_IDH,), _idh_from_labels, positive_class=1),
    "tumor_type": Task("tumor_type", LABEL_VALUES["tumor_type"], "tumor_type", (STAGE_IDH, STAGE_SUBTYPE),
                       _tumor_type_from_labels, positive_class=None),
    "segmentation": Task("segmentation", SEG_CLASSES, "", (STAGE_SEG,), lambda labels: None, positive_class=None,
                         kind="segmentation"),
}


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: unknown name (lists the known ones).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]
