import logging

import numpy as np
import pytest

from synthlearn.data.io import CaseArrays
from synthlearn.data.layouts import open_study
from synthlearn.evaluate.radiomics import (
    RadiomicsExtractor,
    RadiomicsSettings,
    SmallRegionError,
    radiomics_matrix,
    region_mask,
    voxel_spacing,
)


def _blob_case(seed: int, size: int = 20, radius: float = 4.0) -> CaseArrays:
    """A brain-like box with a spherical 'tumour' of different texture."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    r = np.sqrt(((grid - size / 2) ** 2).sum(0))
    brain = r < size / 2 - 1
    tumour = r < radius
    images = np.zeros((4, size, size, size), np.float32)
    for c in range(4):
        images[c] = np.where(brain, 1.0 + 0.2 * rng.standard_normal(brain.shape), 0.0)
        images[c][tumour] += 1.0 + c * 0.3 + 0.5 * rng.standard_normal(int(tumour.sum()))
    seg = np.where(tumour, 2, 0).astype(np.int64)
    return CaseArrays(images=images, seg=seg, affine=np.diag([2.0, 2.0, 2.0, 1.0]))


def test_voxel_spacing_and_region_mask():
    aff = np.diag([1.5, 2.0, 3.0, 1.0])
    assert voxel_spacing(aff) == (1.5, 2.0, 3.0)
    case = _blob_case(0)
    assert region_mask(case.images, case.seg, "tumour").sum() == (case.seg > 0).sum()
    assert region_mask(case.images, case.seg, "brain").sum() > (case.seg > 0).sum()
    with pytest.raises(ValueError, match="region"):
        region_mask(case.images, case.seg, "skull")
    with pytest.raises(ValueError, match="segmentation"):
        region_mask(case.images, None, "tumour")
    with pytest.raises(ValueError, match="zero-length"):
        voxel_spacing(np.zeros((4, 4)))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="feature_classes"):
        RadiomicsSettings(feature_classes=("wavelet",))
    with pytest.raises(ValueError, match="bin_count"):
        RadiomicsSettings(bin_count=1)
    with pytest.raises(ValueError, match="min_voxels"):
        RadiomicsSettings(min_voxels=1)
    with pytest.raises(ValueError, match="on_small"):
        RadiomicsSettings(on_small="ignore")


def test_matrix_has_named_finite_features_and_is_deterministic():
    cases = [_blob_case(0), _blob_case(1)]
    m = radiomics_matrix(cases)
    ext = RadiomicsExtractor()
    n_shape, n_int = len(ext.shape_feature_names()), len(ext.intensity_feature_names())
    assert n_shape > 5 and n_int > 30  # shape ~14, first-order 18 + GLCM 24
    assert m.features.shape == (2, n_shape + 4 * n_int) == (2, len(m.names))
    assert len(set(m.names)) == len(m.names)
    assert m.names[0].startswith("shape_") and "t1c_glcm_Contrast" in m.names and "flair_firstorder_Mean" in m.names
    assert np.isfinite(m.features).all() and m.valid.all()
    assert m.case_ids == ("case-0000", "case-0001")
    again = radiomics_matrix(cases)
    np.testing.assert_array_equal(m.features, again.features)
    # different cases, different features
    assert not np.allclose(m.features[0], m.features[1])


def test_spacing_enters_shape_features():
    case = _blob_case(0)
    ext = RadiomicsExtractor()
    names = ext.shape_feature_names()
    v1 = ext.shape_features(case.seg > 0, (1.0, 1.0, 1.0))[names.index("shape_VoxelVolume")]
    v2 = ext.shape_features(case.seg > 0, (2.0, 2.0, 2.0))[names.index("shape_VoxelVolume")]
    assert v1 == pytest.approx((case.seg > 0).sum())
    assert v2 == pytest.approx(8 * v1)


def test_empty_and_tiny_masks_give_nan_or_raise(caplog):
    case = _blob_case(0)
    ext = RadiomicsExtractor()
    empty = np.zeros(case.seg.shape, bool)
    with caplog.at_level(logging.WARNING):
        row = ext.case_features(case.images, empty, what="phantom/empty")
    assert np.isnan(row).all() and row.shape == (len(ext.case_feature_names()),)
    assert "phantom/empty" in caplog.text
    line = np.zeros(case.seg.shape, bool)
    line[10, 10, 2:14] = True  # 12 voxels but flat in two dimensions: pyradiomics refuses it
    assert np.isnan(ext.case_features(case.images, line)).all()
    strict = RadiomicsExtractor(RadiomicsSettings(on_small="raise"))
    with pytest.raises(SmallRegionError, match="min_voxels"):
        strict.case_features(case.images, empty)
    with pytest.raises(SmallRegionError, match="refused"):
        strict.case_features(case.images, line)
    # a case without tumour becomes a NaN row in a matrix, the others stay valid
    no_tumour = CaseArrays(images=case.images, seg=np.zeros_like(case.seg), affine=case.affine)
    m = radiomics_matrix([case, no_tumour])
    assert m.valid.tolist() == [True, False]


def test_bad_input_is_refused():
    case = _blob_case(0)
    ext = RadiomicsExtractor()
    with pytest.raises(ValueError, match="images must be"):
        ext.case_features(case.images[:2], case.seg > 0)
    with pytest.raises(ValueError, match="mask shape"):
        ext.case_features(case.images, (case.seg > 0)[:5])
    with pytest.raises(ValueError, match="sequences"):
        radiomics_matrix([case], sequences=("t1", "dwi"))
    with pytest.raises(ValueError, match="region"):
        radiomics_matrix([case], region="skull")


def test_phantom_cases_from_disk(tiny_study):
    site = open_study(tiny_study).site("tcga")
    m = radiomics_matrix(site.cases[:2], sequences=("t1c", "flair"), region="tumour")
    assert m.case_ids == tuple(f"tcga/{c.case_id}" for c in site.cases[:2])
    assert m.features.shape == (2, len(m.names)) and m.valid.all()
    brain = radiomics_matrix(site.cases[:1], sequences=("t1",), region="brain",
                             settings=RadiomicsSettings(feature_classes=("firstorder",)))
    assert brain.names[0] == "t1_firstorder_10Percentile" and brain.valid.all()
