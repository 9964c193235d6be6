import numpy as np
import pytest

from synthlearn.data.io import read_case
from synthlearn.data.layouts import open_study
from synthlearn.data.preprocess import (
    PreprocessConfig,
    brain_bbox,
    crop_to_brain,
    fit_to_shape,
    preprocess_case,
    zscore_nonzero,
)


def _blob(shape=(20, 24, 18), box=(slice(3, 15), slice(4, 20), slice(2, 16)), seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((4, *shape), np.float32)
    images[(slice(None), *box)] = rng.uniform(0.5, 2.0, size=(4, *[s.stop - s.start for s in box]))
    seg = np.zeros(shape, np.int64)
    seg[box[0].start + 2: box[0].start + 6, box[1].start + 3: box[1].start + 7, box[2].start + 2: box[2].start + 5] = 2
    return images, seg


def test_crop_of_already_cropped_input_is_identity():
    images, seg = _blob()
    cropped, cseg = crop_to_brain(images, seg)
    again, aseg = crop_to_brain(cropped, cseg)
    np.testing.assert_array_equal(again, cropped)
    np.testing.assert_array_equal(aseg, cseg)
    assert cropped.shape == (4, 12, 16, 14)
    assert brain_bbox(images) == (slice(3, 15), slice(4, 20), slice(2, 16))


def test_zscore_has_mean0_sd1_inside_brain_and_zero_outside():
    images, _ = _blob()
    z = zscore_nonzero(images)
    mask = np.any(images != 0, axis=0)
    for c in range(4):
        assert abs(z[c][mask].mean()) < 1e-5
        assert abs(z[c][mask].std() - 1) < 1e-4
        assert np.all(z[c][~mask] == 0)


def test_pad_fit_resize_reach_shape_and_keep_identity():
    images, seg = _blob()
    cfg = PreprocessConfig(shape=(16, 16, 16))
    out, oseg = preprocess_case(images, seg, cfg)
    assert out.shape == (4, 16, 16, 16) and oseg.shape == (16, 16, 16)
    assert set(np.unique(oseg)) <= {0, 2}
    # same shape in, same shape out: fit/pad are identities
    same, sseg = fit_to_shape(images, seg, images.shape[1:], "fit")
    np.testing.assert_array_equal(same, images)
    np.testing.assert_array_equal(sseg, seg)
    r, rs = fit_to_shape(images, seg, (8, 8, 8), "resize")
    assert r.shape == (4, 8, 8, 8) and rs.shape == (8, 8, 8)


def test_preprocess_is_deterministic_on_a_real_case(tiny_study):
    case = open_study(tiny_study).cases[0]
    a = read_case(case)
    cfg = PreprocessConfig(shape=(32, 32, 32))
    x1, s1 = preprocess_case(a.images, a.seg, cfg)
    x2, s2 = preprocess_case(a.images.copy(), a.seg.copy(), cfg)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(s1, s2)
    assert (s1 > 0).sum() > 0  # the tumour survives preprocessing


def test_bad_config_and_input_are_refused():
    with pytest.raises(ValueError, match="shape"):
        PreprocessConfig(shape=(2, 16, 16))
    with pytest.raises(ValueError, match="mode"):
        PreprocessConfig(mode="stretch")
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        preprocess_case(np.zeros((8, 8, 8)), None, PreprocessConfig(shape=(8, 8, 8)))
