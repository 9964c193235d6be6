"""The sampling loop: determinism, classifier-free guidance, DDIM/DDPM; and post-processing into cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from synthlearn.models.diffusion import ClassConditionedUNet, DiffusionConfig
from synthlearn.synthesis.cases import (
    BRAIN_FLOOR,
    SYNTHETIC_TUMOUR_LABEL,
    centred_affine,
    count_components,
    generator_intensities,
    largest_component,
    postprocess_sample,
)
from synthlearn.generators.ldm.sample import guided_noise, sample_latents
from synthlearn.generators.ldm.config import SamplingConfig

CFG = DiffusionConfig(channels=(8, 8), attention_levels=(False, True), num_head_channels=4, norm_num_groups=4,
                      cross_attention_dim=8, num_train_timesteps=50)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ClassConditionedUNet(CFG, latent_channels=2, num_classes=2)
    with torch.no_grad():
        for p in m.parameters():  # MONAI zero-initialises the output layer: randomise so classes differ
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _sample(model, seed, **kw):
    kw.setdefault("num_inference_steps", 5)
    return sample_latents(model, CFG, torch.tensor([0, 1]), (4, 4, 4), 2,
                          generator=torch.Generator().manual_seed(seed), **kw)


def test_same_seed_same_samples_other_seed_other_samples(model):
    a, b, c = _sample(model, 3), _sample(model, 3), _sample(model, 4)
    assert a.shape == (2, 2, 4, 4, 4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddpm_is_seeded_too(model):
    a = _sample(model, 5, scheduler="ddpm", num_inference_steps=50)
    b = _sample(model, 5, scheduler="ddpm", num_inference_steps=50)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _sample(model, 5, num_inference_steps=50))  # DDIM eta=0 differs


def test_guidance_scale_one_is_the_conditional_prediction(model):
    x = torch.randn(2, 2, 4, 4, 4)
    cls = torch.tensor([0, 1])
    t = torch.tensor([7, 7])
    with torch.no_grad():
        cond = model(x, t, cls)
        uncond = model(x, t, torch.tensor([2, 2]))
    assert torch.equal(guided_noise(model, x, 7, cls, 2, 1.0), cond)
    assert torch.equal(guided_noise(model, x, 7, cls, 2, 0.0), uncond)
    g3 = guided_noise(model, x, 7, cls, 2, 3.0)
    torch.testing.assert_close(g3, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_guidance_changes_samples_and_scale_factor_divides(model):
    base = _sample(model, 1, guidance_scale=1.0)
    assert not torch.allclose(base, _sample(model, 1, guidance_scale=4.0))
    torch.testing.assert_close(_sample(model, 1, guidance_scale=1.0, scale_factor=2.0), base / 2.0)
    channels = base.shape[1]
    scale, shift = torch.arange(1.0, channels + 1), torch.linspace(-1, 1, channels)
    per_channel = _sample(model, 1, guidance_scale=1.0, scale_factor=scale, shift=shift)
    torch.testing.assert_close(per_channel, base / scale.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1))


def test_guidance_interval_guides_only_the_steps_inside_it(model, monkeypatch):
    import synthlearn.generators.ldm.sample as sampling

    full = _sample(model, 1, guidance_scale=3.0)
    assert torch.equal(_sample(model, 1, guidance_scale=3.0, guidance_interval=(0.0, 1.0)), full)
    # no step of 5 DDIM steps over T = 50 (MONAI: t = 49, 37, 24, 12, 0) lies in [0.99, 1]: conditional only
    assert torch.equal(_sample(model, 1, guidance_scale=3.0, guidance_interval=(0.99, 1.0)),
                       _sample(model, 1, guidance_scale=1.0))
    seen = []
    real = sampling.guided_noise

    def spy(model_, x, t, class_index, null_class, g):
        seen.append((t, g))
        return real(model_, x, t, class_index, null_class, g)

    monkeypatch.setattr(sampling, "guided_noise", spy)
    part = _sample(model, 1, guidance_scale=3.0, guidance_interval=(0.4, 0.8))
    assert seen == [(49, 1.0), (37, 3.0), (24, 3.0), (12, 1.0), (0, 1.0)]
    assert not torch.allclose(part, full)
    with pytest.raises(ValueError, match="guidance_interval"):
        _sample(model, 0, guidance_interval=(0.7, 0.3))


def test_argument_checks(model):
    with pytest.raises(ValueError, match="guidance_scale"):
        _sample(model, 0, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        _sample(model, 0, num_inference_steps=51)
    with pytest.raises(ValueError, match="1D"):
        sample_latents(model, CFG, torch.zeros(2, 1, dtype=torch.long), (4, 4, 4), 2,
                       generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------- post-processing


def test_largest_component_keeps_the_biggest_blob():
    mask = np.zeros((10, 10, 10), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[5:9, 5:9, 5:9] = True  # 64 voxels
    assert count_components(mask) == 2
    kept = largest_component(mask)
    assert kept.sum() == 64 and kept[6, 6, 6] and not kept[1, 1, 1]
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def _decoded(rng):
    x = np.zeros((5, 16, 16, 16), np.float32)
    x[:4, 2:14, 2:14, 2:14] = rng.uniform(0.3, 1.0, size=(4, 12, 12, 12))
    x[:4] += rng.normal(0, 0.02, size=x[:4].shape)  # decoder noise in the background
    x[4, 5:9, 5:9, 5:9] = 0.9  # the tumour
    x[4, 11:13, 11:13, 11:13] = 0.8  # a second, smaller blob
    x[4, 0, 0, 0] = 0.9  # outside the brain
    return x


def test_postprocess_sample_makes_a_contract_case():
    case = postprocess_sample(_decoded(np.random.default_rng(0)))
    assert case.images.shape == (4, 16, 16, 16) and case.seg.shape == (16, 16, 16)
    assert case.images.dtype == np.float32 and case.seg.dtype == np.int8
    assert (case.images[:, 0, 0, 0] == 0).all()  # background exactly 0
    brain = np.any(case.images != 0, axis=0)
    assert brain.sum() == 12 ** 3 == case.brain_voxels
    assert set(np.unique(case.seg)) == {0, SYNTHETIC_TUMOUR_LABEL}
    assert case.tumour_components == 2 and case.tumour_voxels == 64
    assert count_components(case.seg > 0) == 1
    assert not (case.seg > 0)[~brain].any()


def test_postprocess_sample_keeps_the_blurred_brain_edge_out():
    # a decoder blurs the brain's edge: at the generator scale every real brain voxel is >= BRAIN_FLOOR, so
    # the brain of a blurred case must come out about as large as the sharp one (half the floor added 20 %)
    rng = np.random.default_rng(0)
    grid = np.indices((32, 32, 32)) - 15.5
    ball = (grid ** 2).sum(0) < 11 ** 2
    sharp = generator_intensities(np.where(ball[None], rng.uniform(100, 900, (4, 32, 32, 32)), 0).astype(np.float32))
    decoded = np.zeros((5, 32, 32, 32), np.float32)
    decoded[:4] = ndimage.gaussian_filter(sharp, (0, 0.7, 0.7, 0.7))
    decoded[4] = (grid ** 2).sum(0) < 3 ** 2
    assert postprocess_sample(decoded).brain_voxels == pytest.approx(ball.sum(), rel=0.06)
    assert postprocess_sample(decoded, brain_threshold=BRAIN_FLOOR / 2).brain_voxels > 1.15 * ball.sum()


def test_sampling_config_refuses_a_brain_threshold_off_the_scale():
    assert SamplingConfig().brain_threshold == BRAIN_FLOOR
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="brain_threshold"):
            SamplingConfig(brain_threshold=bad)


def test_postprocess_sample_checks_input():
    with pytest.raises(ValueError, match=r"\(5, X, Y, Z\)"):
        postprocess_sample(np.zeros((4, 8, 8, 8), np.float32))
    bad = np.zeros((5, 8, 8, 8), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        postprocess_sample(bad)


def test_generator_intensities_keep_background_zero_and_brain_above_floor():
    rng = np.random.default_rng(0)
    images = np.zeros((4, 8, 8, 8), np.float32)
    images[:, 2:6, 2:6, 2:6] = rng.uniform(100, 900, size=(4, 4, 4, 4))
    out = generator_intensities(images)
    brain = np.any(images != 0, axis=0)
    assert (out[:, ~brain] == 0).all()
    assert out[:, brain].min() >= BRAIN_FLOOR and out[:, brain].max() <= 1.5
    # affine inside the brain: a rescaled input maps to the same output
    np.testing.assert_allclose(generator_intensities(images * 3.0 + np.where(brain, 5.0, 0.0)), out, atol=1e-5)


def test_centred_affine():
    aff = centred_affine((4, 6, 8), (2.0, 2.0, 3.0))
    assert np.allclose(np.diag(aff), [2, 2, 3, 1])
    centre = aff @ np.array([1.5, 2.5, 3.5, 1.0])
    assert np.allclose(centre[:3], 0)
    with pytest.raises(ValueError):
        centred_affine((4, 4, 4), (1.0, 0.0, 1.0))
