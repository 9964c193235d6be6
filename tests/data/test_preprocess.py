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


def test_reoriented_and_resampled_case_matches_the_original(tiny_study):
    """A case stored LPS with flipped/permuted axes and at half the voxel size preprocesses like the original."""
    from synthlearn.data.preprocess import to_canonical

    case = open_study(tiny_study).cases[0]
    a = read_case(case)
    cfg = PreprocessConfig(shape=(32, 32, 32))
    ref, ref_seg = preprocess_case(a.images, a.seg, cfg, affine=a.affine)

    # LPS storage: flip x and y; permute to (y, x, z); the affine describes the same world positions
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = a.images.shape[1] - 1
    flip[1, 3] = a.images.shape[2] - 1
    img = a.images[:, ::-1, ::-1, :]
    seg = a.seg[::-1, ::-1, :]
    aff = a.affine @ flip
    perm = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    img = img.transpose(0, 2, 1, 3)
    seg = seg.transpose(1, 0, 2)
    aff = aff @ perm
    back, back_seg, back_aff = to_canonical(img.copy(), seg.copy(), aff)
    np.testing.assert_array_equal(back, a.images)
    np.testing.assert_allclose(back_aff, a.affine)
    out, out_seg = preprocess_case(img.copy(), seg.copy(), cfg, affine=aff)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_array_equal(out_seg, ref_seg)

    # resampling to the original spacing from a finer grid keeps the geometry
    spacing = tuple(float(v) for v in np.sqrt((a.affine[:3, :3] ** 2).sum(0)))
    cfg_sp = PreprocessConfig(shape=(32, 32, 32), spacing=spacing)
    fine_aff = a.affine.copy()
    fine_aff[:3, :3] /= 2
    import torch
    fine = torch.nn.functional.interpolate(torch.from_numpy(a.images)[None], scale_factor=2, mode="nearest")[0].numpy()
    fine_seg = np.repeat(np.repeat(np.repeat(a.seg, 2, 0), 2, 1), 2, 2)
    out2, seg2 = preprocess_case(fine, fine_seg, cfg_sp, affine=fine_aff)
    assert out2.shape == ref.shape
    assert abs(int((seg2 > 0).sum()) - int((ref_seg > 0).sum())) <= 0.1 * (ref_seg > 0).sum()
    with pytest.raises(ValueError, match="no affine"):
        preprocess_case(a.images, a.seg, cfg_sp)


@pytest.mark.parametrize("cfg", [PreprocessConfig(shape=(16, 16, 16), zscore=False),
                                 PreprocessConfig(shape=(64, 64, 64), zscore=False),
                                 PreprocessConfig(shape=(16, 20, 24), mode="resize", zscore=False),
                                 PreprocessConfig(shape=(24, 24, 24), mode="pad", zscore=False),
                                 PreprocessConfig(shape=(32, 32, 32), spacing=(2.5, 2.5, 2.5), zscore=False)])
def test_grid_affine_maps_preprocessed_voxels_to_their_world_positions(cfg):
    """Images holding their own world coordinates (an oblique, permuted, flipped affine) keep them through
    reorientation, resampling, crop and fit: value at output voxel v == world position of grid_affine @ v."""
    from scipy.ndimage import binary_erosion

    from synthlearn.data.preprocess import preprocess_case_on_grid

    affine = np.array([[0, -2.0, 0, 10], [0, 0, 3.0, -5], [1.5, 0, 0, 7], [0, 0, 0, 1]])
    shape = (40, 30, 50)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    world = (affine[:3, :3] @ idx + affine[:3, 3:]).reshape(3, *shape)
    images = np.zeros((4, *shape), np.float32)
    box = (slice(5, 35), slice(4, 27), slice(6, 44))
    for c in range(3):
        images[c][box] = world[c][box] + 1000.0  # positive inside the "brain"
    images[3][box] = 1.0
    out, _, grid = preprocess_case_on_grid(images, None, cfg, affine)
    plain, _ = preprocess_case(images, None, cfg, affine)
    np.testing.assert_array_equal(out, plain)
    oidx = np.stack(np.meshgrid(*[np.arange(n) for n in cfg.shape], indexing="ij")).reshape(3, -1)
    expected = (grid[:3, :3] @ oidx + grid[:3, 3:]).reshape(3, *cfg.shape)
    inside = binary_erosion(out[3] > 0.999, iterations=2)  # interpolation mixes in the zeros at the border
    assert inside.sum() > 100
    for c in range(3):
        np.testing.assert_allclose(out[c][inside] - 1000.0, expected[c][inside], atol=1e-3)


def test_a_2d_case_is_cropped_scored_and_fitted_in_its_plane():
    from synthlearn.data.preprocess import preprocess_case_on_grid

    images, seg = _blob()
    images, seg = images[..., 5], seg[..., 5]  # (4, 20, 24), (20, 24): a slice through the tumour
    cfg = PreprocessConfig(shape=(8, 8))
    x, s, grid = preprocess_case_on_grid(images, seg, cfg, affine=np.diag([2.0, 2.0, 3.0, 1.0]))
    assert x.shape == (4, 8, 8) and s.shape == (8, 8) and cfg.spatial_dims == 2
    brain = np.any(x != 0, axis=0)
    assert np.allclose(x[:, brain].mean(axis=1), 0, atol=1e-5) and (s > 0).any()
    # the 12 x 16 brain is fitted to 8 x 8 (scale 1/2): 4 mm pixels, the slice's own 3 mm axis kept
    np.testing.assert_allclose(np.sqrt((grid[:3, :3] ** 2).sum(0)), [4.0, 4.0, 3.0])
    with pytest.raises(ValueError, match="3D studies only"):
        PreprocessConfig(shape=(8, 8), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(C, X, Y\)"):
        preprocess_case(np.zeros((4, 8, 8, 8)), None, cfg)
