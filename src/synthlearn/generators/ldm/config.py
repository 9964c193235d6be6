"""A site's CATphishing generator settings: the data grid, the three stages, sampling defaults, compute.

:class:`GeneratorConfig` is what ``train-generator`` reads from TOML (``configs/generator_*.toml``) and what an
artifact's manifest records.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal


from synthlearn.config import load_toml
from synthlearn.data.contract import LABEL_VALUES
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.models.autoencoder import (
    GENERATOR_CHANNELS,
    AutoencoderConfig,
    working_shape,
)
from synthlearn.models.diffusion import DiffusionConfig
from synthlearn.models.refiner import RefinerConfig
from synthlearn.models.superres import SuperResConfig
from synthlearn.generators.ldm.dp import PrivacyConfig



log = logging.getLogger(__name__)

STAGES = ("autoencoder", "superres", "diffusion", "refiner")
CONDITION_LABELS = ("idh", "tumor_type")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Defaults for ``synthesize`` (the server may override steps and guidance).

    Attributes:
        scheduler: ``ddim`` (deterministic with eta 0) or ``ddpm`` (ancestral, ``num_train_timesteps`` steps).
        steps: DDIM steps.
        guidance_scale: classifier-free guidance (1 = conditional only; > 1 sharpens the class).
        guidance_interval: ``[lo, hi]``, fractions of the training timesteps where the guidance applies
            (conditional only elsewhere; :func:`synthlearn.generators.ldm.sample.sample_latents`).
        eta: DDIM stochasticity.
        batch_size: samples decoded together.
        mask_threshold: threshold of the decoded mask channel.
        brain_threshold: a decoded voxel is brain where the mean of its four sequences exceeds this
            (generator scale; :data:`synthlearn.synthesis.cases.BRAIN_FLOOR`, the lowest real brain value, by
            default); :func:`synthlearn.synthesis.cases.postprocess_sample`.
        min_tumour_voxels: a sample whose largest tumour component is smaller is drawn again (0 accepts
            samples without any tumour voxel).
        max_draws_per_case: at most this many draws per requested case before giving up (logged).
    """

    scheduler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = 50
    guidance_scale: float = 2.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    eta: float = 0.0
    batch_size: int = 4
    mask_threshold: float = 0.5
    brain_threshold: float = 0.2
    min_tumour_voxels: int = 8
    max_draws_per_case: int = 3

    def __post_init__(self) -> None:
        if self.scheduler not in ("ddim", "ddpm"):
            raise ValueError(f"sampling.scheduler must be ddim or ddpm, found {self.scheduler!r}")
        if self.steps < 1 or self.batch_size < 1 or self.max_draws_per_case < 1 or self.min_tumour_voxels < 0:
            raise ValueError("sampling: steps, batch_size, max_draws_per_case >= 1 and min_tumour_voxels >= 0 "
                             f"expected, found {self.steps}, {self.batch_size}, {self.max_draws_per_case}, "
                             f"{self.min_tumour_voxels}")
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"sampling.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1, found "
                             f"{list(self.guidance_interval)}")
        if not 0.0 < self.brain_threshold < 1.5:
            raise ValueError(f"sampling.brain_threshold must be in (0, 1.5) (generator intensity scale: brain in "
                             f"[0.2, 1.5]), found {self.brain_threshold}")
        if self.guidance_scale < 0 or self.eta < 0:
            raise ValueError(f"sampling.guidance_scale and eta must be >= 0, found {self.guidance_scale}, {self.eta}")


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """A site's generator: data grid, the three stages, sampling defaults and compute settings.

    Attributes:
        label: the class the generator is conditioned on: ``idh`` (2 classes) or ``tumor_type`` (3).
        shape: case grid ``(X, Y, Z)`` (cases are cropped to the brain and fitted to it).
        fit_mode: :class:`synthlearn.data.preprocess.PreprocessConfig` ``mode``.
        latent_shape: spatial shape of the latent (paper: 16x32x32 for 128x192x192).
        autoencoder, superres, diffusion: the three stages of the paper.
        refiner: an optional fourth, a class-conditional pixel-space diffusion refiner of the decoded tumour's crop
            (:mod:`synthlearn.models.refiner`; ``refiner.epochs = 0``, the default, leaves it out).
        sampling: defaults for synthesis.
        privacy: DP-SGD for the autoencoder and the diffusion model (:mod:`synthlearn.generators.ldm.dp`).
        augment_flip: random left-right flips (the brain is roughly symmetric; paper: augmentation).
        tumour_patch_fraction: share of training patches centred on a tumour voxel (when patches are used).
        grad_clip: gradient-norm clipping in every stage (paper: gradient clipping against over-fitting).
        precision: ``fp32``; ``bf16`` / ``fp16`` autocast (fp16 with a gradient scaler, CUDA only).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``.
        background: what the generator sees outside the brain. ``zero``: the sequences are 0 there (the contract's
            skull-stripped convention), so the autoencoder must draw a step from the brain's edge to 0, and a
            decoded case's brain is where its sequences exceed ``sampling.brain_threshold``. ``filled``: each
            sequence's background is filled with the value of the nearest brain voxel (no step to draw) and a
            sixth channel holds the brain mask, whose decoded threshold at 0.5 makes the decoded case's brain. On
            the default phantom a 16^3-latent autoencoder with ``zero`` rendered the outer two voxels of the brain
            (37 % of its voxels at 32^3) 0.2 darker in T2 than real (0.27 vs 0.48), which the task's per-case z-score
            turned into tumours twice as bright in T2 as real (docs/benchmarks.md, section 21).
    """

    label: Literal["idh", "tumor_type"] = "idh"
    shape: tuple[int, int, int] = (64, 64, 64)
    fit_mode: Literal["fit", "pad", "resize"] = "fit"
    latent_shape: tuple[int, int, int] = (16, 16, 16)
    autoencoder: AutoencoderConfig = dataclasses.field(default_factory=AutoencoderConfig)
    superres: SuperResConfig = dataclasses.field(default_factory=SuperResConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    refiner: RefinerConfig = dataclasses.field(default_factory=RefinerConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    augment_flip: bool = True
    tumour_patch_fraction: float = 0.5
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    background: Literal["zero", "filled"] = "zero"

    def __post_init__(self) -> None:
        if self.background not in ("zero", "filled"):
            raise ValueError(f"background must be zero or filled, found {self.background!r}")
        if self.label not in CONDITION_LABELS:
            raise ValueError(f"label must be one of {list(CONDITION_LABELS)}, found {self.label!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, found {self.precision!r}")
        PreprocessConfig(shape=self.shape, mode=self.fit_mode)  # checks shape and mode
        work = working_shape(self.shape, self.latent_shape, self.autoencoder)
        if self.autoencoder.kind == "space_to_depth":
            f = self.autoencoder.space_to_depth_factor
            if tuple(work) != tuple(self.shape):
                raise ValueError(f"autoencoder.kind = space_to_depth needs shape = latent_shape x {f}; found shape "
                                 f"{tuple(self.shape)} and latent_shape {tuple(self.latent_shape)}")
            if self.autoencoder.latent_channels != self.channels * f ** 3:
                raise ValueError(f"autoencoder.kind = space_to_depth with factor {f} on {self.channels} channels needs "
                                 f"autoencoder.latent_channels = {self.channels * f ** 3}, found "
                                 f"{self.autoencoder.latent_channels}")
            if self.superres.epochs:
                raise ValueError("autoencoder.kind = space_to_depth decodes to the case grid: superres.epochs must be "
                                 f"0, found {self.superres.epochs}")
        f_ae = self.autoencoder.downsample_factor
        if self.autoencoder.patch_size is not None:
            p = self.autoencoder.patch_size
            if any(a > b or a % f_ae for a, b in zip(p, work)):
                raise ValueError(f"autoencoder.patch_size {p} must be <= the working grid {work} and divisible by "
                                 f"the autoencoder down-sampling {f_ae}")
        f_sr = 2 ** (len(self.superres.channels) - 1)
        if any(s % f_sr for s in self.shape):
            raise ValueError(f"shape {self.shape} must be divisible by 2**(len(superres.channels)-1) = {f_sr}")
        if self.superres.patch_size is not None:
            p = self.superres.patch_size
            if any(a > b or a % f_sr for a, b in zip(p, self.shape)):
                raise ValueError(f"superres.patch_size {p} must be <= shape {self.shape} and divisible by {f_sr}")
        f_dm = 2 ** (len(self.diffusion.channels) - 1)
        if any(s % f_dm for s in self.latent_shape):
            raise ValueError(f"latent_shape {self.latent_shape} must be divisible by 2**(len(diffusion.channels)-1) "
                             f"= {f_dm}")
        if self.refiner.epochs and any(c > s for c, s in zip(self.refiner.crop, self.shape)):
            raise ValueError(f"refiner.crop {list(self.refiner.crop)} must fit in shape {list(self.shape)}")
        if not 0.0 <= self.tumour_patch_fraction <= 1.0:
            raise ValueError(f"tumour_patch_fraction must be in [0, 1], found {self.tumour_patch_fraction}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, found {self.grad_clip}")
        if self.privacy.dp_sgd:
            refused = []
            if self.autoencoder.kind == "space_to_depth":
                refused.append("autoencoder.kind = space_to_depth (nothing to train privately; not supported)")
            if self.autoencoder.adv_weight > 0:
                refused.append(f"autoencoder.adv_weight = {self.autoencoder.adv_weight} (its discriminator reads the "
                               f"members' images without noise; set 0)")
            if self.autoencoder.patch_size is not None:
                refused.append("autoencoder.patch_size (a batch's patch is placed on one case's tumour; use whole "
                               "cases)")
            if self.superres.epochs:
                refused.append(f"superres.epochs = {self.superres.epochs} (stage 2 has no DP-SGD yet; set 0)")
            if self.refiner.epochs:
                refused.append(f"refiner.epochs = {self.refiner.epochs} (the refiner has no DP-SGD yet; set 0)")
            if refused:
                raise ValueError("privacy.dp_sgd = true refuses " + "; ".join(refused))

    @property
    def class_names(self) -> tuple[str, ...]:
        return LABEL_VALUES[self.label]

    @property
    def channels(self) -> int:
        """Channels of the generator tensor: 4 sequences + the tumour mask (+ the brain mask when ``filled``)."""
        return GENERATOR_CHANNELS + (1 if self.background == "filled" else 0)


def load_generator_config(path: str | Path) -> GeneratorConfig:
    """Read a :class:`GeneratorConfig` TOML file (``base = "..."`` inheritance; unknown keys refused)."""
    return load_toml(GeneratorConfig, path)


