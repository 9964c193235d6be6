"""The diabetic-retinopathy fundus phantom (splits, lesions, determinism, argument checks, CLI) and its
preprocessing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from synthlearn.cli import main
from synthlearn.data.fundus_preprocess import preprocess_fundus
from synthlearn.data.io import read_labels_csv
from synthlearn.data.layouts import open_study
from synthlearn.data.phantom.fundus import FUNDUS_PRESETS, GRADES, make_fundus_study, render_fundus, site_camera


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _image_digests(root: Path) -> dict[str, str]:
    """Digests of the RGB images only (grade-0 lesion masks are all zero, hence equal across studies)."""
    return {name: d for name, d in _digests(root).items() if Path(name).name in ("r.nii.gz", "g.nii.gz", "b.nii.gz")}


def _grades(site_dir: Path) -> set[str]:
    rows, _ = read_labels_csv(site_dir / "labels.csv")
    return {row["grade"] for row in rows}


@pytest.fixture(scope="module")
def tiny_fundus(tmp_path_factory):
    """The tiny-fundus study (non-iid, 3 sites x 8 images, 10 test images at 32x32), seed 0. Read-only."""
    return make_fundus_study(tmp_path_factory.mktemp("fundus") / "study", "tiny-fundus", progress=False)


def test_tiny_preset_passes_verify_and_follows_the_contract(tiny_fundus):
    assert main(["verify-data", str(tiny_fundus), "-q"]) == 0
    study = open_study(tiny_fundus)
    side, _n_sites, per_site, n_test = FUNDUS_PRESETS["tiny-fundus"]
    assert study.sequences == ("r", "g", "b") and study.labels.names == ("grade",)
    assert study.labels.values("grade") == GRADES
    roles = {s.name: s.role for s in study.sites}
    assert roles == {"site_01": "train", "site_02": "train", "site_03": "train", "test": "test"}
    assert {s.name: len(s.cases) for s in study.sites} == {"site_01": per_site, "site_02": per_site,
                                                          "site_03": per_site, "test": n_test}
    meta = json.loads((tiny_fundus / "fundus_phantom.json").read_text())
    assert meta["split"] == "non-iid" and meta["side"] == side
    assert sum(meta["sites"]["test"]["grade_counts"].values()) == n_test
    assert set(meta["sites"]["test"]["grade_counts"].values()) == {2}  # balanced: 10 images over 5 grades


def test_non_iid_sites_hold_few_grades_and_cover_all(tiny_fundus):
    held = [_grades(tiny_fundus / f"site_{k:02d}") for k in (1, 2, 3)]
    assert all(len(g) <= 2 for g in held)
    assert set().union(*held) == set(GRADES)
    assert _grades(tiny_fundus / "test") == set(GRADES)


def test_iid_sites_hold_several_grades_and_pool_is_one_site(tmp_path):
    iid = make_fundus_study(tmp_path / "iid", "tiny-fundus", split="iid", cases_per_site=6, test_cases=5,
                            progress=False)
    for k in (1, 2, 3):
        assert len(_grades(iid / f"site_{k:02d}")) >= 3
    pool = make_fundus_study(tmp_path / "pool", "tiny-fundus", split="pool", n_sites=2, cases_per_site=5,
                             test_cases=5, progress=False)
    assert {s.name: s.role for s in open_study(pool).sites} == {"pool": "train", "test": "test"}
    assert len(read_labels_csv(pool / "pool" / "labels.csv")[0]) == 10
    assert len(_grades(pool / "pool")) >= 3
    # the test site is the same for every split; the pool's images are not the federation's
    assert _digests(iid / "test") == _digests(pool / "test")
    assert not set(_image_digests(pool / "pool").values()) & set(_image_digests(iid / "site_01").values())


@pytest.mark.parametrize("side", [32, 64])
def test_grade_four_has_lesions_grade_zero_none(side):
    rng = np.random.default_rng(0)
    camera = site_camera(rng)
    for _ in range(3):
        image0, mask0 = render_fundus(rng, 0, side, camera)
        image4, mask4 = render_fundus(rng, 4, side, camera)
        assert mask0.sum() == 0 and mask4.sum() > 0.04 * side * side
        for image, mask in ((image0, mask0), (image4, mask4)):
            assert image.shape == (3, side, side) and image.dtype == np.float32
            assert mask.shape == (side, side) and mask.dtype == np.uint8
            assert 0 <= image.min() and image.max() <= 1
            assert image[:, 0, 0].max() == 0 and image[:, side // 2, side // 2].min() > 0  # 0 outside the FOV only
    masks = [render_fundus(rng, g, side, camera)[1].sum() for g in range(5)]
    assert masks[0] == 0 < masks[1] < masks[2] < masks[3] < masks[4]


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    kwargs = {"n_sites": 3, "cases_per_site": 2, "test_cases": 2, "progress": False}
    a = make_fundus_study(tmp_path / "a", "tiny-fundus", seed=3, **kwargs)
    b = make_fundus_study(tmp_path / "b", "tiny-fundus", seed=3, **kwargs)
    c = make_fundus_study(tmp_path / "c", "tiny-fundus", seed=4, **kwargs)
    assert _digests(a) == _digests(b)
    other = _image_digests(c)
    assert all(other[name] != digest for name, digest in _image_digests(a).items())


@pytest.mark.parametrize("kwargs, match", [
    ({"preset": "huge"}, "preset must be one of"),
    ({"split": "mixed"}, "split must be one of"),
    ({"n_sites": 0}, "n_sites must be >= 1, found 0"),
    ({"cases_per_site": 0}, "cases_per_site must be >= 1, found 0"),
    ({"test_cases": 0}, "test_cases must be >= 1, found 0"),
    ({"grades_per_site": 0}, "grades_per_site must be >= 1, found 0"),
    ({"grades_per_site": 6}, r"grades_per_site must be in 1..5 .*found 6"),
])
def test_bad_arguments_refused_and_nothing_written(tmp_path, kwargs, match):
    out = tmp_path / "study"
    with pytest.raises(ValueError, match=match):
        make_fundus_study(out, **{"preset": "tiny-fundus", **kwargs}, progress=False)
    assert not out.exists()


def test_bad_types_and_a_non_empty_folder_refused(tmp_path):
    with pytest.raises(TypeError, match="n_sites must be an integer"):
        make_fundus_study(tmp_path / "s", "tiny-fundus", n_sites=2.5, progress=False)
    with pytest.raises(ValueError, match="grade must be an integer in 0..4, found 5"):
        render_fundus(np.random.default_rng(0), 5, 32, site_camera(np.random.default_rng(0)))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        make_fundus_study(tmp_path / "full", "tiny-fundus", progress=False)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x.txt"]


def test_preprocess_shape_range_and_grayscale():
    rng = np.random.default_rng(0)
    image, _ = render_fundus(rng, 3, 64, site_camera(rng))
    rgb = preprocess_fundus(image, 32)
    assert rgb.shape == (3, 32, 32) and rgb.dtype == np.float32
    assert rgb.min() == pytest.approx(-1) and rgb.max() == pytest.approx(1)
    grey = preprocess_fundus(image, 48, clahe_clip=0.02, gamma=0.8, grayscale=True)
    assert grey.shape == (1, 48, 48) and -1 <= grey.min() and grey.max() <= 1
    flat = preprocess_fundus(np.full((1, 16, 16), 0.5), 8)
    assert flat.shape == (1, 8, 8) and np.all(flat == -1)  # a constant image normalises to 0 -> -1


@pytest.mark.parametrize("kwargs, match", [
    ({"image": np.zeros((16, 16))}, r"image must be \(C, H, W\)"),
    ({"image": np.full((3, 16, 16), 2.0)}, r"in \[0, 1\]"),
    ({"size": 4}, "size must be an integer >= 8, found 4"),
    ({"clahe_clip": 0.0}, "clahe_clip must be in"),
    ({"gamma": 0.0}, "gamma must be > 0"),
])
def test_preprocess_refuses_bad_arguments(kwargs, match):
    args = {"image": np.zeros((3, 16, 16)), "size": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        preprocess_fundus(args.pop("image"), args.pop("size"), **args)


def test_cli_preset_and_fundus_only_options(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["make-phantoms", "--preset", "tiny-fundus", "--out", str(out), "--sites", "2", "--split", "iid",
                 "--cases-per-site", "3", "-q"]) == 0
    assert {s.name for s in open_study(out).sites} == {"site_01", "site_02", "test"}
    assert json.loads((out / "fundus_phantom.json").read_text())["split"] == "iid"
    assert main(["make-phantoms", "--preset", "tiny-nuclei", "--out", str(tmp_path / "n"), "--split", "iid",
                 "-q"]) != 0
    assert "--split apply to the fundus presets only" in capsys.readouterr().err
    assert not (tmp_path / "n").exists() or not any((tmp_path / "n").iterdir())


def test_the_segmentation_is_the_field_of_view_and_lesions_are_recorded_per_grade(tmp_path):
    """The voxel-wise task model reads a case's class on its segmentation: a fundus image's is its field of view
    (a grade-0 image has no lesion to read), and the lesion pixel counts per grade go to fundus_phantom.json."""
    import json

    from synthlearn.data.io import read_case
    from synthlearn.data.layouts import open_study

    out = make_fundus_study(tmp_path / "s", "tiny-fundus", split="iid", n_sites=1, cases_per_site=10, test_cases=2,
                            progress=False)
    for case in open_study(out).site("site_01").cases[:4]:
        arrays = read_case(case)
        np.testing.assert_array_equal(arrays.seg > 0, np.any(arrays.images != 0, axis=0))
    lesions = json.loads((out / "fundus_phantom.json").read_text())["sites"]["site_01"]["lesion_pixels_mean_by_grade"]
    assert lesions["0"] == 0 and lesions["4"] > lesions["1"] > 0
