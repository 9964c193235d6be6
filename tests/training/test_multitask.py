"""The multi-task trainer path: masked per-head losses, training, and the learning check of every head."""

import numpy as np
import pytest
import torch

from synthlearn.models.multitask import MultiTaskUNet
from synthlearn.tasks.definitions import Stage
from synthlearn.training.segmentation import check_multitask_learning
from synthlearn.training.trainer import TrainConfig, multitask_loss, predict_head_probabilities, train_model
from tests.training.test_segmentation import BrightSpheres


def test_an_unknown_label_adds_nothing_and_an_all_unknown_head_keeps_a_gradient_path():
    torch.manual_seed(0)
    seg_logits = torch.randn(3, 4, 8, 8, 8)
    seg = torch.randint(0, 4, (3, 8, 8, 8))
    a = torch.randn(3, 2, requires_grad=True)
    b = torch.randn(3, 3, requires_grad=True)
    targets = torch.tensor([[1, -1], [-1, -1], [0, -1]])
    loss = multitask_loss(seg_logits, [a, b], seg, targets)
    loss.backward()
    assert torch.all(a.grad[1] == 0) and torch.any(a.grad[0] != 0) and torch.all(b.grad == 0)
    known_only = multitask_loss(seg_logits[[0, 2]], [a[[0, 2]], b[[0, 2]]], seg[[0, 2]], torch.tensor([[1, -1], [0, -1]]))
    base = multitask_loss(seg_logits, [], seg, torch.zeros(3, 0, dtype=torch.long))
    base_known = multitask_loss(seg_logits[[0, 2]], [], seg[[0, 2]], torch.zeros(2, 0, dtype=torch.long))
    assert float((loss - base).detach()) == pytest.approx(float((known_only - base_known).detach()), rel=1e-5)  # the same head term
    with pytest.raises(ValueError, match=r"head targets must be \(B, 2\)"):
        multitask_loss(seg_logits, [a, b], seg, torch.zeros(3, 1, dtype=torch.long))


class Labelled(BrightSpheres):
    """BrightSpheres whose head 'bright' is 1 when the sphere is made brighter (learnable from the image) and whose
    head 'coin' is unknown for half the cases."""

    def __init__(self, n=8, size=16, seed=0):
        super().__init__(n, size, seed)
        self.bright = [i % 2 for i in range(n)]
        for (img, seg), b in zip(self.items, self.bright):
            if b:
                img[:, seg > 0] += 2.0
        self.targets = [(b, -1 if i % 2 else i % 4 // 2) for i, b in enumerate(self.bright)]


@pytest.mark.parametrize("pool", ["voxel", "global"])
def test_a_multitask_network_learns_its_segmentation_and_a_head_and_the_check_reads_every_head(pool):
    cases = Labelled()
    heads = (Stage("bright", ("no", "yes"), lambda labels: None), Stage("coin", ("a", "b"), lambda labels: None))
    stage = Stage("multitask", ("bg", "core", "oedema", "enh"), lambda labels: None, segmentation=True, heads=heads)
    cfg = TrainConfig(epochs=30, batch_size=4, optimizer="adamw", lr=3e-3, lr_schedule="constant", augment_flips=False)
    torch.manual_seed(0)
    net = MultiTaskUNet(3, 4, 4, stage.head_sizes, channels=(8, 16), norm_num_groups=4, pool=pool)
    out = train_model(net, cases, cases.targets, cfg, seed=0, name="multitask/fold-0", progress=False,
                      segmentation=True, heads=stage.head_sizes)
    assert out.losses[-1] < 0.6 * out.losses[0]  # the coin head has nothing to learn
    probs = predict_head_probabilities([net], cases)
    assert [p.shape for p in probs] == [(8, 2), (8, 2)]
    assert (probs[0].argmax(1) == np.array(cases.bright)).all()
    check = check_multitask_learning(net, cases, cases.targets, out.losses, cfg, stage)
    assert check["train_dice"]["WT"] > 0.8 and check["heads"]["bright"]["train_accuracy"] == 1.0
    assert check["heads"]["coin"]["n_known"] == 4
    with pytest.raises(ValueError, match="one target per head"):
        train_model(net, cases, [0] * len(cases), cfg, seed=0, name="x", progress=False, segmentation=True,
                    heads=stage.head_sizes)
