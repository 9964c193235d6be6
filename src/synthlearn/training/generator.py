"""Training a site's CATphishing generator: autoencoder, super-resolution stage, latent diffusion.

:func:`train_generator` runs at a hospital on its own site folder and writes the artifact the site ships
once (:mod:`synthlearn.synthesis.artifact`). Three plain loops, top to bottom (paper 000, "Methods"):

1. **autoencoder** (:mod:`synthlearn.models.autoencoder`): L1 + KL (+ patch adversarial after
   ``adv_start_epoch``, + perceptual when weights are given) on 4 sequences + whole-tumour mask;
2. **super-resolution** (:mod:`synthlearn.models.superres`): encoder frozen, decoder + UNet module
   fine-tuned with L1 + SSIM (+ perceptual);
3. **diffusion** (:mod:`synthlearn.models.diffusion`): the frozen encoder's latents, scaled to unit
   variance, DDPM noise-prediction loss, class by cross-attention with label dropout.

Every random choice of epoch ``e`` of stage ``s`` (order, flips, patches, latent noise, timesteps, label
dropout) comes from a ``torch.Generator`` seeded with ``(seed, s, e)``. After every epoch a checkpoint with
the weights, optimizer states, loss history and RNG state is written atomically to
``ARTIFACT_DIR/checkpoints/``; a killed run started again with the same arguments resumes from it and ends
with the same weights as an uninterrupted run. When all stages are done the folder is replaced by the
artifact (checkpoints removed: they hold nothing a site should ship).

Scale: bf16/fp16 autocast (``precision``), CUDA when available, and DDP under ``torchrun`` (WORLD_SIZE > 1:
every rank trains on its share of each epoch's batches, rank 0 writes checkpoints and the artifact).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synthlearn.config import load_toml, to_dict
from synthlearn.data.contract import LABEL_VALUES, CaseRecord
from synthlearn.data.preprocess import PreprocessConfig, brain_bbox, preprocess_case
from synthlearn.models.autoencoder import (
    GENERATOR_CHANNELS,
    MASK_CHANNEL,
    AutoencoderConfig,
    GeneratorAutoencoder,
    build_discriminator,
    decode_latent,
    kl_loss,
    make_perceptual_loss,
    mask_dice_loss,
    reconstruction_l1,
    working_shape,
)
from synthlearn.models.diffusion import ClassConditionedUNet, DiffusionConfig, build_scheduler, drop_labels
from synthlearn.models.superres import SuperResConfig, SuperResolution
from synthlearn.training.checkpoint import load_checkpoint, save_checkpoint
from synthlearn.training.seeding import torch_generator
from synthlearn.training.trainer import poly_lr

log = logging.getLogger(__name__)

STAGES = ("autoencoder", "superres", "diffusion")
CONDITION_LABELS = ("idh", "tumor_type")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Defaults for ``synthesize`` (the server may override steps and guidance).

    Attributes:
        scheduler: ``ddim`` (deterministic with eta 0) or ``ddpm`` (ancestral, ``num_train_timesteps`` steps).
        steps: DDIM steps.
        guidance_scale: classifier-free guidance (1 = conditional only; > 1 sharpens the class).
        guidance_interval: ``[lo, hi]``, fractions of the training timesteps where the guidance applies
            (conditional only elsewhere; :func:`synthlearn.synthesis.sampling.sample_latents`).
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
        autoencoder, superres, diffusion: the three stages.
        sampling: defaults for synthesis.
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
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
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
        if not 0.0 <= self.tumour_patch_fraction <= 1.0:
            raise ValueError(f"tumour_patch_fraction must be in [0, 1], found {self.tumour_patch_fraction}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, found {self.grad_clip}")

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


# ----------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class SiteTensors:
    """A site's cases in the generator's working form.

    Attributes:
        x: ``(N, C, *shape)`` float32: sequences in the generator scale and the whole-tumour mask (C = 5), and the
            brain mask (C = 6, ``background = "filled"``; the sequences' background then holds the nearest brain
            voxel's value, :func:`fill_background`).
        class_index: ``(N,)`` long, the class of each case, -1 when unknown.
        voxel_size: median voxel size (mm) of the case grid after cropping and fitting.
        cases: the case records (never written to the artifact).
    """

    x: torch.Tensor
    class_index: torch.Tensor
    voxel_size: tuple[float, float, float]
    cases: tuple[CaseRecord, ...]


def open_site(site_dir: str | Path, cfg: GeneratorConfig,
              case_ids: Sequence[str] | None = None) -> tuple[CaseRecord, ...]:
    """Check that ``site_dir`` is one clean site with segmentations and labels for ``cfg.label``.

    Reads every array (``verify_study``) and raises before anything is written. With ``case_ids``, only
    those cases are returned (e.g. a site that keeps some cases out of generator training as the
    non-members of a privacy audit); an id that is not in the site is an error.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: not a single site, problems found (each listed with file, expected, found), no
            segmentation, or no case labelled for ``cfg.label``.
    """
    from synthlearn.data.layouts import open_study
    from synthlearn.data.verify import verify_study

    site_dir = Path(site_dir)
    study = open_study(site_dir)
    if len(study.sites) != 1:
        raise ValueError(f"{site_dir}: expected one site folder (case folders + labels.csv), found a study with "
                         f"{len(study.sites)} sites {[s.name for s in study.sites]}; pass one site's folder")
    report = verify_study(site_dir, progress=False)
    if report.problems:
        lines = "\n  ".join(str(p) for p in report.problems[:30])
        more = f"\n  ... and {len(report.problems) - 30} more" if len(report.problems) > 30 else ""
        raise ValueError(f"{site_dir}: {len(report.problems)} problem(s) in the site data:\n  {lines}{more}")
    cases = study.sites[0].cases
    if case_ids is not None:
        wanted = set(case_ids)
        unknown = sorted(wanted - {c.case_id for c in cases})
        if unknown:
            raise ValueError(f"{site_dir}: case_ids not in the site: {unknown[:10]}")
        cases = tuple(c for c in cases if c.case_id in wanted)
    if not cases:
        raise ValueError(f"{site_dir}: expected case folders, found none")
    no_seg = [c.case_id for c in cases if c.seg is None or not Path(c.seg).is_file()]
    if no_seg:
        raise ValueError(f"{site_dir}: the generator needs a segmentation (seg.nii.gz) in every case; missing in "
                         f"{no_seg[:10]}")
    labelled = [c for c in cases if c.labels.get(cfg.label) is not None]
    if not labelled:
        raise ValueError(f"{site_dir / 'labels.csv'}: expected {cfg.label} labels "
                         f"({'/'.join(LABEL_VALUES[cfg.label])}) for at least one case, found none")
    return cases


def _voxel_size(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def load_site_tensors(cases: tuple[CaseRecord, ...], cfg: GeneratorConfig) -> SiteTensors:
    """Read, crop and fit every case, map intensities to the generator scale, stack with the tumour mask.

    Each sequence is z-scored over the brain at the case's own resolution *before* it is fitted to
    ``cfg.shape``, exactly as the task models' preprocessing does (:func:`synthlearn.data.preprocess.preprocess_case`),
    and only then mapped to the generator scale (an affine map inside the brain). Fitting raw intensities
    instead blends the brain's edge with the zero background into a dark rim that lowers the brain mean and
    widens its spread: on the default phantom that took the tumour-to-brain contrast a task model sees from
    -0.74 to -0.18 SD in T1 (sign flipped for some wildtype cases) and from 2.5 to 1.6 SD in T2, i.e. the
    generator learnt a class signal weaker than, and different from, the real one (docs/benchmarks.md).
    """
    from synthlearn.data.io import read_case
    from synthlearn.synthesis.cases import generator_intensities

    pre = PreprocessConfig(shape=cfg.shape, mode=cfg.fit_mode, crop=True, zscore=True)
    xs, classes, sizes = [], [], []
    names = cfg.class_names
    for case in cases:
        arrays = read_case(case)
        box = brain_bbox(arrays.images)
        cropped = [b.stop - b.start for b in box]
        images, seg = preprocess_case(arrays.images, arrays.seg, pre)
        spacing = _voxel_size(arrays.affine)
        if cfg.fit_mode == "fit":
            scale = min(1.0, *(w / h for w, h in zip(cfg.shape, cropped)))
            spacing = spacing / scale
        elif cfg.fit_mode == "resize":
            spacing = spacing * np.asarray(cropped) / np.asarray(cfg.shape)
        sizes.append(spacing)
        mask = (seg > 0).astype(np.float32)[None]
        scaled = generator_intensities(images)
        if cfg.background == "filled":
            brain = (scaled > 0).any(axis=0)
            xs.append(np.concatenate([fill_background(scaled, brain), mask, brain.astype(np.float32)[None]], axis=0))
        else:
            xs.append(np.concatenate([scaled, mask], axis=0))
        value = case.labels.get(cfg.label)
        classes.append(names.index(value) if value is not None else -1)
    voxel = tuple(float(v) for v in np.median(np.stack(sizes), axis=0))
    return SiteTensors(x=torch.from_numpy(np.stack(xs)), class_index=torch.tensor(classes, dtype=torch.long),
                       voxel_size=voxel, cases=tuple(cases))  # type: ignore[arg-type]


def fill_background(images: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """``(C, X, Y, Z)`` images with every voxel outside ``brain`` ``(X, Y, Z)`` set to the value of its nearest brain
    voxel (Euclidean distance transform): the brain's edge no longer steps to 0. Unchanged without any brain voxel."""
    from scipy import ndimage

    if not brain.any() or brain.all():
        return images.copy()
    idx = ndimage.distance_transform_edt(~brain, return_distances=False, return_indices=True)
    return images[:, idx[0], idx[1], idx[2]].astype(images.dtype)


# ------------------------------------------------------------------------------------------ runtime


@dataclasses.dataclass
class Runtime:
    """Device, precision and (optional) DDP process group of a training run."""

    device: torch.device
    precision: str
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP-wrap a trainable module under torchrun (identity otherwise)."""
        if self.world_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def setup_runtime(cfg: GeneratorConfig) -> Runtime:
    """Pick the device; join the process group when started by ``torchrun`` (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r} asked for, but CUDA is not available; use device = \"auto\"")
    if device.type == "cuda" and world > 1:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use fp32 (or bf16) on CPU")
    if cfg.precision == "bf16" and device.type == "cpu":
        log.warning("bf16 autocast on CPU: fast only with AVX-512 BF16 / AMX; on the project's AMD EPYC CPUs 3D "
                    "convolutions ran ~50x slower in bf16 than fp32 (ENVIRONMENT.md, benchmarks)")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if rank > 0:
        log.setLevel(logging.WARNING)  # rank 0 reports progress; the others only problems
    return Runtime(device=device, precision=cfg.precision, rank=rank, world_size=world)


