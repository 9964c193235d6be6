"""The offline glioma phantom: determinism, the data contract, label biology, phenotypes, site effects."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from synthlearn.data.contract import LABEL_COLUMNS, LABEL_VALUES, SEQUENCES
from synthlearn.data.io import load_nifti, read_labels_csv
from synthlearn.data.layouts import open_study
from synthlearn.data.phantom import PRESETS, STUDY_PRESETS, generate_case, make_phantom_study
from synthlearn.data.phantom.atlas import load_atlas
from synthlearn.data.phantom.generate import case_design, parse_shape, site_tumour_types
from synthlearn.data.phantom.sites import allocate_classes, site_preset


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def atlas32():
    return load_atlas((32, 32, 32))


# --- determinism -----------------------------------------------------------------------------------------

def test_same_seed_same_bytes_different_seed_different(tmp_path, tiny_study):
    again = make_phantom_study(tmp_path / "again", preset="tiny", seed=0, progress=True)
    assert _digests(again) == _digests(tiny_study)
    other = make_phantom_study(tmp_path / "other", preset="tiny", cases_per_site=1, seed=1, progress=False)
    first = _digests(tiny_study)
    for name, digest in _digests(other).items():
        if name.endswith(".nii.gz"):
            assert first[name] != digest, name


def test_case_does_not_depend_on_study_order_nor_touch_global_rngs(atlas32):
    import torch

    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = generate_case("nyu", 3, seed=5, shape=32, atlas=atlas32)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    generate_case("tcga", 0, seed=5, shape=32, atlas=atlas32)  # something in between
    b = generate_case("nyu", 3, seed=5, shape=32, atlas=atlas32)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.seg, b.seg)
    assert a.labels == b.labels


# --- the data contract -----------------------------------------------------------------------------------

def test_study_follows_the_contract(tiny_study):
    study = open_study(tiny_study)
    assert not study.problems, study.problems
    spec = STUDY_PRESETS["tiny"]
    assert [s.name for s in study.sites] == [s.name for s in spec.sites]
    assert [s.role for s in study.sites] == [s.role for s in spec.sites]
    assert sum(s.role == "train" for s in study.sites) == 3 and sum(s.role == "test" for s in study.sites) == 2
    for site in study.sites:
        assert len(site) == spec.cases_per_site
        rows, header = read_labels_csv(tiny_study / site.name / "labels.csv")
        assert header == ["case_id", *LABEL_COLUMNS]
        for row in rows:
            for col in LABEL_COLUMNS:
                assert row[col] in LABEL_VALUES[col], (row["case_id"], col, row[col])
        for case in site.cases:
            seg, seg_affine = load_nifti(case.seg, dtype=np.float64)
            brain = np.zeros(seg.shape, bool)
            for seq in SEQUENCES:
                img, affine = load_nifti(case.images[seq])
                assert img.shape == (32, 32, 32) and np.isfinite(img).all()
                np.testing.assert_allclose(affine, seg_affine)
                assert img.min() >= 0 and 0.5 < np.percentile(img[img > 0], 99.5) < 1.5
                brain |= img > 0
            assert set(np.unique(seg)) <= {0, 1, 2, 3} and (seg > 0).any()
            assert not (seg[~brain] > 0).any()  # skull-stripped: tumour only inside the brain
    assert json.loads((tiny_study / "phantom.json").read_text())["complete"] is True


def test_written_dtypes_and_affine(tiny_study):
    import nibabel as nib

    case = open_study(tiny_study).sites[0].cases[0]
    assert nib.load(str(case.images["t1"])).get_data_dtype() == np.float32
    assert nib.load(str(case.seg)).get_data_dtype() == np.int8
    affine = nib.load(str(case.seg)).affine
    np.testing.assert_allclose(np.diag(affine)[:3], [6.0, 6.0, 6.0])  # 192 mm cube at 32^3, RAS


def test_paper_default_grid_is_3mm_and_paper_scale_shapes_work():
    assert STUDY_PRESETS["paper"].shape == (64, 64, 64)
    case = generate_case("ucsf", 0, shape=(16, 24, 24))
    assert case.images.shape == (4, 16, 24, 24) and case.seg.shape == (16, 24, 24)
    np.testing.assert_allclose(np.diag(case.affine)[:3], [12.0, 8.0, 8.0])
    assert parse_shape(128, (64, 64, 64)) == (128, 128, 128)
    assert parse_shape((128, 192, 192), (64, 64, 64)) == (128, 192, 192)


# --- labels follow biology; phenotypes follow labels (with overlap) ---------------------------------------

def test_labels_follow_who_2021(tiny_study, atlas32):
    labels = [c.labels for c in open_study(tiny_study).cases]
    for site in STUDY_PRESETS["paper"].sites:  # many designs, no images: cheap
        labels += [case_design(site, i, 0, atlas32, t)[0] for i, t in enumerate(site_tumour_types(site, 30))]
    for lab in labels:
        assert lab.idh == ("wildtype" if lab.tumor_type == "glioblastoma" else "mutant")
        assert lab.codeletion_1p19q == ("codeleted" if lab.tumor_type == "oligodendroglioma" else "intact")
        assert lab.grade in {"glioblastoma": {"4"}, "astrocytoma": {"2", "3", "4"},
                             "oligodendroglioma": {"2", "3"}}[lab.tumor_type]
    by_type = {t: Counter(lab.mgmt for lab in labels if lab.tumor_type == t) for t in LABEL_VALUES["tumor_type"]}
    for t, counts in by_type.items():
        assert counts["methylated"] > 0 and counts["unmethylated"] > 0, t  # MGMT is never a rule


def test_glioblastomas_enhance_and_necrose(atlas32):
    cases = [generate_case(site, i, seed=3, shape=32, tumor_type="glioblastoma", atlas=atlas32)
             for site in ("tcga", "upenn") for i in range(6)]
    both = [bool((c.seg == 3).any() and (c.seg == 1).any()) for c in cases]
    assert np.mean(both) >= 0.7, both
    for c in cases:
        if c.phenotype.look == "ring":  # necrosis + enhancing rim
            assert (c.seg == 3).sum() > 0 and (c.seg == 2).sum() > 0


def test_idh_mutant_astrocytomas_mostly_do_not_enhance(atlas32):
    cases = [generate_case(site, i, seed=3, shape=32, tumor_type="astrocytoma", atlas=atlas32)
             for site in ("tcga", "egd") for i in range(6)]
    no_enh = [not (c.seg == 3).any() for c in cases]
    assert np.mean(no_enh) >= 0.6, no_enh
    for c in cases:
        if c.phenotype.look == "diffuse":
            assert not (c.seg == 3).any()


def test_phenotypes_overlap_between_classes(atlas32):
    """No imaging rule is absolute: some glioblastomas do not enhance or sit frontally, some IDH-mutant
    tumours enhance; the mismatch sign belongs to astrocytomas; calcifications mostly to oligodendrogliomas."""
    designs = {t: [] for t in LABEL_VALUES["tumor_type"]}
    site = site_preset("tcga")
    for i in range(200):
        for t in designs:
            designs[t].append(case_design(site, i, 11, atlas32, t)[1])
    gbm, astro, oligo = designs["glioblastoma"], designs["astrocytoma"], designs["oligodendroglioma"]
    share = lambda ps, f: np.mean([f(p) for p in ps])  # noqa: E731
    assert 0.8 < share(gbm, lambda p: p.look in ("ring", "solid")) < 0.99
    assert 0.03 < share(astro + oligo, lambda p: p.look in ("ring", "solid")) < 0.2
    assert 0.1 < share(gbm, lambda p: p.location != "deep_posterior") < 0.5
    assert 0.5 < share(astro, lambda p: p.mismatch) < 0.7 and share(gbm, lambda p: p.mismatch) < 0.05
    assert share(oligo, lambda p: p.calcifications > 0) > 0.5 > share(astro, lambda p: p.calcifications > 0)
    assert share(oligo, lambda p: p.location == "frontal_cortical") > 0.5
    idh_mut_y = np.mean([p.centre_mni[1] for p in astro + oligo])
    assert idh_mut_y > np.mean([p.centre_mni[1] for p in gbm]) + 15  # IDH-mutant: frontal; GBM: posterior


# --- sites are non-IID: class mixes and scanner fingerprints ---------------------------------------------

def test_site_class_mixes_differ(tiny_study):
    study = open_study(tiny_study)
    mixes = {s.name: tuple(sum(c.labels.tumor_type == t for c in s.cases) for t in LABEL_VALUES["tumor_type"])
             for s in study.sites}
    assert len(set(mixes.values())) >= 3, mixes
    paper = {s.name: allocate_classes(s.class_mix, 48) for s in STUDY_PRESETS["paper"].sites}
    idh_mut = {k: (v[1] + v[2]) / 48 for k, v in paper.items()}
    assert idh_mut["tcga"] > 0.5 and idh_mut["egd"] > 0.5 and idh_mut["upenn"] < 0.1


def _fingerprint(images: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Per-sequence intensity statistics of normal-appearing brain."""
    brain = (images[0] > 0) & (seg == 0)
    feats = []
    for img in images:
        v = img[brain]
        q10, q50, q90 = np.percentile(v, [10, 50, 90])
        grad = np.abs(np.diff(img, axis=0))[brain[1:] & brain[:-1]].mean()  # noise / sharpness
        feats += [q10, q50, q90, grad]
    return np.array(feats)


