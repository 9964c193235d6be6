"""Tasks: which label a model learns, its classes, and how stages combine.

A :class:`Task` is one or more :class:`Stage` s, each a classifier over its own classes trained on the
cases whose stage label is known (unknown labels are masked, never guessed):

- ``idh``: one stage, IDH wildtype (0) vs mutant (1). The positive class of SEN/SPE/AUC is ``mutant``.
- ``tumor_type`` (CATphishing's two-stage pipeline, paper 000): stage ``idh`` (IDH-wildtype glioblastoma vs
  IDH-mutant), then stage ``subtype`` (astrocytoma vs oligodendroglioma) trained on IDH-mutant cases only.
  The 3-class probabilities are ``p(gbm) = 1 - p(mut)``, ``p(astro) = p(mut) * p(astro | mut)``,
  ``p(oligo) = p(mut) * p(oligo | mut)``: the arg-max equals "stage 1 says wildtype -> glioblastoma, else
  the stage-2 class" whenever stage 1 is confident, and the probabilities stay a proper distribution for AUC.
- any other label column of the study (``study.json``'s ``labels``; for the glioma defaults ``codeletion_1p19q``,
  ``mgmt``, ``grade``): one stage over the column's values in their declared order; a binary column's positive
  class is its second value (``codeleted``, ``methylated``; ``{"grade": ["low", "high"]}`` -> ``high``).
- ``multitask`` (Ren et al., paper 001): one network that segments the tumour and classifies it with one head per
  label column (the glioma study: IDH, 1p/19q, MGMT, grade; a study of its own: every column); a head's loss and
  metrics leave out the cases whose label is unknown.
- ``segmentation``: one stage, the tumour's labels voxel by voxel (0 background, 1 necrosis / non-enhancing core,
  2 oedema, 3 enhancing; :mod:`synthlearn.training.segmentation`), learned from every case with a segmentation and
  evaluated per region (whole tumour, tumour core, enhancing tumour) with Dice and HD95.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping

import numpy as np

from synthlearn.data.contract import GLIOMA_LABELS, LABEL_VALUES, Labels, LabelSchema
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
        segmentation: the stage learns the tumour's voxel labels (every case with a segmentation trains it).
        heads: a multi-task stage's classification heads (each a one-column stage), learned with the segmentation.
    """

    name: str
    class_names: tuple[str, ...]
    extract: Callable[[Labels], str | None] = dataclasses.field(compare=False, repr=False)
    segmentation: bool = False
    heads: tuple[Stage, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def head_sizes(self) -> tuple[int, ...]:
        """Classes of each classification head of a multi-task stage (empty otherwise)."""
        return tuple(h.num_classes for h in self.heads)

    def head_targets(self, labels: Labels) -> tuple[int, ...]:
        """Class index per head of a multi-task stage, -1 where the head's label is unknown (masked)."""
        return tuple(-1 if (y := h.label(labels)) is None else y for h in self.heads)

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
        kind: ``classification`` (case classes, AUC...), ``segmentation`` (voxel labels, Dice and HD95) or
            ``multitask`` (both: the segmentation and a classification head per label column).
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
    def is_multitask(self) -> bool:
        return self.kind == "multitask"

    @property
    def segments(self) -> bool:
        """It predicts voxel labels (a segmentation or a multi-task task)."""
        return self.kind in ("segmentation", "multitask")

    @property
    def heads(self) -> tuple[Stage, ...]:
        """The classification heads of a multi-task task (empty otherwise)."""
        return self.stages[0].heads if self.is_multitask else ()

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
        if self.segments:
            raise ValueError(f"task {self.name} predicts voxel labels, not case probabilities (a multi-task model's "
                             f"heads: TaskModel.predict_heads)")
        if len(self.stages) == 1:
            return np.asarray(stage_probs[self.stages[0].name], dtype=np.float64)
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


#: The label columns each built-in task reads (any one of them suffices).
_TASK_COLUMNS: dict[str, tuple[str, ...]] = {"idh": ("idh", "tumor_type"), "tumor_type": ("tumor_type", "idh"),
                                             "segmentation": (), "multitask": ()}
#: The heads of the multi-task model on the glioma columns (Ren et al.: IDH, 1p/19q, MGMT, grade).
MULTITASK_GLIOMA_HEADS: tuple[str, ...] = ("idh", "codeletion_1p19q", "mgmt", "grade")


def multitask(labels: LabelSchema = GLIOMA_LABELS) -> Task:
    """The multi-task task of a study: segmentation plus one head per label column (the glioma study: IDH with its
    WHO 2021 fallback on the tumour type, 1p/19q, MGMT, grade; a study of its own: every column)."""
    if labels == GLIOMA_LABELS:
        heads = (STAGE_IDH, *(column_task(c, labels.values(c)).stages[0] for c in MULTITASK_GLIOMA_HEADS[1:]))
    else:
        heads = tuple(column_task(c, v).stages[0] for c, v in labels.columns)
    stage = Stage("multitask", SEG_CLASSES, lambda labels: None, segmentation=True, heads=heads)
    return Task("multitask", SEG_CLASSES, "", (stage,), lambda labels: None, positive_class=None, kind="multitask")


def column_task(column: str, values: tuple[str, ...]) -> Task:
    """A one-stage classification task over one label column's values (declared order = class index; a binary
    column's positive class is its second value)."""
    extract = operator.methodcaller("get", column)
    return Task(column, tuple(values), column, (Stage(column, tuple(values), extract),), extract,
                positive_class=1 if len(values) == 2 else None)


TASKS["multitask"] = multitask()


def task_names(labels: LabelSchema = GLIOMA_LABELS) -> list[str]:
    """Every task a study with label columns ``labels`` can run."""
    return sorted({*(n for n, cols in _TASK_COLUMNS.items() if not cols or any(c in labels for c in cols)),
                   *labels.names})


def get_task(name: str, labels: LabelSchema | None = None) -> Task:
    """The task called ``name`` for a study with label columns ``labels`` (default: the glioma columns).

    Built-in tasks (``idh``, ``tumor_type``, ``segmentation``) come first; any other name is a label column of the
    study, learned as one classification stage (:func:`column_task`).

    Raises:
        ValueError: unknown name, or a built-in task whose label columns the study lacks (lists the tasks it can
            run).
    """
    schema = labels or GLIOMA_LABELS
    if name == "multitask":
        return multitask(schema)
    if name in TASKS:
        needed = _TASK_COLUMNS[name]
        if needed and not any(c in schema for c in needed):
            raise ValueError(f"task {name!r} needs label column {' or '.join(needed)}; the study's columns are "
                             f"{list(schema.names)}; tasks it can run: {task_names(schema)}")
        return TASKS[name]
    if name in schema:
        return column_task(name, schema.values(name))
    raise ValueError(f"unknown task {name!r}; expected one of {task_names(schema)} (built-in tasks and the study's "
                     f"label columns)")