def _batches(n: int, batch_size: int, generator: torch.Generator, rt: Runtime) -> list[torch.Tensor]:
    """This rank's batches of a seeded permutation of ``n`` items (the last partial batch is kept).

    Under DDP every rank must take the same number of steps: the batch list is padded by wrapping around
    (as ``DistributedSampler`` does) to a multiple of the world size, then dealt out round-robin.
    """
    order = torch.randperm(n, generator=generator)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if rt.world_size == 1:
        return batches
    original = len(batches)
    i = 0
    while len(batches) % rt.world_size:
        batches.append(batches[i % original])
        i += 1
    return batches[rt.rank :: rt.world_size]


def _random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each item of ``(B, C, X, Y, Z)`` left-right (axis X) with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    if flip.any():
        x = x.clone()
        x[flip] = x[flip].flip(-3)
    return x


def _patch_corner(shape: tuple[int, ...], size: tuple[int, ...] | None, generator: torch.Generator,
                  mask: torch.Tensor | None = None, tumour_fraction: float = 0.0) -> tuple[int, int, int] | None:
    """Corner of a random patch of ``size`` in a volume of ``shape`` (None when no patching).

    With probability ``tumour_fraction`` the patch is centred (as far as the volume allows) on a random
    tumour voxel of ``mask`` ``(B, X, Y, Z)`` (nnU-Net-style foreground over-sampling: the tumour is a few %
    of the volume); otherwise uniform. Every draw comes from ``generator``.
    """
    if size is None or tuple(size) == tuple(shape):
        return None
    use_tumour = float(torch.rand(1, generator=generator)) < tumour_fraction
    if use_tumour and mask is not None:
        voxels = torch.nonzero(mask.detach().cpu() > 0.5)
        if len(voxels):
            pick = voxels[int(torch.randint(len(voxels), (1,), generator=generator))][1:]
            return tuple(int(min(max(int(c) - w // 2, 0), h - w))
                         for c, w, h in zip(pick, size, shape))  # type: ignore[return-value]
    return tuple(int(torch.randint(h - w + 1, (1,), generator=generator))
                 for h, w in zip(shape, size))  # type: ignore[return-value]


def _random_patch(x: torch.Tensor, size: tuple[int, ...] | None, generator: torch.Generator,
                  tumour_fraction: float = 0.0) -> torch.Tensor:
    """A random patch of ``size`` of ``(B, C, X, Y, Z)`` (same corner for the batch; see
    :func:`_patch_corner`); ``size`` None returns ``x``."""
    corner = _patch_corner(tuple(x.shape[-3:]), size, generator, x[:, MASK_CHANNEL], tumour_fraction)
    if corner is None:
        return x
    (sx, sy, sz), (px, py, pz) = corner, size
    return x[..., sx : sx + px, sy : sy + py, sz : sz + pz]


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _clip(module: nn.Module, max_norm: float) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


class _AutoencoderStep(nn.Module):
    """forward(x, eps, classes) -> (reconstruction, mu, sigma) with the reparameterisation noise given
    (DDP-friendly, reproducible); ``classes`` ``(B,)`` for a class-conditional decoder."""

    def __init__(self, ae: GeneratorAutoencoder):
        super().__init__()
        self.ae = ae.ae

    def forward(self, x: torch.Tensor, eps: torch.Tensor, classes: torch.Tensor | None = None):
        mu, sigma = self.ae.encode(x)
        return decode_latent(self.ae, mu + sigma * eps.to(mu.dtype), classes), mu, sigma


class _DecodeRefine(nn.Module):
    """forward(z, corner, classes) -> the super-resolved decoder output, or a patch of it starting at ``corner``:
    what stage 2 trains (decoder + SR module). The decoder always decodes the whole latent."""

    def __init__(self, ae: GeneratorAutoencoder, sr: SuperResolution, patch_size: tuple[int, int, int] | None):
        super().__init__()
        self.ae = ae.ae
        self.sr = sr
        self.patch_size = patch_size

    def forward(self, z: torch.Tensor, corner: tuple[int, int, int] | None = None,
                classes: torch.Tensor | None = None) -> torch.Tensor:
        up = self.sr.upsample(decode_latent(self.ae, z, classes))
        if corner is not None and self.patch_size is not None:
            (x0, y0, z0), (px, py, pz) = corner, self.patch_size
            up = up[..., x0 : x0 + px, y0 : y0 + py, z0 : z0 + pz]
        return self.sr.refine(up)


def _latent_eps(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


def _history_append(history: dict[str, list[float]], sums: dict[str, float], count: int) -> dict[str, float]:
    means = {k: v / max(count, 1) for k, v in sums.items()}
    for k, v in means.items():
        history.setdefault(k, []).append(float(v))
    return means


def _progress(iterable, total: int, desc: str, enabled: bool) -> Iterator:
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, leave=False, disable=not enabled))


def _reduce(sums: dict[str, float], count: int, rt: Runtime) -> tuple[dict[str, float], int]:
    """Sum the loss sums and counts over ranks (DDP) so that every rank logs the same epoch means."""
    if rt.world_size == 1:
        return sums, count
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64, device=rt.device)
    torch.distributed.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t[:-1].tolist())}, int(t[-1].item())


