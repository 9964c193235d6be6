import json
import warnings

import numpy as np
import pytest
import torch

from synthlearn.data.io import CaseArrays
from synthlearn.data.layouts import open_study
from synthlearn.audits.fidelity import (
    TorchFeatures,
    fidelity,
    frechet_distance,
    frechet_distance_from_stats,
    make_extractor,
)
from synthlearn.audits.quality import BrisqueModel, image_quality, mid_tumour_slice, piqe_score, to_uint8

# ---------------------------------------------------------------------------------------------- Frechet


def test_fd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fd_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-9)
    # and from samples of those Gaussians (sampling error only)
    a = mu1 + np.sqrt(v1) * rng.standard_normal((20000, 6))
    b = mu2 + np.sqrt(v2) * rng.standard_normal((20000, 6))
    assert frechet_distance(a, b) == pytest.approx(closed, abs=0.05 * closed + 0.02)


def test_shifted_sets_are_farther():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 5))
    y = rng.normal(size=(200, 5))
    d = [frechet_distance(x, y + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert d == sorted(d) and d[0] < 0.2 and d[-1] == pytest.approx(5 * 4, rel=0.1)


def test_fd_with_fewer_cases_than_features_is_finite():
    # singular covariances: the sqrtm route fails, the eigenvalue route takes over
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 30)), rng.normal(size=(5, 30)) + 1.0
    d = frechet_distance(a, b)
    assert np.isfinite(d) and d > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-5)


def test_fd_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((4, 3), np.nan), np.zeros((4, 3)))


# ------------------------------------------------------------------------------------- per-site matrix


def test_matrix_shape_and_same_site_is_near_zero_for_identical_sets(tiny_study):
    study = open_study(tiny_study)
    real = {s: study.site(s).cases for s in ("tcga", "utsw", "egd")}
    synthetic = {s: study.site(s).cases for s in ("tcga", "utsw")}  # "synthetic" = the real cases themselves
    out = fidelity(real, synthetic, sequences=("t1c", "flair"), n_real=None, n_synthetic=None)
    json.dumps(out)
    assert out["real_sites"] == ["tcga", "utsw", "egd"] and out["synthetic_sites"] == ["tcga", "utsw"]
    assert out["n_real"] == {s: len(study.site(s).cases) for s in real}
    for seq in ("t1c", "flair"):
        m = np.asarray(out["matrix"][seq])
        assert m.shape == (2, 3)
        assert m[0, 0] == pytest.approx(0.0, abs=1e-5) and m[1, 1] == pytest.approx(0.0, abs=1e-5)
        assert m[0, 1] > 1.0 and m[1, 0] > 1.0  # other sites are farther
        assert out["same_site"]["tcga"][seq] == m[0, 0]
    assert out["extractor"]["name"] == "radiomics" and out["extractor"]["region"] == "brain"


def test_counts_are_drawn_reproducibly(tiny_study):
    study = open_study(tiny_study)
    real = {"tcga": study.site("tcga").cases}
    synthetic = {"tcga": study.site("utsw").cases}
    kw = dict(sequences=("t2",), n_real=3, n_synthetic=4, seed=5)
    a, b = fidelity(real, synthetic, **kw), fidelity(real, synthetic, **kw)
    assert a == b and a["n_real"] == {"tcga": 3} and a["n_synthetic"] == {"tcga": 4}
    with pytest.raises(ValueError, match="at least 2"):
        fidelity({"tcga": study.site("tcga").cases[:1]}, synthetic)
    with pytest.raises(ValueError, match="needs weights"):
        fidelity(real, synthetic, extractor="torch")
    with pytest.raises(ValueError, match="sequences"):
        fidelity(real, synthetic, sequences=("dwi",))


def test_a_study_of_its_own_channels_and_2d_slices():
    """Channels named by the study (RGB tiles, one T2 slice...), 2D images as (C, X, Y, 1): each sequence is read
    from its own channel, whatever its name."""
    rng = np.random.default_rng(4)

    def tile(smooth_green):
        from scipy import ndimage

        images = np.zeros((3, 24, 24, 1), np.float32)
        images[:, 2:-2, 2:-2, 0] = rng.normal(3.0, 1.0, (3, 20, 20))
        if smooth_green:  # another texture in the green channel only
            images[1, 2:-2, 2:-2, 0] = ndimage.gaussian_filter(images[1, 2:-2, 2:-2, 0], 2.0) * 8
        return CaseArrays(images=images, seg=None, affine=np.eye(4))

    real, near, far = [tile(False) for _ in range(4)], [tile(False) for _ in range(4)], [tile(True) for _ in range(4)]
    out = fidelity({"a": real}, {"a": real, "b": near, "c": far}, channels=("r", "g", "b"), n_real=None,
                   n_synthetic=None)
    assert out["sequences"] == ["r", "g", "b"] and out["matrix"]["r"][0][0] == pytest.approx(0.0, abs=1e-5)
    g, r = [row[0] for row in out["matrix"]["g"]], [row[0] for row in out["matrix"]["r"]]
    assert g[2] > 10 * g[1] and r[2] < 10 * r[1] + 1  # only the green channel of "c" differs: read from its own
    only = fidelity({"a": real}, {"b": near}, channels=("r", "g", "b"), sequences=("b",), n_real=None,
                    n_synthetic=None)
    assert list(only["matrix"]) == ["b"]
    with pytest.raises(ValueError, match="channels"):
        fidelity({"a": real}, {"b": near}, channels=("r", "g", "b"), sequences=("t1",))


