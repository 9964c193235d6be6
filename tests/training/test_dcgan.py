"""DCGAN training (paper 002): a tiny run is deterministic, changes the weights and learns a trivial dataset;
sampling and the realism score."""

import pytest
import torch

from synthlearn.models.dcgan import DCGANConfig, DCGANDiscriminator, DCGANGenerator
from synthlearn.training.dcgan import make_dcgan_optimizer, realism_score, sample_dcgan, train_dcgan_epochs

torch.set_num_threads(1)


def squares(n: int = 16, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` grayscale images: a dark background (-1) with a centred square, bright (1, class 1) or grey (-0.2,
    class 0). Mean intensity -0.65."""
    images = torch.full((n, 1, size, size), -1.0)
    labels = torch.arange(n) % 2
    q = size // 4
    for i in range(n):
        images[i, :, q:size - q, q:size - q] = 1.0 if labels[i] == 1 else -0.2
    return images, labels


def tiny(**kw) -> DCGANConfig:
    base = {"image_size": 32, "channels": 1, "latent_dim": 8, "generator_width": 4, "discriminator_width": 4,
            "batch_size": 8}
    return DCGANConfig(**{**base, **kw})


def build(cfg: DCGANConfig, seed: int = 0) -> tuple[DCGANGenerator, DCGANDiscriminator]:
    torch.manual_seed(seed)
    return DCGANGenerator(cfg), DCGANDiscriminator(cfg)


def snapshot(*nets) -> list[torch.Tensor]:
    return [v.detach().clone() for net in nets for v in net.state_dict().values()]


@pytest.mark.parametrize("num_classes, dropout", [(0, 0.0), (2, 0.3)])
def test_two_epochs_are_deterministic_and_change_the_weights(num_classes, dropout):
    images, labels = squares()
    cfg = tiny(num_classes=num_classes, dropout=dropout, label_smoothing=0.1)
    labels = labels if num_classes else None
    runs = []
    for _ in range(2):
        gen, disc = build(cfg)
        before = snapshot(gen, disc)
        torch.manual_seed(123)  # the caller's global generator state must not matter ...
        history, opt_g, opt_d = train_dcgan_epochs(gen, disc, images, labels, cfg, epochs=2, seed=7)
        runs.append((history, snapshot(gen, disc)))
        assert any(not torch.equal(a, b) for a, b in zip(before, runs[-1][1]))
        assert isinstance(opt_g, torch.optim.Adam) and opt_g.param_groups[0]["betas"] == (0.5, 0.999)
        assert opt_d.param_groups[0]["lr"] == cfg.lr
    assert set(runs[0][0]) == {"d", "g", "d_real", "d_fake"}
    assert all(len(v) == 2 for v in runs[0][0].values())
    assert all(0 <= p <= 1 for key in ("d_real", "d_fake") for p in runs[0][0][key])
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    gen, disc = build(cfg)
    other, _, _ = train_dcgan_epochs(gen, disc, images, labels, cfg, epochs=2, seed=8)
    assert other != runs[0][0]


def test_global_rng_untouched_and_optimizers_continue():
    images, _ = squares(n=5)  # fewer images than the batch size: one short batch per epoch
    cfg = tiny(batch_size=32)
    gen, disc = build(cfg)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    history, opt_g, opt_d = train_dcgan_epochs(gen, disc, images, None, cfg, epochs=1, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert len(history["d"]) == 1
    step = float(opt_g.state[next(iter(opt_g.state))]["step"])
    _, opt_g2, opt_d2 = train_dcgan_epochs(gen, disc, images, None, cfg, epochs=1, seed=1, opt_g=opt_g, opt_d=opt_d)
    assert opt_g2 is opt_g and opt_d2 is opt_d
    assert float(opt_g.state[next(iter(opt_g.state))]["step"]) == step + 1
    assert isinstance(make_dcgan_optimizer(gen, cfg), torch.optim.Adam)


def test_zero_epochs_is_a_no_op():
    images, _ = squares(n=4)
    gen, disc = build(tiny())
    before = snapshot(gen, disc)
    history, _, _ = train_dcgan_epochs(gen, disc, images, None, tiny(), epochs=0, seed=0)
    assert history == {"d": [], "g": [], "d_real": [], "d_fake": []}
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(gen, disc)))


def test_learns_the_mean_intensity_and_layout_of_a_trivial_dataset():
    """Trained 60 epochs, samples move from mean 0 (tanh of a fresh net) most of the way to the data's -0.65, dark
    corners and a bright centre. Eight seeds gave means -0.43 to -0.50 and corners 0.7-1.1 darker than the centre
    (a run that learns nothing stays near 0)."""
    images, _ = squares()
    cfg = tiny(latent_dim=16, generator_width=16, discriminator_width=4, lr=2e-3)
    gen, disc = build(cfg)
    target = float(images.mean())
    before = float(sample_dcgan(gen, 64, seed=1).mean())
    train_dcgan_epochs(gen, disc, images, None, cfg, epochs=60, seed=0)
    samples = sample_dcgan(gen, 64, seed=1)
    assert abs(float(samples.mean()) - target) < 0.5 * abs(before - target)
    assert float(samples[:, :, :4, :4].mean()) < float(samples[:, :, 12:20, 12:20].mean()) - 0.3


def test_input_checks():
    images, labels = squares(n=4)
    gen, disc = build(tiny())
    with pytest.raises(ValueError, match=r"images must be \(N, 1, 32, 32\)"):
        train_dcgan_epochs(gen, disc, images[:, :, :16], None, tiny(), epochs=1, seed=0)
    with pytest.raises(ValueError, match="num_classes = 0"):
        train_dcgan_epochs(gen, disc, images, labels, tiny(), epochs=1, seed=0)
    cgen, cdisc = build(tiny(num_classes=2))
    with pytest.raises(ValueError, match="labels is None"):
        train_dcgan_epochs(cgen, cdisc, images, None, tiny(num_classes=2), epochs=1, seed=0)
    with pytest.raises(ValueError, match="epochs"):
        train_dcgan_epochs(gen, disc, images, None, tiny(), epochs=-1, seed=0)
    with pytest.raises(ValueError, match="conditional"):
        sample_dcgan(cgen, 2)


@pytest.mark.parametrize("num_classes", [0, 2])
def test_sample_shapes_range_determinism(num_classes):
    cfg = tiny(num_classes=num_classes, channels=3)
    gen, _ = build(cfg)
    gen.train()
    labels = torch.tensor([0, 1, 1, 0, 1]) if num_classes else None
    a = sample_dcgan(gen, 5, labels=labels, seed=3, batch_size=2)
    assert a.shape == (5, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert gen.training  # mode restored
    assert torch.equal(a, sample_dcgan(gen, 5, labels=labels, seed=3, batch_size=64))  # batch size does not matter
    assert not torch.equal(a, sample_dcgan(gen, 5, labels=labels, seed=4))
    assert sample_dcgan(gen, 0, labels=labels[:0] if num_classes else None).shape == (0, 3, 32, 32)


def test_realism_score_is_a_probability():
    images, labels = squares(n=6)
    for cfg, y in ((tiny(), None), (tiny(num_classes=2), labels)):
        _, disc = build(cfg)
        score = realism_score(disc, images, labels=y, batch_size=4)
        assert 0.0 <= score <= 1.0
        with torch.no_grad():
            expected = float(torch.sigmoid(disc.eval()(images, y)).mean())
        assert score == pytest.approx(expected, abs=1e-6)