# ------------------------------------------------------------------------------------------- stages


def _train_autoencoder(ae: GeneratorAutoencoder, x_work: torch.Tensor, cfg: GeneratorConfig, rt: Runtime, *,
                       seed: int, ckpt: Path, progress: bool,
                       classes: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Stage 1 on ``x_work`` ``(N, 5, *working_shape)`` (``classes`` ``(N,)``, -1 = unknown: what a
    class-conditional decoder decodes with); returns the per-epoch loss history."""
    from monai.losses import PatchAdversarialLoss

    acfg = cfg.autoencoder
    disc = build_discriminator(acfg, cfg.channels).to(rt.device) if acfg.adv_weight > 0 else None
    perceptual = make_perceptual_loss(acfg)
    if perceptual is not None:
        perceptual = perceptual.to(rt.device)
    opt = torch.optim.Adam(ae.ae.parameters(), lr=acfg.lr)
    opt_d = torch.optim.Adam(disc.parameters(), lr=acfg.disc_lr) if disc is not None else None
    scaler = torch.amp.GradScaler("cuda", enabled=rt.precision == "fp16")
    history: dict[str, list[float]] = {}
    start = 0
    if ckpt.is_file():
        state = load_checkpoint(ckpt, map_location=rt.device)
        ae.ae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            disc.load_state_dict(state["discriminator"])
            opt_d.load_state_dict(state["disc_optimizer"])
        history, start = state["history"], int(state["epoch"])
        if start < acfg.epochs:
            log.info("autoencoder: resuming from epoch %d/%d (%s)", start, acfg.epochs, ckpt)
    if start >= acfg.epochs:
        return history
    # On CPU, oneDNN's 3D convolutions run ~25 % faster on channels-last tensors (benchmarks/bench_ae_batch.py);
    # the weights go back to the default layout when the stage ends, so nothing downstream sees the difference.
    layout = torch.channels_last_3d if rt.device.type == "cpu" else torch.contiguous_format
    ae.ae.to(memory_format=layout)
    if disc is not None:
        disc.to(memory_format=layout)
    step_ae = rt.wrap(_AutoencoderStep(ae))
    disc_run = rt.wrap(disc) if disc is not None else None
    adv_loss = PatchAdversarialLoss(criterion="least_squares")
    f = acfg.downsample_factor
    n = x_work.shape[0]
    for epoch in range(start, acfg.epochs):
        gen = torch_generator(seed, "autoencoder", epoch)
        step_ae.train()
        use_adv = disc is not None and epoch >= acfg.adv_start_epoch
        sums: dict[str, float] = {"l1": 0.0, "kl": 0.0, "mask_dice": 0.0}
        if use_adv:
            sums.update(g_adv=0.0, d=0.0)
        if perceptual is not None:
            sums["perceptual"] = 0.0
        batches = _batches(n, acfg.batch_size, gen, rt)
        count = 0
        for i, idx in enumerate(_progress(batches, len(batches), f"autoencoder {epoch + 1}/{acfg.epochs}", progress)):
            if acfg.lr_schedule == "poly":  # a function of the step alone: a resumed run continues the same curve
                step_no, total = epoch * len(batches) + i, acfg.epochs * len(batches)
                _set_lr(opt, poly_lr(acfg.lr, step_no, total))
                if opt_d is not None:
                    _set_lr(opt_d, poly_lr(acfg.disc_lr, step_no, total))
            xb = x_work[idx]
            cb = classes[idx].to(rt.device) if classes is not None else None
            if cfg.augment_flip:
                xb = _random_flip(xb, gen)
            xb = _random_patch(xb, acfg.patch_size, gen, cfg.tumour_patch_fraction).contiguous(memory_format=layout)
            eps = _latent_eps((xb.shape[0], acfg.latent_channels, *(s // f for s in xb.shape[-3:])), gen)
            xb, eps = xb.to(rt.device), eps.to(rt.device)
            with rt.autocast():
                recon, mu, sigma = step_ae(xb, eps, cb)
                recon = recon.float()
                l1 = reconstruction_l1(recon, xb, acfg.mask_weight, acfg.tumour_weight, acfg.enhancement_weight)
                kl = kl_loss(mu, sigma)
                dice = mask_dice_loss(recon, xb)
                loss = l1 + acfg.kl_weight * kl + acfg.mask_dice_weight * dice
                if perceptual is not None:
                    p_loss = perceptual(recon, xb)
                    loss = loss + acfg.perceptual_weight * p_loss
                if use_adv:  # the bare discriminator: its gradients here are discarded, nothing to all-reduce
                    g_adv = adv_loss(disc(recon)[-1].float(), target_is_real=True, for_discriminator=False)
                    loss = loss + acfg.adv_weight * g_adv
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            _clip(ae.ae, cfg.grad_clip)
            scaler.step(opt)
            if use_adv:
                with rt.autocast():  # one forward over fake and real (GroupNorm is per sample): one DDP pass
                    logits = disc_run(torch.cat([recon.detach(), xb]))[-1].float()
                    logits_fake, logits_real = logits.chunk(2)
                    d_loss = 0.5 * (adv_loss(logits_fake, target_is_real=False, for_discriminator=True)
                                    + adv_loss(logits_real, target_is_real=True, for_discriminator=True))
                opt_d.zero_grad(set_to_none=True)
                scaler.scale(d_loss).backward()
                scaler.unscale_(opt_d)
                _clip(disc, cfg.grad_clip)
                scaler.step(opt_d)
                sums["g_adv"] += float(g_adv.detach()) * len(idx)
                sums["d"] += float(d_loss.detach()) * len(idx)
            scaler.update()
            sums["l1"] += float(l1.detach()) * len(idx)
            sums["kl"] += float(kl.detach()) * len(idx)
            sums["mask_dice"] += float(dice.detach()) * len(idx)
            if perceptual is not None:
                sums["perceptual"] += float(p_loss.detach()) * len(idx)
            count += len(idx)
        sums, count = _reduce(sums, count, rt)
        means = _history_append(history, sums, count)
        log.info("autoencoder epoch %d/%d: %s", epoch + 1, acfg.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in means.items()))
        if rt.is_main:
            payload = {"epoch": epoch + 1, "model": ae.ae.state_dict(), "optimizer": opt.state_dict(),
                       "history": history}
            if disc is not None:
                payload.update(discriminator=disc.state_dict(), disc_optimizer=opt_d.state_dict())
            save_checkpoint(ckpt, payload)
        rt.barrier()
    ae.ae.to(memory_format=torch.contiguous_format)
    return history


@torch.no_grad()
def encode_site(ae: GeneratorAutoencoder, x: torch.Tensor, rt: Runtime, flips: bool,
                batch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``mu, sigma`` of every case ``(N', C, *latent)`` (N' = 2N with left-right flipped copies)."""
    ae.eval()
    mus, sigmas = [], []
    variants = [x, x.flip(-3)] if flips else [x]
    for xs in variants:
        for i in range(0, xs.shape[0], batch_size):
            with rt.autocast():
                mu, sigma = ae.encode(xs[i : i + batch_size].to(rt.device))
            mus.append(mu.float().cpu())
            sigmas.append(sigma.float().cpu())
    return torch.cat(mus), torch.cat(sigmas)


def latent_tumour_map(x: torch.Tensor, latent_shape: Sequence[int], flips: bool,
                      mode: Literal["touched", "case"] = "touched") -> torch.Tensor:
    """Where the tumour lies on the latent grid, in :func:`encode_site`'s order: what the diffusion loss weighs
    ``diffusion.tumour_weight`` times more (``weight = 1 + (tumour_weight - 1) * map``).

    Args:
        x: ``(N, 5, *shape)`` generator tensors (mask channel last).
        latent_shape: the latent grid ``(x, y, z)``.
        flips: also the left-right flipped copies (``N' = 2N``), as ``encode_site(flips=True)``.
        mode: ``touched``: 1 at every position the average-pooled mask is > 0 (a tumour's share of the loss grows
            with its size); ``case``: the same positions, each case's scaled by ``T / n_i`` (``n_i`` its touched
            positions, ``T`` the mean of ``n_i`` over the cases with a tumour), so every case's tumour carries
            the same total weight (``diffusion.tumour_weighting``).

    Returns:
        ``(N', 1, *latent_shape)`` float, 0 off the tumour.
    """
    variants = [x, x.flip(-3)] if flips else [x]
    mask = torch.cat([v[:, MASK_CHANNEL:MASK_CHANNEL + 1].float() for v in variants])
    pooled = F.adaptive_avg_pool3d(mask, tuple(int(s) for s in latent_shape))
    touched = (pooled > 0).float()
    if mode == "touched":
        return touched
    if mode != "case":
        raise ValueError(f"mode must be touched or case, found {mode!r}")
    counts = touched.flatten(1).sum(1)
    has = counts > 0
    if not has.any():
        return touched
    per_case = torch.where(has, counts[has].mean() / counts.clamp_min(1), torch.zeros_like(counts))
    return touched * per_case.view(-1, 1, 1, 1, 1)


def latent_normalisation(mu: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator,
                         mode: Literal["global", "channel"]) -> dict[str, Any]:
    """How latents are brought to unit scale for the diffusion model (``diffusion.latent_scaling``).

    From reparameterised latents ``z = mu + sigma * eps`` ``(N, C, *latent)``: ``global``: shift 0 and the single
    factor ``1 / std(z)`` for every channel (Rombach et al. 2022); ``channel``: shift ``mean_c(z)`` and factor
    ``1 / std_c(z)`` per channel. The diffusion model sees ``(z - shift) * scale``; sampling returns
    ``x / scale + shift``.

    Returns:
        ``{"latent_scale_factor": 1 / std(z) (the global factor, always), "latent_shift": [C],
        "latent_scale": [C], "latent_channel_mean": [C], "latent_channel_std": [C]}`` (the manifest's keys).

    Raises:
        ValueError: a channel (or the whole latent) has no spread: the autoencoder did not train.
    """
    z = mu + sigma * torch.randn(mu.shape, generator=generator)
    per_channel = z.transpose(0, 1).flatten(1)
    mean, std = per_channel.mean(1).double(), per_channel.std(1).double()
    factor = latent_scale_factor(mu, sigma, generator)  # a fresh draw of eps: the same figure as before this option
    if mode == "global":
        shift, scale = torch.zeros_like(mean), torch.full_like(mean, factor)
    elif mode == "channel":
        if not torch.isfinite(std).all() or (std <= 0).any():
            raise ValueError(f"latent channels have standard deviations {std.tolist()}; the autoencoder did not train")
        shift, scale = mean, 1.0 / std
    else:
        raise ValueError(f"mode must be global or channel, found {mode!r}")
    return {"latent_scale_factor": factor, "latent_shift": shift.tolist(), "latent_scale": scale.tolist(),
            "latent_channel_mean": mean.tolist(), "latent_channel_std": std.tolist()}


def latent_norm_tensors(manifest: dict[str, Any], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, scale)``, each ``(C,)`` float32, of an artifact's manifest: its ``latent_shift`` and ``latent_scale``
    when it has them, else (artifacts written before per-channel scaling) shift 0 and ``latent_scale_factor``.

    Raises:
        ValueError: the values are missing, not ``channels`` long, not finite, or the scale is not positive.
    """
    if "latent_scale" in manifest or "latent_shift" in manifest:
        shift, scale = manifest.get("latent_shift"), manifest.get("latent_scale")
    else:
        factor = manifest.get("latent_scale_factor")
        shift, scale = [0.0] * channels, [factor] * channels
    try:
        shift_t = torch.tensor(shift, dtype=torch.float32)
        scale_t = torch.tensor(scale, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"latent_shift / latent_scale must be lists of {channels} numbers, found {shift!r} and "
                         f"{scale!r}") from exc
    if shift_t.shape != (channels,) or scale_t.shape != (channels,):
        raise ValueError(f"latent_shift and latent_scale must hold {channels} values (one per latent channel), found "
                         f"{list(shift_t.shape)} and {list(scale_t.shape)}")
    if not (torch.isfinite(shift_t).all() and torch.isfinite(scale_t).all()) or (scale_t <= 0).any():
        raise ValueError(f"latent_shift must be finite and latent_scale finite and > 0, found {shift} and {scale}")
    return shift_t, scale_t


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error with a per-position weight ``(B, 1, *latent)`` (None = plain mean), normalised so
    that a uniform error gives the plain mean."""
    if weight is None:
        return F.mse_loss(pred, target)
    w = weight.expand_as(pred)
    return ((pred - target) ** 2 * w).sum() / w.sum()


def _train_superres(ae: GeneratorAutoencoder, sr: SuperResolution, x: torch.Tensor, cfg: GeneratorConfig,
                    rt: Runtime, *, seed: int, ckpt: Path, progress: bool,
                    classes: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Stage 2: decoder + SR module on the frozen encoder, ``x`` ``(N, 5, *shape)`` (``classes`` ``(N,)`` for a
    class-conditional decoder)."""
    from monai.losses import SSIMLoss

    scfg = cfg.superres
    perceptual = make_perceptual_loss(cfg.autoencoder) if cfg.autoencoder.perceptual_weights else None
    if perceptual is not None:
        perceptual = perceptual.to(rt.device)
    trainable = _DecodeRefine(ae, sr, scfg.patch_size)
    params = list(ae.ae.post_quant_conv.parameters()) + list(ae.ae.decoder.parameters()) + list(sr.parameters())
    if getattr(ae.ae, "class_vectors", None) is not None:
        params.append(ae.ae.class_vectors)
    opt = torch.optim.Adam(params, lr=scfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.precision == "fp16")
    history: dict[str, list[float]] = {}
    start = 0
    if ckpt.is_file():
        state = load_checkpoint(ckpt, map_location=rt.device)
        ae.ae.load_state_dict(state["autoencoder"])
        sr.load_state_dict(state["superres"])
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], int(state["epoch"])
        if start < scfg.epochs:
            log.info("superres: resuming from epoch %d/%d (%s)", start, scfg.epochs, ckpt)
    if start >= scfg.epochs:
        return history
    for p in ae.ae.encoder.parameters():
        p.requires_grad_(False)
    for p in list(ae.ae.quant_conv_mu.parameters()) + list(ae.ae.quant_conv_log_sigma.parameters()):
        p.requires_grad_(False)
    run = rt.wrap(trainable)
    from synthlearn.synthesis.cases import INTENSITY_CEIL

    ssim = SSIMLoss(spatial_dims=3, data_range=INTENSITY_CEIL, win_size=7)  # the generator scale spans [0, 1.5]
    n = x.shape[0]
    for epoch in range(start, scfg.epochs):
        gen = torch_generator(seed, "superres", epoch)
        run.train()
        ae.ae.encoder.eval()
        sums = {"l1": 0.0, "ssim": 0.0, "mask_dice": 0.0}
        if perceptual is not None:
            sums["perceptual"] = 0.0
        batches = _batches(n, scfg.batch_size, gen, rt)
        count = 0
        for idx in _progress(batches, len(batches), f"superres {epoch + 1}/{scfg.epochs}", progress):
            xb = x[idx]
            cb = classes[idx].to(rt.device) if classes is not None else None
            if cfg.augment_flip:
                xb = _random_flip(xb, gen)
            xb = xb.to(rt.device)
            with torch.no_grad(), rt.autocast():
                mu, sigma = ae.encode(xb)
            eps = _latent_eps(tuple(mu.shape), gen).to(rt.device)
            z = (mu.float() + sigma.float() * eps)
            corner = _patch_corner(tuple(xb.shape[-3:]), scfg.patch_size, gen, xb[:, MASK_CHANNEL],
                                   cfg.tumour_patch_fraction)
            if corner is not None:
                (x0, y0, z0), (px, py, pz) = corner, scfg.patch_size
                xb = xb[..., x0 : x0 + px, y0 : y0 + py, z0 : z0 + pz]
            with rt.autocast():
                out = run(z, corner, cb).float()
                l1 = reconstruction_l1(out, xb, cfg.autoencoder.mask_weight, cfg.autoencoder.tumour_weight,
                                       cfg.autoencoder.enhancement_weight)
                s_loss = ssim(out[:, :MASK_CHANNEL], xb[:, :MASK_CHANNEL])
                dice = mask_dice_loss(out, xb)
                loss = l1 + scfg.ssim_weight * s_loss + cfg.autoencoder.mask_dice_weight * dice
                if perceptual is not None:
                    p_loss = perceptual(out, xb)
                    loss = loss + scfg.perceptual_weight * p_loss
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sums["l1"] += float(l1.detach()) * len(idx)
            sums["ssim"] += float(s_loss.detach()) * len(idx)
            sums["mask_dice"] += float(dice.detach()) * len(idx)
            if perceptual is not None:
                sums["perceptual"] += float(p_loss.detach()) * len(idx)
            count += len(idx)
        sums, count = _reduce(sums, count, rt)
        means = _history_append(history, sums, count)
        log.info("superres epoch %d/%d: %s", epoch + 1, scfg.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in means.items()))
        if rt.is_main:
            save_checkpoint(ckpt, {"epoch": epoch + 1, "autoencoder": ae.ae.state_dict(), "superres": sr.state_dict(),
                                   "optimizer": opt.state_dict(), "history": history})
        rt.barrier()
    for p in ae.ae.parameters():
        p.requires_grad_(True)
    return history


def latent_scale_factor(mu: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator) -> float:
    """``1 / std`` of reparameterised latents ``mu + sigma * eps`` (Rombach et al. 2022, Sec. 4.3.2)."""
    z = mu + sigma * torch.randn(mu.shape, generator=generator)
    std = float(z.std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latents have standard deviation {std}; the autoencoder did not train")
    return 1.0 / std


def _ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                ema[k].copy_(v)


def _train_diffusion(model: ClassConditionedUNet, mu: torch.Tensor, sigma: torch.Tensor, classes: torch.Tensor,
                     scale: float | tuple[torch.Tensor, torch.Tensor], cfg: GeneratorConfig, rt: Runtime, *,
                     seed: int, ckpt: Path, progress: bool, tumour: torch.Tensor | None = None,
                     ) -> tuple[dict[str, list[float]], dict[str, torch.Tensor] | None]:
    """Stage 3: DDPM noise (or velocity) prediction on scaled latents; ``classes`` -1 = unknown (trained as the
    null class). ``scale``: one factor, or ``(shift, scale)`` per channel ``(C,)`` each (the model sees
    ``(z - shift) * scale``; :func:`latent_normalisation`). ``tumour``: :func:`latent_tumour_map` of the same
    latents; with ``diffusion.tumour_weight`` != 1 the loss at each position is weighted ``1 + (tumour_weight - 1)
    * map`` (ignored when None)."""
    if isinstance(scale, tuple):
        shift_c, scale_c = (t.float().view(1, -1, *([1] * (mu.dim() - 2))) for t in scale)
    else:
        shift_c, scale_c = torch.zeros(()), torch.tensor(float(scale))
    dcfg = cfg.diffusion
    opt = torch.optim.AdamW(model.parameters(), lr=dcfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.precision == "fp16")
    scheduler = build_scheduler(dcfg, "ddpm")
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if dcfg.ema_decay > 0 else None
    history: dict[str, list[float]] = {}
    start = 0
    if ckpt.is_file():
        state = load_checkpoint(ckpt, map_location=rt.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema = state["ema"]
        history, start = state["history"], int(state["epoch"])
        if start < dcfg.epochs:
            log.info("diffusion: resuming from epoch %d/%d (%s)", start, dcfg.epochs, ckpt)
    if start >= dcfg.epochs:
        return history, ema
    run = rt.wrap(model)
    null = model.null_class
    targets = torch.where(classes >= 0, classes, torch.full_like(classes, null))
    n = mu.shape[0]
    weights = None
    if tumour is not None and dcfg.tumour_weight != 1.0:
        if tumour.shape != (n, 1, *mu.shape[2:]):
            raise ValueError(f"tumour map must be {(n, 1, *mu.shape[2:])} (one per latent), "
                             f"found {tuple(tumour.shape)}")
        weights = 1.0 + (dcfg.tumour_weight - 1.0) * tumour
    for epoch in range(start, dcfg.epochs):
        gen = torch_generator(seed, "diffusion", epoch)
        run.train()
        sums = {"mse": 0.0}
        count = 0
        batches = _batches(n, dcfg.batch_size, gen, rt)
        for idx in _progress(batches, len(batches), f"diffusion {epoch + 1}/{dcfg.epochs}", progress):
            z = (mu[idx] + sigma[idx] * torch.randn(mu[idx].shape, generator=gen) - shift_c) * scale_c
            noise = torch.randn(z.shape, generator=gen)
            t = torch.randint(0, dcfg.num_train_timesteps, (z.shape[0],), generator=gen)
            cls = drop_labels(targets[idx], dcfg.label_dropout, null, gen)
            noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=t)
            target = noise if dcfg.prediction_type == "epsilon" else scheduler.get_velocity(z, noise, t)
            noisy, target, t, cls = noisy.to(rt.device), target.to(rt.device), t.to(rt.device), cls.to(rt.device)
            with rt.autocast():
                pred = run(noisy, t, cls).float()
                loss = weighted_mse(pred, target, None if weights is None else weights[idx].to(rt.device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            _clip(model, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                _ema_update(ema, model, dcfg.ema_decay)
            sums["mse"] += float(loss.detach()) * len(idx)
            count += len(idx)
        sums, count = _reduce(sums, count, rt)
        means = _history_append(history, sums, count)
        if (epoch + 1) % max(1, dcfg.epochs // 10) == 0 or epoch + 1 == dcfg.epochs:
            log.info("diffusion epoch %d/%d: mse %.4g", epoch + 1, dcfg.epochs, means["mse"])
        if rt.is_main:
            payload = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                       "history": history}
            if ema is not None:
                payload["ema"] = ema
            save_checkpoint(ckpt, payload)
        rt.barrier()
    return history, ema


# ---------------------------------------------------------------------------------------- figures


def plot_loss_curves(histories: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """One panel per stage, one line per loss term against the epoch (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if histories.get(s)]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4.2 * max(1, len(stages)), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for name, values in histories[stage].items():
            vals = np.asarray(values, dtype=float)
            if np.all(vals > 0):
                ax.semilogy(np.arange(1, len(vals) + 1), vals, label=name, marker="." if len(vals) < 30 else None)
            else:
                ax.plot(np.arange(1, len(vals) + 1), vals, label=name)
        ax.set_title(stage)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("generator training losses")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ driver


def _run_identity(cfg: GeneratorConfig, seed: int, fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {"config": to_dict(cfg), "seed": seed, "data_sha256": fingerprint["sha256"]}


def _prepare_out(out: Path, identity: dict[str, Any]) -> Path:
    """Check ``out`` is new, empty or an unfinished run of the same config/seed/data; return the checkpoint
    folder (created)."""
    ckpt_dir = out / "checkpoints"
    run_file = ckpt_dir / "run.json"
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out}: expected a folder for the artifact, found a file")
        entries = [p.name for p in out.iterdir()]
        if "manifest.json" in entries:
            raise ValueError(f"--out {out}: already holds a finished artifact (manifest.json); choose a new folder")
        if entries and not run_file.is_file():
            raise ValueError(f"--out {out}: expected a new or empty folder (or an unfinished train-generator run), "
                             f"found {sorted(entries)[:10]}")
        if run_file.is_file():
            previous = json.loads(run_file.read_text())
            if previous != json.loads(json.dumps(identity)):
                diff = [k for k in identity if previous.get(k) != json.loads(json.dumps(identity[k]))]
                raise ValueError(f"{run_file}: an unfinished run with a different {', '.join(diff)} is in {out}; "
                                 f"resume needs the same site, config and seed, or use a new --out")
            log.info("resuming the unfinished generator training in %s", out)
            return ckpt_dir
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    from synthlearn.data.io import write_json

    write_json(run_file, identity)
    return ckpt_dir


def train_generator(site_dir: Path, cfg: GeneratorConfig, out: Path, seed: int = 0, *,
                    case_ids: Sequence[str] | None = None, progress: bool = True) -> Path:
    """Train a site's generator and write its artifact.

    Args:
        site_dir: one site folder of the data contract (case folders with the four sequences and ``seg``,
            ``labels.csv`` with the ``cfg.label`` column).
        cfg: the generator settings (e.g. ``load_generator_config("configs/generator_cpu.toml")``).
        out: the artifact folder (new or empty; an unfinished run of the same site/config/seed resumes).
        seed: every random choice derives from it; same seed, same artifact bytes (CPU, one thread).
        case_ids: train on these cases of the site only (default: all); the others stay unseen by the
            generator (the privacy audit's non-members). The manifest records the count, never the ids.
        progress: tqdm bars.

    Returns:
        ``out``, holding ``manifest.json``, three ``.safetensors`` files and ``loss_curves.png``.

    Raises:
        FileNotFoundError / ValueError: bad site data, config or ``out`` (nothing is written).
    """
    from synthlearn import __version__
    from synthlearn.runinfo import data_fingerprint, file_sha256, version_info
    from synthlearn.synthesis.artifact import write_artifact

    site_dir, out = Path(site_dir), Path(out)
    if not isinstance(cfg, GeneratorConfig):
        raise TypeError(f"cfg must be a GeneratorConfig, found {type(cfg).__name__}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, found {seed!r}")
    if cfg.autoencoder.perceptual_weights and not Path(cfg.autoencoder.perceptual_weights).is_file():
        make_perceptual_loss(cfg.autoencoder)  # raises FileNotFoundError with the fix, before anything is written
    t0 = time.perf_counter()
    cases = open_site(site_dir, cfg, case_ids)
    fingerprint = data_fingerprint(cases, include_ids=False)
    rt = setup_runtime(cfg)
    identity = _run_identity(cfg, seed, fingerprint)
    if rt.is_main:
        ckpt_dir = _prepare_out(out, identity)
    rt.barrier()
    ckpt_dir = out / "checkpoints"

    data = load_site_tensors(cases, cfg)
    names = cfg.class_names
    counts = {name: int((data.class_index == i).sum()) for i, name in enumerate(names)}
    unlabelled = int((data.class_index < 0).sum())
    log.info("site %s: %d cases, %s = %s, %d unlabelled; grid %s, latent %dx%s", site_dir, len(cases), cfg.label,
             counts, unlabelled, cfg.shape, cfg.autoencoder.latent_channels, cfg.latent_shape)

    torch.manual_seed(seed)  # initial weights: same seed, same network
    ae = GeneratorAutoencoder(cfg.autoencoder, cfg.shape, cfg.latent_shape, len(names), cfg.channels).to(rt.device)
    sr = SuperResolution(cfg.superres, cfg.shape, cfg.channels).to(rt.device)
    dm = ClassConditionedUNet(cfg.diffusion, cfg.autoencoder.latent_channels, len(names)).to(rt.device)

    x_work = ae.to_working(data.x) if ae.working_shape != tuple(cfg.shape) else data.x
    histories: dict[str, dict[str, list[float]]] = {}
    histories["autoencoder"] = _train_autoencoder(ae, x_work, cfg, rt, seed=seed, ckpt=ckpt_dir / "autoencoder.pt",
                                                  progress=progress, classes=data.class_index)
    histories["superres"] = _train_superres(ae, sr, data.x, cfg, rt, seed=seed, ckpt=ckpt_dir / "superres.pt",
                                            progress=progress, classes=data.class_index)
    mu, sigma = encode_site(ae, data.x, rt, flips=cfg.augment_flip)
    classes = torch.cat([data.class_index] * (2 if cfg.augment_flip else 1))
    norm = latent_normalisation(mu, sigma, torch_generator(seed, "latent-scale"), cfg.diffusion.latent_scaling)
    log.info("latents: global scale factor %.4f; per channel mean %s, std %s (%s scaling)",
             norm["latent_scale_factor"], [round(v, 3) for v in norm["latent_channel_mean"]],
             [round(v, 3) for v in norm["latent_channel_std"]], cfg.diffusion.latent_scaling)
    tumour = latent_tumour_map(data.x, cfg.latent_shape, flips=cfg.augment_flip, mode=cfg.diffusion.tumour_weighting)
    histories["diffusion"], ema = _train_diffusion(
        dm, mu, sigma, classes, (torch.tensor(norm["latent_shift"]), torch.tensor(norm["latent_scale"])), cfg, rt,
        seed=seed, ckpt=ckpt_dir / "diffusion.pt", progress=progress, tumour=tumour)
    if not rt.is_main:
        rt.barrier()
        return out

    figure = plot_loss_curves(histories, ckpt_dir / "loss_curves.png")
    config = to_dict(cfg)
    perceptual_note: dict[str, Any]
    if cfg.autoencoder.perceptual_weights:
        pw = Path(cfg.autoencoder.perceptual_weights)
        config["autoencoder"]["perceptual_weights"] = pw.name  # no local paths leave the site
        perceptual_note = {"used": True, "weights_file": pw.name, "weights_sha256": file_sha256(pw)}
    else:
        perceptual_note = {"used": False, "reason": "no weights given (autoencoder.perceptual_weights is empty); "
                                                    "synthlearn never downloads weights"}
    total = sum(counts.values())
    finals = {stage: {k: v[-1] for k, v in h.items() if v} for stage, h in histories.items()}
    manifest = {
        "package": {"synthlearn": __version__, **version_info()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "config": config,
        "label": cfg.label,
        "class_names": list(names),
        "class_counts": counts,
        "class_prevalence": {k: (v / total if total else 0.0) for k, v in counts.items()},
        "unlabelled_cases": unlabelled,
        "data_fingerprint": fingerprint,
        "shape": list(cfg.shape),
        "working_shape": list(ae.working_shape),
        "latent_shape": list(cfg.latent_shape),
        "latent_channels": cfg.autoencoder.latent_channels,
        **norm,
        "voxel_size_mm": list(data.voxel_size),
        "intensity_scale": "per sequence, z-scored over the brain at the case's resolution, fitted to the grid, "
                           "then brain 0.5th/99.5th percentiles -> 0.2/1.0, clipped to [0.2, 1.5]; "
                           "background 0 (synthlearn.synthesis.cases.generator_intensities)",
        "perceptual_loss": perceptual_note,
        "training": {"epochs": {s: len(next(iter(h.values()), [])) for s, h in histories.items()},
                     "final_losses": finals, "history": histories,
                     "wall_time_s": round(time.perf_counter() - t0, 1), "device": str(rt.device),
                     "precision": cfg.precision, "world_size": rt.world_size,
                     "diffusion_weights": "ema" if ema is not None else "last"},
        "figures": ["loss_curves.png"],
    }
    weights = {
        "autoencoder.safetensors": ae.ae.state_dict(),
        "superres.safetensors": sr.state_dict(),
        "diffusion.safetensors": ema if ema is not None else dm.state_dict(),
    }
    write_artifact(out, weights=weights, manifest=manifest, files={"loss_curves.png": figure}, replace=True)
    log.info("generator artifact written to %s (%.1f s)", out, time.perf_counter() - t0)
    rt.barrier()
    return out
