"""Class-conditioned diffusion UNet, label dropout and schedulers on tiny nets."""

from __future__ import annotations

import pytest
import torch

from synthlearn.models.diffusion import ClassConditionedUNet, DiffusionConfig, build_scheduler, drop_labels

TINY = dict(channels=(8, 8), attention_levels=(False, True), num_head_channels=4, norm_num_groups=4,
            cross_attention_dim=8, num_train_timesteps=20)


def test_forward_shape_and_class_dependence():
    torch.manual_seed(0)
    model = ClassConditionedUNet(DiffusionConfig(**TINY), latent_channels=2, num_classes=3)
    assert model.null_class == 3
    x = torch.randn(2, 2, 8, 8, 8)
    t = torch.tensor([0, 10])
    with torch.no_grad():
        for p in model.parameters():  # MONAI zero-initialises output layers; randomise for this check
            p.add_(0.05 * torch.randn_like(p))
        a = model(x, t, torch.tensor([0, 0]))
        b = model(x, t, torch.tensor([1, 1]))
        null = model(x, t, torch.tensor([3, 3]))
    assert a.shape == x.shape
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, null)



@pytest.mark.parametrize("in_timestep", [True, False])
def test_class_in_timestep_carries_the_class_without_cross_attention(in_timestep):
    """Every class given the same cross-attention token: only the timestep path can still tell them apart."""
    torch.manual_seed(0)
    cfg = DiffusionConfig(**{**TINY, "class_in_timestep": in_timestep})
    model = ClassConditionedUNet(cfg, latent_channels=2, num_classes=2)
    assert (model.unet.num_class_embeds == 3) if in_timestep else model.unet.num_class_embeds is None
    x = torch.randn(2, 2, 8, 8, 8)
    t = torch.tensor([5, 5])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.class_embedding.weight.copy_(model.class_embedding.weight[:1].expand(3, -1))
        a = model(x, t, torch.tensor([0, 0]))
        b = model(x, t, torch.tensor([1, 1]))
    assert torch.allclose(a, b) is (not in_timestep)


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=(8,)), "at least 2 levels"),
    (dict(channels=(8, 6)), "must divide"),
    (dict(attention_levels=(True,)), "entries"),
    (dict(label_dropout=1.0), "label_dropout"),
    (dict(schedule="sigmoid"), "schedule"),
    (dict(prediction_type="sample"), "prediction_type"),
    (dict(num_train_timesteps=1), "num_train_timesteps"),
])
def test_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**{**TINY, **kwargs})


def test_model_argument_checks():
    with pytest.raises(ValueError, match="num_classes"):
        ClassConditionedUNet(DiffusionConfig(**TINY), latent_channels=2, num_classes=1)
    with pytest.raises(ValueError, match="latent_channels"):
        ClassConditionedUNet(DiffusionConfig(**TINY), latent_channels=0, num_classes=2)


def test_label_dropout():
    labels = torch.tensor([0, 1, 1, 0] * 50)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(drop_labels(labels, 0.0, 2, g), labels)
    assert (drop_labels(labels, 1.0, 2, g) == 2).all()
    a = drop_labels(labels, 0.3, 2, torch.Generator().manual_seed(1))
    b = drop_labels(labels, 0.3, 2, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    dropped = (a == 2).float().mean().item()
    assert 0.15 < dropped < 0.45
    assert torch.equal(a[a != 2], labels[a != 2])
    with pytest.raises(ValueError, match="p must be"):
        drop_labels(labels, 1.5, 2, g)


def test_schedulers_do_not_clip_unit_variance_latents():
    cfg = DiffusionConfig(**TINY)
    for kind in ("ddpm", "ddim"):
        sched = build_scheduler(cfg, kind)
        assert sched.clip_sample is False
        assert sched.num_train_timesteps == 20
    with pytest.raises(ValueError, match="ddpm"):
        build_scheduler(cfg, "euler")
