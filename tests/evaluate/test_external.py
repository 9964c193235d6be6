"""External validation (``synthlearn evaluate`` / ``predict``): a tiny study run (centralized + local, 2 folds,
1 epoch, 32^3) trained once per module is applied to re-written copies of a test site as real NIfTI:
BraTS-2021 names with a flipped and permuted voxel order at another voxel size, unlabelled cases, broken
cases, and single case folders."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthlearn.cli import main
from synthlearn.data.io import CaseArrays, read_case
from synthlearn.data.layouts import open_case, open_study
from synthlearn.data.preprocess import PreprocessConfig, voxel_spacing
from synthlearn.evaluate.external import (
    CaseRefused,
    PreparedCases,
    evaluate_run,
    load_run_models,
    metrics_block,
    predict_case,
    prepare_case,
    read_case_checked,
    run_arms,
    voxel_probability_map,
)
from synthlearn.study import load_study_config, run_study
from synthlearn.tasks import get_task

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "study_tiny.toml"
SITE = "nyu"  # a test site of the tiny phantom (6 cases)
BRATS_NAMES = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}


@pytest.fixture(scope="module")
def trained_run(tiny_study, tmp_path_factory):
    """centralized + local arms on the tiny phantom; the preprocessing resamples to the phantom's voxel size, so
    a copy stored at another voxel size reaches the networks on the training grid."""
    first = open_study(tiny_study).cases[0]
    spacing = [float(v) for v in voxel_spacing(nib.load(str(first.images["t1"])).affine)]
    cfg = load_study_config(TINY, {"study": str(tiny_study), "arms": ["centralized", "local"],
                                   "preprocess": {"spacing": spacing},
                                   "evaluate": {"n_bootstrap": 50, "figures": False}})
    out = tmp_path_factory.mktemp("ext") / "run"
    run_study(cfg, out, progress=False)
    return out


def _reoriented_brats_copy(site_dir: Path, dst: Path, factor: float, exact: bool) -> Path:
    """Copy a contract site to BraTS-2021 names (seg 3 -> 4) with the x axis flipped, x and y swapped and the
    grid resampled ``factor`` times finer; the affine keeps every voxel's world position. ``exact``: nearest
    duplication (a 2x copy then returns to the original grid exactly); else trilinear images."""
    dst.mkdir(parents=True)
    rows = list(csv.DictReader((site_dir / "labels.csv").open()))
    for row in rows:
        case_id = row["case_id"]
        (dst / case_id).mkdir()
        for key, name in BRATS_NAMES.items():
            img = nib.load(str(site_dir / case_id / f"{key}.nii.gz"))
            data = np.asarray(img.dataobj, dtype=np.float32)
            affine = img.affine.copy()
            flip = np.eye(4)
            flip[0, 0], flip[0, 3] = -1.0, data.shape[0] - 1
            data, affine = data[::-1], affine @ flip
            swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
            data, affine = data.transpose(1, 0, 2), affine @ swap
            before = np.array(data.shape, dtype=float)
            size = tuple(int(round(n * factor)) for n in data.shape)
            t = torch.from_numpy(np.ascontiguousarray(data))[None, None]
            if key == "seg" or exact:
                data = F.interpolate(t, size=size, mode="nearest-exact")[0, 0].numpy()
            else:
                data = F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
            scale = before / np.array(size)
            zoom = np.eye(4)
            zoom[:3, :3] = np.diag(scale)
            zoom[:3, 3] = 0.5 * scale - 0.5  # voxel centres of an align_corners=False resampling
            affine = affine @ zoom
            if key == "seg":
                data = np.where(data == 3, 4, data).astype(np.int16)
            nib.save(nib.Nifti1Image(data, affine), str(dst / case_id / f"{case_id}_{name}.nii.gz"))
    with (dst / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dst


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _p_mutant(rows: list[dict[str, str]]) -> dict[tuple[str, str], float]:
    return {(r["model"], r["case_id"]): float(r["p_mutant"]) for r in rows}


@pytest.fixture(scope="module")
def original_eval(trained_run, tiny_study, tmp_path_factory):
    """evaluate on the test site as it is (a site folder with labels.csv)."""
    out = tmp_path_factory.mktemp("eval") / "original"
    results = evaluate_run(trained_run, tiny_study / SITE, out, progress=False)
    return results, _read_csv(out / "predictions.csv")


# ---------------------------------------------------------------------------------------------- evaluate
def test_site_folder_reproduces_the_runs_own_predictions(trained_run, original_eval):
    results, rows = original_eval
    ours = _p_mutant(rows)
    assert len(rows) == 6 * 4  # 6 cases x (centralized + 3 local site models)
    saved = {}
    for arm in ("centralized", "local"):
        saved.update({k: v for k, v in _p_mutant(_read_csv(trained_run / arm / "predictions.csv")).items()
                      if k[1].startswith(SITE)})
    assert set(saved) == set(ours)
    np.testing.assert_allclose([ours[k] for k in saved], [saved[k] for k in saved], atol=1e-5)
    assert results["reference_arm"] == "centralized" and results["skipped"] == []


def test_reoriented_resampled_brats_copy(trained_run, tiny_study, tmp_path, original_eval):
    """(a) BraTS-2021 names, x flipped, x/y swapped, 1.5x finer voxels: every case predicted, per-site and
    combined metrics, predictions close to the original's; a 2x nearest copy matches it exactly."""
    _, original_rows = original_eval
    reference = _p_mutant(original_rows)
    study = _reoriented_brats_copy(tiny_study / SITE, tmp_path / "brats", factor=1.5, exact=False)
    assert nib.aff2axcodes(nib.load(str(study / "nyu_000" / "nyu_000_t1ce.nii.gz")).affine) == ("A", "L", "S")
    out = tmp_path / "out"
    assert main(["evaluate", "--run", str(trained_run), "--study", str(study), "--out", str(out), "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["layout"] == "brats" and results["task"] == "idh"
    assert results["n_cases"] == results["n_predicted"] == results["n_labelled"] == 6
    site = results["sites"][0]
    for arm in ("centralized", "local"):
        block = results["arms"][arm]
        assert set(block["test"]) == {site, "combined"}
        assert block["test"]["combined"]["n"] == 6
        assert "mcnemar_p_vs_centralized" in block
    assert set(results["arms"]["local"]["site_models"]) == {"tcga", "utsw", "egd"}
    for sub in results["arms"]["local"]["site_models"].values():
        assert 0.0 <= sub["mcnemar_p_vs_centralized"] <= 1.0
    assert results["arms"]["centralized"]["mcnemar_p_vs_centralized"] is None
    rows = _read_csv(out / "predictions.csv")
    assert list(rows[0]) == ["site", "case_id", "arm", "model", "p_wildtype", "p_mutant", "pred", "true", "region"]
    assert {(r["arm"], r["model"], r["case_id"]) for r in rows} == {
        (arm, model, f"{SITE}_{i:03d}") for arm, model in
        [("centralized", "centralized"), ("local", "tcga"), ("local", "utsw"), ("local", "egd")] for i in range(6)}
    assert all(r["true"] in ("wildtype", "mutant") and r["region"] == "tumour" for r in rows)
    moved = _p_mutant(rows)
    diffs = np.array([abs(moved[k] - reference[k]) for k in reference])
    # two trilinear resamplings (32 -> 48 -> 32 voxels of 6 mm) blur the tiny phantom: close, not equal
    assert diffs.max() < 0.12 and diffs.mean() < 0.05, diffs
    for name in ("run.json", "config.json"):
        assert (out / name).is_file()
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["data_fingerprint"]["n_cases"] == 6 and run_info["version"]["synthlearn"]

    exact = _reoriented_brats_copy(tiny_study / SITE, tmp_path / "brats2x", factor=2, exact=True)
    evaluate_run(trained_run, exact, tmp_path / "out2x", progress=False)
    again = _p_mutant(_read_csv(tmp_path / "out2x" / "predictions.csv"))
    np.testing.assert_allclose([again[k] for k in reference], [reference[k] for k in reference], atol=1e-5)


def test_unlabelled_cases_give_predictions_only(trained_run, tiny_study, tmp_path):
    """(b) a folder of case folders without labels.csv; one case has no segmentation (brain average)."""
    study = tmp_path / "unlabelled"
    for case_id in ("nyu_000", "nyu_001", "nyu_002"):
        shutil.copytree(tiny_study / SITE / case_id, study / case_id)
    (study / "nyu_002" / "seg.nii.gz").unlink()
    results = evaluate_run(trained_run, study, tmp_path / "out", arms=["local", "centralized"], progress=False)
    assert results["n_predicted"] == 3 and results["n_labelled"] == 0
    assert "no labelled case" in results["note"]
    assert all("test" not in block for block in results["arms"].values())
    assert results["reference_arm"] == "centralized"
    assert results["cases_without_tumour_mask"] == ["unlabelled/nyu_002"]
    rows = _read_csv(tmp_path / "out" / "predictions.csv")
    assert len(rows) == 3 * 4
    assert all(r["true"] == "" for r in rows)
    assert {r["region"] for r in rows if r["case_id"] == "nyu_002"} == {"brain"}
    for r in rows:
        assert abs(float(r["p_wildtype"]) + float(r["p_mutant"]) - 1.0) < 1e-4
    assert [r["arm"] for r in rows[:1]] == ["local"]  # arms in the requested order


def test_broken_cases_are_skipped_and_reported(trained_run, tiny_study, tmp_path):
    """(c) a missing sequence, a truncated file and a sequence of another shape skip their cases only."""
    study = tmp_path / "broken"
    shutil.copytree(tiny_study / SITE, study)
    (study / "nyu_000" / "t1c.nii.gz").unlink()
    flair = study / "nyu_001" / "flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:200])
    t2 = nib.load(str(study / "nyu_002" / "t2.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), t2.affine), str(study / "nyu_002" / "t2.nii.gz"))
    out = tmp_path / "out"
    assert main(["evaluate", "--run", str(trained_run), "--study", str(study), "--out", str(out), "--arms",
                 "centralized", "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    skipped = {s["case"]: s for s in results["skipped"]}
    assert set(skipped) == {"nyu_000", "nyu_001", "nyu_002"}
    assert skipped["nyu_000"]["file"].endswith("nyu_000/t1c.nii.gz") and "no such file" in skipped["nyu_000"]["reason"]
    assert skipped["nyu_001"]["file"].endswith("flair.nii.gz") and "reads in full" in skipped["nyu_001"]["reason"]
    assert skipped["nyu_002"]["file"].endswith("t2.nii.gz")
    assert "expected shape 32x32x32" in skipped["nyu_002"]["reason"]
    assert "found shape 20x20x20" in skipped["nyu_002"]["reason"]
    assert results["n_predicted"] == 3 and results["arms"]["centralized"]["test"]["combined"]["n"] == 3
    assert {r["case_id"] for r in _read_csv(out / "predictions.csv")} == {"nyu_003", "nyu_004", "nyu_005"}


def test_unknown_or_incomplete_arm_is_a_clear_error(trained_run, tiny_study, tmp_path, capsys):
    """(d)"""
    assert run_arms(trained_run) == (["centralized", "local"], [])
    with pytest.raises(ValueError, match=r"\['fedavg'\] not found complete in run folder .*complete arms there: "
                                         r"\['centralized', 'local'\]"):
        evaluate_run(trained_run, tiny_study / SITE, tmp_path / "out", arms=["fedavg"], progress=False)
    assert main(["evaluate", "--run", str(trained_run), "--study", str(tiny_study / SITE), "--out",
                 str(tmp_path / "out"), "--arms", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and str(trained_run) in err and "centralized" in err
    # an arm folder without arm.json (an interrupted arm) is listed as incomplete
    fake_run = tmp_path / "run"
    shutil.copytree(trained_run / "centralized", fake_run / "centralized")
    (fake_run / "fedavg").mkdir()
    (fake_run / "fedavg" / "run.json").write_text('{"arm": "fedavg"}')  # started, never finished
    (fake_run / "elsewhere").mkdir()
    (fake_run / "elsewhere" / "run.json").write_text('{"command": "evaluate"}')  # not an arm
    assert run_arms(fake_run) == (["centralized"], ["fedavg"])
    with pytest.raises(ValueError, match=r"incomplete: \['fedavg'\]"):
        load_run_models(fake_run, ["fedavg"])
    with pytest.raises(ValueError, match="run folder itself"):
        evaluate_run(trained_run, tiny_study / SITE, trained_run, progress=False)
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        evaluate_run(tmp_path / "nothing", tiny_study / SITE, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------------- predict
def test_predict_writes_map_overlay_and_prints_probabilities(trained_run, tiny_study, tmp_path, capsys):
    """(e)"""
    case_dir = tiny_study / SITE / "nyu_001"
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(trained_run), "--arm", "centralized", "--case", str(case_dir),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    probs = {line.split("(")[1].split(")")[0]: float(line.split("=")[1]) for line in printed.splitlines()
             if line.strip().startswith("p(")}
    assert set(probs) == {"wildtype", "mutant"} and abs(sum(probs.values()) - 1.0) < 1e-3
    info = json.loads((out / "nyu_001_centralized_prediction.json").read_text())
    assert info["region"] == "tumour" and info["map"]["stage"] == "idh"
    img = nib.load(str(out / info["map"]["file"]))
    assert img.shape == (32, 32, 32, 2)
    assert b"preprocessed grid" in img.header["descrip"].tobytes()
    pmap = np.asarray(img.dataobj)
    np.testing.assert_allclose(pmap.sum(-1), 1.0, atol=1e-5)
    # the map is on the preprocessed grid: its tumour mean is the printed case probability
    model = load_run_models(trained_run, ["centralized"])[0].model
    prep = prepare_case(read_case_checked(open_case(case_dir)), model.preprocess)
    np.testing.assert_allclose(img.affine, prep.grid_affine, atol=1e-4)
    tumour = prep.region.astype(bool)
    np.testing.assert_allclose(pmap[tumour].mean(0), [info["probabilities"]["wildtype"],
                                                      info["probabilities"]["mutant"]], atol=1e-4)
    png = out / info["overlay"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_predict_brats_case_without_seg_and_local_model(trained_run, tiny_study, tmp_path, capsys):
    case_dir = tmp_path / "BraTS2021_00001"
    case_dir.mkdir()
    for key, name in BRATS_NAMES.items():
        if key != "seg":
            shutil.copy(tiny_study / SITE / "nyu_003" / f"{key}.nii.gz", case_dir / f"{case_dir.name}_{name}.nii.gz")
    assert main(["predict", "--run", str(trained_run), "--arm", "local", "--case", str(case_dir)]) == 2
    assert "choose one with --model" in capsys.readouterr().err
    info = predict_case(trained_run, "local", case_dir, tmp_path / "p", model_label="egd")
    assert info["region"] == "brain" and info["model"] == "egd"
    assert abs(sum(info["probabilities"].values()) - 1.0) < 1e-6
    assert (tmp_path / "p" / "BraTS2021_00001_local-egd_probability.nii.gz").is_file()
    (case_dir / f"{case_dir.name}_t1ce.nii.gz").unlink()
    assert main(["predict", "--run", str(trained_run), "--arm", "centralized", "--case", str(case_dir),
                 "--out", str(tmp_path / "q")]) == 2
    assert "BraTS2021_00001_t1ce.nii.gz: expected sequence t1c" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- building blocks
def _case_arrays(shape=(12, 14, 10), seed=0) -> CaseArrays:
    rng = np.random.default_rng(seed)
    images = np.zeros((4, *shape), np.float32)
    images[:, 2:10, 3:12, 2:8] = rng.uniform(1, 2, size=(4, 8, 9, 6))
    seg = np.zeros(shape, np.int64)
    seg[4:7, 5:8, 3:6] = 2
    return CaseArrays(images=images, seg=seg, affine=np.diag([2.0, 2.0, 2.0, 1.0]))


def test_prepare_case_falls_back_to_the_brain_without_tumour():
    cfg = PreprocessConfig(shape=(16, 16, 16))
    a = _case_arrays()
    with_seg = prepare_case(a, cfg)
    assert with_seg.region_kind == "tumour" and with_seg.region.sum() == 27
    no_seg = prepare_case(CaseArrays(a.images, None, a.affine), cfg)
    assert no_seg.region_kind == "brain"
    np.testing.assert_array_equal(no_seg.region, np.any(with_seg.image != 0, axis=0))
    empty_seg = prepare_case(CaseArrays(a.images, np.zeros_like(a.seg), a.affine), cfg)
    assert empty_seg.region_kind == "brain"


def test_read_case_checked_names_file_expected_and_found(tiny_study, tmp_path):
    case_dir = tmp_path / "case"
    shutil.copytree(tiny_study / SITE / "nyu_004", case_dir)
    ok = read_case_checked(open_case(case_dir))
    ref = read_case(open_case(case_dir))
    np.testing.assert_array_equal(ok.images, ref.images)
    np.testing.assert_array_equal(ok.seg, ref.seg)
    t1 = nib.load(str(case_dir / "t1.nii.gz"))
    bad = np.asarray(t1.dataobj, np.float32).copy()
    bad[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(bad, t1.affine), str(case_dir / "t2.nii.gz"))
    with pytest.raises(CaseRefused, match=r"t2.nii.gz: expected finite values; found 1 NaN and 0 inf voxels"):
        read_case_checked(open_case(case_dir))
    shifted = t1.affine.copy()
    shifted[0, 3] += 3.0
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj), shifted), str(case_dir / "t2.nii.gz"))
    with pytest.raises(CaseRefused, match=r"expected the affine of t1.nii.gz; found an affine differing by up to 3"):
        read_case_checked(open_case(case_dir))
    nib.save(nib.Nifti1Image(np.zeros(t1.shape, np.float32), t1.affine), str(case_dir / "t2.nii.gz"))
    with pytest.raises(CaseRefused, match="expected a non-zero t2 image; found all voxels zero"):
        read_case_checked(open_case(case_dir))
    nib.save(nib.Nifti1Image(np.ones((*t1.shape, 2), np.float32), t1.affine), str(case_dir / "t2.nii.gz"))
    with pytest.raises(CaseRefused, match=r"expected a 3D volume \(or a 2D image\); found 4D"):
        read_case_checked(open_case(case_dir))


def test_voxel_map_of_one_network_is_its_softmax_and_averages_to_the_case_probability():
    from synthlearn.models.classifier import VoxelClassifierUNet
    from synthlearn.training.trainer import predict_probabilities

    torch.manual_seed(0)
    nets = [VoxelClassifierUNet(channels=(4, 4), norm_num_groups=2, out_channels=2).eval() for _ in range(2)]
    prep = prepare_case(_case_arrays(), PreprocessConfig(shape=(16, 16, 16)))
    single = voxel_probability_map(nets[:1], prep.image)
    with torch.no_grad():
        expected = torch.softmax(nets[0](torch.from_numpy(prep.image)[None]), dim=1)[0].numpy()
    np.testing.assert_allclose(single, expected, atol=1e-6)
    both = voxel_probability_map(nets, prep.image)
    case = predict_probabilities(nets, PreparedCases([prep]), device="cpu")[0]
    np.testing.assert_allclose(both[:, prep.region.astype(bool)].mean(1), case, atol=1e-5)
    with pytest.raises(ValueError, match="at least one network"):
        voxel_probability_map([], prep.image)


def test_metrics_block_identical_predictions_give_mcnemar_one():
    task = get_task("idh")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1], size=10)
    pred = {"site": np.array(["a"] * 5 + ["b"] * 5), "case_id": np.array([f"c{i}" for i in range(10)]),
            "true": np.array([0, 1] * 5), "probs": probs}
    block = metrics_block(pred, ["a", "b"], task, reference=pred, reference_name="centralized", n_bootstrap=20)
    assert block["mcnemar_p_vs_centralized"] == 1.0
    assert set(block["test"]) == {"a", "b", "combined"} and block["test"]["combined"]["n"] == 10
    unlabelled = dict(pred, true=np.full(10, -1))
    assert metrics_block(unlabelled, [], task, reference=pred, reference_name="x",
                         n_bootstrap=20)["mcnemar_p_vs_x"] is None


def test_an_invalid_label_is_refused_not_read_as_another_column(trained_run, tiny_study, tmp_path, capsys):
    """idh = 'maybe' beside tumor_type = glioblastoma must not become 'wildtype' by the tumour-type fallback."""
    import shutil

    study = tmp_path / "study"
    shutil.copytree(tiny_study, study)
    path = study / "nyu" / "labels.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    row[header.index("idh")] = "maybe"
    path.write_text("\n".join([lines[0], ",".join(row)] + lines[2:]) + "\n")
    out = tmp_path / "ext"
    assert main(["evaluate", "--run", str(trained_run), "--study", str(study), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2" in err and "'maybe'" in err and "idh" in err
    assert not out.exists()


def test_the_runs_own_training_cases_are_found_and_reported(trained_run, tiny_study, tmp_path, capsys):
    """Evaluating on a copy of a training site, its cases renamed: the same scans are found by content and reported
    (results.json, the log and the printed table); a true test site has no overlap."""
    import shutil

    site = tmp_path / "copy_of_tcga"
    shutil.copytree(tiny_study / "tcga", site)
    out = tmp_path / "ext"
    assert main(["evaluate", "--run", str(trained_run), "--study", str(site), "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    overlap = json.loads((out / "results.json").read_text())["training_overlap"]
    assert overlap["checked"] and overlap["n_cases"] == 6
    assert "WARNING: 6 case(s) are this run's own training cases" in printed
    clean = tmp_path / "ext_nyu"
    assert main(["evaluate", "--run", str(trained_run), "--study", str(tiny_study / "nyu"), "--out", str(clean),
                 "-q"]) == 0
    assert json.loads((clean / "results.json").read_text())["training_overlap"] == {"checked": True, "n_cases": 0,
                                                                                       "cases": []}
