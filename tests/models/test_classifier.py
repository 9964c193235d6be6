"""VoxelClassifierUNet: shapes, argument checks, case probabilities."""

import pytest
import torch

from synthlearn.models.classifier import (
    ClassifierConfig,
    MambaBlock3d,
    VoxelClassifierUNet,
    build_classifier,
    case_probabilities,
)


@pytest.mark.parametrize("mamba", [False, True])
def test_output_shape(mamba):
    torch.manual_seed(0)
    net = VoxelClassifierUNet(in_channels=4, out_channels=3, channels=(4, 8, 8), norm_num_groups=2, mamba=mamba,
                              mamba_d_state=4)
    out = net(torch.randn(2, 4, 16, 16, 16))
    assert out.shape == (2, 3, 16, 16, 16)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_2d():
    net = VoxelClassifierUNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), norm_num_groups=2)
    assert net(torch.randn(1, 1, 8, 8)).shape == (1, 2, 8, 8)


def test_mamba_block_residual_shape():
    block = MambaBlock3d(8, n_layers=1, d_state=4, use_cuda=False)
    x = torch.randn(1, 8, 2, 3, 4)
    assert block(x).shape == x.shape
    x2 = torch.randn(1, 8, 3, 4)  # a 2D feature map: its pixels are the tokens
    assert block(x2).shape == x2.shape


def test_a_2d_network_with_mamba_for_2d_studies():
    net = build_classifier(ClassifierConfig(channels=(4, 8), norm_num_groups=2, mamba=True, mamba_d_state=4),
                           out_channels=4, spatial_dims=2)
    assert net(torch.randn(2, 4, 8, 8)).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"spatial_dims": 1}, "spatial_dims"),
    ({"in_channels": 0}, "in_channels"),
    ({"out_channels": 1}, "out_channels"),
    ({"channels": (4,)}, "at least 2"),
    ({"channels": (4, -8)}, "positive"),
    ({"channels": (4, 6), "norm_num_groups": 4}, "divisible"),
    ({"dropout": 1.0}, "dropout"),
])
def test_argument_checks(kwargs, match):
    args = {"channels": (4, 8), "norm_num_groups": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        VoxelClassifierUNet(**args)


def test_mamba_argument_checks():
    with pytest.raises(ValueError, match="n_layers"):
        MambaBlock3d(8, n_layers=0)
    with pytest.raises(ValueError, match="d_state"):
        MambaBlock3d(8, d_state=0)


def test_forward_checks():
    net = VoxelClassifierUNet(channels=(4, 8), norm_num_groups=2)
    with pytest.raises(ValueError, match="5D"):
        net(torch.randn(4, 8, 8, 8))
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(1, 4, 7, 8, 8))


def test_build_classifier():
    net = build_classifier(ClassifierConfig(channels=(4, 8), norm_num_groups=2, mamba=False), out_channels=2)
    assert net(torch.zeros(1, 4, 8, 8, 8)).shape == (1, 2, 8, 8, 8)


def test_case_probabilities_mean_over_tumour():
    logits = torch.randn(2, 3, 4, 4, 4)
    mask = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 1:3, 1:3] = True
    mask[1, 0, 0, 0] = True
    probs = case_probabilities(logits, mask)
    soft = torch.softmax(logits, 1)
    assert torch.allclose(probs[0], soft[0][:, mask[0]].mean(1))
    assert torch.allclose(probs[1], soft[1, :, 0, 0, 0])
    assert torch.allclose(probs.sum(1), torch.ones(2))


def test_case_probabilities_empty_mask_falls_back_to_all_voxels():
    logits = torch.randn(1, 2, 2, 2, 2)
    probs = case_probabilities(logits, torch.zeros(1, 2, 2, 2, dtype=torch.bool))
    assert torch.allclose(probs[0], torch.softmax(logits, 1)[0].flatten(1).mean(1))


def test_case_probabilities_checks_shapes():
    with pytest.raises(ValueError, match="disagree"):
        case_probabilities(torch.randn(1, 2, 4, 4, 4), torch.ones(1, 4, 4, 3, dtype=torch.bool))
