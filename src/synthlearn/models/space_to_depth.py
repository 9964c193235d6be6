"""A loss-free "autoencoder": 3D space-to-depth (pixel unshuffle) and its inverse.

The fidelity issue's design (b): diffusion without a learned autoencoder. A case ``(B, C, X, Y, Z)`` is
rearranged, without loss, into ``(B, C * f^3, X / f, Y / f, Z / f)``: every ``f x f x f`` block of voxels becomes
``f^3`` channels at one latent position (for the demo's 5 x 32^3 case and ``f = 2``: 40 x 16^3, the paper's
physical latent scale). The diffusion model then works on a grid as coarse as a latent's, but nothing is lost
between the case and that grid: no decoder has to redraw the brain's edge, its texture or a thin enhancing rim
(what the 16^3 KL autoencoder got wrong on the default phantom; docs/benchmarks.md, section 21).

:class:`SpaceToDepth` has the interface of MONAI's ``AutoencoderKL`` that the generator uses (``encode`` returns
a posterior mean and standard deviation, here the rearranged case and zeros; ``decode``), and no parameters,
so its state dict is empty and an artifact ships an empty ``autoencoder.safetensors``.
"""

from __future__ import annotations

import torch
from torch import nn


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``(B, C, X, Y, Z)`` -> ``(B, C * f^3, X / f, Y / f, Z / f)``; channel ``c * f^3 + (i * f + j) * f + k``
    holds voxel offset ``(i, j, k)`` of channel ``c``.

    Raises:
        ValueError: ``x`` is not 5-D or a spatial size is not divisible by ``factor``.
    """
    if x.dim() != 5:
        raise ValueError(f"space_to_depth expects (B, C, X, Y, Z), found shape {tuple(x.shape)}")
    b, c, *sizes = x.shape
    f = int(factor)
    if any(s % f for s in sizes):
        raise ValueError(f"space_to_depth: spatial shape {tuple(sizes)} is not divisible by {f}")
    gx, gy, gz = (s // f for s in sizes)
    y = x.reshape(b, c, gx, f, gy, f, gz, f).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return y.reshape(b, c * f ** 3, gx, gy, gz)


def depth_to_space(z: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse of :func:`space_to_depth`: ``(B, C * f^3, x, y, z)`` -> ``(B, C, x f, y f, z f)``.

    Raises:
        ValueError: ``z`` is not 5-D or its channels are not a multiple of ``factor ** 3``.
    """
    f = int(factor)
    if z.dim() != 5 or z.shape[1] % f ** 3:
        raise ValueError(f"depth_to_space expects (B, C * {f ** 3}, x, y, z), found shape {tuple(z.shape)}")
    b, cf, gx, gy, gz = z.shape
    c = cf // f ** 3
    y = z.reshape(b, c, f, f, f, gx, gy, gz).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return y.reshape(b, c, gx * f, gy * f, gz * f)


class SpaceToDepth(nn.Module):
    """:func:`space_to_depth` as an autoencoder without parameters.

    Shapes (C = ``in_channels``, f = ``factor``):
        ``encode``: ``(B, C, X, Y, Z)`` -> ``mu, sigma`` each ``(B, C f^3, X / f, Y / f, Z / f)`` (sigma is 0);
        ``decode``: ``(B, C f^3, x, y, z)`` -> ``(B, C, x f, y f, z f)``.
    """

    def __init__(self, in_channels: int, factor: int):
        super().__init__()
        if in_channels < 1 or factor < 1:
            raise ValueError(f"SpaceToDepth needs in_channels >= 1 and factor >= 1, found {in_channels}, {factor}")
        self.in_channels = int(in_channels)
        self.factor = int(factor)

    @property
    def latent_channels(self) -> int:
        return self.in_channels * self.factor ** 3

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"SpaceToDepth expects {self.in_channels} channels, found shape {tuple(x.shape)}")
        mu = space_to_depth(x, self.factor)
        return mu, torch.zeros_like(mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] != self.latent_channels:
            raise ValueError(f"SpaceToDepth decodes {self.latent_channels} channels, found shape {tuple(z.shape)}")
        return depth_to_space(z, self.factor)
