"""A class-conditional pixel-space refiner of the decoded tumour (the fidelity issue's design (a)).

At the demo's 16^3 latent the autoencoder keeps the tumour's size and the classes' order but not the tumour's
fine appearance (the wildtype's thin enhancing ring, the contrast to the brain around it; docs/benchmarks.md,
section 21): a task model trained on its reconstructions of real members reaches ~0.90 AUC against 0.95 for the
members themselves. The refiner is a second, small diffusion model in *pixel* space, in the manner of cascaded
diffusion (Ho et al. 2022, "Cascaded diffusion models for high fidelity image generation"): on a crop of the case
around the decoded tumour it draws the residual ``real - decoded`` given the decoded crop and the class, and the
crop is pasted back.

- **What it learns from**: each member case, its autoencoder reconstruction (posterior mean, decoded; both the
  case and its mirror image when the generator flips), the crop of ``crop`` voxels centred on the reconstruction's
  tumour (:func:`tumour_corners`, jittered by up to ``jitter`` voxels while training). The target is the residual
  of the real crop over the decoded one, scaled to unit spread (the factor is a buffer of the network, so it ships
  with the weights).
- **Conditioning augmentation** (Ho et al. 2022, Sec. 3.2): the decoded crop the network sees is blurred
  (Gaussian, up to ``condition_blur`` voxels) and noised (up to ``condition_noise`` SD) by a random level ``u`` in
  [0, 1], and ``u`` is a constant input channel; at sampling the level is ``sample_level``. Trained on
  reconstructions, the refiner then meets decoded *samples*, which are further from real cases.
- **The network**: MONAI's :class:`~monai.networks.nets.DiffusionModelUNet` without attention, input the noisy
  residual, the decoded crop and the level (``2C + 1`` channels), the class through the timestep embedding
  (``num_class_embeds``). DDPM training with velocity prediction; DDIM sampling with ``steps`` steps.

Shapes: a case is ``(B, C, X, Y, Z)`` with ``C`` the generator's channels (4 sequences + tumour mask (+ brain
mask)); a crop ``(B, C, *crop)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from synthlearn.models.autoencoder import MASK_CHANNEL


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    """The refiner's network, training and sampling settings.

    Attributes:
        epochs: passes over the site's (case, mirror) crops; 0 = no refiner (the decoded case is the sample).
        crop: the refined crop, voxels of the case grid (centred on the decoded tumour, clipped to the case). Equal
            to the case grid, the whole case is refined.
        jitter: training crops move by up to this many voxels per axis around the tumour's centre.
        channels: UNet channels per level (``len(channels) - 1`` down-samplings by 2).
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).
        batch_size: crops per step.
        lr: AdamW learning rate.
        num_train_timesteps, schedule, beta_start, beta_end, prediction_type: the DDPM noise schedule
            (:func:`synthlearn.models.diffusion.build_scheduler`); pixel space uses the linear schedule of Ho et
            al. 2020 (the latent model's ``scaled_linear_beta`` leaves too much signal at its last step here).
        condition_blur: Gaussian blur SD (voxels) of the decoded crop at augmentation level 1.
        condition_noise: noise SD (generator intensity scale, brain 0.2-1.0) of the decoded crop at level 1.
        sample_level: augmentation level applied to the decoded crop at sampling (0 = as decoded).
        steps: DDIM steps at sampling.
        taper: voxels over which the pasted residual fades to 0 at a crop face inside the case (no seam).
    """

    epochs: int = 0
    crop: tuple[int, int, int] = (16, 16, 16)
    jitter: int = 2
    channels: tuple[int, ...] = (32, 64)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    num_train_timesteps: int = 1000
    schedule: Literal["linear_beta", "scaled_linear_beta", "cosine"] = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    condition_blur: float = 1.0
    condition_noise: float = 0.1
    sample_level: float = 0.0
    steps: int = 10
    taper: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.steps < 1:
            raise ValueError(f"refiner: epochs >= 0, batch_size >= 1, lr > 0 and steps >= 1 expected, found "
                             f"{self.epochs}, {self.batch_size}, {self.lr}, {self.steps}")
        if len(self.crop) != 3 or any(c < 4 for c in self.crop):
            raise ValueError(f"refiner.crop must be three sizes >= 4 voxels, found {list(self.crop)}")
        if len(self.channels) < 2:
            raise ValueError(f"refiner.channels needs at least 2 levels, found {list(self.channels)}")
        f = 2 ** (len(self.channels) - 1)
        if any(c % f for c in self.crop):
            raise ValueError(f"refiner.crop {list(self.crop)} must be divisible by 2**(len(refiner.channels)-1) = {f}")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"refiner.norm_num_groups={self.norm_num_groups} must divide every channel count; "
                             f"found channels {list(self.channels)}")
        if self.jitter < 0 or self.taper < 0 or self.condition_blur < 0 or self.condition_noise < 0:
            raise ValueError(f"refiner: jitter, taper, condition_blur and condition_noise must be >= 0, found "
                             f"{self.jitter}, {self.taper}, {self.condition_blur}, {self.condition_noise}")
        if not 0.0 <= self.sample_level <= 1.0:
            raise ValueError(f"refiner.sample_level must be in [0, 1], found {self.sample_level}")
        if self.num_train_timesteps < 2 or not self.steps <= self.num_train_timesteps:
            raise ValueError(f"refiner: num_train_timesteps >= 2 and steps <= num_train_timesteps expected, found "
                             f"{self.num_train_timesteps}, {self.steps}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"refiner.prediction_type must be epsilon or v_prediction, found {self.prediction_type!r}")
        if self.schedule not in ("linear_beta", "scaled_linear_beta", "cosine"):
            raise ValueError(f"refiner.schedule must be linear_beta, scaled_linear_beta or cosine, found "
                             f"{self.schedule!r}")


class TumourRefiner(nn.Module):
    """The refiner's denoising network.

    Args:
        cfg: settings.
        channels: channels of a generator tensor ``C``.
        num_classes: classes; index ``num_classes`` is reserved (unknown class).

    Shapes:
        ``forward(noisy, timesteps, condition, level, class_index)``: ``noisy`` ``(B, C, *crop)`` (the noised,
        scaled residual), ``timesteps`` ``(B,)`` long, ``condition`` ``(B, C, *crop)`` (the augmented decoded crop),
        ``level`` ``(B,)`` in [0, 1], ``class_index`` ``(B,)`` long -> ``(B, C, *crop)``.
    """

    def __init__(self, cfg: RefinerConfig, channels: int, num_classes: int):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        levels = len(cfg.channels)
        self.num_classes = num_classes
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=2 * channels + 1, out_channels=channels, channels=tuple(cfg.channels),
            attention_levels=(False,) * levels, num_res_blocks=(cfg.num_res_blocks,) * levels,
            norm_num_groups=cfg.norm_num_groups, num_class_embeds=num_classes + 1)
        #: 1 / SD of the training residuals ``real - decoded`` in the crops (set by training; ships with the weights)
        self.register_buffer("residual_scale", torch.ones(()))

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor, level: torch.Tensor,
                class_index: torch.Tensor) -> torch.Tensor:
        lv = level.to(noisy.dtype).view(-1, 1, 1, 1, 1).expand(-1, 1, *noisy.shape[2:])
        x = torch.cat([noisy, condition.to(noisy.dtype), lv], dim=1)
        return self.unet(x, timesteps=timesteps, class_labels=class_index.long())


def tumour_corners(cases: torch.Tensor, crop: tuple[int, int, int], jitter: int = 0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Corner ``(B, 3)`` (long) of the ``crop`` around each case's tumour, clipped to the case.

    The centre is the centroid of the mask channel above 0.5; with no such voxel, of the mask channel's positive
    values; with none, the case's centre. ``jitter`` > 0 moves each centre by a uniform integer in
    ``[-jitter, jitter]`` per axis (drawn from ``generator``).

    Args:
        cases: ``(B, C, X, Y, Z)`` with the tumour mask in channel 4.
    """
    shape = torch.tensor(cases.shape[-3:])
    size = torch.tensor(crop)
    if (size > shape).any():
        raise ValueError(f"refiner.crop {list(crop)} is larger than the case grid {list(cases.shape[-3:])}")
    mask = cases[:, MASK_CHANNEL].detach().float().cpu()
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in cases.shape[-3:]], indexing="ij")
    corners = []
    for m in mask:
        w = (m > 0.5).float()
        if w.sum() == 0:
            w = m.clamp(min=0)
        if w.sum() > 0:
            centre = torch.stack([(g * w).sum() / w.sum() for g in grids])
        else:
            centre = (shape.float() - 1) / 2
        corners.append(torch.round(centre - (size.float() - 1) / 2))
    out = torch.stack(corners).long()
    if jitter:
        out = out + torch.randint(-jitter, jitter + 1, out.shape, generator=generator)
    return torch.minimum(torch.clamp(out, min=0), shape - size)


