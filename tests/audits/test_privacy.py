import json

import numpy as np
import pytest
from scipy import ndimage

from synthlearn.data.io import CaseArrays
from synthlearn.data.layouts import open_study
from synthlearn.audits.privacy import (
    attack_metrics,
    auc_score,
    audit_site,
    copy_rate,
    make_memorising_set,
    normalize_for_ssim,
    ssim_3d,
    ssim_matrix,
    stratified_holdout,
    tpr_at_fpr,
)


def _smooth_case(rng: np.random.Generator, size: int = 16) -> CaseArrays:
    """An i.i.d. random 'case': smooth noise inside a ball, a blob as tumour."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    r = np.sqrt(((grid - size / 2 + 0.5) ** 2).sum(0))
    brain = r < size / 2 - 0.5
    images = ndimage.gaussian_filter(rng.standard_normal((4, size, size, size)), (0, 1.2, 1.2, 1.2)) + 3.0
    images = np.where(brain, images, 0.0).astype(np.float32)
    seg = np.where(r < 3, 2, 0).astype(np.int64)
    return CaseArrays(images=images, seg=seg, affine=np.eye(4))


# --------------------------------------------------------------------------------------------------- SSIM


def test_ssim_equals_skimage_gaussian_ssim():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = np.clip(ndimage.gaussian_filter(rng.random((4, 13, 16, 12)), (0, 1, 1, 1)) * 1.5 - 0.2, 0, 1)
    y = np.clip(x + rng.normal(0, 0.08, x.shape), 0, 1)
    x, y = x.astype(np.float32), y.astype(np.float32)
    ref = structural_similarity(x, y, channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert ssim_3d(x, y) == pytest.approx(ref, abs=1e-5)
    assert ssim_3d(x, x) == pytest.approx(1.0, abs=1e-6)


def test_2d_images_as_a_singleton_last_axis_get_skimage_2d_ssim_and_a_2d_audit():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(3)
    x = np.clip(ndimage.gaussian_filter(rng.random((2, 20, 24)), (0, 1, 1)) * 1.5 - 0.2, 0, 1).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.08, x.shape), 0, 1).astype(np.float32)
    ref = structural_similarity(x, y, channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert ssim_3d(x[..., None], y[..., None]) == pytest.approx(ref, abs=1e-5)
    cases = [CaseArrays(images=c.images[:, :, :, 8:9], seg=c.seg[:, :, 8:9], affine=np.eye(4))
             for c in (_smooth_case(rng) for _ in range(8))]
    out = audit_site(cases[:4], cases[4:7], cases[7:], n_bootstrap=50)
    assert out["method"].startswith("2D SSIM") and "(11^2)" in out["method"] and out["shape"] == [4, 16, 16, 1]
    assert out["positive_control_caught"]


def test_ssim_matrix_is_symmetric_and_checks_shapes():
    rng = np.random.default_rng(1)
    vols = np.stack([normalize_for_ssim(_smooth_case(rng).images) for _ in range(3)])
    m = ssim_matrix(vols, vols)
    np.testing.assert_allclose(m, m.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="at least 11"):
        ssim_matrix(vols[:, :, :8, :8, :8], vols[:, :, :8, :8, :8])
    with pytest.raises(ValueError, match="differ in shape"):
        ssim_matrix(vols, vols[:, :2])


def test_normalize_for_ssim_windows_each_sequence():
    case = _smooth_case(np.random.default_rng(2))
    out = normalize_for_ssim(case.images)
    scaled = normalize_for_ssim(case.images * np.array([1, 10, 100, 1000], np.float32)[:, None, None, None])
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, scaled, atol=1e-5)  # a scale change per sequence disappears
    assert (out[:, case.images[0] == 0] == 0).all()


def test_grid_windowing_sees_a_case_with_its_background_moved_as_the_case():
    """A case changed by 0.1 SD everywhere, background included (what a few optimisation steps do to a compressed
    sample started from it): the brain rule now finds a brain everywhere and windows it differently, the grid rule
    windows both alike."""
    rng = np.random.default_rng(3)
    case = _smooth_case(rng, size=24).images
    moved = case + rng.uniform(-0.1, 0.1, case.shape).astype(np.float32) * case[case != 0].std()
    grid = normalize_for_ssim(moved, "grid")
    assert grid.min() == 0.0 and grid.max() == 1.0
    np.testing.assert_allclose(grid, normalize_for_ssim(moved + 7.0, "grid"), atol=1e-5)  # a shift disappears
    assert ssim_3d(normalize_for_ssim(case, "grid"), grid) > 0.9 > ssim_3d(normalize_for_ssim(case),
                                                                           normalize_for_ssim(moved))
    with pytest.raises(ValueError, match="region"):
        normalize_for_ssim(case, "mask")
    cases = [_smooth_case(rng) for _ in range(2)]
    with pytest.raises(ValueError, match="ssim_region"):
        audit_site(cases, cases, cases, ssim_region="mask")


def test_stratified_holdout_checks_its_fraction(tiny_study):
    site = open_study(tiny_study).sites[0]
    assert stratified_holdout(site, 0.0, lambda case: None, seed=0) == (sorted(c.case_id for c in site.cases), [])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        stratified_holdout(site, 1.0, lambda case: None, seed=0)


# ------------------------------------------------------------------------------------------ attack metrics


def test_auc_and_tpr_at_fpr():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    pos, neg = rng.normal(1, 1, 40), rng.normal(0, 1, 60)
    pos[:3] = neg[:3]  # ties
    assert auc_score(pos, neg) == pytest.approx(roc_auc_score(np.r_[np.ones(40), np.zeros(60)], np.r_[pos, neg]))
    assert auc_score([2, 3], [0, 1]) == 1.0 and auc_score([0, 1], [2, 3]) == 0.0
    assert tpr_at_fpr([5, 6, 0.5], [0, 1, 2, 3]) == pytest.approx(2 / 3)  # above every negative
    assert tpr_at_fpr([0, 0], [1, 1]) == 0.0


def test_attack_metrics_are_seeded_and_cover_chance_for_identical_distributions():
    from scipy.stats import norm

    rng = np.random.default_rng(4)
    m = rng.permutation(norm.ppf((np.arange(300) + 0.5) / 300))  # two samples of one distribution
    n = rng.permutation(norm.ppf((np.arange(300) + 0.25) / 300))
    a = attack_metrics(m, n, n_bootstrap=300, rng=np.random.default_rng(0))
    b = attack_metrics(m, n, n_bootstrap=300, rng=np.random.default_rng(0))
    assert a == b
    assert a["ci_low"] < 0.5 < a["ci_high"] and a["p_value"] > 0.05
    assert a["n_members"] == 300 and a["min_resolvable_fpr"] == pytest.approx(1 / 300)
    strong = attack_metrics(m + 3, n, n_bootstrap=300)
    assert strong["auc"] > 0.95 and strong["ci_low"] > 0.9 and strong["tpr_at_1pct_fpr"] > 0.3


# ---------------------------------------------------------------------------------------- copy rate


def test_copy_rate_is_one_for_exact_copies_and_zero_for_unrelated():
    rng = np.random.default_rng(5)
    train = np.stack([normalize_for_ssim(_smooth_case(rng).images) for _ in range(6)])
    holdout = np.stack([normalize_for_ssim(_smooth_case(rng).images) for _ in range(6)])
    ref = 1.0 - ssim_matrix(holdout, train)
    copies = copy_rate(1.0 - ssim_matrix(train[:4], train), ref)
    assert copies["rate"] == 1.0 and copies["n_copies"] == 4 and copies["threshold"] > 0
    unrelated = rng.random((5, 4, 16, 16, 16)).astype(np.float32)  # white noise, nothing like a case
    assert copy_rate(1.0 - ssim_matrix(unrelated, train), ref)["rate"] == 0.0
    with pytest.raises(ValueError, match="percentile"):
        copy_rate(np.zeros((2, 3)), np.zeros((2, 3)), percentile=150)


def test_memorising_set_is_a_seeded_noisy_copy():
    rng = np.random.default_rng(6)
    cases = [_smooth_case(rng) for _ in range(2)]
    a = make_memorising_set(cases, copies_per_case=3, rng=np.random.default_rng(0))
    b = make_memorising_set(cases, copies_per_case=3, rng=np.random.default_rng(0))
    assert len(a) == 6
    np.testing.assert_array_equal(a[4].images, b[4].images)
    np.testing.assert_array_equal(a[4].seg, cases[1].seg)
    assert not np.array_equal(a[0].images, a[1].images)
    assert (a[0].images[cases[0].images == 0] == 0).all()  # background stays zero
    exact = make_memorising_set(cases, copies_per_case=1, noise_std=0.0, intensity_jitter=0.0,
                                rng=np.random.default_rng(0))
    np.testing.assert_array_equal(exact[1].images, cases[1].images)
    with pytest.raises(ValueError, match="copies_per_case"):
        make_memorising_set(cases, copies_per_case=0, rng=rng)


# ------------------------------------------------------------------------------------------- the audit


def test_audit_on_iid_cases_sits_at_chance_and_catches_the_positive_control():
    rng = np.random.default_rng(7)
    train = [_smooth_case(rng) for _ in range(24)]
    holdout = [_smooth_case(rng) for _ in range(24)]
    synthetic = [_smooth_case(rng) for _ in range(12)]  # a "generator" that learnt the distribution only
    out = audit_site(train, holdout, synthetic, n_bootstrap=300, seed=0)
    json.dumps(out)
    assert out["negative_control_ok"] and out["negative_control"]["ci_covers_chance"]
    assert out["negative_control"]["n_members"] + out["negative_control"]["n_nonmembers"] == 24
    assert out["membership"]["ci_low"] < 0.5 < out["membership"]["ci_high"]
    assert not out["membership"]["above_chance"] and out["membership"]["underpowered"]
    assert out["positive_control_caught"] and out["positive_control"]["auc"] == 1.0
    assert out["positive_control"]["copy_rate"] == 1.0
    assert out["copy_rate"]["rate"] <= 0.1
    assert out["n_train"] == 24 and out["shape"] == [4, 16, 16, 16]
    assert audit_site(train, holdout, synthetic, n_bootstrap=300, seed=0) == out  # same seed, same result


def test_audit_on_phantom_cases(tiny_study, tmp_path):
    study = open_study(tiny_study)
    tcga = study.site("tcga").cases
    unrelated = list(study.site("egd").cases)
    out = audit_site(tcga[:3], tcga[3:], unrelated, n_bootstrap=200, montage_path=tmp_path / "closest.png",
                     montage_k=3)
    assert out["positive_control_caught"]
    assert out["positive_control"]["memorised_case_ids"] == [f"tcga/{c.case_id}" for c in tcga[:3]]
    # another site's phantoms share the atlas anatomy, so one may come as close as a held-out case does,
    # but they are not copies (white noise gives exactly 0: test_copy_rate_is_one_for_exact_copies...)
    assert out["copy_rate"]["rate"] <= 1 / 3
    assert len(out["copy_rate"]["closest"]) == 3
    assert out["copy_rate"]["closest"][0]["synthetic"].startswith("egd/")
    import matplotlib.image as mpimg

    img = mpimg.imread(out["montage"])
    assert img.shape[0] > 200 and img[..., :3].std() > 0.05
    # exact copies of training cases as "synthetic": every one is a copy and members are exposed
    leaked = audit_site(tcga[:3], tcga[3:], tcga[:3], n_bootstrap=200)
    assert leaked["copy_rate"]["rate"] == 1.0
    assert leaked["membership"]["auc"] == 1.0 and leaked["membership"]["member_score_mean"] == pytest.approx(1.0)


def test_audit_refuses_bad_input():
    rng = np.random.default_rng(8)
    cases = [_smooth_case(rng) for _ in range(3)]
    with pytest.raises(ValueError, match=">= 2 training"):
        audit_site(cases[:1], cases, cases)
    other = CaseArrays(images=np.zeros((4, 18, 16, 16), np.float32), seg=None, affine=np.eye(4))
    with pytest.raises(ValueError, match="preprocess="):
        audit_site(cases, cases, [other])
    with pytest.raises(ValueError, match="positive_n_cases"):
        audit_site(cases, cases, cases, positive_n_cases=10)
    with pytest.raises(ValueError, match="go together"):
        audit_site(cases, cases, cases, control_synthetic=cases)
    with pytest.raises(ValueError, match="not among them"):
        audit_site(cases, cases, cases, control_synthetic=cases, control_case_ids=["nobody"])


def test_generator_positive_control_is_caught_when_its_samples_copy_the_memorised_cases(tiny_study):
    tcga = list(open_study(tiny_study).site("tcga").cases)
    members, holdout, unrelated = tcga[:4], tcga[4:], list(open_study(tiny_study).site("egd").cases)
    memorised = [members[1].case_id, f"tcga/{members[3].case_id}"]  # plain and site/case ids both work
    leaking = audit_site(members, holdout, unrelated, n_bootstrap=200, control_synthetic=[members[1], members[3]],
                         control_case_ids=memorised)
    control = leaking["positive_control_generator"]
    assert leaking["positive_control_generator_caught"] and control["auc"] == 1.0
    assert control["memorised_case_ids"] == [f"tcga/{members[1].case_id}", f"tcga/{members[3].case_id}"]
    assert control["n_samples"] == 2 and control["copy_rate"] == 1.0
    # a "generator" whose samples are unrelated cases has memorised nothing: not caught
    blind = audit_site(members, holdout, unrelated, n_bootstrap=200, control_synthetic=unrelated,
                       control_case_ids=memorised)
    assert not blind["positive_control_generator_caught"]
    assert "positive_control_generator" not in audit_site(members, holdout, unrelated, n_bootstrap=50)


def test_reference_control_scores_the_same_split_against_generators_that_never_saw_it(tiny_study):
    study = open_study(tiny_study)
    tcga = list(study.site("tcga").cases)
    members, holdout = tcga[:3], tcga[3:]
    unrelated, other = list(study.site("egd").cases), list(study.site("utsw").cases)
    out = audit_site(members, holdout, unrelated, n_bootstrap=200,
                     reference_synthetic={"egd": unrelated, "leak": members, "utsw": other})
    json.dumps(out)
    ref = out["reference_control"]
    assert set(ref["by_generator"]) == {"egd", "leak", "utsw"}
    # the same synthetic cases as the attack's own give the membership AUC exactly
    assert ref["by_generator"]["egd"]["auc"] == out["membership"]["auc"]
    assert ref["by_generator"]["egd"]["n_synthetic"] == len(unrelated)
    # a "reference" made of the members themselves exposes them: the split is what it measures
    assert ref["by_generator"]["leak"]["auc"] == 1.0
    aucs = [r["auc"] for r in ref["by_generator"].values()]
    assert ref["auc_mean"] == pytest.approx(np.mean(aucs))
    assert ref["excess_auc"] == pytest.approx(out["membership"]["auc"] - ref["auc_mean"])
    assert ref["excess_ci_low"] <= ref["excess_auc"] <= ref["excess_ci_high"]
    assert ref["excess_above_zero"] == (ref["excess_ci_low"] > 0)
    # a reference that is the attack's own synthetic set: no excess, in every paired resample
    same = audit_site(members, holdout, unrelated, n_bootstrap=200, reference_synthetic={"egd": unrelated})
    assert same["reference_control"]["excess_auc"] == 0.0
    assert same["reference_control"]["excess_ci_low"] == same["reference_control"]["excess_ci_high"] == 0.0
    # synthetic cases that copy the members exceed a reference that does not
    copies = audit_site(members, holdout, members, n_bootstrap=200, reference_synthetic={"egd": unrelated})
    assert copies["reference_control"]["excess_auc"] == pytest.approx(1.0 - out["membership"]["auc"])
    # not asked for: not run; every other figure is unchanged by it
    plain = audit_site(members, holdout, unrelated, n_bootstrap=200)
    assert "reference_control" not in plain
    assert plain["membership"] == out["membership"] and plain["negative_control"] == out["negative_control"]
    with pytest.raises(ValueError, match="reference_synthetic\\['empty'\\]"):
        audit_site(members, holdout, unrelated, reference_synthetic={"empty": []})
