"""CATphishing stage 2: a UNet super-resolution module that refines the decoder's output.

Paper 000 ("Methods", Autoencoder): "the decoder was augmented with an SR module based on a standard UNet
architecture. The model was trained in two stages: first, the VAE was trained without the SR module, and
then the decoder was fine-tuned with the SR module using the pre-trained VAE model. The SR module training
leveraged perceptual loss, pixel-wise loss, and SSIM loss."

:class:`SuperResolution` takes the decoder output ``(B, 5, *working_shape)``, resamples it trilinearly to the
case grid ``(B, 5, *shape)`` (a no-op when they are equal) and adds a residual predicted by MONAI's
:class:`~monai.networks.nets.UNet`; the residual head starts at zero, so stage 2 starts from the stage-1
reconstruction and can only improve on it. During stage 2 the encoder is frozen (the diffusion model's
latents do not move) and the decoder and this module are trained together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from synthlearn.models.autoencoder import GENERATOR_CHANNELS


@dataclasses.dataclass(frozen=True)
class SuperResConfig:
    """Stage 2 settings.

    Attributes:
        channels: UNet channels per level (``len(channels) - 1`` down-samplings by 2).
        num_res_units: residual units per UNet block.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).
        ssim_weight: weight of the SSIM loss (MONAI ``SSIMLoss``) over the four sequences.
        perceptual_weight: weight of the perceptual loss; used only when the autoencoder's
            ``perceptual_weights`` path is set.
        epochs: training epochs (0 = no stage 2: the module stays the identity/resampling).
        batch_size: cases (or patches) per step.
        lr: Adam learning rate (decoder and module).
        patch_size: the UNet and the losses see random patches of this size of the resampled decoder output
            (the decoder always decodes the whole latent); None = whole volumes.
    """

    channels: tuple[int, ...] = (8, 16)
    num_res_units: int = 1
    norm_num_groups: int = 4
    ssim_weight: float = 0.5
    perceptual_weight: float = 0.001
    epochs: int = 2
    batch_size: int = 1
    lr: float = 5e-5
    patch_size: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.channels) < 2:
            raise ValueError(f"superres.channels needs at least 2 levels, found {self.channels}")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"superres.norm_num_groups={self.norm_num_groups} must divide every channel count; "
                             f"found channels {self.channels}")
        if self.epochs < 0 or self.batch_size < 1 or self.num_res_units < 0:
            raise ValueError(f"superres: epochs >= 0, batch_size >= 1 and num_res_units >= 0 expected, found "
                             f"{self.epochs}, {self.batch_size}, {self.num_res_units}")
        for name in ("ssim_weight", "perceptual_weight", "lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"superres.{name} must be >= 0, found {getattr(self, name)}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 4):
            raise ValueError(f"superres.patch_size must be 3 sizes >= 4 or absent, found {self.patch_size}")


class SuperResolution(nn.Module):
    """Resample to the case grid, then add a UNet residual.

    Args:
        cfg: stage-2 settings.
        shape: case grid ``(X, Y, Z)``.
        in_channels: channels of the decoder output (5: four sequences + mask).

    Shapes:
        ``forward``: ``(B, C, x, y, z)`` -> ``(B, C, *shape)``; each edge of ``shape`` (and of training
        patches) must be divisible by ``2 ** (len(cfg.channels) - 1)``.
    """

    def __init__(self, cfg: SuperResConfig, shape: Sequence[int], in_channels: int = GENERATOR_CHANNELS):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"shape must be 3 sizes, found {tuple(shape)}")
        from monai.networks.nets import UNet

        self.shape = tuple(int(s) for s in shape)
        self.unet = UNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=cfg.channels[0],
            channels=tuple(cfg.channels),
            strides=(2,) * (len(cfg.channels) - 1),
            num_res_units=cfg.num_res_units,
            norm=("GROUP", {"num_groups": cfg.norm_num_groups}),
        )
        self.head = nn.Conv3d(cfg.channels[0], in_channels, kernel_size=1)
        nn.init.zeros_(self.head.weight)  # start as the identity: stage 2 begins at the stage-1 reconstruction
        nn.init.zeros_(self.head.bias)

    def upsample(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Trilinear resampling to ``size`` (default: the case grid); identity when already there."""
        size = self.shape if size is None else tuple(int(s) for s in size)
        if tuple(x.shape[-3:]) == size:
            return x
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)

    def refine(self, up: torch.Tensor) -> torch.Tensor:
        """The UNet residual step on an already resampled ``(B, C, x, y, z)`` volume or patch. An untrained module
        (``superres.epochs = 0``: its residual head is still exactly zero) is the identity, and the UNet is not run
        outside training (at inference, e.g. sampling, it would cost a UNet pass for nothing)."""
        if not torch.is_grad_enabled() and not (self.head.weight.any() or self.head.bias.any()):
            return up
        return up + self.head(self.unet(up))

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Resample ``x`` to the case grid (or ``size``) and refine it."""
        return self.refine(self.upsample(x, size))
