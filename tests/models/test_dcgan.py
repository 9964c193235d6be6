"""DCGAN networks (paper 002): shapes at every size, conditioning, argument checks, DCGAN's initialisation and the
BatchNorm buffers a FedAvg must average."""

import dataclasses

import pytest
import torch

from synthlearn.models.dcgan import (
    DCGANConfig,
    DCGANDiscriminator,
    DCGANGenerator,
    init_dcgan_weights,
)

torch.set_num_threads(1)


def tiny(**kw) -> DCGANConfig:
    base = {"image_size": 32, "channels": 1, "latent_dim": 8, "generator_width": 4, "discriminator_width": 4}
    return DCGANConfig(**{**base, **kw})


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_shapes(size, channels, num_classes):
    torch.manual_seed(0)
    cfg = tiny(image_size=size, channels=channels, num_classes=num_classes)
    gen, disc = DCGANGenerator(cfg), DCGANDiscriminator(cfg)
    y = torch.tensor([0, 2]) if num_classes else None
    x = gen(torch.randn(2, cfg.latent_dim), y)
    assert x.shape == (2, channels, size, size)
    logits = disc(x, y)
    assert logits.shape == (2,)
    levels = {32: 3, 64: 4}[size]
    assert cfg.levels == levels
    assert disc.features(x).shape == (2, 4 * 2 ** (levels - 1) * 16) == (2, disc.feature_dim)
    logits.sum().backward()
    assert all(p.grad is not None for p in [*gen.parameters(), *disc.parameters()])


def test_128_forward():
    cfg = tiny(image_size=128, channels=1, generator_width=2, discriminator_width=2)
    gen, disc = DCGANGenerator(cfg), DCGANDiscriminator(cfg)
    with torch.no_grad():
        x = gen(torch.randn(2, cfg.latent_dim))
        assert x.shape == (2, 1, 128, 128)
        assert disc(x).shape == (2,)


def test_default_widths_are_radford_and_parameter_counts():
    cfg = DCGANConfig()  # 64x64 RGB, z 100, ngf = ndf = 64: PyTorch's DCGAN example
    gen, disc = DCGANGenerator(cfg), DCGANDiscriminator(cfg)
    assert [m.out_channels for m in gen.modules() if isinstance(m, torch.nn.ConvTranspose2d)] == [512, 256, 128, 64, 3]
    assert [m.out_channels for m in disc.modules() if isinstance(m, torch.nn.Conv2d)] == [64, 128, 256, 512, 1]
    assert sum(p.numel() for p in gen.parameters()) == 3_576_704
    assert sum(p.numel() for p in disc.parameters()) == 2_765_568
    # no BatchNorm on the discriminator's first layer
    assert not isinstance(disc.body[1], torch.nn.BatchNorm2d) and isinstance(disc.body[3], torch.nn.BatchNorm2d)


def test_generator_output_in_tanh_range():
    torch.manual_seed(0)
    gen = DCGANGenerator(tiny())
    x = gen(torch.randn(4, 8) * 50)  # huge z saturates tanh, never beyond it
    assert x.min() >= -1 and x.max() <= 1


def test_conditioning_changes_outputs():
    torch.manual_seed(0)
    cfg = tiny(num_classes=2)
    gen, disc = DCGANGenerator(cfg).eval(), DCGANDiscriminator(cfg).eval()
    assert gen.model[0].in_channels == 8 + 2  # z and the one-hot class code
    z = torch.randn(1, 8).repeat(2, 1)
    with torch.no_grad():
        x = gen(z, torch.tensor([0, 1]))
        assert not torch.allclose(x[0], x[1])
        same = x[:1].repeat(2, 1, 1, 1)
        logits = disc(same, torch.tensor([0, 1]))
        assert not torch.allclose(logits[0], logits[1], rtol=1e-3, atol=0)  # the logits of a fresh D are tiny


