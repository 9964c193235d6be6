"""Task definitions: label extraction with unknowns masked, two-stage combination."""

import numpy as np
import pytest

from synthlearn.data.contract import Labels
from synthlearn.tasks import get_task


def test_idh_labels():
    task = get_task("idh")
    assert task.label(Labels(idh="mutant")) == 1
    assert task.label(Labels(idh="wildtype")) == 0
    assert task.label(Labels()) is None
    assert task.label(Labels(tumor_type="glioblastoma")) == 0  # WHO 2021: glioblastoma is IDH-wildtype
    assert task.stages[0].label(Labels(tumor_type="astrocytoma")) == 1


def test_tumor_type_labels_and_stages():
    task = get_task("tumor_type")
    assert task.class_names == ("glioblastoma", "astrocytoma", "oligodendroglioma")
    assert task.label(Labels(idh="mutant", codeletion_1p19q="codeleted")) == 2
    assert task.label(Labels(idh="mutant")) is None
    sub = task.stage("subtype")
    assert sub.label(Labels(tumor_type="glioblastoma")) is None  # stage 2 trains on IDH-mutant cases only
    assert sub.label(Labels(tumor_type="oligodendroglioma")) == 1


def test_two_stage_combination():
    task = get_task("tumor_type")
    idh = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    sub = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    p = task.combine({"idh": idh, "subtype": sub})
    assert np.allclose(p.sum(1), 1)
    assert p.argmax(1).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="missing"):
        task.combine({"idh": idh})
    with pytest.raises(ValueError, match="expected"):
        task.combine({"idh": idh, "subtype": sub[:, :1]})


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("mgmt")
