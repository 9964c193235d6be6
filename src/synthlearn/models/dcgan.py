"""The DCGAN of FedGAN (paper 002): a deep convolutional GAN (Radford, Metz and Chintala 2016,
https://arxiv.org/abs/1511.06434) pretrained centrally, then fine-tuned at each site and averaged by FedAvg.

- :class:`DCGANGenerator`: a latent vector ``z`` is projected to a 4x4 map by a 4x4 transposed convolution, then
  doubled ``log2(image_size) - 2`` times by stride-2 transposed convolutions + BatchNorm + ReLU (the width halving
  at every level), the last one to the image channels with ``tanh``: images in ``[-1, 1]`` (paper 002 rescales its
  fundus images to ``[-1, 1]`` at 128x128, grayscale).
- :class:`DCGANDiscriminator`: the mirror image: stride-2 4x4 convolutions + BatchNorm (none on the first layer) +
  LeakyReLU(0.2) down to 4x4 (the width doubling at every level), then a 4x4 convolution to one logit.
- :func:`init_dcgan_weights`: DCGAN's initialisation (convolution weights ``N(0, 0.02)``, BatchNorm weights
  ``N(1, 0.02)`` and biases 0); both networks apply it when built.

Class conditioning (``num_classes > 0``, e.g. the five diabetic-retinopathy grades): the generator concatenates the
class's fixed one-hot code times :data:`CLASS_CODE_SCALE` to ``z`` (Mirza and Osindero 2014). A learned class
embedding there (50 values) made a conditional DCGAN of a few hundred 32x32 fundus images ignore ``z`` and draw
one image per class (pixel SD across ``z`` 0.013-0.02 against 0.11 with the fixed code and 0.12 among the real
images; docs/benchmarks.md, section 28). The discriminator adds a projection term (Miyato and Koyama 2018,
https://arxiv.org/abs/1802.05637): ``logit = w . h + embed(y) . h`` with ``h`` the penultimate feature vector
(:meth:`DCGANDiscriminator.features`), or sees one-hot class maps beside the image (``conditioning = "concat"``).

Federated averaging: the BatchNorm running means, variances and ``num_batches_tracked`` are *buffers*, not
parameters. ``state_dict()`` holds them, so a FedAvg of GAN weights must average the whole ``state_dict`` (buffers
included), not only ``parameters()``: otherwise every site keeps its own running statistics and the averaged
generator samples (in eval mode) with statistics that belong to no site.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

#: size of the generator's learned class embedding, concatenated to ``z`` (conditional networks only)
#: the generator's class input: one-hot code times this (z's entries have SD 1; measured with 3, section 28)
CLASS_CODE_SCALE = 3.0


@dataclasses.dataclass(frozen=True)
class DCGANConfig:
    """Networks and optimisation of a DCGAN (the defaults are Radford et al.'s).

    Attributes:
        image_size: side ``S`` of the square images: a power of two >= 32 (64 in DCGAN, 128 in paper 002; 32 for
            tiny tests). Sets the number of up/down-samplings: ``log2(S) - 2``.
        channels: image channels (>= 1): 1 grayscale (paper 002), 3 RGB, or a study's sequences plus a mask channel
            (the ``fedgan`` arm draws each image with its segmentation mask).
        latent_dim: length of ``z`` (100 in DCGAN).
        generator_width: ``ngf``, the channels of the generator's last hidden layer; they double at every level
            towards the 4x4 map.
        discriminator_width: ``ndf``, the channels of the discriminator's first layer; they double at every level.
        num_classes: 0 = unconditional; > 0 = class-conditional networks (generator: class embedding concatenated
            to ``z``; discriminator: projection term).
        dropout: dropout after every hidden LeakyReLU of the discriminator (0 = none, as DCGAN).
        lr: Adam learning rate of both networks (2e-4 in DCGAN).
        beta1: Adam's first-moment decay (0.5 in DCGAN; second-moment decay 0.999).
        batch_size: images per step.
        label_smoothing: one-sided label smoothing ``s``: the discriminator's target for real images is ``1 - s``
            (Salimans et al. 2016); fake targets stay 0.
        minibatch_std: the discriminator's last layer also sees the standard deviation of its 4x4 features across
            the batch, one constant channel (Karras et al. 2018), so it can tell a batch of identical fakes from a
            varied real one: against mode collapse, not in DCGAN. It did not stop the per-class collapse of a learned
            class embedding (the fixed one-hot code did); the ``fedgan`` arm's figures were measured with it on
            (docs/benchmarks.md, section 28).
        conditioning: how a conditional discriminator sees the class: ``projection`` (Miyato & Koyama 2018: plus
            ``embed(y) . h``) or ``concat`` (Mirza & Osindero 2014: one constant one-hot map per class beside the
            image channels at its input).
    """

    image_size: int = 64
    channels: int = 3
    latent_dim: int = 100
    generator_width: int = 64
    discriminator_width: int = 64
    num_classes: int = 0
    dropout: float = 0.0
    lr: float = 2e-4
    beta1: float = 0.5
    batch_size: int = 32
    label_smoothing: float = 0.0
    minibatch_std: bool = False
    conditioning: Literal["projection", "concat"] = "projection"

    def __post_init__(self) -> None:
        s = self.image_size
        if not isinstance(s, int) or s < 32 or s & (s - 1):
            raise ValueError(f"DCGANConfig.image_size must be a power of two >= 32 (64 or 128; 32 for tests), "
                             f"found {s!r}")
        if not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"DCGANConfig.channels must be an integer >= 1 (1 grayscale, 3 RGB), found "
                             f"{self.channels!r}")
        for key in ("latent_dim", "generator_width", "discriminator_width", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DCGANConfig.{key} must be an integer >= 1, found {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"DCGANConfig.num_classes must be an integer >= 0 (0 = unconditional), "
                             f"found {self.num_classes!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DCGANConfig.dropout must be in [0, 1), found {self.dropout!r}")
        if not self.lr > 0.0:
            raise ValueError(f"DCGANConfig.lr must be > 0, found {self.lr!r}")
        if not 0.0 <= self.beta1 < 1.0:
            raise ValueError(f"DCGANConfig.beta1 must be in [0, 1), found {self.beta1!r}")
        if self.conditioning not in ("projection", "concat"):
            raise ValueError(f"DCGANConfig.conditioning must be projection or concat, found {self.conditioning!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DCGANConfig.label_smoothing must be in [0, 0.5) (real target 1 - s), "
                             f"found {self.label_smoothing!r}")

    @property
    def levels(self) -> int:
        """Stride-2 up-samplings of the generator (= down-samplings of the discriminator): ``log2(S) - 2``."""
        return int(math.log2(self.image_size)) - 2


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN's initialisation of one module (use as ``net.apply(init_dcgan_weights)``): (transposed) convolution
    weights ``N(0, 0.02)`` and biases 0; BatchNorm weights ``N(1, 0.02)`` and biases 0. Other modules are left
    unchanged."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _check_labels(labels: torch.Tensor | None, batch: int, num_classes: int, who: str) -> None:
    if num_classes == 0:
        if labels is not None:
            raise ValueError(f"{who} is unconditional (num_classes = 0) but labels were given; pass labels=None or "
                             f"build it with num_classes > 0")
        return
    if labels is None:
        raise ValueError(f"{who} is class-conditional (num_classes = {num_classes}): labels (B,) long expected, "
                         f"found None")
    if labels.shape != (batch,) or labels.dtype != torch.long:
        raise ValueError(f"{who} labels must be ({batch},) long, found shape {tuple(labels.shape)} {labels.dtype}")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{who} labels must be in [0, {num_classes}), found [{int(labels.min())}, "
                         f"{int(labels.max())}]")


class DCGANGenerator(nn.Module):
    """``z`` (and a class) -> image (Radford et al. 2016, figure 1).

    Layers for ``L = cfg.levels`` and ``ngf = cfg.generator_width``: ``ConvTranspose(z, ngf * 2^(L-1), 4)`` to 4x4,
    BatchNorm, ReLU; then ``L - 1`` times ``ConvTranspose(4, stride 2)`` halving the width, BatchNorm, ReLU; then
    ``ConvTranspose(ngf, channels, 4, stride 2)`` and ``tanh``. 64x64: 512 -> 256 -> 128 -> 64 channels at 4, 8, 16
    and 32 pixels.

    Args:
        cfg: :class:`DCGANConfig` (``image_size``, ``channels``, ``latent_dim``, ``generator_width``,
            ``num_classes`` are used).

    Shapes:
        ``z (B, latent_dim)`` (+ ``labels (B,)`` long when ``num_classes > 0``) -> ``(B, channels, S, S)`` in
        ``[-1, 1]``.
    """

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        if not isinstance(cfg, DCGANConfig):
            raise TypeError(f"DCGANGenerator expects a DCGANConfig, found {type(cfg).__name__}")
        self.cfg = cfg
        levels, ngf = cfg.levels, cfg.generator_width
        conditional = cfg.num_classes > 0
        in_features = cfg.latent_dim + (cfg.num_classes if conditional else 0)
        width = ngf * 2 ** (levels - 1)
        # bias=False before every BatchNorm: its shift makes a convolution bias redundant
        layers: list[nn.Module] = [nn.ConvTranspose2d(in_features, width, 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(levels - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"generator input z must be (B, {self.cfg.latent_dim}), found shape {tuple(z.shape)}")
        _check_labels(labels, z.shape[0], self.cfg.num_classes, "DCGANGenerator")
        if self.cfg.num_classes > 0:
            z = torch.cat([z, F.one_hot(labels, self.cfg.num_classes).to(z.dtype) * CLASS_CODE_SCALE], dim=1)
        return self.model(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """Image (and a class) -> one real/fake logit (Radford et al. 2016).

    Layers for ``L = cfg.levels`` and ``ndf = cfg.discriminator_width``: ``Conv(channels, ndf, 4, stride 2)``,
    LeakyReLU(0.2); then ``L - 1`` times ``Conv(4, stride 2)`` doubling the width, BatchNorm, LeakyReLU(0.2) (each
    LeakyReLU followed by dropout when ``cfg.dropout > 0``) down to a 4x4 map; then a 4x4 convolution to one logit
    (a linear map of the flattened 4x4 map, :meth:`features`, and of the minibatch-std channel when
    ``cfg.minibatch_std``). Conditional: plus the projection ``embed(y) . h``.

    Args:
        cfg: :class:`DCGANConfig` (``image_size``, ``channels``, ``discriminator_width``, ``num_classes``,
            ``dropout`` are used).

    Shapes:
        ``(B, channels, S, S)`` (+ ``labels (B,)`` long when ``num_classes > 0``) -> logits ``(B,)``;
        :meth:`features`: ``(B, channels, S, S) -> (B, feature_dim)``, ``feature_dim = ndf * 2^(L-1) * 16``.
    """

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        if not isinstance(cfg, DCGANConfig):
            raise TypeError(f"DCGANDiscriminator expects a DCGANConfig, found {type(cfg).__name__}")
        self.cfg = cfg
        width = cfg.discriminator_width

        def activation() -> list[nn.Module]:
            return [nn.LeakyReLU(0.2, True)] + ([nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else [])

        # no BatchNorm on the first layer (Radford et al.: it made samples oscillate)
        extra = cfg.num_classes if cfg.num_classes > 0 and cfg.conditioning == "concat" else 0
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels + extra, width, 4, 2, 1, bias=False), *activation()]
        for _ in range(cfg.levels - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2), *activation()]
            width *= 2
        self.body = nn.Sequential(*layers)
        self.feature_dim = width * 16
        self.head = nn.Conv2d(width + (1 if cfg.minibatch_std else 0), 1, 4, 1, 0, bias=False)
        self.projection = None
        if cfg.num_classes > 0 and cfg.conditioning == "projection":
            self.projection = nn.Embedding(cfg.num_classes, self.feature_dim)
            # small, like the head's weights, so that the projection does not dominate the first logits
            nn.init.normal_(self.projection.weight, 0.0, 0.02)
        self.apply(init_dcgan_weights)

    def _check(self, x: torch.Tensor) -> None:
        c, s = self.cfg.channels, self.cfg.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"discriminator input must be (B, {c}, {s}, {s}), found shape {tuple(x.shape)}")

    def _with_batch_std(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` ``(B, W, 4, 4)``, plus the minibatch-std channel when ``cfg.minibatch_std`` (0 for a batch of 1)."""
        if not self.cfg.minibatch_std:
            return h
        std = h.std(dim=0, unbiased=False).mean() if h.shape[0] > 1 else h.new_zeros(())
        return torch.cat([h, std.expand(h.shape[0], 1, *h.shape[2:])], dim=1)

    def _input(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """``x`` with one constant one-hot map per class appended (``conditioning = "concat"``), else ``x``."""
        if self.cfg.num_classes > 0 and self.cfg.conditioning == "concat":
            onehot = F.one_hot(labels, self.cfg.num_classes).to(x.dtype)
            x = torch.cat([x, onehot[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        return x

    def features(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The penultimate feature vector (the flattened 4x4 map the logit is a linear function of), for a
        realism score or feature matching: ``(B, channels, S, S) -> (B, feature_dim)`` (``labels`` ``(B,)`` are
        needed by a ``concat``-conditioned discriminator)."""
        self._check(x)
        if self.cfg.num_classes > 0 and self.cfg.conditioning == "concat":
            _check_labels(labels, x.shape[0], self.cfg.num_classes, "DCGANDiscriminator")
        return self.body(self._input(x, labels)).flatten(1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        _check_labels(labels, x.shape[0], self.cfg.num_classes, "DCGANDiscriminator")
        h = self.body(self._input(x, labels))
        logits = self.head(self._with_batch_std(h)).flatten()
        if self.projection is not None:
            logits = logits + (self.projection(labels) * h.flatten(1)).sum(dim=1)
        return logits


__all__ = ["CLASS_CODE_SCALE", "DCGANConfig", "DCGANDiscriminator", "DCGANGenerator", "init_dcgan_weights"]
