"""verify-data: one test per kind of fault, all faults reported at once, nothing written."""

import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from synthlearn.cli import main
from synthlearn.data.layouts import open_study
from synthlearn.data.verify import verify_study
from tests.data.brats import write_brats_copy


def _tree_digest(root: Path) -> dict[str, tuple[str, float]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), os.stat(p).st_mtime)
    out["__listing__"] = (str(sorted(str(p.relative_to(root)) for p in root.rglob("*"))), 0.0)
    return out


def _first_case(study_dir: Path):
    return open_study(study_dir).sites[0].cases[0]


def _resave(path: Path, data: np.ndarray, affine=None):
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), str(path))


def _checks(report):
    return sorted({p.check for p in report.problems})


def test_clean_study_passes_with_summary(tiny_study):
    report = verify_study(tiny_study, progress=False)
    assert report.ok, report.format()
    text = report.format()
    assert "OK: no problems found" in text
    for site in open_study(tiny_study).sites:
        assert site.name in text
    assert "32x32x32" in text


def test_truncated_gzip_is_caught(copy_study):
    f = _first_case(copy_study).images["t2"]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    report = verify_study(copy_study, progress=False)
    assert _checks(report) == ["unreadable"]
    assert str(f) == report.problems[0].file


def test_nan_and_inf_are_caught(copy_study):
    f = _first_case(copy_study).images["flair"]
    data = np.asarray(nib.load(str(f)).dataobj).copy()
    data[1, 1, 1] = np.nan
    data[2, 2, 2] = np.inf
    _resave(f, data)
    report = verify_study(copy_study, progress=False)
    assert _checks(report) == ["non-finite"]
    assert "1 NaN and 1 inf" in report.problems[0].found


def test_shape_mismatch_is_caught(copy_study):
    f = _first_case(copy_study).images["t1c"]
    data = np.asarray(nib.load(str(f)).dataobj)
    _resave(f, data[:-2])
    report = verify_study(copy_study, progress=False)
    assert _checks(report) == ["shape"]
    assert report.problems[0].file == str(f)
    assert "30x32x32" in report.problems[0].found and "32x32x32" in report.problems[0].expected


def test_affine_mismatch_is_caught(copy_study):
    f = _first_case(copy_study).images["t1"]
    img = nib.load(str(f))
    affine = img.affine.copy()
    affine[0, 3] += 5.0
    _resave(f, np.asarray(img.dataobj), affine)
    report = verify_study(copy_study, progress=False)
    # the four files that agree are the reference: the odd one is named
    assert _checks(report) == ["affine"]
    assert [p.file for p in report.problems] == [str(f)]


def test_missing_sequence_is_caught(copy_study):
    f = _first_case(copy_study).images["t1"]
    f.unlink()
    report = verify_study(copy_study, progress=False)
    assert _checks(report) == ["missing-file"]
    assert report.problems[0].file == str(f)


def test_invalid_seg_value_is_caught(copy_study):
    f = _first_case(copy_study).seg
    data = np.asarray(nib.load(str(f)).dataobj).copy()
    data[0, 0, 0] = 7
    _resave(f, data)
    report = verify_study(copy_study, progress=False)
    assert _checks(report) == ["seg-values"]
    assert "7" in report.problems[0].found


def test_invalid_label_and_missing_row_are_caught(copy_study):
    site = open_study(copy_study).sites[0]
    csv_path = copy_study / site.name / "labels.csv"
    lines = csv_path.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    row[header.index("idh")] = "maybe"
    lines[1] = ",".join(row)
    del lines[2]
    csv_path.write_text("\n".join(lines) + "\n")
    report = verify_study(copy_study, progress=False)
    assert _checks(report) == ["label-value", "labels"]


def test_empty_image_is_caught(copy_study):
    f = _first_case(copy_study).images["t2"]
    _resave(f, np.zeros(nib.load(str(f)).shape, np.float32))
    assert _checks(verify_study(copy_study, progress=False)) == ["empty-image"]


