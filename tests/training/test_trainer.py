"""The task trainer: voxel loss, determinism, resume after interruption, prediction."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthlearn.models.classifier import VoxelClassifierUNet
from synthlearn.training.trainer import (
    IGNORE_INDEX,
    TrainConfig,
    class_weights_for,
    poly_lr,
    predict_probabilities,
    random_flips,
    train_model,
    voxel_loss,
    voxel_targets,
)


class FakeCases:
    """Cases with a sphere whose intensity depends on the class (what the trainer reads: len, arrays)."""

    def __init__(self, n=6, size=8, seed=0):
        rng = np.random.default_rng(seed)
        self.targets = [i % 2 for i in range(n)]
        grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
        self.items = []
        for y in self.targets:
            centre = rng.uniform(2, size - 2, 3)
            seg = (np.sum((grid - centre[:, None, None, None]) ** 2, 0) < 4).astype(np.int64) * 2
            img = rng.normal(0, 0.3, (4, size, size, size)).astype(np.float32)
            img[:, seg > 0] += 1.0 if y else -1.0
            self.items.append((img, seg))

    def __len__(self):
        return len(self.items)

    def arrays(self, i):
        return self.items[i]


def _net(seed=0):
    torch.manual_seed(seed)
    return VoxelClassifierUNet(channels=(4, 8), norm_num_groups=2, out_channels=2)


CFG = TrainConfig(epochs=3, batch_size=2, lr=0.01, momentum=0.9, device="cpu")


def test_voxel_targets_ignore_background():
    seg = torch.tensor([[0, 1, 2, 3], [0, 0, 3, 0]])
    t = voxel_targets(seg, torch.tensor([1, 0]))
    assert t.tolist() == [[IGNORE_INDEX, 1, 1, 1], [IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="targets"):
        voxel_targets(seg, torch.tensor([1]))


def test_voxel_loss_is_ce_over_tumour_voxels():
    logits = torch.randn(2, 2, 3, 3, 3)
    seg = torch.zeros(2, 3, 3, 3, dtype=torch.long)
    seg[0, 1, 1, 1] = 1
    seg[1, :2] = 2
    targets = torch.tensor([1, 0])
    flat_logits = torch.cat([logits[0][:, seg[0] > 0].T, logits[1][:, seg[1] > 0].T])
    flat_t = torch.cat([torch.full((int((seg[0] > 0).sum()),), 1), torch.full((int((seg[1] > 0).sum()),), 0)])
    assert torch.allclose(voxel_loss(logits, seg, targets), F.cross_entropy(flat_logits, flat_t))
    zero = voxel_loss(logits.requires_grad_(), torch.zeros_like(seg), targets)
    assert zero.item() == 0.0
    zero.backward()


def test_poly_lr_and_class_weights():
    assert poly_lr(0.01, 0, 10) == pytest.approx(0.01)
    assert poly_lr(0.01, 10, 10) == 0.0
    assert 0 < poly_lr(0.01, 5, 10) < 0.01
    w = class_weights_for([0, 0, 0, 1], 3)
    assert w[0] < w[1] and w[2] == 0


def test_random_flips_keep_image_and_seg_aligned():
    img = torch.arange(2 * 4 * 27, dtype=torch.float32).reshape(2, 4, 3, 3, 3)
    seg = img[:, 0].long()
    fi, fs = random_flips(img, seg, torch.Generator().manual_seed(1))
    assert torch.equal(fi[:, 0].long(), fs)


def test_train_config_checks():
    for kwargs in ({"epochs": 0}, {"batch_size": 0}, {"lr": 0}, {"momentum": 1.0}, {"momentum": 0, "nesterov": True},
                   {"lr_schedule": "cos"}, {"class_weighting": "x"}, {"checkpoint_every": 0},
                   {"optimizer": "adam"}, {"warmup_epochs": -1}, {"epochs": 2, "warmup_epochs": 2},
                   {"loss_normalisation": "x"}, {"collapse_margin": 1.0}, {"retrain_collapsed": -1}):
        with pytest.raises(ValueError):
            TrainConfig(**kwargs)


def test_training_learns_and_is_deterministic():
    data = FakeCases()
    a, b = _net(), _net()
    out_a = train_model(a, data, data.targets, dataclasses.replace(CFG, epochs=6), seed=0, name="m", progress=False)
    train_model(b, data, data.targets, dataclasses.replace(CFG, epochs=6), seed=0, name="m", progress=False)
    assert out_a.losses[-1] < out_a.losses[0]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    probs = predict_probabilities([a], data, device="cpu")
    assert probs.shape == (6, 2) and np.allclose(probs.sum(1), 1)


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    data = FakeCases()
    straight = _net()
    ref = train_model(straight, data, data.targets, CFG, seed=3, name="m", progress=False)

    ckpt = tmp_path / "m.pt"
    first = _net()
    train_model(first, data, data.targets, CFG, seed=3, name="m", stop_epoch=1, checkpoint_path=ckpt, progress=False)
    torch.manual_seed(12345)  # a new process: other global RNG state, fresh network
    resumed = _net(seed=99)
    out = train_model(resumed, data, data.targets, CFG, seed=3, name="m", checkpoint_path=ckpt, progress=False)
    assert out.resumed_from == 1
    assert out.losses == pytest.approx(ref.losses, abs=0, rel=0)
    for (k, va), vb in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(va, vb), k


def test_checkpoint_of_another_model_is_refused(tmp_path):
    data = FakeCases(n=2)
    ckpt = tmp_path / "m.pt"
    train_model(_net(), data, data.targets, dataclasses.replace(CFG, epochs=1), seed=0, name="a",
                checkpoint_path=ckpt, progress=False)
    with pytest.raises(ValueError, match="checkpoint of model"):
        train_model(_net(), data, data.targets, CFG, seed=0, name="b", checkpoint_path=ckpt, progress=False)


def test_input_checks():
    data = FakeCases(n=2)
    with pytest.raises(ValueError, match="targets"):
        train_model(_net(), data, [0], CFG, seed=0, name="m", progress=False)
    with pytest.raises(ValueError, match="start"):
        train_model(_net(), data, data.targets, CFG, seed=0, name="m", start_epoch=2, stop_epoch=1, progress=False)
    with pytest.raises(ValueError, match="at least one model"):
        predict_probabilities([], data)


def test_brain_noise_leaves_background_and_is_seeded():
    from synthlearn.training.seeding import torch_generator
    from synthlearn.training.trainer import TrainConfig, add_brain_noise

    images = torch.zeros(3, 2, 6, 6, 6)
    images[:, :, 1:5, 1:5, 1:5] = 1.0
    a = add_brain_noise(images, 0.8, torch_generator(0, "noise"))
    b = add_brain_noise(images, 0.8, torch_generator(0, "noise"))
    assert torch.equal(a, b)
    assert torch.equal(a[:, :, 0], images[:, :, 0])  # background untouched
    inside = (a - images)[:, :, 1:5, 1:5, 1:5]
    assert 0 < float(inside.std()) < 0.8
    with pytest.raises(ValueError, match="augment_noise"):
        TrainConfig(augment_noise=-0.1)


def test_random_intensity_keeps_background_order_and_seed():
    from synthlearn.training.seeding import torch_generator
    from synthlearn.training.trainer import TrainConfig, random_intensity

    gen = torch.Generator().manual_seed(3)
    images = torch.zeros(4, 2, 8, 8, 8)
    images[:, :, 2:6, 2:6, 2:6] = torch.randn(4, 2, 4, 4, 4, generator=gen) * 0.8 + 0.3
    a = random_intensity(images, 0.4, torch_generator(0, "intensity"))
    b = random_intensity(images, 0.4, torch_generator(0, "intensity"))
    assert torch.equal(a, b)
    assert torch.equal(a[:, :, :2], images[:, :, :2])  # background untouched
    brain = images[:, :, 2:6, 2:6, 2:6].flatten(2)
    changed = a[:, :, 2:6, 2:6, 2:6].flatten(2)
    for i in range(4):
        for c in range(2):  # monotone per case and channel: the voxels keep their order
            assert torch.equal(torch.argsort(brain[i, c]), torch.argsort(changed[i, c]))
    ratio = changed.std(-1) / brain.std(-1)  # contrast and gamma move the spread, case by case
    assert float(ratio.min()) < 0.97 and float(ratio.max()) > 1.03
    assert float((changed - brain).abs().max()) < 3.0  # a bounded change, not a new image
    assert torch.allclose(random_intensity(images, 1e-6, torch_generator(1, "x")), images, atol=1e-4)
    with pytest.raises(ValueError, match="augment_intensity"):
        TrainConfig(augment_intensity=1.5)


def test_parallel_networks_train_the_same_weights_as_one_after_another(tiny_study, tmp_path):
    """train.parallel_networks = 2: the two folds train in two single-thread worker processes and give the
    weights (and learning checks) of training them one after another on one thread."""
    import json
    from pathlib import Path

    from synthlearn.data.layouts import open_study
    from synthlearn.study import load_study_config
    from synthlearn.tasks.model import train_task_model

    configs = Path(__file__).resolve().parents[2] / "configs"
    cfg = load_study_config(configs / "study_tiny.toml", {"study": str(tiny_study)})
    cases = [c for s in open_study(tiny_study).sites_with_role("train") for c in s.cases]
    one = train_task_model(cases, cfg.setup, tmp_path / "one", progress=False)
    setup = dataclasses.replace(cfg.setup, train=dataclasses.replace(cfg.setup.train, parallel_networks=2))
    two = train_task_model(cases, setup, tmp_path / "two", progress=False)
    for name, net in one.networks.items():
        for (k, a), b in zip(net.state_dict().items(), two.networks[name].state_dict().values()):
            torch.testing.assert_close(a, b, msg=f"{name} {k}")
    assert one.info["learning_check"] == two.info["learning_check"]
    assert json.loads((tmp_path / "two" / "model" / "model.json").read_text())["info"]["learning_summary"]["n_networks"] == 2
