"""CATphishing stage-1 autoencoder: a 3D KL-regularised autoencoder of 4 sequences + whole-tumour mask.

Paper 000 ("Methods", Autoencoder; Table S2): a VAE on five channels (T1, T1c, T2, FLAIR and the whole
tumour mask) so that the generator makes the images and the tumour mask together; losses: pixel L1,
Kullback-Leibler divergence, a patch adversarial loss and a perceptual loss. Paper scale: 128x192x192 input,
latent 8x16x32x32.

What synthlearn uses:

- the network is MONAI's :class:`~monai.networks.nets.AutoencoderKL` (Rombach et al. 2022, "High-resolution
  image synthesis with latent diffusion models"), wrapped by :class:`GeneratorAutoencoder`, which resamples
  the input to the autoencoder's working grid when the latent shape is not an integer down-sampling of the
  case shape (the paper's 128x192x192 -> 16x32x32 is 8x in depth but 6x in-plane: the encoder works on
  64x128x128 and the stage-2 super-resolution module, :mod:`synthlearn.models.superres`, returns to
  128x192x192);
- the discriminator is MONAI's :class:`~monai.networks.nets.PatchDiscriminator` with **GroupNorm** (no
  BatchNorm), so that per-sample DP-SGD (Opacus) stays possible later;
- the perceptual term (:class:`PerceptualLoss3D`) uses a MedicalNet ResNet-10 (Chen et al. 2019, "Med3D")
  whose weights the **user supplies by path**: nothing here can download weights, and without a path the
  term is off (the training log and the artifact manifest say so).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


log = logging.getLogger(__name__)

#: channels of the generator's working tensor: the four sequences, then the whole-tumour mask (a generator with
#: ``background = "filled"`` adds the brain mask as a sixth channel, :data:`BRAIN_CHANNEL`)
GENERATOR_CHANNELS = 5
MASK_CHANNEL = 4
BRAIN_CHANNEL = 5
#: the T1 and T1c channels of the generator tensor (the data contract's sequence order: t1, t1c, t2, flair)
T1_CHANNEL, T1C_CHANNEL = 0, 1


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Stage 1: the autoencoder, its discriminator, its losses and its training schedule.

    Attributes:
        channels: feature channels per level of MONAI ``AutoencoderKL``; the encoder down-samples
            ``len(channels) - 1`` times (2 per step).
        latent_channels: channels of the latent (paper: 8).
        num_res_blocks: residual blocks per level.
        attention_levels: self-attention per level (None = none; 3D attention is costly).
        with_nonlocal_attn: the mid-block attention of encoder and decoder.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).
        kl_weight: weight of the KL divergence (MONAI LDM tutorials: 1e-6).
        posterior_log_var_init: initial bias of the posterior log-variance head (None = MONAI's default, ~0,
            i.e. sigma ~1). With a KL weight of 1e-6 the posterior ends up narrow anyway; starting it narrow
            (-6: sigma ~0.05) spares the hundreds of steps the decoder otherwise spends learning through
            unit-variance latent noise, which on a CPU budget decides whether small tumours are learned.
        mask_weight: extra weight of the mask channel in the L1 loss (the tumour is a few % of the volume).
        tumour_weight: weight of the tumour's voxels (target mask > 0.5) in the four sequences' L1, relative
            to the rest of the brain (1 = uniform). The tumour is 1-2 % of the voxels: uniformly weighted,
            a briefly trained decoder renders it as a dark hole (docs/benchmarks.md).
        enhancement_weight: weight of an L1 term on the T1c - T1 difference image (contrast enhancement,
            the enhancing ring of a glioblastoma), tumour-weighted like the sequences' L1; 0 = off (not in the
            paper). The two sequences' own L1 terms let a decoder get both slightly wrong in ways that swap
            which class enhances; this term scores the difference itself. Measured at 1 on two demo sites: it
            restored the enhancement gap at one and washed the tumour out at the other (docs/benchmarks.md,
            section 13), so the demo leaves it off.
        mask_dice_weight: weight of a soft Dice loss on the mask channel (not in the paper: with L1 alone a
            tumour of 1-3 % of the volume is predicted as background for many hundreds of steps, longer than
            a CPU budget allows; Dice does not depend on the tumour's share of the volume). 0 = off.
        adv_weight: weight of the generator's patch adversarial loss (0 = no discriminator).
        adv_start_epoch: epochs of pure reconstruction before the adversarial loss starts.
        disc_channels: first-layer channels of the PatchDiscriminator.
        disc_layers: its number of strided layers.
        perceptual_weight: weight of the perceptual loss, used only when ``perceptual_weights`` is set.
        perceptual_weights: path to MedicalNet ResNet-10 weights (``.safetensors`` or a ``torch.load``
            ``weights_only`` state dict such as MedicalNet's ``resnet_10_23dataset.pth``); "" = off.
        epochs: training epochs over the site's cases.
        batch_size: cases (or patches) per step.
        lr: Adam learning rate of the autoencoder.
        disc_lr: Adam learning rate of the discriminator.
        lr_schedule: ``poly``: both rates decay per step as ``lr * (1 - step / total_steps) ** 0.9`` (nnU-Net's
            schedule, as the task trainer's); ``constant``: no decay. With a constant rate of 1e-3 and batch 1
            the tumour's rendered intensities swing by more than the tumour's own contrast from one step to
            the next while the whole-volume L1 keeps falling, so the weights the run stops at show the class
            at random (docs/benchmarks.md); the decay lets them settle.
        patch_size: train on random patches of this size (None = whole volumes); the network is fully
            convolutional when no attention is used, so patches make each step much cheaper on CPU.
        class_conditional_decoder: the decoder also sees the case's class: a learned vector per class
            (``latent_channels`` values, zero at the start) is added to the decoder's input after
            ``post_quant_conv`` (not in the paper). Training decodes each case with its own class, sampling
            with the class the diffusion model was conditioned on, so the decoder can render what the latent
            does not carry about the class. Cases of unknown class get no vector. On the default phantom,
            fine-tuning make demo-long's decoders with it took a task model trained on the members'
            reconstructions to 0.91 on average (0.80 without) but not one on its samples; trained from scratch,
            the arm gave 0.46 at the demo's budget (the demo's 0.70) and 0.67-0.77 over three task seeds at
            demo-long's (0.73-0.78 without), so it stays off (docs/benchmarks.md, sections 16 and 17).
        kind: ``kl``: the learned KL autoencoder above (the paper's); ``space_to_depth``: no learned autoencoder,
            the case is rearranged without loss into ``latent_channels = C * f^3`` channels on a grid ``f`` times
            coarser (:mod:`synthlearn.models.space_to_depth`, ``f = space_to_depth_factor``), so the diffusion
            model works at a latent's scale on the case itself (the fidelity issue's design (b)). Every other
            stage-1 key is then unused, and there is no stage 1 to train.
        space_to_depth_factor: ``f`` of ``kind = "space_to_depth"`` (the latent grid is the case grid / f).
    """

    channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 8
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] | None = None
    with_nonlocal_attn: bool = False
    norm_num_groups: int = 8
    kl_weight: float = 1e-6
    posterior_log_var_init: float | None = -6.0
    mask_weight: float = 1.0
    tumour_weight: float = 1.0
    enhancement_weight: float = 0.0
    mask_dice_weight: float = 1.0
    adv_weight: float = 0.01
    adv_start_epoch: int = 0
    disc_channels: int = 16
    disc_layers: int = 2
    perceptual_weight: float = 0.001
    perceptual_weights: str = ""
    epochs: int = 10
    batch_size: int = 1
    lr: float = 1e-4
    disc_lr: float = 1e-4
    lr_schedule: Literal["poly", "constant"] = "constant"
    patch_size: tuple[int, int, int] | None = None
    class_conditional_decoder: bool = False
    kind: Literal["kl", "space_to_depth"] = "kl"
    space_to_depth_factor: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ("kl", "space_to_depth"):
            raise ValueError(f"autoencoder.kind must be kl or space_to_depth, found {self.kind!r}")
        if self.space_to_depth_factor < 1:
            raise ValueError(f"autoencoder.space_to_depth_factor must be >= 1, found {self.space_to_depth_factor}")
        if self.kind == "space_to_depth" and self.class_conditional_decoder:
            raise ValueError("autoencoder.class_conditional_decoder needs a learned decoder (kind = kl), "
                             "found kind = space_to_depth")
        if len(self.channels) < 2:
            raise ValueError(f"autoencoder.channels needs at least 2 levels, found {self.channels}")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"autoencoder.norm_num_groups={self.norm_num_groups} must divide every channel count; "
                             f"found channels {self.channels}")
        if self.attention_levels is not None and len(self.attention_levels) != len(self.channels):
            raise ValueError(f"autoencoder.attention_levels must have {len(self.channels)} entries (one per level), "
                             f"found {len(self.attention_levels)}")
        for name in ("latent_channels", "num_res_blocks", "epochs", "batch_size", "disc_channels", "disc_layers"):
            if getattr(self, name) < (0 if name == "epochs" else 1):
                raise ValueError(f"autoencoder.{name} must be >= 1, found {getattr(self, name)}")
        for name in ("kl_weight", "mask_weight", "tumour_weight", "enhancement_weight", "mask_dice_weight",
                     "adv_weight", "perceptual_weight", "lr", "disc_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"autoencoder.{name} must be >= 0, found {getattr(self, name)}")
        if self.lr_schedule not in ("poly", "constant"):
            raise ValueError(f"autoencoder.lr_schedule must be poly or constant, found {self.lr_schedule!r}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 4):
            raise ValueError(f"autoencoder.patch_size must be 3 sizes >= 4 or absent, found {self.patch_size}")

    @property
    def downsample_factor(self) -> int:
        """Spatial down-sampling of the encoder (2 per level after the first; ``space_to_depth_factor`` for
        ``kind = "space_to_depth"``)."""
        if self.kind == "space_to_depth":
            return self.space_to_depth_factor
        return 2 ** (len(self.channels) - 1)


def build_autoencoder(cfg: AutoencoderConfig, in_channels: int = GENERATOR_CHANNELS) -> nn.Module:
    """MONAI ``AutoencoderKL`` (3D) for ``cfg``; input and output ``(B, in_channels, X, Y, Z)``
    (:class:`~synthlearn.models.space_to_depth.SpaceToDepth` for ``kind = "space_to_depth"``).

    Raises:
        ValueError: ``space_to_depth`` with ``latent_channels`` other than ``in_channels * f^3``.
    """
    from monai.networks.nets import AutoencoderKL

    if cfg.kind == "space_to_depth":
        from synthlearn.models.space_to_depth import SpaceToDepth

        s2d = SpaceToDepth(in_channels, cfg.space_to_depth_factor)
        if s2d.latent_channels != cfg.latent_channels:
            raise ValueError(f"autoencoder.kind = space_to_depth with factor {cfg.space_to_depth_factor} makes "
                             f"{in_channels} x {cfg.space_to_depth_factor}^3 = {s2d.latent_channels} latent "
                             f"channels; autoencoder.latent_channels is {cfg.latent_channels}")
        return s2d

    levels = len(cfg.channels)
    ae = AutoencoderKL(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(cfg.channels),
        latent_channels=cfg.latent_channels,
        num_res_blocks=(cfg.num_res_blocks,) * levels,
        attention_levels=tuple(cfg.attention_levels or (False,) * levels),
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.with_nonlocal_attn,
        with_decoder_nonlocal_attn=cfg.with_nonlocal_attn,
    )
    if cfg.posterior_log_var_init is not None:
        nn.init.constant_(ae.quant_conv_log_sigma.conv.bias, cfg.posterior_log_var_init)
    return ae


def build_discriminator(cfg: AutoencoderConfig, in_channels: int = GENERATOR_CHANNELS) -> nn.Module:
    """MONAI ``PatchDiscriminator`` (3D) with GroupNorm (Opacus-compatible; no BatchNorm anywhere).

    Its forward returns a list of intermediate feature maps; the last entry holds the patch logits
    ``(B, 1, x, y, z)``.
    """
    from monai.networks.nets import PatchDiscriminator

    groups = min(8, cfg.disc_channels)
    while cfg.disc_channels % groups:
        groups -= 1
    return PatchDiscriminator(
        spatial_dims=3,
        channels=cfg.disc_channels,
        in_channels=in_channels,
        out_channels=1,
        num_layers_d=cfg.disc_layers,
        norm=("GROUP", {"num_groups": groups}),
    )


def working_shape(shape: Sequence[int], latent_shape: Sequence[int], cfg: AutoencoderConfig) -> tuple[int, int, int]:
    """The grid the autoencoder works on: ``latent_shape * downsample_factor``.

    Equal to ``shape`` when the case shape is an integer down-sampling of the latent shape (32^3 -> 8^3,
    64^3 -> 16^3); otherwise (paper: 128x192x192 -> 16x32x32 gives 64x128x128) the input is resampled to
    it and stage 2 returns to ``shape``.

    Raises:
        ValueError: the latent shape is larger than ``shape / 1`` or not 3 sizes.
    """
    if len(shape) != 3 or len(latent_shape) != 3:
        raise ValueError(f"shape and latent_shape must have 3 sizes, found {tuple(shape)} and {tuple(latent_shape)}")
    f = cfg.downsample_factor
    out = tuple(int(s) * f for s in latent_shape)
    if any(o > 2 * s for o, s in zip(out, shape)):
        raise ValueError(f"latent_shape {tuple(latent_shape)} x {f} (autoencoder down-sampling) = {out} is more than "
                         f"twice the case shape {tuple(shape)}; use fewer autoencoder levels or a smaller latent")
    return out  # type: ignore[return-value]


class GeneratorAutoencoder(nn.Module):
    """``AutoencoderKL`` plus the resampling between the case grid and the autoencoder's working grid.

    Args:
        cfg: the autoencoder settings.
        shape: case shape ``(X, Y, Z)``.
        latent_shape: latent spatial shape; ``working_shape = latent_shape * 2**(levels - 1)``.
        num_classes: K, the classes of the class-conditional decoder (needed when
            ``cfg.class_conditional_decoder``; its ``(K, latent_channels)`` vectors are the parameter
            ``ae.class_vectors``, so they travel in the autoencoder's state dict).
        in_channels: channels of the generator tensor (5; 6 with the brain mask of ``background = "filled"``).

    Shapes (C = ``in_channels``):
        ``encode``: ``(B, C, *shape)`` -> ``mu, sigma`` each ``(B, latent_channels, *latent_shape)``;
        ``decode``: ``(B, latent_channels, *latent_shape)`` (+ ``(B,)`` classes) -> ``(B, C, *working_shape)``;
        ``to_working``: ``(B, C, *shape)`` -> ``(B, C, *working_shape)``.
    """

    def __init__(self, cfg: AutoencoderConfig, shape: Sequence[int], latent_shape: Sequence[int],
                 num_classes: int = 0, in_channels: int = GENERATOR_CHANNELS):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.working_shape = working_shape(self.shape, self.latent_shape, cfg)
        self.latent_channels = cfg.latent_channels
        self.in_channels = int(in_channels)
        self.ae = build_autoencoder(cfg, in_channels)
        if cfg.class_conditional_decoder:
            if num_classes < 1:
                raise ValueError(f"autoencoder.class_conditional_decoder needs the number of classes, found "
                                 f"{num_classes}")
            self.ae.register_parameter("class_vectors", nn.Parameter(torch.zeros(num_classes, cfg.latent_channels)))

    def to_working(self, x: torch.Tensor) -> torch.Tensor:
        """Resample a whole case ``(B, C, *shape)`` to the working grid; anything else (already on the working
        grid, or a training patch) passes unchanged."""
        if tuple(x.shape[-3:]) != self.shape or self.shape == self.working_shape:
            return x
        return F.interpolate(x, size=self.working_shape, mode="trilinear", align_corners=False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation of the latent, ``(B, latent_channels, *latent)`` each."""
        return self.ae.encode(self.to_working(x))

    def decode(self, z: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Decode a latent to ``(B, 5, *working_shape)`` (stage 2 refines it to the case grid); ``classes``
        ``(B,)`` (-1 = unknown) is needed by a class-conditional decoder and ignored otherwise."""
        return decode_latent(self.ae, z, classes)

    @staticmethod
    def sample(mu: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Reparameterised latent ``mu + sigma * eps`` with ``eps`` drawn from ``generator``."""
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + sigma * eps


def decode_latent(ae: nn.Module, z: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """``AutoencoderKL.decode`` of ``z`` ``(B, C, *latent)``, with the class vectors of a class-conditional
    decoder (``ae.class_vectors``, ``(K, C)``) added after ``post_quant_conv``; ``classes`` ``(B,)`` long,
    -1 = unknown (no vector). Without class vectors ``classes`` is ignored.

    Raises:
        ValueError: the decoder is class-conditional and ``classes`` is missing or does not match ``z``.
    """
    vectors = getattr(ae, "class_vectors", None)
    if vectors is None:
        return ae.decode(z)
    if classes is None or classes.shape != (z.shape[0],):
        raise ValueError(f"this autoencoder's decoder is class-conditional: decode needs one class per latent "
                         f"((B,) = ({z.shape[0]},)), found {None if classes is None else tuple(classes.shape)}")
    classes = classes.to(vectors.device).long()
    known = (classes >= 0).to(vectors.dtype)[:, None]
    h = ae.post_quant_conv(z)
    h = h + (vectors[classes.clamp_min(0)] * known).to(h.dtype)[:, :, None, None, None]
    return ae.decoder(h)


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of ``N(mu, sigma^2)`` from ``N(0, 1)``, summed over latent voxels, mean over the batch.

    Args:
        mu, sigma: ``(B, C, x, y, z)``.
    """
    var = sigma.float().pow(2)
    kl = 0.5 * (mu.float().pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(1).mean()


def reconstruction_l1(recon: torch.Tensor, target: torch.Tensor, mask_weight: float = 1.0,
                      tumour_weight: float = 1.0, enhancement_weight: float = 0.0) -> torch.Tensor:
    """Pixel L1 over the 5 channels; the mask channel's term is multiplied by ``mask_weight``.

    Args:
        recon, target: ``(B, 5, X, Y, Z)``.
        mask_weight: weight of the mask channel's mean error against each sequence's.
        tumour_weight: voxel weight of the tumour (target mask > 0.5) inside the sequences' mean error,
            normalised so that a uniform error gives the same loss (1 = plain mean).
        enhancement_weight: weight of the same (tumour-weighted) mean error of the T1c - T1 difference image,
            added to the channel average (0 = off).
    """
    recon, target = recon.float(), target.float()
    diff = (recon - target).abs()
    w = 1.0 + (tumour_weight - 1.0) * (target[:, MASK_CHANNEL:MASK_CHANNEL + 1] > 0.5).float()
    if tumour_weight != 1.0:
        seq = (diff[:, :MASK_CHANNEL] * w).sum(dim=(0, 2, 3, 4)) / w.sum()
        err = torch.cat([seq, diff[:, MASK_CHANNEL:].mean(dim=(0, 2, 3, 4))])
    else:
        err = diff.mean(dim=(0, 2, 3, 4))  # per channel
    weights = torch.ones_like(err)
    weights[MASK_CHANNEL] = mask_weight
    loss = (err * weights).sum() / weights.sum()
    if enhancement_weight:
        t1, t1c = T1_CHANNEL, T1C_CHANNEL
        enh = ((recon[:, t1c] - recon[:, t1]) - (target[:, t1c] - target[:, t1])).abs()
        loss = loss + enhancement_weight * (enh * w[:, 0]).sum() / w[:, 0].sum()
    return loss


def mask_dice_loss(recon: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - 2|P.T| / (|P| + |T|)`` of the mask channel, per item then averaged.

    Args:
        recon, target: ``(B, 5, X, Y, Z)``; the reconstructed mask is clamped to [0, 1].
        eps: smoothing (keeps an empty mask with an empty prediction at loss 0).
    """
    p = recon[:, MASK_CHANNEL].float().clamp(0, 1).flatten(1)
    t = target[:, MASK_CHANNEL].float().flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


class PerceptualLoss3D(nn.Module):
    """LPIPS-style perceptual distance with a MedicalNet ResNet-10 whose weights the user supplies.

    Each of the four sequences is fed separately as a one-channel volume (z-scored per volume as MedicalNet
    expects); the distance is the mean squared difference of channel-normalised feature maps of the four
    residual stages, averaged over stages and sequences (Zhang et al. 2018; MONAI's
    ``MedicalNetPerceptualSimilarity`` does the same with a downloaded network). The mask channel is not
    used.

    Args:
        weights_path: ``.safetensors`` file or a ``torch.load(weights_only=True)``-readable file holding a
            ResNet-10 state dict (a ``state_dict`` entry and a ``module.`` prefix, as in MedicalNet's
            release, are accepted).

    Raises:
        FileNotFoundError: the file does not exist (nothing is downloaded).
        ValueError: the file holds no ResNet-10 state dict that fits.
    """

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"perceptual loss weights {path}: no such file. synthlearn never downloads weights: give the path "
                f"of a MedicalNet ResNet-10 state dict (e.g. resnet_10_23dataset.pth), or leave "
                f"autoencoder.perceptual_weights empty to train without the perceptual term"
            )
        from monai.networks.nets import resnet10

        net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B", pretrained=False)
        state = load_state_dict_file(path)
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: expected a MedicalNet ResNet-10 state dict; found missing keys {missing[:5]} "
                             f"and unexpected keys {unexpected[:5]}")
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
        self.path = str(path)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        feats = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    @staticmethod
    def _normalise_volume(x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3, 4), keepdim=True)
        std = x.std(dim=(2, 3, 4), keepdim=True)
        return (x - mean) / (std + 1e-5)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Perceptual distance of ``(B, C>=4, X, Y, Z)`` volumes (first four channels), a scalar."""
        total = recon.new_zeros((), dtype=torch.float32)
        for c in range(4):
            a = self._features(self._normalise_volume(recon[:, c : c + 1].float()))
            b = self._features(self._normalise_volume(target[:, c : c + 1].float()))
            for fa, fb in zip(a, b):
                fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + (fa - fb).pow(2).sum(1).mean()
        return total / (4 * 4)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.load(weights_only=True)``-safe file.

    Raises:
        ValueError: the file cannot be read safely (names the file).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable weights file (safetensors or weights_only torch file): "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def make_perceptual_loss(cfg: AutoencoderConfig) -> PerceptualLoss3D | None:
    """The perceptual loss when ``cfg.perceptual_weights`` is set, else None (logged once, clearly)."""
    if not cfg.perceptual_weights:
        log.info("perceptual loss: OFF (no weights given; synthlearn never downloads weights; set "
                 "autoencoder.perceptual_weights to a MedicalNet ResNet-10 file to use it)")
        return None
    loss = PerceptualLoss3D(cfg.perceptual_weights)
    log.info("perceptual loss: ON, MedicalNet ResNet-10 weights from %s", cfg.perceptual_weights)
    return loss