def test_sites_have_scanner_fingerprints(atlas32):
    """A nearest-centroid site classifier on simple intensity statistics beats chance clearly."""
    sites = ["tcga", "utsw", "egd", "uwm", "ucsf"]
    feats, names = [], []
    for site in sites:
        for i in range(5):
            c = generate_case(site, i, seed=7, shape=32, tumor_type="glioblastoma", atlas=atlas32)
            feats.append(_fingerprint(c.images, c.seg))
            names.append(site)
    x = np.array(feats)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    names = np.array(names)
    correct = 0
    for i in range(len(x)):  # leave-one-out
        keep = np.arange(len(x)) != i
        centroids = {s: x[keep & (names == s)].mean(0) for s in sites}
        guess = min(sites, key=lambda s: np.linalg.norm(x[i] - centroids[s]))
        correct += guess == names[i]
    assert correct / len(x) >= 0.6, correct / len(x)  # chance is 0.2


# --- arguments and the output folder ---------------------------------------------------------------------

def test_presets_are_named():
    assert set(PRESETS) == {"paper", "tiny", "slices2d", "tiny-slices2d"}
    assert STUDY_PRESETS["slices2d"].sites == STUDY_PRESETS["paper"].sites and STUDY_PRESETS["slices2d"].slices2d
    assert [s.name for s in STUDY_PRESETS["paper"].sites] == [
        "tcga", "utsw", "egd", "nyu", "uwm", "ucsf", "upenn", "utswp2"]
    assert [s.role for s in STUDY_PRESETS["paper"].sites] == ["train"] * 3 + ["test"] * 5


