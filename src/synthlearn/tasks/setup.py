"""How a task model is trained, shared by every arm of a study: :class:`TrainingSetup`, and the names of the
networks it trains (``<stage>/fold-<k>``)."""

from __future__ import annotations

import dataclasses

from synthlearn.data.contract import SEQUENCES, LabelSchema
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.models.classifier import ClassifierConfig
from synthlearn.tasks.definitions import Task, get_task
from synthlearn.training.trainer import TrainConfig


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """Everything that defines how a task model is trained, shared by every arm of a study.

    Attributes:
        task: task name (:mod:`synthlearn.tasks`).
        n_folds: k of the k-fold ensemble (1 = one model on all cases; paper: 5).
        seed: run seed.
        preprocess: preprocessing of every case (real or synthetic).
        model: network settings.
        train: optimiser/epochs settings.
        sequences: the input channels, in order (the study's sequences; a model applied to other cases reads
            these sequences of them).
        label_values: the study's label columns and their values when they are not the glioma defaults (empty =
            defaults); a task over a column of the study's own (:func:`synthlearn.tasks.get_task`) reads its
            classes here.
    """

    task: str
    n_folds: int
    seed: int
    preprocess: PreprocessConfig
    model: ClassifierConfig
    train: TrainConfig
    sequences: tuple[str, ...] = SEQUENCES
    label_values: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.task_spec  # noqa: B018 - an unknown task fails here
        if self.n_folds < 1:
            raise ValueError(f"n_folds must be >= 1, found {self.n_folds}")
        if not self.sequences:
            raise ValueError("sequences must name at least one input channel")
        if self.task_spec.is_multitask and self.model.mamba:
            raise ValueError("the multi-task UNet (Ren et al.) has no Mamba block; set [model] mamba = false")

    @property
    def labels(self) -> LabelSchema | None:
        """The study's label schema (None = the glioma defaults)."""
        return LabelSchema(tuple(self.label_values.items())) if self.label_values else None

    @property
    def task_spec(self) -> Task:
        return get_task(self.task, self.labels)


def model_names(setup: TrainingSetup) -> list[str]:
    """Names of the networks an arm trains: ``<stage>/fold-<k>`` for every stage and fold."""
    return [f"{stage.name}/fold-{k}" for stage in setup.task_spec.stages for k in range(setup.n_folds)]


def split_name(name: str) -> tuple[str, int]:
    """``"idh/fold-2"`` -> ``("idh", 2)``."""
    stage, fold = name.split("/")
    return stage, int(fold.removeprefix("fold-"))


__all__ = ["TrainingSetup", "model_names", "split_name"]
