"""Task definitions: label extraction with unknowns masked, two-stage combination, tasks over any label column."""

import dataclasses
import pickle

import numpy as np
import pytest

from synthlearn.data.contract import Labels, LabelSchema
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
    with pytest.raises(ValueError, match="unknown task 'ki67'.*'mgmt'"):
        get_task("ki67")


def test_any_label_column_is_a_one_stage_task():
    mgmt = get_task("mgmt")  # a glioma column without a task of its own
    assert mgmt.class_names == ("unmethylated", "methylated") and mgmt.positive_class == 1
    assert mgmt.label(Labels(mgmt="methylated")) == 1 and mgmt.label(Labels(idh="mutant")) is None
    assert get_task("grade").positive_class is None  # three classes: macro averages
    p = np.array([[0.2, 0.8], [0.9, 0.1]])
    assert np.array_equal(mgmt.combine({"mgmt": p}), p)
    schema = LabelSchema((("response", ("no", "yes")),))
    response = get_task("response", schema)
    assert response.label(Labels(response="yes")) == 1 and response.stages[0].name == "response"
    assert pickle.loads(pickle.dumps(response.stages[0].extract))(Labels(response="no")) == "no"
    with pytest.raises(ValueError, match="task 'idh' needs label column idh or tumor_type.*'response', 'segmentation'"):
        get_task("idh", schema)
    assert get_task("segmentation", schema).is_segmentation


def test_labels_are_immutable_hashable_and_pickle():
    a = Labels(idh="mutant", grade=None, response="yes")
    assert a == Labels({"response": "yes", "idh": "mutant"}) and hash(a) == hash(Labels(idh="mutant", response="yes"))
    assert a.idh == "mutant" and a.grade is None and a.get("response") == "yes" and a.get("other") is None
    assert pickle.loads(pickle.dumps(a)) == a
    assert a.as_row(("idh", "response", "mgmt")) == {"idh": "mutant", "response": "yes", "mgmt": ""}
    with pytest.raises(AttributeError, match=r"\.get\(\)"):
        a.response  # noqa: B018 - only the glioma columns read as attributes
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.idh = "wildtype"
