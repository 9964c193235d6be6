import json
import shutil

import numpy as np
import pytest

from synthlearn.data.contract import SEQUENCES, Labels, normalize_label
from synthlearn.data.io import read_case
from synthlearn.data.layouts import StudyLayoutError, open_case, open_study
from tests.data.brats import write_brats_copy
from tests.data.custom import write_custom_copy


def test_contract_study_reads_sites_roles_and_labels(tiny_study):
    study = open_study(tiny_study)
    meta = json.loads((tiny_study / "study.json").read_text())
    assert study.layout == "contract"
    assert [s.name for s in study.sites] == list(meta["sites"])
    assert {s.role for s in study.sites} == {"train", "test"}
    assert not study.problems
    case = study.sites[0].cases[0]
    assert list(case.images) == list(SEQUENCES)
    assert case.labels.idh in ("mutant", "wildtype")
    arrays = read_case(case)
    assert arrays.images.shape[0] == 4 and arrays.images.dtype == np.float32
    assert arrays.seg.shape == arrays.images.shape[1:]
    assert set(np.unique(arrays.seg)) <= {0, 1, 2, 3}


def test_brats_adapter_reads_one_site_and_maps_enhancing(tiny_study, tmp_path):
    site_dir = tiny_study / open_study(tiny_study).sites[0].name
    ids = write_brats_copy(site_dir, tmp_path / "BraTS2021", max_cases=3)
    study = open_study(tmp_path / "BraTS2021")
    assert study.layout == "brats" and len(study.sites) == 1
    site = study.sites[0]
    assert [c.case_id for c in site.cases] == sorted(ids)
    contract = {c.case_id: c for c in open_study(tiny_study).sites[0].cases}
    for case in site.cases:
        assert case.images["t1c"].name == f"{case.case_id}_t1ce.nii.gz"
        assert case.labels == contract[case.case_id].labels
        brats, ref = read_case(case), read_case(contract[case.case_id])
        np.testing.assert_array_equal(brats.seg, ref.seg)  # 4 mapped back to 3
        np.testing.assert_allclose(brats.images, ref.images)


def test_brats_without_labels_is_unlabelled(tiny_study, tmp_path):
    site_dir = tiny_study / open_study(tiny_study).sites[0].name
    write_brats_copy(site_dir, tmp_path / "b", max_cases=2)
    (tmp_path / "b" / "labels.csv").unlink()
    study = open_study(tmp_path / "b")
    assert all(c.labels == Labels() for c in study.cases)
    assert not study.problems


def test_single_site_folder_and_folder_of_sites(tiny_study, tmp_path):
    name = open_study(tiny_study).sites[0].name
    shutil.copytree(tiny_study / name, tmp_path / "sites" / name)
    site = open_study(tmp_path / "sites" / name)
    assert site.layout == "site" and site.sites[0].name == name
    sites = open_study(tmp_path / "sites")
    assert sites.layout == "sites" and sites.sites[0].role == "external"


def test_a_study_names_its_own_sequences_and_label_columns(tiny_study, tmp_path):
    study = open_study(write_custom_copy(tiny_study, tmp_path / "custom"))
    assert not study.problems and study.sequences == ("flair", "t1")
    assert study.labels.names == ("response", "risk") and study.labels.values("risk") == ("low", "high")
    case = study.sites[0].cases[0]
    assert case.sequences == ("flair", "t1") and case.labels.get("response") in ("no", "yes")  # "Yes" -> "yes"
    assert case.labels.idh is None
    arrays = read_case(case)
    assert arrays.images.shape[0] == 2
    original = read_case(open_study(tiny_study).sites[0].cases[0])
    assert np.array_equal(arrays.images[0], original.images[SEQUENCES.index("flair")])  # the study's channel order
    with pytest.raises(ValueError, match=r"expected sequences \['t1c'\], found \['flair', 't1'\]"):
        case.with_sequences(["t1c"])
    assert case.with_sequences(["t1"]).sequences == ("t1",)


@pytest.mark.parametrize("key, value, message", [
    ("sequences", [], "sequences: expected a non-empty list"),
    ("sequences", ["t1", "t1"], "sequences: expected a non-empty list of distinct"),
    ("sequences", ["T1"], "lower-case"),
    ("sequences", ["t1", "seg"], "not \"seg\""),
    ("labels", {"response": ["yes"]}, "labels: label column 'response': expected at least two distinct"),
    ("labels", {"Response": ["no", "yes"]}, "labels: label column 'Response': expected a lower-case name"),
    ("labels", ["response"], "labels: expected an object of label columns"),
])
def test_bad_sequences_or_labels_in_study_json_are_refused(tiny_study, tmp_path, key, value, message):
    meta = json.loads((tiny_study / "study.json").read_text())
    meta[key] = value
    (tmp_path / "study.json").write_text(json.dumps(meta))
    with pytest.raises(StudyLayoutError, match=f"study.json: {message}" if key == "labels" else message):
        open_study(tmp_path)


def test_a_labels_csv_without_the_study_columns_or_with_a_value_outside_them_is_a_problem(tiny_study, tmp_path):
    root = write_custom_copy(tiny_study, tmp_path / "custom")
    site = open_study(root).sites[0].name
    path = root / site / "labels.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].rsplit(",", 1)[0] + ",medium", *lines[2:]]) + "\n")
    problems = open_study(root).problems
    assert [p.check for p in problems] == ["label-value"] and "risk in ['low', 'high'] or blank" in str(problems[0])
    path.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    assert "missing columns ['risk']" in str(open_study(root).problems[0])


def test_not_a_study_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(StudyLayoutError, match="not a study"):
        open_study(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        open_study(tmp_path / "missing")


def test_label_synonyms_and_invalid_values():
    assert normalize_label("idh", "1") == "mutant"
    assert normalize_label("idh", " WT ") == "wildtype"
    assert normalize_label("grade", "IV") == "4"
    assert normalize_label("tumor_type", "GBM") == "glioblastoma"
    assert normalize_label("mgmt", "") is None
    with pytest.raises(ValueError, match="idh='maybe'"):
        normalize_label("idh", "maybe")
    for code in ("0", "1", "2"):  # no standard numbers tumour types: refused rather than guessed
        with pytest.raises(ValueError, match=f"tumor_type='{code}'"):
            normalize_label("tumor_type", code)


def test_open_case_reads_contract_and_brats_names(tiny_study, tmp_path):
    site = open_study(tiny_study).sites[0]
    ref = site.cases[0]
    case = open_case(tiny_study / site.name / ref.case_id)
    assert case.case_id == ref.case_id and case.site == site.name and case.images == ref.images
    assert case.seg == ref.seg and case.labels == Labels()
    write_brats_copy(tiny_study / site.name, tmp_path / "b", max_cases=1)
    brats = open_case(tmp_path / "b" / ref.case_id, site="ext")
    assert brats.site == "ext" and brats.images["t1c"].name == f"{ref.case_id}_t1ce.nii.gz"
    np.testing.assert_array_equal(read_case(brats).seg, read_case(ref).seg)  # 4 mapped back to 3
    (tmp_path / "b" / ref.case_id / f"{ref.case_id}_seg.nii.gz").unlink()
    (tmp_path / "b" / ref.case_id / f"{ref.case_id}_t2.nii.gz").unlink()
    partial = open_case(tmp_path / "b" / ref.case_id)
    assert partial.seg is None and not partial.images["t2"].exists()  # the reader names the missing file
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudyLayoutError, match="not a case folder"):
        open_case(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        open_case(tmp_path / "missing")
