"""CATphishing's class-conditional 3D latent diffusion UNet.

Paper 000 ("Methods", Diffusion model): a 3D denoising UNet in the autoencoder's latent space, conditioned
through cross-attention on the class (IDH status, or the tumour type), with more down-sampling levels and a
larger base width than the 2D LDM (Rombach et al. 2022).

:class:`ClassConditionedUNet` is MONAI's :class:`~monai.networks.nets.DiffusionModelUNet` (3D,
``with_conditioning=True``) whose cross-attention context is one token: a learned embedding of the class.
The embedding table has one extra row, the **null class**, used for unconditional predictions: training
replaces the class by the null class with probability ``label_dropout`` (and always for cases whose label
is unknown), which gives classifier-free guidance at sampling time (Ho & Salimans 2022):
``eps = eps(x, null) + g * (eps(x, c) - eps(x, null))`` (the same for a v-prediction). Training is DDPM
(Ho et al. 2020): at a uniformly drawn timestep, predict the added noise (``epsilon``) or the velocity
(``v_prediction``, the default; Salimans & Ho 2022), MSE loss. Latents are brought to unit scale first: by default one
factor ``1 / std(z)`` (Rombach et al. 2022, Sec. 4.3.2), or per channel (``latent_scaling``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Diffusion UNet, noise schedule and training settings.

    Attributes:
        channels: UNet channels per level (``len(channels) - 1`` down-samplings).
        attention_levels: self- and cross-attention per level (None = all but the first level).
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).
        cross_attention_dim: width of the class embedding token.
        transformer_num_layers: transformer layers per attention block.
        num_train_timesteps: DDPM timesteps T.
        schedule: MONAI beta schedule (``scaled_linear_beta``, ``linear_beta``, ``cosine``).
        beta_start, beta_end: schedule ends (MONAI's LDM tutorials: 0.0015, 0.0195).
        prediction_type: what the UNet predicts: ``epsilon`` (the noise; Ho et al. 2020) or ``v_prediction``
            (``v = sqrt(a) eps - sqrt(1 - a) x0``; Salimans & Ho 2022). With the LDM schedule ``a`` is ~1e-4 at
            the last timestep, so an epsilon error there is amplified ~80x in DDIM's first x0 estimate; with
            few training steps (CPU budgets) DDIM samples from an epsilon model came out at 3x the latent
            scale while v-prediction kept it.
        class_in_timestep: also add a learned class embedding to the timestep embedding (MONAI's
            ``num_class_embeds``), so that the class reaches every residual block and not only the attention
            levels (Dhariwal & Nichol 2021 condition this way). With one context token the cross-attention
            output is the same vector at every position (softmax over one key is 1): a class bias at the
            attention levels only. On the demo's CPU budget the number of training steps mattered more than
            this option (docs/benchmarks.md); artifacts written before it existed load with it off. The null
            class has its own row, so classifier-free guidance works the same.
        label_dropout: probability of training a case as the null class (classifier-free guidance).
        epochs: passes over the site's latents.
        batch_size: latents per step.
        lr: AdamW learning rate.
        ema_decay: exponential moving average of the weights that the artifact ships (0 = no EMA).
        tumour_weight: weight, in the training loss, of the latent positions the tumour covers (the whole-tumour
            mask average-pooled to the latent grid, > 0) relative to the rest (1 = plain mean squared error).
            The tumour covers a few of the 512 positions of an 8^3 latent; the class lives there.
        tumour_weighting: how ``tumour_weight`` spreads over a case's latent positions
            (:func:`synthlearn.generators.ldm.stages.latent_tumour_map`): ``touched``: every position the tumour
            touches gets the full weight, so a large tumour weighs more than a small one (on the default phantom
            the wildtype tumours got 2.3x the mutant ones' extra weight); ``case``: the same positions scaled so
            that every case's tumour carries the same total extra weight. ``case`` was measured worse on the
            default phantom: a real-data model recognised the samples of one draw at AUC 0.76 against 0.90
            (docs/benchmarks.md, section 21), so ``touched`` stays the default.
        latent_scaling: how latents are brought to unit scale before diffusion: ``global``: one factor
            ``1 / std(z)`` (Rombach et al. 2022, Sec. 4.3.2); ``channel``: per channel, ``(z - mean_c) / std_c``.
            With the KL weight at 1e-8 the channels keep their own spreads (0.4-2.1 on the demo's sites; the
            manifest records each channel's mean and SD), but ``global`` keeps the autoencoder's own metric, in
            which the loss weighs every channel's error as the decoder feels it; ``channel`` gives a low-spread
            channel's error as much weight as the widest's. Measured on the same autoencoders, ``channel`` lowered
            the samples' recognition AUC from 0.90 to 0.82 (section 21), so ``global`` stays the default.
            Sampling undoes whichever the artifact records.
    """

    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] | None = None
    num_res_blocks: int = 1
    num_head_channels: int = 16
    norm_num_groups: int = 8
    cross_attention_dim: int = 32
    transformer_num_layers: int = 1
    num_train_timesteps: int = 1000
    schedule: Literal["scaled_linear_beta", "linear_beta", "cosine"] = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    class_in_timestep: bool = True
    label_dropout: float = 0.15
    epochs: int = 100
    batch_size: int = 4
    lr: float = 2e-4
    ema_decay: float = 0.0
    tumour_weight: float = 1.0
    tumour_weighting: Literal["touched", "case"] = "touched"
    latent_scaling: Literal["global", "channel"] = "global"

    def __post_init__(self) -> None:
        if self.tumour_weighting not in ("touched", "case"):
            raise ValueError(f"diffusion.tumour_weighting must be touched or case, found {self.tumour_weighting!r}")
        if self.latent_scaling not in ("global", "channel"):
            raise ValueError(f"diffusion.latent_scaling must be global or channel, found {self.latent_scaling!r}")
        if self.tumour_weight <= 0:
            raise ValueError(f"diffusion.tumour_weight must be > 0, found {self.tumour_weight}")
        if len(self.channels) < 2:
            raise ValueError(f"diffusion.channels needs at least 2 levels, found {self.channels}")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"diffusion.norm_num_groups={self.norm_num_groups} must divide every channel count; "
                             f"found channels {self.channels}")
        if self.attention_levels is not None and len(self.attention_levels) != len(self.channels):
            raise ValueError(f"diffusion.attention_levels must have {len(self.channels)} entries, "
                             f"found {len(self.attention_levels)}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"diffusion.label_dropout must be in [0, 1), found {self.label_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"diffusion.ema_decay must be in [0, 1), found {self.ema_decay}")
        if self.num_train_timesteps < 2 or self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("diffusion: num_train_timesteps >= 2, epochs >= 0, batch_size >= 1 and lr > 0 expected; "
                             f"found {self.num_train_timesteps}, {self.epochs}, {self.batch_size}, {self.lr}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"diffusion.prediction_type must be epsilon or v_prediction, found {self.prediction_type!r}")
        if self.schedule not in ("scaled_linear_beta", "linear_beta", "cosine"):
            raise ValueError(f"diffusion.schedule must be scaled_linear_beta, linear_beta or cosine, "
                             f"found {self.schedule!r}")


class ClassConditionedUNet(nn.Module):
    """MONAI ``DiffusionModelUNet`` (3D) conditioned by cross-attention on a learned class embedding.

    Args:
        cfg: network settings.
        latent_channels: channels of the latent (input and output).
        num_classes: number of classes (IDH: 2, tumour type: 3); index ``num_classes`` is the null class.

    Shapes:
        ``forward(x, timesteps, class_index)``: ``x`` ``(B, latent_channels, x, y, z)``, ``timesteps``
        ``(B,)`` long, ``class_index`` ``(B,)`` long in ``[0, num_classes]`` -> predicted noise, shape of
        ``x``.
    """

    def __init__(self, cfg: DiffusionConfig, latent_channels: int, num_classes: int):
        super().__init__()
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, found {latent_channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, found {num_classes}")
        from monai.networks.nets import DiffusionModelUNet

        levels = len(cfg.channels)
        attention = cfg.attention_levels or (False,) + (True,) * (levels - 1)
        self.num_classes = num_classes
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=latent_channels,
            out_channels=latent_channels,
            channels=tuple(cfg.channels),
            attention_levels=tuple(attention),
            num_res_blocks=(cfg.num_res_blocks,) * levels,
            num_head_channels=cfg.num_head_channels,
            norm_num_groups=cfg.norm_num_groups,
            with_conditioning=True,
            cross_attention_dim=cfg.cross_attention_dim,
            transformer_num_layers=cfg.transformer_num_layers,
            num_class_embeds=num_classes + 1 if cfg.class_in_timestep else None,
        )
        self.class_in_timestep = cfg.class_in_timestep
        self.class_embedding = nn.Embedding(num_classes + 1, cfg.cross_attention_dim)

    @property
    def null_class(self) -> int:
        """Index of the unconditional (null) class token."""
        return self.num_classes

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
        class_index = class_index.long()
        context = self.class_embedding(class_index)[:, None, :]  # (B, 1, cross_attention_dim)
        return self.unet(x, timesteps=timesteps, context=context,
                         class_labels=class_index if self.class_in_timestep else None)


def drop_labels(class_index: torch.Tensor, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each class index by ``null_class`` with probability ``p`` (classifier-free guidance training).

    Args:
        class_index: ``(B,)`` long.
        p: drop probability in ``[0, 1]``; 0 returns the input unchanged.
        null_class: index of the null class.
        generator: source of the random draws (same generator state, same result).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], found {p}")
    draws = torch.rand(class_index.shape, generator=generator, device=generator.device)
    drop = draws.to(class_index.device) < p
    return torch.where(drop, torch.full_like(class_index, null_class), class_index)


def build_scheduler(cfg: DiffusionConfig, kind: Literal["ddpm", "ddim"] = "ddpm"):
    """MONAI DDPM or DDIM scheduler with the training noise schedule of ``cfg``.

    ``clip_sample`` is off: latents scaled to unit variance are not bounded to [-1, 1].
    """
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    kwargs = dict(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule, clip_sample=False,
                  prediction_type=cfg.prediction_type)
    if cfg.schedule != "cosine":
        kwargs.update(beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    if kind == "ddpm":
        return DDPMScheduler(**kwargs)
    if kind == "ddim":
        return DDIMScheduler(**kwargs)
    raise ValueError(f"scheduler kind must be 'ddpm' or 'ddim', found {kind!r}")
