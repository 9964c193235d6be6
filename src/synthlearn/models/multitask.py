"""The multi-task glioma UNet of Ren et al. (paper 001): one encoder, a segmentation decoder and a classification
branch with one head per marker.

- Encoder: a level of two conv-norm-ReLU layers at each width of ``channels`` (paper: 16-32-64-128), max-pooled by
  2 between levels (``len(channels) - 1`` down-samplings; paper: three).
- Decoder: a transposed convolution (stride 2) per level, concatenated with the encoder's skip, then two
  conv-norm-ReLU layers; a 1x1 convolution gives the segmentation logits (4 contract labels).
- Classification branch: global average pooling of the bottleneck, a shared hidden layer (ReLU, dropout), and one
  linear head per marker (IDH, 1p/19q, MGMT, grade...), each with its own number of classes.

The classification branch (``pool``):

- ``global``: the paper's, above.
- ``tumour``: the bottleneck's global average plus the mean of every decoder level's features weighted by the
  network's own tumour probability (``1 - p(background)`` of its segmentation, detached, averaged down to each
  level's grid, the drawn tumour: voxels where ``p(background) < 0.5``).
- ``voxel`` (our default): a trunk of two conv-norm-ReLU layers on the input sequences and the last decoder level's
  features (detached: the heads do not train the shared encoder-decoder) and a 1x1 convolution per head, giving
  class logits per voxel
  (:meth:`MultiTaskUNet.forward_voxels`); it trains on the tumour voxels of each case with the case's label (the
  voxel classifier of paper 000, :func:`synthlearn.training.trainer.multitask_voxel_loss`), and a case's class
  probabilities are the mean softmax over the voxels of the tumour it draws.

On the phantom the markers live in the tumour's intensities (``PHANTOM.md``) and the tumour fills ~1 % of the volume.
With ``global`` and with ``tumour`` every head of the CPU config (10 epochs, 144 cases) predicted one class for every
training case and the test AUCs stayed at chance (IDH 0.37 and 0.51; docs/benchmarks.md section 24): one label per
case through a pooled vector is too weak a signal for that budget, while a label on every tumour voxel is the signal
that lets the voxel classifier reach 0.95.

The blocks are MONAI's ``Convolution`` (conv + norm + activation, also transposed). GroupNorm rather than the
paper's batch norm: a FedAvg site averages no running statistics and a batch of one trains as any other.

:meth:`MultiTaskUNet.forward` returns the segmentation logits only, so every segmentation tool (label maps, Dice
checks) applies unchanged; :meth:`MultiTaskUNet.forward_all` adds the heads' logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: the classification branches (``pool``)
POOLS = ("global", "tumour", "voxel")


def _conv(spatial_dims: int, cin: int, cout: int, groups: int, *, kernel: int = 3, strides: int = 1,
          transposed: bool = False) -> nn.Module:
    from monai.networks.blocks import Convolution

    return Convolution(spatial_dims, cin, cout, strides=strides, kernel_size=kernel, act="RELU",
                       norm=("GROUP", {"num_groups": min(groups, cout)}), is_transposed=transposed,
                       padding=None if not transposed else 0, output_padding=0 if transposed else None)


class MultiTaskUNet(nn.Module):
    """Segmentation UNet with a classification branch from its bottleneck (Ren et al.).

    Args:
        spatial_dims: 3 (volumes) or 2 (a 2D study).
        in_channels: input sequences.
        seg_classes: segmentation labels (4: background, necrosis / core, oedema, enhancing).
        head_classes: classes of each classification head, in head order (e.g. ``(2, 2, 2, 3)`` for IDH, 1p/19q,
            MGMT, grade); empty = segmentation only.
        channels: width per encoder level; spatial sizes must be divisible by ``2 ** (len(channels) - 1)``.
        norm_num_groups: GroupNorm groups (capped at a layer's width).
        hidden: width of the classification branch's shared layer.
        dropout: dropout before the heads.
        pool: ``global`` (the bottleneck's global average, the paper), ``tumour`` (plus every decoder level's
            tumour-weighted mean) or ``voxel`` (per-voxel heads averaged over the drawn tumour); module docstring.

    Shapes:
        input ``(B, in_channels, *S)`` -> segmentation logits ``(B, seg_classes, *S)`` and, from
        :meth:`forward_all`, a list of ``(B, head_classes[h])`` logits.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 4, seg_classes: int = 4,
                 head_classes: Sequence[int] = (), channels: Sequence[int] = (16, 32, 64, 128),
                 norm_num_groups: int = 8, hidden: int = 64, dropout: float = 0.0, pool: str = "voxel"):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, found {spatial_dims}")
        if len(channels) < 2 or any(c < 1 for c in channels):
            raise ValueError(f"channels must give at least two positive widths, found {channels}")
        if in_channels < 1 or seg_classes < 2 or any(int(k) < 2 for k in head_classes):
            raise ValueError(f"need in_channels >= 1, seg_classes >= 2 and heads of >= 2 classes; found "
                             f"{in_channels}, {seg_classes}, {list(head_classes)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), found {dropout}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, found {pool!r}")
        self.pool_mode = pool
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.head_classes = tuple(int(k) for k in head_classes)
        g = norm_num_groups
        self.encoder = nn.ModuleList()
        prev = in_channels
        for width in channels:
            self.encoder.append(nn.Sequential(_conv(spatial_dims, prev, width, g),
                                              _conv(spatial_dims, width, width, g)))
            prev = width
        self.pool = (nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d)(2)
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(channels[:-1]):
            self.upsample.append(_conv(spatial_dims, prev, width, g, kernel=2, strides=2, transposed=True))
            self.decoder.append(nn.Sequential(_conv(spatial_dims, 2 * width, width, g),
                                              _conv(spatial_dims, width, width, g)))
            prev = width
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.seg_head = conv(prev, seg_classes, kernel_size=1)
        if pool == "voxel":  # a trunk of their own on the input and the last decoder level, a 1x1 conv per head
            self.branch = nn.Sequential(_conv(spatial_dims, prev + in_channels, prev, g),
                                        _conv(spatial_dims, prev, prev, g))
            self.heads = nn.ModuleList(nn.Sequential(nn.Dropout(dropout), conv(prev, k, kernel_size=1))
                                       for k in self.head_classes)
        else:
            branch_in = channels[-1] + (sum(channels[:-1]) if pool == "tumour" else 0)
            self.branch = nn.Sequential(nn.Linear(branch_in, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
            self.heads = nn.ModuleList(nn.Linear(hidden, k) for k in self.head_classes)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def voxel_heads(self) -> bool:
        """The heads classify every voxel (``pool = "voxel"``): train them with :meth:`forward_voxels`."""
        return self.pool_mode == "voxel"

    def _tumour_weight(self, seg: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *S)`` the tumour the network draws: 1 where ``p(background) < 0.5``, else 0 (detached); a case
        where it draws none gets its soft tumour probability ``1 - p(background)`` instead. (The soft probability
        everywhere would let the ~99 % of background voxels, each with a small weight, outweigh the tumour.)"""
        p = 1.0 - torch.softmax(seg.detach().float(), dim=1)[:, :1]
        hard = (p > 0.5).float()
        drawn = hard.flatten(1).sum(1) > 0
        return torch.where(drawn.view(-1, *([1] * (p.ndim - 1))), hard, p)

    def forward_voxels(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``pool = "voxel"``: ``(B, C, *S)`` -> (segmentation logits ``(B, seg_classes, *S)``, per head voxel logits
        ``(B, K_h, *S)``)."""
        if not self.voxel_heads:
            raise ValueError(f"forward_voxels needs pool = 'voxel', this network pools {self.pool_mode!r}")
        seg, features = self._decode(x)
        trunk = self.branch(torch.cat([features.detach(), x], dim=1))
        return seg, [head(trunk) for head in self.heads]

    def _decode(self, x: torch.Tensor, levels: list | None = None, pooled: list | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"input must be {self.spatial_dims + 2}D (B, C, *spatial), but it is {x.ndim}D")
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"spatial sizes must be divisible by {self.divisor}, found {tuple(x.shape[2:])}")
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        if pooled is not None:
            pooled.append(x.flatten(2).mean(-1))
        for up, block, skip in zip(self.upsample, self.decoder, reversed(skips[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
            if levels is not None:
                levels.append(x)
        return self.seg_head(x), x

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(B, C, *S)`` -> (segmentation logits ``(B, seg_classes, *S)``, per head ``(B, K_h)`` logits; for
        ``pool = "voxel"`` the log of the tumour-weighted mean voxel softmax, so that their softmax is the case's
        class probabilities)."""
        if self.voxel_heads:
            seg, voxels = self.forward_voxels(x)
            w = self._tumour_weight(seg)
            cases = []
            for v in voxels:
                p = (torch.softmax(v.float(), dim=1) * w).flatten(2).sum(-1) / w.flatten(2).sum(-1).clamp_min(1e-6)
                cases.append(torch.log(p.clamp_min(1e-8)))
            return seg, cases
        levels: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        seg, x = self._decode(x, levels, pooled)
        if self.pool_mode == "tumour":
            weight = self._tumour_weight(seg).to(x.dtype)  # (B, 1, *S)
            for feat in levels:
                w = weight
                while w.shape[2:] != feat.shape[2:]:
                    w = F.avg_pool3d(w, 2) if self.spatial_dims == 3 else F.avg_pool2d(w, 2)
                pooled.append((feat * w).flatten(2).sum(-1) / w.flatten(2).sum(-1).clamp_min(1e-3))
        features = self.branch(torch.cat(pooled, dim=1))
        return seg, [head(features) for head in self.heads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> segmentation logits ``(B, seg_classes, *S)``."""
        return self._decode(x)[0]


__all__ = ["POOLS", "MultiTaskUNet"]