def take_crops(cases: torch.Tensor, corners: torch.Tensor, crop: tuple[int, int, int]) -> torch.Tensor:
    """``(B, C, *crop)``: each case's crop at its corner (:func:`tumour_corners`)."""
    px, py, pz = crop
    return torch.stack([c[:, x : x + px, y : y + py, z : z + pz]
                        for c, (x, y, z) in zip(cases, corners.tolist())])


def paste_residuals(cases: torch.Tensor, residuals: torch.Tensor, corners: torch.Tensor, taper: int) -> torch.Tensor:
    """``cases`` with each crop's residual ``(B, C, *crop)`` added at its corner, faded to 0 over ``taper`` voxels
    at every crop face that lies inside the case (none at the case's own faces)."""
    out = cases.clone()
    crop = tuple(residuals.shape[-3:])
    for i, corner in enumerate(corners.tolist()):
        weights = []
        for axis, (start, size) in enumerate(zip(corner, crop)):
            w = torch.ones(size, dtype=residuals.dtype, device=residuals.device)
            if taper:
                ramp = torch.arange(1, taper + 1, dtype=residuals.dtype, device=residuals.device) / (taper + 1)
                n = min(taper, size // 2)
                if start > 0:
                    w[:n] = ramp[:n]
                if start + size < cases.shape[2 + axis]:
                    w[size - n:] = torch.minimum(w[size - n:], ramp[:n].flip(0))
            weights.append(w)
        window = weights[0][:, None, None] * weights[1][None, :, None] * weights[2][None, None, :]
        x, y, z = corner
        out[i, :, x : x + crop[0], y : y + crop[1], z : z + crop[2]] += residuals[i] * window
    return out


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable 3D Gaussian blur of ``(B, C, X, Y, Z)`` with one SD per item ``(B,)`` (voxels; 0 = none)."""
    smax = float(sigma.max()) if sigma.numel() else 0.0
    if smax <= 0:
        return x
    radius = max(1, math.ceil(3 * smax))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    out = []
    for xi, si in zip(x, sigma.tolist()):
        if si <= 0:
            out.append(xi)
            continue
        k = torch.exp(-0.5 * (offsets / si) ** 2)
        k = k / k.sum()
        v = xi[:, None]  # (C, 1, X, Y, Z): each channel on its own
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = len(k)
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
            v = F.conv3d(F.pad(v, pad, mode="replicate"), k.view(shape))
        out.append(v[:, 0])
    return torch.stack(out)


def augment_condition(crops: torch.Tensor, level: torch.Tensor, cfg: RefinerConfig,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The decoded crops ``(B, C, *crop)`` blurred by ``level * condition_blur`` voxels and noised with SD
    ``level * condition_noise`` (``level`` ``(B,)`` in [0, 1]; the noise drawn from ``generator``)."""
    out = _gaussian_blur(crops, level * cfg.condition_blur)
    if cfg.condition_noise > 0:
        noise = torch.randn(crops.shape, generator=generator).to(crops.device, crops.dtype)
        out = out + noise * (level * cfg.condition_noise).view(-1, 1, 1, 1, 1).to(crops.dtype)
    return out


__all__ = ["RefinerConfig", "TumourRefiner", "augment_condition", "paste_residuals", "take_crops", "tumour_corners"]