def test_brats_folder_with_five_faults_reports_all_and_is_untouched(tiny_study, tmp_path, capsys):
    """The issue's acceptance check: truncated file, NaN volume, shape mismatch, missing sequence and an
    invalid segmentation value, all reported at once, exit non-zero, folder byte-identical."""
    site_dir = tiny_study / open_study(tiny_study).sites[0].name
    root = tmp_path / "BraTS2021"
    ids = write_brats_copy(site_dir, root, max_cases=5)
    c = [root / i for i in ids]
    # 1 truncated .nii.gz
    f = c[0] / f"{ids[0]}_t2.nii.gz"
    f.write_bytes(f.read_bytes()[:300])
    # 2 NaN volume
    f = c[1] / f"{ids[1]}_flair.nii.gz"
    _resave(f, np.full(nib.load(str(f)).shape, np.nan, np.float32))
    # 3 shape mismatch
    f = c[2] / f"{ids[2]}_t1.nii.gz"
    _resave(f, np.asarray(nib.load(str(f)).dataobj)[:, :, :-4])
    # 4 missing sequence
    (c[3] / f"{ids[3]}_t1ce.nii.gz").unlink()
    # 5 invalid segmentation value (3 is not a BraTS-2021 label)
    f = c[4] / f"{ids[4]}_seg.nii.gz"
    data = np.asarray(nib.load(str(f)).dataobj).copy()
    data[data == 4] = 3
    data[0, 0, 0] = 3
    _resave(f, data)

    before = _tree_digest(root)
    code = main(["verify-data", str(root), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert _tree_digest(root) == before
    for case_id, check in zip(ids, ["unreadable", "non-finite", "shape", "missing-file", "seg-values"]):
        assert any(f"[{check}]" in line and case_id in line for line in err.splitlines()), (check, err)
    assert "FAILED: 5 problem(s)" in err, err


def test_cli_clean_study_exits_zero(tiny_study, capsys):
    assert main(["verify-data", str(tiny_study), "-q"]) == 0
    assert "OK: no problems found" in capsys.readouterr().out


def test_cli_not_a_study_exits_nonzero(tmp_path, capsys):
    assert main(["verify-data", str(tmp_path / "nope")]) == 2
    assert "no such study folder" in capsys.readouterr().err


def test_a_degenerate_affine_is_caught(copy_study):
    """A case whose files agree on an affine that maps no volume (voxels of 1e-5 mm: a determinant of 1e-15):
    verify-data used to pass it and only evaluate refused it; the one checked reader now refuses it everywhere."""
    case = _first_case(copy_study)
    for f in case.files().values():
        img = nib.load(str(f))
        affine = img.affine.copy()
        affine[:3, :3] *= 1e-5
        _resave(f, np.asarray(img.dataobj), affine)
    report = verify_study(copy_study, progress=False)
    assert _checks(report) == ["affine"]
    assert "an invertible voxel-to-world affine" in report.problems[0].expected


def test_trainers_evaluate_and_verify_share_one_checked_reader(copy_study):
    """What verify-data reports is what the trainers' and evaluate's reader refuse, with the same words."""
    import dataclasses

    import pytest

    from synthlearn.data.io import CaseFileMissing, CaseRefused, read_case
    from synthlearn.evaluate.external import read_case_checked

    case = _first_case(copy_study)
    clean = read_case(case)
    assert clean.images.shape == (4, 32, 32, 32) and clean.seg is not None
    data = np.asarray(nib.load(str(case.images["flair"])).dataobj).copy()
    data[3, 3, 3] = np.inf
    _resave(case.images["flair"], data)
    problem = verify_study(copy_study, progress=False).problems[0]
    for reader in (read_case, read_case_checked):
        with pytest.raises(CaseRefused) as err:
            reader(case)
        assert str(err.value) == f"{case.images['flair']}: expected {problem.expected}; found {problem.found}"
        assert err.value.problem == dataclasses.replace(problem, site="")
    case.seg.unlink()
    _resave(case.images["flair"], np.asarray(nib.load(str(case.images["t1"])).dataobj))
    with pytest.raises(CaseFileMissing, match="seg.nii.gz: expected a segmentation"):
        read_case(case)  # a trainer needs the segmentation
    assert isinstance(CaseFileMissing("f", "x", "y"), FileNotFoundError)
    assert read_case_checked(case).seg is None  # evaluate reads a case without one
