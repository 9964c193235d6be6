"""The loss-free space-to-depth "autoencoder" of the fidelity issue's design (b)."""

from __future__ import annotations

import pytest
import torch

from synthlearn.models.autoencoder import AutoencoderConfig, GeneratorAutoencoder, build_autoencoder
from synthlearn.models.space_to_depth import SpaceToDepth, depth_to_space, space_to_depth


def test_round_trip_is_exact_and_each_latent_position_holds_one_block():
    x = torch.randn(2, 5, 8, 6, 4)
    z = space_to_depth(x, 2)
    assert z.shape == (2, 40, 4, 3, 2)
    assert torch.equal(depth_to_space(z, 2), x)
    # latent position (1, 2, 0) of channel c holds the 2x2x2 block of voxels (2:4, 4:6, 0:2) of channel c
    block = x[1, 3, 2:4, 4:6, 0:2].reshape(-1)
    assert torch.equal(z[1, 3 * 8:4 * 8, 1, 2, 0], block)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="not divisible by 2"):
        space_to_depth(torch.zeros(1, 5, 7, 8, 8), 2)
    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\)"):
        space_to_depth(torch.zeros(5, 8, 8, 8), 2)
    with pytest.raises(ValueError, match="C \\* 8"):
        depth_to_space(torch.zeros(1, 12, 4, 4, 4), 2)
    with pytest.raises(ValueError, match="5 channels"):
        SpaceToDepth(5, 2).encode(torch.zeros(1, 4, 8, 8, 8))


def test_generator_autoencoder_of_kind_space_to_depth_has_no_weights_and_a_zero_posterior_spread():
    cfg = AutoencoderConfig(kind="space_to_depth", latent_channels=40)
    ae = GeneratorAutoencoder(cfg, shape=(16, 16, 16), latent_shape=(8, 8, 8))
    assert ae.working_shape == (16, 16, 16) and not list(ae.parameters()) and ae.ae.state_dict() == {}
    x = torch.rand(2, 5, 16, 16, 16)
    mu, sigma = ae.encode(x)
    assert mu.shape == (2, 40, 8, 8, 8) and not sigma.any()
    assert torch.equal(ae.decode(mu), x)
    with pytest.raises(ValueError, match="latent_channels is 8"):
        build_autoencoder(AutoencoderConfig(kind="space_to_depth", latent_channels=8))
    with pytest.raises(ValueError, match="kind must be"):
        AutoencoderConfig(kind="vq")
    with pytest.raises(ValueError, match="learned decoder"):
        AutoencoderConfig(kind="space_to_depth", class_conditional_decoder=True)