# ---------------------------------------------------------------------------------- torch extractor


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 3)

    def forward(self, x):
        return self.conv(x)


def _case(seed, size=12):
    rng = np.random.default_rng(seed)
    images = rng.random((4, size, size, size)).astype(np.float32)
    seg = np.zeros((size, size, size), np.int64)
    seg[4:8, 4:8, 4:8] = 2
    return CaseArrays(images=images, seg=seg, affine=np.eye(4))


def test_torch_extractor_loads_torchscript_and_state_dicts(tmp_path):
    torch.manual_seed(0)
    net = _TinyNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), tmp_path / "net.pt")
    torch.export.save(torch.export.export(net, (torch.zeros(1, 1, 12, 12, 12),)), tmp_path / "net.pt2")
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "sd.pt")

    scripted = TorchFeatures(tmp_path / "net.pt")
    from_sd = TorchFeatures(tmp_path / "sd.pt", model=_TinyNet())
    exported = TorchFeatures(tmp_path / "net.pt2")
    assert scripted.kind == "torchscript" and from_sd.kind == "state_dict" and exported.kind == "torch.export"
    f1 = scripted.features(_case(0), ["t1", "flair"])
    f2 = from_sd.features(_case(0), ["t1", "flair"])
    f3 = exported.features(_case(0), ["t1", "flair"])
    assert f1["t1"].shape == (3,)
    np.testing.assert_allclose(f1["flair"], f2["flair"], rtol=1e-5)
    np.testing.assert_allclose(f1["flair"], f3["flair"], rtol=1e-5)
    resized = TorchFeatures(tmp_path / "net.pt", input_size=(8, 8, 8))
    assert resized.features(_case(0), ["t1"])["t1"].shape == (3,)

    cases = [_case(i) for i in range(4)]
    out = fidelity({"a": cases}, {"a": cases[::-1]}, extractor=scripted, sequences=("t1",), n_real=None,
                   n_synthetic=None)
    assert out["extractor"]["name"] == "torch" and out["matrix"]["t1"][0][0] == pytest.approx(0.0, abs=1e-6)


def test_torch_extractor_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        TorchFeatures(tmp_path / "medicalnet_resnet10.pth")
    torch.save(_TinyNet().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="model="):
        TorchFeatures(tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="does not fit"):
        TorchFeatures(tmp_path / "sd.pt", model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="weights_path"):
        make_extractor("torch")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        make_extractor("inception")


# ------------------------------------------------------------------------------------- image quality


def test_mid_tumour_slice():
    seg = np.zeros((8, 8, 12), np.int64)
    seg[2:4, 2:4, 3:8] = 1  # z 3..7
    images = np.ones((4, 8, 8, 12))
    assert mid_tumour_slice(seg, images) == 5
    images[:, :, :, :2] = 0
    assert mid_tumour_slice(None, images) == 7  # brain centre: z 2..11 (6.5 rounds up)


def _grey_slice(seed=0, n=64):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    img = np.exp(-((yy - n / 2) ** 2 + (xx - n / 2) ** 2) / (2 * (n / 4) ** 2)) + 0.05 * rng.standard_normal((n, n))
    return to_uint8(np.where((yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.45 * n) ** 2, img + 1, 0))


def test_brisque_equals_the_package_on_a_grey_image_and_noise_scores_worse():
    from brisque import BRISQUE

    class _Fixed(BRISQUE):  # the package with its numpy-2.4 scaling bug fixed, for reference only
        def scale_features(self, features):
            f = np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in features])
            mn = np.array([float(np.ravel(v)[0]) for v in self.scale_params["min_"]])
            mx = np.array([float(np.ravel(v)[0]) for v in self.scale_params["max_"]])
            return -1 + 2.0 / (mx - mn) * (f - mn)

    img = _grey_slice()
    ours = BrisqueModel().score(img)
    reference = _Fixed(url=False).score(np.stack([img] * 3, axis=-1))
    assert ours == pytest.approx(reference, rel=1e-9)
    noisy = to_uint8(img.astype(float) + np.random.default_rng(1).normal(0, 40, img.shape) * (img > 0))
    assert BrisqueModel().score(noisy) > ours
    with pytest.raises(ValueError, match="grey"):
        BrisqueModel().score(np.stack([img] * 3, axis=-1))


def test_piqe_score_range():
    img = _grey_slice()
    s = piqe_score(img)
    assert 0.0 <= s <= 100.0
    assert np.isnan(piqe_score(np.zeros((32, 32), np.uint8)))
    assert to_uint8(np.zeros((4, 4))).max() == 0


def test_image_quality_dict(tiny_study):
    study = open_study(tiny_study)
    out = image_quality({"tcga": study.site("tcga").cases}, {"tcga": study.site("utsw").cases[:3]},
                        sequences=("t1", "flair"), n_real=4)
    json.dumps(out)
    for metric in ("brisque", "piqe"):
        entry = out[metric]["tcga"]["flair"]
        assert entry["real"]["n"] + entry["real"]["n_failed"] == 4
        assert entry["synthetic"]["n"] + entry["synthetic"]["n_failed"] == 3
        assert entry["real"]["mean"] is not None and entry["real"]["sd"] is not None
