"""How a task model is trained, shared by every arm of a study: :class:`TrainingSetup`, and the names of the
networks it trains (``<stage>/fold-<k>``)."""

from __future__ import annotations

import dataclasses

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
    """

    task: str
    n_folds: int
    seed: int
    preprocess: PreprocessConfig
    model: ClassifierConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        get_task(self.task)
        if self.n_folds < 1:
            raise ValueError(f"n_folds must be >= 1, found {self.n_folds}")

    @property
    def task_spec(self) -> Task:
        return get_task(self.task)


def model_names(setup: TrainingSetup) -> list[str]:
    """Names of the networks an arm trains: ``<stage>/fold-<k>`` for every stage and fold."""
    return [f"{stage.name}/fold-{k}" for stage in setup.task_spec.stages for k in range(setup.n_folds)]


def split_name(name: str) -> tuple[str, int]:
    """``"idh/fold-2"`` -> ``("idh", 2)``."""
    stage, fold = name.split("/")
    return stage, int(fold.removeprefix("fold-"))


__all__ = ["TrainingSetup", "model_names", "split_name"]