def test_label_checks():
    gen, disc = DCGANGenerator(tiny()), DCGANDiscriminator(tiny())
    with pytest.raises(ValueError, match="unconditional"):
        gen(torch.randn(2, 8), torch.tensor([0, 1]))
    cond = DCGANGenerator(tiny(num_classes=2))
    with pytest.raises(ValueError, match="class-conditional"):
        cond(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        cond(torch.randn(2, 8), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="long"):
        cond(torch.randn(2, 8), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"z must be \(B, 8\)"):
        gen(torch.randn(2, 9))
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        disc(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        disc.features(torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match="DCGANConfig"):
        DCGANGenerator({"image_size": 32})


@pytest.mark.parametrize("key, value", [
    ("image_size", 16), ("image_size", 48), ("image_size", 64.0), ("channels", 0), ("latent_dim", 0),
    ("generator_width", 0), ("discriminator_width", -1), ("batch_size", 0), ("num_classes", -1),
    ("dropout", 1.0), ("dropout", -0.1), ("lr", 0.0), ("beta1", 1.0), ("label_smoothing", 0.5),
    ("label_smoothing", -0.1),
])
def test_config_checks_name_the_key_and_value(key, value):
    with pytest.raises(ValueError, match=rf"DCGANConfig\.{key} .*found {value!r}"):
        DCGANConfig(**{key: value})


def test_config_accepts_powers_of_two_and_is_frozen():
    for size in (32, 64, 128, 256):
        assert DCGANConfig(image_size=size).levels == size.bit_length() - 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        DCGANConfig().lr = 1.0


def test_weight_init_statistics():
    torch.manual_seed(0)
    cfg = DCGANConfig(image_size=64, channels=3, num_classes=0)
    for net in (DCGANGenerator(cfg), DCGANDiscriminator(cfg)):
        w = torch.cat([m.weight.detach().flatten() for m in net.modules()
                       if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))])
        assert abs(float(w.mean())) < 1e-3 and abs(float(w.std()) - 0.02) < 1e-3
        bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        gamma = torch.cat([m.weight.detach() for m in bn])
        assert abs(float(gamma.mean()) - 1) < 5e-3 and abs(float(gamma.std()) - 0.02) < 5e-3
        assert all(torch.all(m.bias == 0) for m in bn)
    # the function itself re-initialises a fresh layer, and leaves other modules alone
    conv, lin = torch.nn.Conv2d(8, 64, 4), torch.nn.Linear(3, 3)
    before = lin.weight.clone()
    conv.apply(init_dcgan_weights)
    lin.apply(init_dcgan_weights)
    assert abs(float(conv.weight.detach().std()) - 0.02) < 2e-3 and torch.all(conv.bias == 0)
    assert torch.equal(lin.weight, before)


def test_dropout_in_discriminator_only_when_asked():
    assert not any(isinstance(m, torch.nn.Dropout) for m in DCGANDiscriminator(tiny()).modules())
    disc = DCGANDiscriminator(tiny(dropout=0.3))
    assert sum(isinstance(m, torch.nn.Dropout) for m in disc.modules()) == tiny().levels


def test_state_dict_holds_batchnorm_running_stats():
    """FedAvg must average the state_dict, buffers included: they are there and are not parameters."""
    cfg = tiny()
    for net in (DCGANGenerator(cfg), DCGANDiscriminator(cfg)):
        state = net.state_dict()
        params = dict(net.named_parameters())
        buffers = [k for k in state if k not in params]
        assert buffers and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
                                for k in buffers)
        assert sum(k.endswith("num_batches_tracked") for k in buffers) == sum(
            isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    gen = DCGANGenerator(cfg)
    before = {k: v.clone() for k, v in gen.state_dict().items() if "running" in k}
    gen.train()(torch.randn(4, 8))
    after = gen.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(int(v) == 1 for k, v in after.items() if k.endswith("num_batches_tracked"))


def test_minibatch_std_lets_the_discriminator_see_a_collapsed_batch():
    cfg = tiny(channels=3, minibatch_std=True)
    disc = DCGANDiscriminator(cfg).eval()
    torch.manual_seed(0)
    varied = torch.rand(4, 3, 32, 32) * 2 - 1
    same = varied[:1].expand(4, -1, -1, -1).contiguous()
    with torch.no_grad():
        torch.nn.init.constant_(disc.head.weight[:, -1], 1.0)  # make the std channel's weight visible
        a, b = disc(same)[0], disc(torch.cat([same[:1], varied[1:]]))[0]  # the same first image, other batch-mates
        assert not torch.allclose(a, b)
        plain = DCGANDiscriminator(tiny(channels=3)).eval()
        assert torch.allclose(plain(same)[0], plain(torch.cat([same[:1], varied[1:]]))[0], atol=1e-6)
    assert disc(varied[:1]).shape == (1,)  # a batch of one: std channel 0
