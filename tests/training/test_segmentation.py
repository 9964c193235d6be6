"""The segmentation task's trainer path: Dice + cross-entropy loss, ensemble label maps, learning check."""

import numpy as np
import pytest
import torch

from synthlearn.models.classifier import ClassifierConfig, build_classifier
from synthlearn.training.segmentation import (
    REGIONS,
    SEG_CLASSES,
    check_segmentation_learning,
    dice,
    predict_label_maps,
    region_masks,
    segmentation_loss,
)
from synthlearn.training.trainer import TrainConfig, train_model


class BrightSpheres:
    """Cases whose tumour is a bright sphere (oedema) with a brighter core (enhancing): learnable in a few epochs."""

    def __init__(self, n=4, size=16, seed=0):
        rng = np.random.default_rng(seed)
        grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
        self.items = []
        for _ in range(n):
            centre = rng.uniform(5, size - 5, 3)
            r2 = np.sum((grid - centre[:, None, None, None]) ** 2, 0)
            seg = np.where(r2 < 4, 3, np.where(r2 < 12, 2, 0)).astype(np.int64)
            img = rng.normal(0, 0.2, (4, size, size, size)).astype(np.float32)
            img[:, seg == 2] += 1.5
            img[:, seg == 3] += 3.0
            self.items.append((img, seg))

    def __len__(self):
        return len(self.items)

    def arrays(self, i):
        return self.items[i]


def _net(seed=0):
    torch.manual_seed(seed)
    return build_classifier(ClassifierConfig(channels=(8, 16), norm_num_groups=4, mamba=False),
                            out_channels=len(SEG_CLASSES))


def test_regions_follow_brats():
    labels = np.array([0, 1, 2, 3])
    masks = region_masks(labels)
    assert list(REGIONS) == ["WT", "TC", "ET"]
    np.testing.assert_array_equal(masks, [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]])
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dice(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool)) == pytest.approx(2 / 3)


def test_loss_is_low_for_the_truth_and_refuses_other_channel_counts():
    seg = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    seg[0, 2:5, 2:5, 2:5] = 2
    right = torch.nn.functional.one_hot(seg, 4).permute(0, 4, 1, 2, 3).float() * 20
    wrong = torch.roll(right, 1, dims=1)
    assert segmentation_loss(right, seg) < 0.05 < segmentation_loss(wrong, seg)
    with pytest.raises(ValueError, match="4 channels"):
        segmentation_loss(torch.zeros(1, 2, 8, 8, 8), seg)


def test_a_network_learns_to_segment_and_the_check_tells_it_from_an_untrained_one():
    cases = BrightSpheres()
    cfg = TrainConfig(epochs=25, batch_size=2, optimizer="adamw", lr=3e-3, lr_schedule="constant", augment_flips=False)
    untrained = _net()
    before = check_segmentation_learning(untrained, cases, None, cfg)
    net = _net()
    out = train_model(net, cases, [0] * len(cases), cfg, seed=0, name="seg/fold-0", progress=False,
                      segmentation=True)
    after = check_segmentation_learning(net, cases, out.losses, cfg)
    assert out.losses[-1] < 0.5 * out.losses[0]
    assert after["learned"], after
    assert after["train_dice"]["WT"] > 0.8 > before["train_dice"]["WT"]
    maps = predict_label_maps([net, net], cases, batch_size=3)
    assert maps.shape == (4, 16, 16, 16) and maps.dtype == np.int64 and set(np.unique(maps)) <= {0, 1, 2, 3}


def test_a_network_that_draws_no_tumour_is_not_learned():
    class Background(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
            logits[:, 0] = 5.0
            return logits

    check = check_segmentation_learning(Background(), BrightSpheres(n=2), [1.0, 0.9], TrainConfig(batch_size=2))
    assert not check["learned"] and "draws no tumour voxel" in check["reasons"][0]
    assert check["loss_ratio"] == pytest.approx(0.9)
