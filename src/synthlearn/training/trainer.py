"""The one task trainer every arm uses (centralized, local, each FedAvg site, synthetic-data arms).

A plain loop, top to bottom: per epoch, a seeded permutation of the cases, batches of preprocessed
arrays, random flips, per-voxel cross-entropy over the tumour (every tumour voxel carries its case's
class; background is ignored, paper 000), SGD with Nesterov momentum and a polynomial learning-rate decay
(the nnU-Net recipe that CATphishing's task model inherits). A checkpoint after every
``checkpoint_every`` epochs holds the model, the optimizer, the loss history and the RNG state; it is
written atomically and training resumes from it to the same weights as an uninterrupted run.

Every random choice of epoch ``e`` is drawn from generators seeded with ``(seed, name, e)``: the same
seed gives the same weights, and a FedAvg run over one site reproduces plain training on that site.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synthlearn.data.contract import SEG_VALUES
from synthlearn.data.datasets import CaseDataset
from synthlearn.models.classifier import case_probabilities
from synthlearn.training.checkpoint import load_checkpoint, save_checkpoint
from synthlearn.training.seeding import derive_seed, torch_generator

log = logging.getLogger(__name__)

#: target value of voxels that do not count in the loss (background)
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Task-model training settings (the ``[train]`` table of a study config).

    Attributes:
        epochs: passes over the training cases (paper: 1000). FedAvg runs ``rounds * local_epochs``.
        batch_size: cases per step.
        lr: initial learning rate of SGD (nnU-Net: 0.01).
        momentum: SGD momentum (nnU-Net: 0.99).
        nesterov: Nesterov momentum.
        weight_decay: L2 weight decay (nnU-Net: 3e-5).
        optimizer: ``sgd`` (the paper's; ``momentum``/``nesterov`` apply) or ``adamw`` (Adam with decoupled
            weight decay, betas (0.9, 0.999); ``momentum``/``nesterov`` are ignored).
        lr_schedule: ``poly``: ``lr * (1 - epoch / total) ** 0.9`` per epoch (nnU-Net); ``cosine``: half a
            cosine from ``lr`` to 0 over every step; ``constant``.
        warmup_epochs: linear warm-up of the learning rate from ~0 over this many epochs' steps (0 = none),
            then the schedule (counted from the warm-up's end for ``cosine``).
        grad_clip: clip the gradient norm (0 = off; nnU-Net: 12).
        class_weighting: ``none`` (plain voxel cross-entropy) or ``balanced`` (classes weighted by
            inverse case frequency in the training cases).
        loss_normalisation: ``voxel``: the cross-entropy is the mean over every tumour voxel of the batch
            (paper 000: a case with a large tumour weighs more); ``case``: the mean over each case's tumour
            voxels, then the mean over the batch's cases (each case weighs the same, whatever its tumour's
            size; on the phantom the wildtype tumours are about twice the mutant ones).
        collapse_margin: after training, a network "did not learn" when its final training loss is above
            ``(1 - collapse_margin)`` times the loss of predicting the training class frequencies (the chance
            level of its loss), or when it predicts one class for every training case
            (:func:`synthlearn.training.learning_check.check_learning`); reported, never silent.
        retrain_collapsed: retrain a network that did not learn with the next seed, at most this many times
            (0 = off: report only); every retry is recorded in ``model.json``. Arms that train with
            ``train_task_model`` (centralized, local, catphishing) retry; a FedAvg federation is reported, not re-run.
        parallel_networks: train this many of a task model's networks (its folds and stages) at the same time,
            each in its own process with one torch thread (1 = one after another in the calling process, with its
            threads). On two cores, two single-thread processes train about 1.5x as many networks per hour as one
            two-thread process (docs/benchmarks.md, section 20); the weights differ from a sequential run only by
            floating-point summation order.
        augment_flips: random flips along each spatial axis.
        augment_noise: Gaussian noise added to the (z-scored) images inside the brain, its standard deviation
            drawn per case from U(0, augment_noise); 0 = off. For training on synthetic cases, whose decoder
            averages scanner noise away (CatphishingConfig.task_augment_noise).
        augment_intensity: random brightness, contrast and gamma per case and sequence inside the brain
            (nnU-Net's intensity augmentations, in z-score units): gamma ``exp(U(-a, a))`` over the brain's
            intensity range, contrast ``U(1 - a, 1 + a)`` about the brain mean, brightness ``U(-a, a)``; 0 = off.
            Makes the model less sensitive to how bright each sequence renders the tumour, the gap between
            decoded and real cases (CatphishingConfig.task_augment_intensity); at 0.3 on the demo-long arm's
            synthetic cases it lowered the task model (0.724 vs 0.759 over six seeds); on the demo's real sites
            it cost egd's local model 0.03-0.08 on each of three seeds and tcga's 0.08 on one
            (docs/benchmarks.md 18).
        bf16: bfloat16 autocast for forward/backward (CPU with AVX-512 BF16, or CUDA).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``.
        checkpoint_every: write the resumable checkpoint every this many epochs (and at the end).
    """

    epochs: int = 2
    batch_size: int = 2
    lr: float = 0.01
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr_schedule: Literal["poly", "cosine", "constant"] = "poly"
    warmup_epochs: float = 0.0
    grad_clip: float = 12.0
    class_weighting: Literal["none", "balanced"] = "none"
    loss_normalisation: Literal["voxel", "case"] = "voxel"
    augment_flips: bool = True
    augment_noise: float = 0.0
    augment_intensity: float = 0.0
    bf16: bool = False
    device: str = "auto"
    checkpoint_every: int = 1
    collapse_margin: float = 0.1
    retrain_collapsed: int = 0
    parallel_networks: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, found {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, found {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, found {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"train.momentum must be in [0, 1), found {self.momentum}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"train.optimizer must be sgd or adamw, found {self.optimizer!r}")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("train.nesterov needs momentum > 0; set nesterov = false or a momentum")
        if self.lr_schedule not in ("poly", "cosine", "constant"):
            raise ValueError(f"train.lr_schedule must be poly, cosine or constant, found {self.lr_schedule!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"train.warmup_epochs must be in [0, epochs = {self.epochs}), found {self.warmup_epochs}")
        if self.loss_normalisation not in ("voxel", "case"):
            raise ValueError(f"train.loss_normalisation must be voxel or case, found {self.loss_normalisation!r}")
        if not 0 <= self.collapse_margin < 1:
            raise ValueError(f"train.collapse_margin must be in [0, 1), found {self.collapse_margin}")
        if isinstance(self.retrain_collapsed, bool) or self.retrain_collapsed < 0:
            raise ValueError(f"train.retrain_collapsed must be an integer >= 0, found {self.retrain_collapsed!r}")
        if isinstance(self.parallel_networks, bool) or self.parallel_networks < 1:
            raise ValueError(f"train.parallel_networks must be an integer >= 1, found {self.parallel_networks!r}")
        if self.class_weighting not in ("none", "balanced"):
            raise ValueError(f"train.class_weighting must be none or balanced, found {self.class_weighting!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"train.checkpoint_every must be >= 1, found {self.checkpoint_every}")
        if not 0 <= self.augment_noise < 10:
            raise ValueError(f"train.augment_noise must be in [0, 10) (z-score units), found {self.augment_noise}")
        if not 0 <= self.augment_intensity < 1:
            raise ValueError(f"train.augment_intensity must be in [0, 1), found {self.augment_intensity}")


def add_brain_noise(images: torch.Tensor, max_std: float, generator: torch.Generator) -> torch.Tensor:
    """``images`` ``(B, C, X, Y, Z)`` plus N(0, s^2) noise where any channel is non-zero (the brain), ``s`` drawn
    per case from U(0, max_std); the background stays 0."""
    std = torch.rand(images.shape[0], generator=generator) * max_std
    noise = torch.randn(images.shape, generator=generator) * std.view(-1, *([1] * (images.ndim - 1)))
    brain = (images != 0).any(dim=1, keepdim=True)
    return images + noise.to(images.dtype) * brain


def random_intensity(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """``images`` ``(B, C, X, Y, Z)`` with a random gamma, contrast and brightness per case and channel, inside
    the brain (where any channel is non-zero); the background stays 0.

    Per case and channel, with ``a = strength``: the brain's intensities ``x`` in ``[lo, hi]`` become
    ``lo + (hi - lo) * ((x - lo) / (hi - lo)) ** g`` with ``g = exp(U(-a, a))`` (monotone: the order of the
    voxels is kept), then ``(x - m) * c + m + b`` with ``m`` their mean, ``c ~ U(1 - a, 1 + a)``,
    ``b ~ U(-a, a)``.
    """
    b, c = images.shape[:2]
    brain = (images != 0).any(dim=1, keepdim=True)
    flat = images.flatten(2).float()
    inside = brain.flatten(2).expand_as(flat)
    n = inside.sum(-1).clamp_min(1)
    lo = torch.where(inside, flat, torch.inf).amin(-1).nan_to_num(0.0, posinf=0.0)
    hi = torch.where(inside, flat, -torch.inf).amax(-1).nan_to_num(0.0, neginf=0.0)
    span = (hi - lo).clamp_min(1e-6)
    gamma = torch.exp((torch.rand(b, c, generator=generator) * 2 - 1) * strength)
    contrast = 1 + (torch.rand(b, c, generator=generator) * 2 - 1) * strength
    brightness = (torch.rand(b, c, generator=generator) * 2 - 1) * strength
    lo_, span_ = lo[..., None], span[..., None]
    out = lo_ + span_ * ((flat - lo_) / span_).clamp(0, 1) ** gamma[..., None]
    mean = (out * inside).sum(-1, keepdim=True) / n[..., None]
    out = (out - mean) * contrast[..., None] + mean + brightness[..., None]
    out = torch.where(inside, out, flat).view(images.shape)
    return out.to(images.dtype)


@dataclasses.dataclass
class TrainOutcome:
    """What :func:`train_model` returns.

    Attributes:
        losses: mean training loss of every epoch run so far (including epochs before a resume).
        optimizer_state: the optimizer's state dict (momentum buffers), e.g. for a FedAvg site to keep.
        epochs_done: epochs completed (global index, ``stop_epoch``).
        resumed_from: the epoch a checkpoint resumed from, or None.
        steps: optimizer steps taken in this call.
        wall_s: seconds spent in this call.
    """

    losses: list[float]
    optimizer_state: dict[str, Any]
    epochs_done: int
    resumed_from: int | None = None
    steps: int = 0
    wall_s: float = 0.0


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def voxel_targets(seg: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-voxel targets: the case's class on tumour voxels, :data:`IGNORE_INDEX` elsewhere.

    Args:
        seg: ``(B, *spatial)`` integer segmentation (0 = background).
        targets: ``(B,)`` class index per case.

    Returns:
        ``(B, *spatial)`` int64.
    """
    if targets.ndim != 1 or seg.shape[0] != targets.shape[0]:
        raise ValueError(f"targets must be (B,) matching seg (B, ...), found {tuple(targets.shape)} "
                         f"and {tuple(seg.shape)}")
    expanded = targets.view(-1, *([1] * (seg.ndim - 1))).expand_as(seg).long()
    return torch.where(seg > 0, expanded, torch.full_like(expanded, IGNORE_INDEX))


def voxel_loss(logits: torch.Tensor, seg: torch.Tensor, targets: torch.Tensor,
               class_weights: torch.Tensor | None = None, normalisation: str = "voxel") -> torch.Tensor:
    """Cross-entropy over tumour voxels, each labelled with its case's class (background ignored).

    Args:
        logits: ``(B, K, *spatial)``.
        seg: ``(B, *spatial)``.
        targets: ``(B,)`` class per case.
        class_weights: optional ``(K,)`` weights.
        normalisation: ``voxel``: the (class-weighted) mean over every tumour voxel of the batch; ``case``: the
            mean over each case's tumour voxels, then the (class-weighted) mean over the cases that have a
            tumour (:class:`TrainConfig` ``loss_normalisation``).

    Returns:
        Scalar loss (0 with a gradient path when the batch holds no tumour voxel).
    """
    voxels = voxel_targets(seg, targets)
    tumour = voxels != IGNORE_INDEX
    if not tumour.any():
        return logits.sum() * 0.0
    if normalisation == "voxel":
        return F.cross_entropy(logits.float(), voxels, weight=class_weights, ignore_index=IGNORE_INDEX)
    if normalisation != "case":
        raise ValueError(f"normalisation must be voxel or case, found {normalisation!r}")
    ce = F.cross_entropy(logits.float(), voxels, ignore_index=IGNORE_INDEX, reduction="none")  # 0 off the tumour
    counts = tumour.flatten(1).sum(1)
    per_case = ce.flatten(1).sum(1) / counts.clamp_min(1)
    w = (counts > 0).float()
    if class_weights is not None:
        w = w * class_weights.to(w.device)[targets.long()]
    return (per_case * w).sum() / w.sum().clamp_min(1e-12)


def segmentation_loss(logits: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """MONAI's ``DiceCELoss`` (softmax over the labels, one-hot target, Dice over every label including
    background, batch Dice) of ``(B, 4, *S)`` logits against ``(B, *S)`` contract labels; a scalar."""
    from monai.losses import DiceCELoss

    if logits.shape[1] != len(SEG_VALUES):
        raise ValueError(f"segmentation logits must have {len(SEG_VALUES)} channels (one per contract label), "
                         f"found {logits.shape[1]}")
    loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    return loss(logits.float(), seg.unsqueeze(1).long())


def multitask_loss(seg_logits: torch.Tensor, head_logits: Sequence[torch.Tensor], seg: torch.Tensor,
                   head_targets: torch.Tensor, head_weights: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
    """The multi-task loss (Ren et al.): :func:`segmentation_loss` plus, per classification head, the cross-entropy
    over the cases of the batch whose label is known (a head without one adds 0, with a gradient path).

    Args:
        seg_logits: ``(B, 4, *S)``.
        head_logits: per head ``(B, K_h)``.
        seg: ``(B, *S)`` contract labels.
        head_targets: ``(B, H)`` int64 class per head, -1 = unknown (masked).
        head_weights: per head optional ``(K_h,)`` class weights.

    Returns:
        Scalar loss.
    """
    if head_targets.ndim != 2 or head_targets.shape != (seg.shape[0], len(head_logits)):
        raise ValueError(f"head targets must be (B, {len(head_logits)}), found {tuple(head_targets.shape)}")
    loss = segmentation_loss(seg_logits, seg)
    for h, logits in enumerate(head_logits):
        t = head_targets[:, h]
        known = t >= 0
        if not known.any():
            loss = loss + logits.sum() * 0.0
            continue
        w = head_weights[h] if h < len(head_weights) else None
        loss = loss + F.cross_entropy(logits.float()[known], t[known], weight=w)
    return loss


def multitask_voxel_loss(seg_logits: torch.Tensor, voxel_logits: Sequence[torch.Tensor], seg: torch.Tensor,
                         head_targets: torch.Tensor, head_weights: Sequence[torch.Tensor | None] = (),
                         normalisation: str = "case") -> torch.Tensor:
    """The multi-task loss of voxel heads (``MultiTaskUNet(pool="voxel")``): :func:`segmentation_loss` plus the mean over
    heads of :func:`voxel_loss` of each head's ``(B, K_h, *S)`` voxel logits on the true tumour voxels of the cases whose
    label is known (a case with an unknown label contributes no voxel).

    Args:
        head_targets: ``(B, H)`` int64 class per head, -1 = unknown.
        normalisation: as :func:`voxel_loss` (``case``: every case's tumour weighs the same).
    """
    if head_targets.ndim != 2 or head_targets.shape != (seg.shape[0], len(voxel_logits)):
        raise ValueError(f"head targets must be (B, {len(voxel_logits)}), found {tuple(head_targets.shape)}")
    heads = seg_logits.new_zeros(()).float()
    for h, logits in enumerate(voxel_logits):
        t = head_targets[:, h]
        known = (t >= 0).view(-1, *([1] * (seg.ndim - 1)))
        w = head_weights[h] if h < len(head_weights) else None
        heads = heads + voxel_loss(logits, seg * known, t.clamp_min(0), w, normalisation)
    # the mean over heads: their sum (four voxel losses on the same last-level features) made the segmentation
    # collapse to "no tumour" on the phantom (docs/benchmarks.md section 24)
    return segmentation_loss(seg_logits, seg) + heads / max(len(voxel_logits), 1)


def poly_lr(base_lr: float, epoch: int, total_epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay ``base_lr * (1 - epoch / total) ** exponent``."""
    return base_lr * (1.0 - min(epoch, total_epochs) / max(total_epochs, 1)) ** exponent


def learning_rate(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int, total_epochs: int) -> float:
    """The learning rate of step ``step`` (0-based, within the epoch) of global epoch ``epoch``.

    Warm-up: linear from ``lr / W`` to ``lr`` over the first ``W = round(warmup_epochs * steps_per_epoch)``
    steps. Then ``poly`` (per epoch, :func:`poly_lr`, as nnU-Net), ``cosine`` (per step, from ``lr`` to 0 over the
    steps after the warm-up) or ``constant``. A function of the global step alone, so a resumed run and a FedAvg
    site (which trains a slice of the epochs per round) follow the same curve as one uninterrupted run.
    """
    spe = max(int(steps_per_epoch), 1)
    g = epoch * spe + step
    warm = int(round(cfg.warmup_epochs * spe))
    if g < warm:
        return cfg.lr * (g + 1) / warm
    if cfg.lr_schedule == "poly":
        return poly_lr(cfg.lr, epoch, total_epochs)
    if cfg.lr_schedule == "cosine":
        total = max(total_epochs * spe - warm, 1)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(g - warm, total) / total))
    if cfg.lr_schedule == "constant":
        return cfg.lr
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optimizer``: SGD (paper 000; momentum, Nesterov) or AdamW."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def class_weights_for(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights normalised to mean 1 (absent classes get weight 0)."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def load_batch(dataset: CaseDataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack preprocessed cases: images ``(B, 4, X, Y, Z)`` float32, seg ``(B, X, Y, Z)`` int64."""
    images, segs = zip(*(dataset.arrays(int(i)) for i in indices))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(segs))


def random_flips(images: torch.Tensor, seg: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Flip each case along each spatial axis with probability 1/2 (draws from ``generator``)."""
    flips = torch.rand(images.shape[0], seg.ndim - 1, generator=generator) < 0.5
    images, seg = images.clone(), seg.clone()
    for b in range(images.shape[0]):
        axes = [a for a in range(seg.ndim - 1) if flips[b, a]]
        if axes:
            images[b] = torch.flip(images[b], dims=[a + 1 for a in axes])
            seg[b] = torch.flip(seg[b], dims=axes)
    return images, seg


def train_model(
    model: nn.Module,
    dataset: CaseDataset,
    targets: Sequence[int],
    cfg: TrainConfig,
    *,
    seed: int,
    name: str,
    total_epochs: int | None = None,
    start_epoch: int = 0,
    stop_epoch: int | None = None,
    optimizer_state: dict[str, Any] | None = None,
    checkpoint_path: str | Path | None = None,
    progress: bool = True,
    num_classes: int | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    segmentation: bool = False,
    heads: Sequence[int] = (),
) -> TrainOutcome:
    """Train ``model`` in place on labelled cases for epochs ``[start_epoch, stop_epoch)``.

    Args:
        model: a network mapping ``(B, 4, X, Y, Z)`` to per-voxel logits ``(B, K, X, Y, Z)``.
        dataset: the preprocessed training cases: anything with ``len()`` and ``arrays(i) -> (image (4, X, Y, Z),
            seg (X, Y, Z))``, e.g. :class:`CaseDataset` or :class:`synthlearn.tasks.cache.CasesView`.
        targets: class index of every case of ``dataset`` (unknown labels must be filtered out before).
        cfg: training settings.
        seed: run seed; data order, flips and dropout of epoch ``e`` are drawn from ``(seed, name, e)``.
        name: the model's name in the run (e.g. ``idh/fold-0``), part of every derived seed.
        total_epochs: length of the learning-rate schedule (default ``cfg.epochs``); FedAvg passes
            ``rounds * local_epochs`` and trains one round's slice at a time.
        start_epoch: first epoch of this call (global index).
        stop_epoch: epoch to stop before (default ``total_epochs``).
        optimizer_state: momentum buffers to continue from (a FedAvg site keeps its own).
        checkpoint_path: resumable checkpoint; when it exists (same ``name``), training continues from it.
        progress: show a tqdm bar.
        num_classes: K (for class weighting; default: from the model's output on the first batch).
        on_epoch: called as ``on_epoch(epoch, mean_loss)`` after every epoch (e.g. a worker's progress report).
        segmentation: learn the segmentation itself (:func:`synthlearn.training.segmentation.segmentation_loss`,
            Dice + cross-entropy over every voxel; ``targets`` and class weighting unused) instead of the case
            class on the tumour voxels.
        heads: classes of each classification head of a multi-task network (``model.forward_all`` gives the
            segmentation logits and the heads', :func:`multitask_loss`; a network with ``voxel_heads`` trains its
            heads' voxel logits, :func:`multitask_voxel_loss`); ``targets`` is then one tuple per case of
            a class per head, -1 where unknown; with ``class_weighting = "balanced"`` each head weighs its classes
            over its known labels.

    Returns:
        :class:`TrainOutcome`.
    """
    if len(dataset) != len(targets):
        raise ValueError(f"dataset has {len(dataset)} cases but {len(targets)} targets were given")
    if len(dataset) == 0:
        raise ValueError(f"{name}: no training cases")
    total_epochs = cfg.epochs if total_epochs is None else total_epochs
    stop_epoch = total_epochs if stop_epoch is None else stop_epoch
    if not 0 <= start_epoch <= stop_epoch <= total_epochs:
        raise ValueError(f"epochs must satisfy 0 <= start ({start_epoch}) <= stop ({stop_epoch}) "
                         f"<= total ({total_epochs})")
    device = resolve_device(cfg.device)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    losses: list[float] = []
    resumed_from = None
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint_path is not None and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, map_location=device)
        if state.get("name") != name:
            raise ValueError(f"{checkpoint_path}: checkpoint of model {state.get('name')!r}, expected {name!r}; "
                             "remove it or choose another run folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        losses = [float(x) for x in state["losses"]]
        resumed_from = int(state["epoch"])
        start_epoch = max(start_epoch, resumed_from)
        log.info("%s: resumed from %s at epoch %d", name, checkpoint_path, resumed_from)
    targets_t = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    weights = None
    head_weights: list[torch.Tensor | None] = [None] * len(heads)
    if heads:
        if targets_t.ndim != 2 or targets_t.shape[1] != len(heads):
            raise ValueError(f"{name}: a multi-task network needs one target per head ({len(heads)}) per case, found "
                             f"targets of shape {tuple(targets_t.shape)}")
        if cfg.class_weighting == "balanced":
            for h, k in enumerate(heads):
                known = targets_t[:, h][targets_t[:, h] >= 0]
                head_weights[h] = class_weights_for(known.tolist(), k).to(device) if len(known) else None
    elif cfg.class_weighting == "balanced" and not segmentation:
        k = num_classes or int(targets_t.max()) + 1
        weights = class_weights_for(targets, k).to(device)
    use_bf16 = cfg.bf16
    steps = 0
    t0 = time.perf_counter()
    epochs = range(start_epoch, stop_epoch)
    bar = None
    if progress and len(epochs):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(epochs), desc=name, unit="epoch", leave=False)
    model.train()
    steps_per_epoch = math.ceil(len(dataset) / cfg.batch_size)
    lr = cfg.lr
    for epoch in epochs:
        order = torch.randperm(len(dataset), generator=torch_generator(seed, "order", name, epoch))
        flip_gen = torch_generator(seed, "flips", name, epoch)
        noise_gen = torch_generator(seed, "noise", name, epoch)
        intensity_gen = torch_generator(seed, "intensity", name, epoch)
        torch.manual_seed(derive_seed(seed, "dropout", name, epoch))  # dropout draws from the global RNG
        epoch_loss, n_batches = 0.0, 0
        for step, start in enumerate(range(0, len(order), cfg.batch_size)):
            lr = learning_rate(cfg, epoch, step, steps_per_epoch, total_epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[start:start + cfg.batch_size]
            images, seg = load_batch(dataset, idx.tolist())
            if cfg.augment_flips:
                images, seg = random_flips(images, seg, flip_gen)
            if cfg.augment_intensity > 0:
                images = random_intensity(images, cfg.augment_intensity, intensity_gen)
            if cfg.augment_noise > 0:
                images = add_brain_noise(images, cfg.augment_noise, noise_gen)
            images, seg = images.to(device, non_blocking=True), seg.to(device, non_blocking=True)
            batch_targets = targets_t[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if heads and getattr(model, "voxel_heads", False):
                    logits, head_logits = model.forward_voxels(images)
                elif heads:
                    logits, head_logits = model.forward_all(images)
                else:
                    logits = model(images)
            if heads and getattr(model, "voxel_heads", False):
                loss = multitask_voxel_loss(logits, head_logits, seg, batch_targets, head_weights,
                                            cfg.loss_normalisation)
            elif heads:
                loss = multitask_loss(logits, head_logits, seg, batch_targets, head_weights)
            elif segmentation:
                loss = segmentation_loss(logits, seg)
            else:
                loss = voxel_loss(logits, seg, batch_targets, weights, cfg.loss_normalisation)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{name}: training loss became {value} at epoch {epoch}; "
                                         "lower train.lr or check the input data")
            epoch_loss += value
            n_batches += 1
            steps += 1
        losses.append(epoch_loss / max(n_batches, 1))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
        log.debug("%s epoch %d loss %.4f lr %.3g", name, epoch, losses[-1], lr)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
        done = epoch + 1
        if checkpoint_path is not None and (done % cfg.checkpoint_every == 0 or done == stop_epoch):
            save_checkpoint(checkpoint_path, {"name": name, "epoch": done, "model": model.state_dict(),
                                              "optimizer": optimizer.state_dict(),
                                              "losses": torch.tensor(losses, dtype=torch.float64)})
    if bar is not None:
        bar.close()
    return TrainOutcome(losses=losses, optimizer_state=optimizer.state_dict(), epochs_done=stop_epoch,
                        resumed_from=resumed_from, steps=steps, wall_s=time.perf_counter() - t0)


@torch.no_grad()
def predict_probabilities(models: Sequence[nn.Module], dataset: CaseDataset, *, batch_size: int = 2,
                          bf16: bool = False, device: str = "auto", progress: bool = False) -> np.ndarray:
    """Case probabilities of an ensemble: per model the mean softmax over each case's tumour voxels
    (seg > 0), then the mean over models (paper 000's 5-fold ensemble).

    Args:
        models: networks with the same number of classes K.
        dataset: the cases (``len()`` and ``arrays(i)``, as for :func:`train_model`).

    Returns:
        ``(N, K)`` float64 probabilities.
    """
    if not models:
        raise ValueError("predict_probabilities needs at least one model")
    dev = resolve_device(device)
    out = []
    for model in models:
        model.to(dev).eval()
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="predict", unit="batch", leave=False)
    for start in starts:
        idx = list(range(start, min(start + batch_size, len(dataset))))
        images, seg = load_batch(dataset, idx)
        images, seg = images.to(dev), seg.to(dev)
        probs = []
        for model in models:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(images)
            probs.append(case_probabilities(logits, seg > 0))
        out.append(torch.stack(probs).mean(0).double().cpu().numpy())
    k = out[0].shape[1] if out else 0
    return np.concatenate(out) if out else np.zeros((0, k))


@torch.no_grad()
def predict_head_probabilities(models: Sequence[nn.Module], dataset, *, batch_size: int = 2, bf16: bool = False,
                               device: str = "auto") -> list[np.ndarray]:
    """Per classification head of multi-task networks (``forward_all``), the ensemble's mean softmax per case.

    Returns:
        per head ``(N, K_h)`` float64 probabilities.
    """
    if not models:
        raise ValueError("predict_head_probabilities needs at least one model")
    dev = resolve_device(device)
    for model in models:
        model.to(dev).eval()
    out: list[list[np.ndarray]] = []
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        images, _ = load_batch(dataset, idx)
        images = images.to(dev)
        summed = None
        for model in models:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                _, head_logits = model.forward_all(images)
            p = [torch.softmax(t.float(), dim=1) for t in head_logits]
            summed = p if summed is None else [a + b for a, b in zip(summed, p)]
        out.append([(t / len(models)).double().cpu().numpy() for t in summed])
    if not out:
        return []
    return [np.concatenate([batch[h] for batch in out]) for h in range(len(out[0]))]


@torch.no_grad()
def predict_label_maps(models: Sequence[nn.Module], dataset, *, batch_size: int = 2, bf16: bool = False,
                       device: str = "auto") -> np.ndarray:
    """Label maps of an ensemble: per case the arg-max over the labels of the models' mean softmax.

    Args:
        models: networks with one output channel per contract label (:data:`synthlearn.data.contract.SEG_VALUES`).
        dataset: the cases (``len()`` and ``arrays(i) -> (image (C, *S), seg (*S))``).

    Returns:
        ``(N, *S)`` int64 contract labels on the preprocessed grid.
    """
    if not models:
        raise ValueError("predict_label_maps needs at least one model")
    dev = resolve_device(device)
    for model in models:
        model.to(dev).eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        images, _ = load_batch(dataset, idx)
        images = images.to(dev)
        probs = None
        for model in models:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(images)
            p = torch.softmax(logits.float(), dim=1)
            probs = p if probs is None else probs + p
        out.append(probs.argmax(dim=1).cpu().numpy().astype(np.int64))
    return np.concatenate(out) if out else np.zeros((0,), np.int64)
