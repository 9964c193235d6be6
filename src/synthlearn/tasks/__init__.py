"""Tasks: what a model learns (its classes, its stages), how it is trained and the trained model itself.

- :mod:`synthlearn.tasks.definitions`: :class:`Task` and :class:`Stage` (IDH; the two-stage tumour type; segmentation;
  any label column of a study), ``get_task``;
- :mod:`synthlearn.tasks.setup`: :class:`TrainingSetup`, the network names of a task model;
- :mod:`synthlearn.tasks.folds`: k-fold splits per (site, label);
- :mod:`synthlearn.tasks.cache`: preprocessed cases shared by the arms of a run;
- :mod:`synthlearn.tasks.model`: :class:`TaskModel` and :func:`train_task_model`.

Both ``strategies`` (which train task models) and ``evaluate`` (which applies them) use this package; neither
imports the other's internals.
"""

from synthlearn.tasks.definitions import (
    STAGE_IDH,
    STAGE_SEG,
    STAGE_SUBTYPE,
    TASKS,
    Stage,
    Task,
    column_task,
    get_task,
    task_names,
)

__all__ = ["STAGE_IDH", "STAGE_SEG", "STAGE_SUBTYPE", "TASKS", "Stage", "Task", "column_task", "get_task",
           "task_names"]
