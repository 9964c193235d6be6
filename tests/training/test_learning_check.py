"""The learning check: the chance level of the loss, and a network that did not learn is caught."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from synthlearn.training.learning_check import chance_loss, check_learning, summarise_checks, tumour_voxel_counts
from synthlearn.training.trainer import TrainConfig, voxel_loss


class _Cases:
    """``len`` / ``arrays(i)``: 8^3 cases, a cube of tumour whose size is given per case."""

    def __init__(self, sizes, value=None):
        self.items = []
        for i, size in enumerate(sizes):
            img = np.zeros((4, 8, 8, 8), np.float32)
            seg = np.zeros((8, 8, 8), np.int64)
            seg[:size, :2, :2] = 1
            img[:, seg > 0] = 1.0 if value is None else value[i]
            self.items.append((img, seg))

    def __len__(self):
        return len(self.items)

    def arrays(self, i):
        return self.items[i]


class _Constant(nn.Module):
    """Per-voxel logits that ignore the input: ``bias`` everywhere, or the sign of channel 0 times ``gain``."""

    def __init__(self, bias=(0.0, 0.0), gain=0.0):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(bias))
        self.gain = gain

    def forward(self, x):
        out = self.bias.view(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[2:]).clone()
        out[:, 1] += self.gain * x[:, 0]
        return out


def test_chance_loss_is_the_entropy_of_the_class_mass_the_loss_sees():
    cfg = TrainConfig()
    # voxel normalisation: class 0 has 3 cases of 8 voxels, class 1 one case of 8: q = (3/4, 1/4)
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert chance_loss([0, 0, 0, 1], [8, 8, 8, 8], cfg, 2) == pytest.approx(expected)
    # the same cases but class 1's tumours 3x the size: voxel mass balanced -> ln 2
    assert chance_loss([0, 0, 0, 1], [8, 8, 8, 24], cfg, 2) == pytest.approx(math.log(2))
    # case normalisation counts cases, whatever the tumour size
    case = TrainConfig(loss_normalisation="case")
    assert chance_loss([0, 0, 0, 1], [8, 8, 8, 24], case, 2) == pytest.approx(expected)
    # balanced class weights make any mix ln K; a case without tumour does not count
    balanced = TrainConfig(loss_normalisation="case", class_weighting="balanced")
    assert chance_loss([0, 0, 0, 1], [8, 8, 8, 24], balanced, 2) == pytest.approx(math.log(2))
    assert chance_loss([0, 1], [8, 0], case, 2) == 0.0


def test_chance_loss_matches_the_loss_of_the_best_constant_prediction():
    """The constant logits log q reach exactly the chance level under the trainer's own loss."""
    for norm in ("voxel", "case"):
        cfg = TrainConfig(loss_normalisation=norm)
        sizes, targets = [2, 3, 5, 8], [0, 1, 0, 1]
        data = _Cases(sizes)
        seg = torch.from_numpy(np.stack([data.arrays(i)[1] for i in range(4)]))
        mass = np.bincount(targets, weights=sizes if norm == "voxel" else np.ones(4))
        q = mass / mass.sum()
        logits = torch.log(torch.tensor(q, dtype=torch.float32)).view(1, 2, 1, 1, 1).expand(4, 2, 8, 8, 8)
        loss = voxel_loss(logits, seg, torch.tensor(targets), normalisation=norm)
        assert float(loss) == pytest.approx(chance_loss(targets, tumour_voxel_counts(data), cfg, 2), rel=1e-5)


def test_voxel_loss_case_normalisation_weighs_each_case_the_same():
    seg = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    seg[0, :1] = 1   # 16 voxels
    seg[1, :] = 1    # 64 voxels
    logits = torch.zeros(2, 2, 4, 4, 4)
    logits[1, 1] = 5.0  # case 1 is predicted right with confidence, case 0 at chance
    targets = torch.tensor([0, 1])
    per_case = [math.log(2), float(torch.nn.functional.cross_entropy(torch.tensor([[0.0, 5.0]]), torch.tensor([1])))]
    assert float(voxel_loss(logits, seg, targets, normalisation="case")) == pytest.approx(np.mean(per_case), rel=1e-5)
    voxel = (16 * per_case[0] + 64 * per_case[1]) / 80
    assert float(voxel_loss(logits, seg, targets, normalisation="voxel")) == pytest.approx(voxel, rel=1e-5)
    with pytest.raises(ValueError, match="normalisation"):
        voxel_loss(logits, seg, targets, normalisation="x")


def test_a_network_that_did_not_learn_is_caught_and_one_that_did_is_not():
    cfg = TrainConfig(collapse_margin=0.1)
    data = _Cases([2, 2, 2, 2], value=[-1.0, -1.0, 1.0, 1.0])
    targets = [0, 0, 1, 1]
    chance = math.log(2)
    # the constant network: one class for every case, loss at chance
    stuck = check_learning(_Constant(bias=(0.1, 0.0)), data, targets, [0.7, chance * 0.99], cfg, 2,
                           ["wildtype", "mutant"])
    assert not stuck["learned"]
    assert stuck["predicted_classes"] == {"wildtype": 4, "mutant": 0}
    assert len(stuck["reasons"]) == 2 and "chance level" in stuck["reasons"][0] and "wildtype" in stuck["reasons"][1]
    assert stuck["chance_loss"] == pytest.approx(chance)
    # a network that reads the input: both classes predicted, loss well below chance
    good = check_learning(_Constant(gain=5.0), data, targets, [0.7, 0.1], cfg, 2)
    assert good["learned"] and good["reasons"] == [] and good["train_accuracy"] == 1.0
    # loss alone: near chance although the predictions spread
    near = check_learning(_Constant(gain=5.0), data, targets, [chance * 0.95], cfg, 2)
    assert not near["learned"] and len(near["reasons"]) == 1
    # no loss history: only the predictions are read
    assert check_learning(_Constant(gain=5.0), data, targets, None, cfg, 2)["learned"]
    summary = summarise_checks({"idh/fold-0": stuck, "idh/fold-1": good})
    assert summary == {"n_networks": 2, "n_collapsed": 1, "collapsed": ["idh/fold-0"], "retrained": {}}


def test_training_cases_of_one_class_are_reported():
    check = check_learning(_Constant(gain=5.0), _Cases([2, 2]), [1, 1], [0.01], TrainConfig(), 2, ["wildtype", "mutant"])
    assert not check["learned"] and "one class (mutant)" in check["reasons"][0]
