"""Autoencoder, discriminator, losses and the stage-2 super-resolution module on tiny nets."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from synthlearn.models.autoencoder import (
    AutoencoderConfig,
    GeneratorAutoencoder,
    PerceptualLoss3D,
    build_discriminator,
    kl_loss,
    make_perceptual_loss,
    reconstruction_l1,
    working_shape,
)
from synthlearn.models.superres import SuperResConfig, SuperResolution

TINY = dict(channels=(4, 4), latent_channels=2, norm_num_groups=2, disc_channels=4, disc_layers=2)


def test_encode_decode_shapes():
    ae = GeneratorAutoencoder(AutoencoderConfig(**TINY), shape=(16, 16, 16), latent_shape=(8, 8, 8))
    x = torch.randn(2, 5, 16, 16, 16)
    mu, sigma = ae.encode(x)
    assert mu.shape == sigma.shape == (2, 2, 8, 8, 8)
    assert (sigma > 0).all()
    assert ae.decode(mu).shape == (2, 5, 16, 16, 16)


def test_working_grid_resamples_when_latent_is_not_an_integer_downsampling():
    # paper-style: 128x192x192 -> 16x32x32 is 8x in depth but 6x in-plane; here 16x24x24 -> 8x8x8 (x2)
    ae = GeneratorAutoencoder(AutoencoderConfig(**TINY), shape=(16, 24, 24), latent_shape=(8, 8, 8))
    assert ae.working_shape == (16, 16, 16)
    mu, _ = ae.encode(torch.randn(1, 5, 16, 24, 24))
    assert mu.shape == (1, 2, 8, 8, 8)
    sr = SuperResolution(SuperResConfig(channels=(4, 8), norm_num_groups=2), shape=(16, 24, 24))
    assert sr(ae.decode(mu)).shape == (1, 5, 16, 24, 24)


def test_working_shape_refuses_a_latent_too_large():
    with pytest.raises(ValueError, match="more than twice"):
        working_shape((16, 16, 16), (32, 32, 32), AutoencoderConfig(**TINY))


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=(4,)), "at least 2 levels"),
    (dict(channels=(4, 6), norm_num_groups=4), "must divide"),
    (dict(attention_levels=(False,)), "one per level"),
    (dict(kl_weight=-1.0), "kl_weight"),
    (dict(patch_size=(2, 2, 2)), "patch_size"),
    (dict(batch_size=0), "batch_size"),
])
def test_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderConfig(**{**TINY, **kwargs})


def test_discriminator_uses_groupnorm_only():
    disc = build_discriminator(AutoencoderConfig(**TINY))
    kinds = {type(m) for m in disc.modules()}
    assert nn.GroupNorm in kinds
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    logits = disc(torch.randn(1, 5, 16, 16, 16))[-1]
    assert logits.shape[:2] == (1, 1)


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    mu, sigma = torch.zeros(2, 2, 4, 4, 4), torch.ones(2, 2, 4, 4, 4)
    assert float(kl_loss(mu, sigma)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_loss(mu + 0.5, sigma)) == pytest.approx(0.5 * 0.25 * 2 * 64, rel=1e-5)
    assert float(kl_loss(mu, sigma * 2)) > 0


def test_reconstruction_l1_identity_and_mask_weight():
    x = torch.rand(1, 5, 4, 4, 4)
    assert float(reconstruction_l1(x, x)) == 0.0
    y = x.clone()
    y[:, 4] += 1.0  # error only on the mask channel
    assert float(reconstruction_l1(y, x, mask_weight=1.0)) == pytest.approx(1 / 5)
    assert float(reconstruction_l1(y, x, mask_weight=3.0)) == pytest.approx(3 / 7)


def test_perceptual_off_without_weights_and_clear_error_for_a_missing_file(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert make_perceptual_loss(AutoencoderConfig(**TINY)) is None
    assert "perceptual loss: OFF" in caplog.text
    missing = tmp_path / "resnet_10_23dataset.pth"
    with pytest.raises(FileNotFoundError, match="never downloads"):
        make_perceptual_loss(AutoencoderConfig(**TINY, perceptual_weights=str(missing)))


def test_perceptual_loss_from_user_weights(tmp_path):
    from monai.networks.nets import resnet10
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B")
    path = tmp_path / "medicalnet_r10.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loss = PerceptualLoss3D(path)
    a, b = torch.rand(1, 5, 16, 16, 16), torch.rand(1, 5, 16, 16, 16)
    assert float(loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(a, b)) > 0
    # MedicalNet's release format: {"state_dict": {"module.<key>": ...}} read with weights_only
    pth = tmp_path / "resnet_10_23dataset.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, pth)
    assert float(PerceptualLoss3D(pth)(a, b)) == pytest.approx(float(loss(a, b)), rel=1e-5)
    bad = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="ResNet-10"):
        PerceptualLoss3D(bad)


def test_superres_starts_as_identity_and_checks_config():
    sr = SuperResolution(SuperResConfig(channels=(4, 8), norm_num_groups=2), shape=(8, 8, 8))
    x = torch.randn(2, 5, 8, 8, 8)
    assert torch.equal(sr(x), x)
    assert sr(x, size=(8, 8, 8)).shape == x.shape
    with pytest.raises(ValueError, match="must divide"):
        SuperResConfig(channels=(4, 6), norm_num_groups=4)
    with pytest.raises(ValueError, match="shape"):
        SuperResolution(SuperResConfig(channels=(4, 8), norm_num_groups=2), shape=(8, 8))


def test_mask_dice_loss():
    from synthlearn.models.autoencoder import mask_dice_loss

    x = torch.zeros(2, 5, 8, 8, 8)
    x[:, 4, 2:5, 2:5, 2:5] = 1
    assert float(mask_dice_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    y = torch.zeros_like(x)
    y[:, 4, 5:8, 5:8, 5:8] = 1
    assert float(mask_dice_loss(y, x)) > 0.95
    assert float(mask_dice_loss(torch.zeros_like(x), torch.zeros_like(x))) == 0.0  # no tumour, none predicted


def test_posterior_starts_narrow():
    from synthlearn.models.autoencoder import build_autoencoder

    x = torch.randn(1, 5, 8, 8, 8)
    narrow = build_autoencoder(AutoencoderConfig(**TINY))
    with torch.no_grad():
        _, sigma = narrow.encode(x)
    assert 0.02 < float(sigma.mean()) < 0.1  # exp(-6 / 2) ~ 0.05
    default = build_autoencoder(AutoencoderConfig(**TINY, posterior_log_var_init=None))
    with torch.no_grad():
        assert float(default.encode(x)[1].mean()) > 0.3


def test_tumour_weight_emphasises_the_tumour_and_keeps_uniform_errors():
    import torch

    from synthlearn.models.autoencoder import reconstruction_l1

    target = torch.zeros(2, 5, 8, 8, 8)
    target[:, 4, 2:4, 2:4, 2:4] = 1.0
    uniform = target + 0.3
    plain_uniform = float(reconstruction_l1(uniform, target))
    assert float(reconstruction_l1(uniform, target, 1.0, 10.0)) == pytest.approx(plain_uniform)
    in_tumour = target.clone()
    in_tumour[:, :4, 2:4, 2:4, 2:4] += 1.0  # an error only inside the tumour, in the four sequences
    plain = float(reconstruction_l1(in_tumour, target))
    weighted = float(reconstruction_l1(in_tumour, target, 1.0, 10.0))
    assert weighted > 5 * plain
    with pytest.raises(ValueError, match="tumour_weight"):
        from synthlearn.models.autoencoder import AutoencoderConfig

        AutoencoderConfig(tumour_weight=-1.0)


def test_enhancement_weight_scores_the_t1c_minus_t1_difference():
    import torch

    from synthlearn.models.autoencoder import AutoencoderConfig, reconstruction_l1

    target = torch.zeros(1, 5, 8, 8, 8)
    target[:, 4, 2:5, 2:5, 2:5] = 1.0
    target[:, 1, 2:5, 2:5, 2:5] = 0.5  # T1c enhances inside the tumour, T1 does not
    same_shift = target.clone()
    same_shift[:, :2] += 0.2  # both off by the same amount: the enhancement is right
    lost = target.clone()
    lost[:, 1] = 0.0  # T1c rendered like T1: the enhancement is gone
    lost[:, 0] += 0.1  # and T1 a little off everywhere
    off, on = 0.0, 1.0
    assert float(reconstruction_l1(same_shift, target, 1.0, 3.0, on)) == pytest.approx(
        float(reconstruction_l1(same_shift, target, 1.0, 3.0, off)), abs=1e-6)
    assert float(reconstruction_l1(lost, target, 1.0, 3.0, on)) > float(reconstruction_l1(lost, target, 1.0, 3.0, off))
    assert float(reconstruction_l1(target, target, 1.0, 3.0, on)) == 0.0
    with pytest.raises(ValueError, match="enhancement_weight"):
        AutoencoderConfig(enhancement_weight=-1.0)


def test_class_conditional_decoder_adds_one_vector_per_class_and_needs_the_classes():
    from synthlearn.models.autoencoder import decode_latent

    torch.manual_seed(0)
    plain = GeneratorAutoencoder(AutoencoderConfig(**TINY), shape=(16, 16, 16), latent_shape=(8, 8, 8))
    torch.manual_seed(0)
    cond = GeneratorAutoencoder(AutoencoderConfig(**TINY, class_conditional_decoder=True), shape=(16, 16, 16),
                                latent_shape=(8, 8, 8), num_classes=3)
    assert cond.ae.class_vectors.shape == (3, 2) and "class_vectors" in cond.ae.state_dict()
    assert "class_vectors" not in plain.ae.state_dict()
    z = torch.randn(3, 2, 8, 8, 8)
    classes = torch.tensor([0, 2, -1])
    with torch.no_grad():
        # zero at the start (same other weights): the same output as the plain decoder, which ignores classes
        assert torch.allclose(cond.decode(z, classes), plain.decode(z))
        assert torch.equal(plain.decode(z, classes), plain.decode(z))
        cond.ae.class_vectors.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, -1.0]]))
        out = cond.decode(z, classes)
        h = cond.ae.post_quant_conv(z)
        expected = cond.ae.decoder(h + torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])[:, :, None, None, None])
        assert torch.allclose(out, expected, atol=1e-5)
        assert torch.allclose(out[2:], plain.decode(z[2:]), atol=1e-4)  # class -1 (unknown): no vector
        assert not torch.allclose(out[:1], plain.decode(z[:1]))
    with pytest.raises(ValueError, match="class-conditional"):
        cond.decode(z)
    with pytest.raises(ValueError, match="one class per latent"):
        decode_latent(cond.ae, z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="number of classes"):
        GeneratorAutoencoder(AutoencoderConfig(**TINY, class_conditional_decoder=True), shape=(16, 16, 16),
                             latent_shape=(8, 8, 8))


def test_generator_channels_follow_the_data_contracts_sequence_order():
    """The network module does not import the data contract; its channel constants must agree with it."""
    from synthlearn.data.contract import SEQUENCES
    from synthlearn.models.autoencoder import MASK_CHANNEL, T1_CHANNEL, T1C_CHANNEL

    assert (SEQUENCES.index("t1"), SEQUENCES.index("t1c"), len(SEQUENCES)) == (T1_CHANNEL, T1C_CHANNEL, MASK_CHANNEL)
