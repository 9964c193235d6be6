"""Voxel-wise classification UNet: CATphishing's task model (paper 000, "Methods", Supplementary Note 1).

A UNet whose encoder and decoder are built from residual blocks (He et al. 2016), with an optional Mamba
block (Gu & Dao 2023) at the deepest encoder level. It maps four MRI sequences to per-voxel class logits:
in training every tumour voxel carries its case's class (background ignored), and a case's probability
is the mean softmax over its tumour voxels (:func:`case_probabilities`).

The building blocks are MONAI's (``UnetResBlock``, ``get_conv_layer``, ``UnetOutBlock``) with GroupNorm,
so the network also runs under Opacus and at batch size 1. The Mamba block uses ``mambapy`` (pure
PyTorch); where CUDA and ``mamba_ssm`` are present, mambapy's ``use_cuda`` path calls its fused kernel.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


def _mamba_cuda_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:  # pragma: no cover - needs CUDA
        import mamba_ssm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "use the pure PyTorch scan"
        return False
    return True  # pragma: no cover


class MambaBlock3d(nn.Module):
    """A Mamba sequence model over the voxels of a feature map (3D, or 2D), added as a residual.

    The feature map ``(B, C, X, Y, Z)`` (or ``(B, C, X, Y)``) is read as a sequence of ``X*Y*Z`` tokens of width ``C``
    (raster order), normalised (LayerNorm), passed through ``n_layers`` Mamba layers and added back.

    Args:
        channels: token width ``C``.
        n_layers: number of Mamba layers.
        d_state: state size of the selective scan (Mamba's N).
        use_cuda: use the fused ``mamba_ssm`` kernel (only with CUDA); None = when available.
    """

    def __init__(self, channels: int, n_layers: int = 1, d_state: int = 16, use_cuda: bool | None = None):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, found {channels}")
        if n_layers < 1:
            raise ValueError(f"mamba n_layers must be >= 1, found {n_layers}")
        if d_state < 1:
            raise ValueError(f"mamba d_state must be >= 1, found {d_state}")
        from mambapy.mamba import Mamba, MambaConfig

        if use_cuda is None:
            use_cuda = _mamba_cuda_available()
        self.norm = nn.LayerNorm(channels)
        self.mamba = Mamba(MambaConfig(d_model=channels, n_layers=n_layers, d_state=d_state, use_cuda=use_cuda))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` -> ``(B, C, X, Y, Z)``."""
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        tokens = x.flatten(2).transpose(1, 2)  # (B, L, C)
        out = self.mamba(self.norm(tokens))
        return x + out.transpose(1, 2).reshape(b, c, *spatial)


class VoxelClassifierUNet(nn.Module):
    """Residual UNet with per-voxel class logits, optional Mamba in the encoder.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (4 MRI sequences).
        out_channels: number of classes.
        channels: feature width per level, e.g. ``(16, 32, 64, 128)``; the input is downsampled
            ``len(channels) - 1`` times by 2, so spatial sizes must be divisible by ``2**(len(channels)-1)``.
        norm_num_groups: GroupNorm groups (every width in ``channels`` must be divisible by it).
        mamba: add a :class:`MambaBlock3d` at the deepest encoder level.
        mamba_layers: Mamba layers in that block.
        mamba_d_state: Mamba state size.
        dropout: dropout probability inside the residual blocks.

    Shapes:
        input ``(B, in_channels, X, Y, Z)`` -> logits ``(B, out_channels, X, Y, Z)``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        norm_num_groups: int = 8,
        mamba: bool = False,
        mamba_layers: int = 1,
        mamba_d_state: int = 16,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, found {spatial_dims}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, found {in_channels}")
        if out_channels < 2:
            raise ValueError(f"out_channels must be >= 2 (number of classes), found {out_channels}")
        if len(channels) < 2:
            raise ValueError(f"channels must list at least 2 levels, found {channels}")
        if any(c < 1 for c in channels):
            raise ValueError(f"channels must be positive, found {channels}")
        if norm_num_groups < 1 or any(c % norm_num_groups for c in channels):
            raise ValueError(
                f"every width in channels {channels} must be divisible by norm_num_groups={norm_num_groups}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), found {dropout}")
        from monai.networks.blocks import UnetOutBlock, UnetResBlock
        from monai.networks.blocks.dynunet_block import get_conv_layer

        self.spatial_dims = spatial_dims
        self.channels = channels
        norm = ("group", {"num_groups": norm_num_groups})
        drop = dropout if dropout > 0 else None
        self.encoder = nn.ModuleList()
        prev = in_channels
        for level, width in enumerate(channels):
            self.encoder.append(UnetResBlock(spatial_dims, prev, width, kernel_size=3, stride=1 if level == 0 else 2,
                                             norm_name=norm, dropout=drop))
            prev = width
        self.mamba = (MambaBlock3d(channels[-1], n_layers=mamba_layers, d_state=mamba_d_state)
                      if mamba else None)
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(channels) - 1, 0, -1):
            hi, lo = channels[level], channels[level - 1]
            self.upsample.append(get_conv_layer(spatial_dims, hi, lo, kernel_size=2, stride=2, conv_only=True,
                                                is_transposed=True))
            self.decoder.append(UnetResBlock(spatial_dims, 2 * lo, lo, kernel_size=3, stride=1, norm_name=norm,
                                             dropout=drop))
        self.head = UnetOutBlock(spatial_dims, channels[0], out_channels)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *spatial)`` -> per-voxel logits ``(B, out_channels, *spatial)``."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"input must be {self.spatial_dims + 2}D (B, C, *spatial), but it is {x.ndim}D")
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"spatial sizes must be divisible by {self.divisor}, found {tuple(x.shape[2:])}")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        if self.mamba is not None:
            x = self.mamba(x)
        for up, block, skip in zip(self.upsample, self.decoder, reversed(skips[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def case_probabilities(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Case-level class probabilities: the mean softmax over the voxels in ``mask`` (paper 000).

    Args:
        logits: ``(B, K, *spatial)`` per-voxel logits.
        mask: ``(B, *spatial)`` bool, the tumour (seg > 0). A case with an empty mask falls back to all
            voxels of the case (logged as a warning).

    Returns:
        ``(B, K)`` probabilities (rows sum to 1).
    """
    if logits.ndim != mask.ndim + 1 or logits.shape[0] != mask.shape[0] or logits.shape[2:] != mask.shape[1:]:
        raise ValueError(f"logits (B, K, *S) and mask (B, *S) disagree: {tuple(logits.shape)} vs {tuple(mask.shape)}")
    probs = torch.softmax(logits.float(), dim=1)
    mask = mask.bool()
    empty = ~mask.flatten(1).any(dim=1)
    if empty.any():
        log.warning("%d case(s) without tumour voxels: their probability is the mean over all voxels",
                    int(empty.sum()))
        mask = mask | empty.view(-1, *([1] * (mask.ndim - 1)))
    weights = mask.unsqueeze(1).float()
    return (probs * weights).flatten(2).sum(-1) / weights.flatten(2).sum(-1)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Settings of :class:`VoxelClassifierUNet` (the ``[model]`` table of a study config).

    Attributes:
        channels: feature width per level; ``len(channels) - 1`` downsamplings by 2.
        norm_num_groups: GroupNorm groups.
        mamba: Mamba block at the deepest encoder level (paper 000).
        mamba_layers: Mamba layers in that block.
        mamba_d_state: Mamba state size.
        dropout: dropout probability in the residual blocks.
        multitask_pool: the multi-task UNet's classification branch (task ``multitask`` only): ``voxel`` (per-voxel
            heads trained on the tumour voxels, averaged over the drawn tumour), ``tumour`` (the bottleneck's global
            average plus every decoder level's tumour-weighted mean) or ``global`` (the bottleneck's alone, Ren et
            al.) (:class:`synthlearn.models.multitask.MultiTaskUNet`).
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    norm_num_groups: int = 8
    mamba: bool = True
    mamba_layers: int = 1
    mamba_d_state: int = 16
    dropout: float = 0.0
    multitask_pool: str = "voxel"

    def __post_init__(self) -> None:
        if self.multitask_pool not in ("global", "tumour", "voxel"):
            raise ValueError(f"model.multitask_pool must be voxel, tumour or global, found {self.multitask_pool!r}")


def build_classifier(cfg: ClassifierConfig, *, out_channels: int, in_channels: int = 4,
                     spatial_dims: int = 3) -> VoxelClassifierUNet:
    """A :class:`VoxelClassifierUNet` from its config (``out_channels`` = number of classes; ``spatial_dims`` 3, or 2
    for a 2D study)."""
    return VoxelClassifierUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                               channels=cfg.channels, norm_num_groups=cfg.norm_num_groups, mamba=cfg.mamba,
                               mamba_layers=cfg.mamba_layers, mamba_d_state=cfg.mamba_d_state,
                               dropout=cfg.dropout)
