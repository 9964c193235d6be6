"""Grad-CAM of a multi-task model's heads (MONAI GradCAM): shapes, range, the layer it reads."""

import numpy as np
import pytest
import torch

from synthlearn.evaluate.gradcam import head_gradcam, head_layer
from synthlearn.models.multitask import MultiTaskUNet


@pytest.mark.parametrize("dims, pool", [(3, "voxel"), (3, "global"), (2, "voxel")])
def test_maps_cover_the_input_grid_in_unit_range(dims, pool):
    torch.manual_seed(0)
    net = MultiTaskUNet(dims, 4, 4, (2, 3), channels=(8, 16), norm_num_groups=4, pool=pool)
    images = np.random.default_rng(0).normal(size=(2, 4, *([16] * dims))).astype(np.float32)
    maps = head_gradcam(net, images, 1)
    assert maps.shape == (2, *([16] * dims)) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    assert head_layer(net) == ("net.branch.1" if pool == "voxel" else "net.encoder.1")
    with pytest.raises(ValueError, match="head 2 out of range"):
        head_gradcam(net, images, 2)