@pytest.mark.parametrize("kwargs, error, words", [
    ({"preset": "huge"}, ValueError, ["paper", "tiny", "huge"]),
    ({"shape": 8}, ValueError, ["16", "(8, 8, 8)"]),
    ({"shape": (32, 32)}, TypeError, ["three ints"]),
    ({"cases_per_site": 0}, ValueError, [">= 1", "0"]),
    ({"cases_per_site": 2.5}, TypeError, ["int"]),
    ({"seed": -1}, ValueError, ["non-negative", "-1"]),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, error, words):
    out = tmp_path / "study"
    with pytest.raises(error) as info:
        make_phantom_study(out, **{"preset": "tiny", "progress": False, **kwargs})
    for w in words:
        assert w in str(info.value)
    assert not out.exists()


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a synthlearn phantom study"):
        make_phantom_study(out, preset="tiny", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resume_after_a_killed_run_and_replace(tmp_path):
    out = make_phantom_study(tmp_path / "s", preset="tiny", cases_per_site=1, progress=False)
    reference = _digests(out)
    # simulate a run killed mid-way: no study.json yet, a case folder half written
    (out / "study.json").unlink()
    (out / "nyu" / "nyu_000" / "seg.nii.gz").unlink()
    make_phantom_study(out, preset="tiny", cases_per_site=1, progress=False)
    assert _digests(out) == reference
    # another config is refused without --replace, and nothing is removed
    with pytest.raises(FileExistsError, match="other arguments .*cases_per_site, seed.*--replace"):
        make_phantom_study(out, preset="tiny", cases_per_site=2, seed=4, progress=False)
    assert _digests(out) == reference and (out / "study.json").is_file()
    from synthlearn.cli import main

    assert main(["make-phantoms", "--out", str(out), "--preset", "tiny", "--cases-per-site", "2", "-q"]) == 2
    assert _digests(out) == reference
    # with replace, it replaces the earlier phantom study
    make_phantom_study(out, preset="tiny", cases_per_site=2, seed=4, progress=False, replace=True)
    study = open_study(out)
    assert not study.problems and all(len(s) == 2 for s in study.sites)


def test_slices2d_holds_each_case_s_largest_tumour_slice(tiny_study, tiny_study_2d):
    """``--preset tiny-slices2d``: every case of the tiny study as its axial slice through the largest tumour area
    (the same bytes as that slice of the 3D case, the affine moved to it), a 2D study that verify-data passes."""
    from synthlearn.data.io import read_case
    from synthlearn.data.verify import verify_study

    two = open_study(tiny_study_2d)
    three = {c.case_id: c for c in open_study(tiny_study).cases}
    assert [s.name for s in two.sites] == [s.name for s in open_study(tiny_study).sites]
    assert 0 < len(two.cases) <= len(three)
    for case in two.cases:
        a, b = read_case(case), read_case(three[case.case_id])
        z = int(np.argmax((b.seg > 0).sum(axis=(0, 1))))
        assert a.images.shape == (4, 32, 32) and a.seg.shape == (32, 32)
        np.testing.assert_array_equal(a.images, b.images[..., z])
        np.testing.assert_array_equal(a.seg, b.seg[..., z])
        assert (a.seg > 0).sum() >= 10
        np.testing.assert_allclose(a.affine[:3, 3], (b.affine @ [0, 0, z, 1])[:3])
        assert case.labels == three[case.case_id].labels
    report = verify_study(tiny_study_2d, progress=False)
    assert report.ok and set(report.sites[0].shapes) == {"32x32"}
