"""The image-to-image GAN of AsynDGAN (paper 003): a mask-conditioned ResNet generator and PatchGAN discriminators,
in 2D and 3D.

- :class:`ResnetGenerator` (Johnson et al. 2016, as paper 003 section 4 describes it): a 7x7 convolution, two
  stride-2 down-samplings, ``n_blocks`` residual blocks (nine in the paper), two transposed-convolution
  up-samplings (or, with ``upsampling = "resize"``, nearest-neighbour up-sampling then a 3x3 convolution: Odena et
  al. 2016's cure for the transposed convolution's checkerboard) and a 7x7 convolution to the image channels with
  ``tanh``. Every convolution but the first and last is 3x3 and every non-residual one is followed by a
  normalisation and ReLU. Dropout inside the residual blocks is
  the generator's only noise source (pix2pix): it stays on when sampling (:func:`sampling_mode`).
- :class:`PatchDiscriminator` (pix2pix's ``NLayerDiscriminator``): 4x4 convolutions, ``n_layers`` stride-2
  down-samplings, LeakyReLU 0.2; one logit per patch. With ``n_layers = 3`` each logit sees 70x70 pixels in 2D;
  :func:`receptive_field` gives it for any depth.

Both take ``spatial_dims`` 2 or 3 and a normalisation ``batch`` (the paper), ``instance`` or ``group``
(MONAI's layer factories build the convolutions and norms).
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.layers.factories import Conv, Norm
from torch import nn

NormName = Literal["batch", "instance", "group"]
Upsampling = Literal["transposed", "resize"]


def _norm(kind: NormName, dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return Norm[Norm.BATCH, dims](channels)
    if kind == "instance":
        return Norm[Norm.INSTANCE, dims](channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"norm must be batch, instance or group, found {kind!r}")


def _check(spatial_dims: int, in_channels: int, out_channels: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, found {spatial_dims}")
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"channels must be >= 1, found in={in_channels}, out={out_channels}")


class ResidualBlock(nn.Module):
    """``x + conv-norm-ReLU-dropout-conv-norm(x)`` with 3x3 reflect-padded convolutions."""

    def __init__(self, dims: int, channels: int, norm: NormName, dropout: float):
        super().__init__()
        conv = Conv[Conv.CONV, dims]
        layers: list[nn.Module] = [conv(channels, channels, 3, padding=1, padding_mode="reflect"),
                                   _norm(norm, dims, channels), nn.ReLU(True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [conv(channels, channels, 3, padding=1, padding_mode="reflect"), _norm(norm, dims, channels)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """Mask (and label) maps -> images.

    Args:
        spatial_dims: 2 or 3.
        in_channels: conditioning channels (e.g. one-hot tumour regions, brain mask, label maps).
        out_channels: image channels (sequences).
        features: channels of the first convolution (64 in the paper); the residual blocks run at 4x.
        n_blocks: residual blocks (9 in the paper).
        norm: ``batch`` (paper), ``instance`` or ``group``.
        dropout: dropout in each residual block (0.5 in pix2pix; the noise source, on when sampling too).
        edge_kernel: kernel of the first and last convolutions (7 in the paper; odd; 3 makes a 3D generator ~3x
            cheaper on a CPU, where the two 7^3 convolutions at full resolution dominate).
        upsampling: ``transposed`` (the paper: stride-2 transposed 3x3 convolutions) or ``resize`` (nearest x2,
            then a 3x3 convolution; no checkerboard pattern from uneven kernel overlap).

    Shapes:
        ``(B, in_channels, *S) -> (B, out_channels, *S)`` in ``[-1, 1]``; every side of ``S`` a multiple of 4.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, features: int = 64,
                 n_blocks: int = 9, norm: NormName = "batch", dropout: float = 0.5, edge_kernel: int = 7,
                 upsampling: Upsampling = "transposed"):
        super().__init__()
        _check(spatial_dims, in_channels, out_channels)
        if upsampling not in ("transposed", "resize"):
            raise ValueError(f"upsampling must be transposed or resize, found {upsampling!r}")
        if features < 1 or n_blocks < 0 or not 0 <= dropout < 1 or edge_kernel < 1 or edge_kernel % 2 == 0:
            raise ValueError(f"features >= 1, n_blocks >= 0, dropout in [0, 1) and an odd edge_kernel expected, found "
                             f"{features}, {n_blocks}, {dropout}, {edge_kernel}")
        k, p = edge_kernel, edge_kernel // 2
        d = spatial_dims
        conv, up = Conv[Conv.CONV, d], Conv[Conv.CONVTRANS, d]
        f = features
        layers: list[nn.Module] = [conv(in_channels, f, k, padding=p, padding_mode="reflect"), _norm(norm, d, f),
                                   nn.ReLU(True)]
        for i in range(2):
            layers += [conv(f * 2 ** i, f * 2 ** (i + 1), 3, stride=2, padding=1), _norm(norm, d, f * 2 ** (i + 1)),
                       nn.ReLU(True)]
        layers += [ResidualBlock(d, f * 4, norm, dropout) for _ in range(n_blocks)]
        for i in (2, 1):
            if upsampling == "resize":
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           conv(f * 2 ** i, f * 2 ** (i - 1), 3, padding=1)]
            else:
                layers += [up(f * 2 ** i, f * 2 ** (i - 1), 3, stride=2, padding=1, output_padding=1)]
            layers += [_norm(norm, d, f * 2 ** (i - 1)), nn.ReLU(True)]
        layers += [conv(f, out_channels, k, padding=p, padding_mode="reflect"), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.spatial_dims = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2 or any(s % 4 for s in x.shape[2:]):
            raise ValueError(f"generator input must be (B, C, *S) with {self.spatial_dims} spatial sides that are "
                             f"multiples of 4, found shape {tuple(x.shape)}")
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """(condition, image) -> one real/fake logit per patch.

    Args:
        spatial_dims: 2 or 3.
        in_channels: condition channels + image channels (the two are concatenated).
        features: channels of the first convolution (64 in pix2pix).
        n_layers: stride-2 convolutions after the first (3: 70x70 patches in 2D).
        norm: ``batch``, ``instance`` or ``group``.

    Shapes:
        ``(B, in_channels, *S) -> (B, 1, *P)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, *, features: int = 64, n_layers: int = 3,
                 norm: NormName = "batch"):
        super().__init__()
        _check(spatial_dims, in_channels, 1)
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, found {n_layers}")
        d = spatial_dims
        conv = Conv[Conv.CONV, d]
        layers: list[nn.Module] = [conv(in_channels, features, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            layers += [conv(features * prev, features * mult, 4, stride=2 if n < n_layers else 1, padding=1),
                       _norm(norm, d, features * mult), nn.LeakyReLU(0.2, True)]
        layers.append(conv(features * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        self.n_layers = n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations after each LeakyReLU (the hidden layers; ``n_layers + 1`` maps), for feature matching.

        Shapes:
            ``(B, in_channels, *S) -> [(B, C_l, *P_l)]``.
        """
        out = []
        for layer in self.model:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                out.append(x)
        return out


def receptive_field(n_layers: int) -> int:
    """Side of the input patch one :class:`PatchDiscriminator` logit sees (70 for ``n_layers = 3``)."""
    # kernels 4 throughout; strides 2 for the first n_layers convolutions, then 1, 1
    strides = [2] * n_layers + [1, 1]
    rf, jump = 1, 1
    for s in strides:
        rf += 3 * jump
        jump *= s
    return rf


def sampling_mode(generator: nn.Module) -> nn.Module:
    """Put ``generator`` in evaluation mode with its dropout on (the noise source when sampling)."""
    generator.eval()
    for m in generator.modules():
        if isinstance(m, nn.Dropout):
            m.train()
    return generator


__all__ = ["NormName", "PatchDiscriminator", "ResidualBlock", "ResnetGenerator", "Upsampling", "receptive_field",
           "sampling_mode"]
