"""The ``asyndgan`` arm: one generator at the server learning from a discriminator at each site (AsynDGAN, paper
003, Algorithm 1), then the task model trained on the generator's images only.

What crosses the site boundary, per :class:`AsynDGANProtocol` round:

- round 1, **the conditioning disclosure**: each site sends the masks its images will be generated for (the
  segmentation map and brain outline of every case, plus its label values when the generator is conditioned on
  them). These are patient-derived data; the report says so (``disclosure`` in the arm's results);
- every later round is one generator step: the server generates images for ``batch_size`` of each site's masks and
  sends each site its own batch (generated images and which of its masks they are for); the site updates its
  discriminator on (real, generated) pairs (:func:`discriminator_step`) and returns **only** the gradient of its
  adversarial loss with respect to the generated images (:func:`adversarial_feedback`), of the batch's shape,
  optionally clipped and noised per sample at the site (GS-WGAN), optionally with a feature-matching term
  (``feature_matching``: it reads the real batch through one mean per discriminator channel); the server averages
  the sites' gradients, back-propagates them through the generator and steps it. No L1 or perceptual term against
  the real images is computed (the reference code's leak: PRIVACY.md) and neither network ever leaves where it
  lives.

A site that does not answer within ``round_timeout_s`` is left out of that step (the round goes on with the others;
the history names it). A further task-model seed of a multi-seed study reuses the primary seed's generator and
draws its own synthetic set. Afterwards the server generates ``samples_per_mask`` images for every shared mask
(:func:`sample_synthetic`), writes them as a study of the data contract (``synthetic/``) and trains the same task
model as every other arm on them.

Intensities: a site maps its preprocessed (z-scored) images to the generator's ``[-1, 1]`` by dividing by
``intensity_scale`` and clipping; the server maps generated images back and sets everything outside the brain
outline to 0 (the contract's skull-stripped background).

**Audits** (issue 25; ``audit = true``). Each site keeps a stratified share of its cases (``audit_holdout``, by the
class of the first label column the task uses, unstratified for segmentation; :func:`audit_split`, the split of
:func:`synthlearn.audits.privacy.stratified_holdout`) out of everything: their masks are never disclosed and its
discriminator never sees them. They are the privacy audit's **non-members**; the **members** are the site's other
cases (:meth:`AsynDGANProtocol.training_cases`). The server records the split (``holdout/<site>.json``; in a
simulation it knows both groups, as FedKD's audit does). After synthesis, per site (:func:`privacy_audit`), the
shared audit of synthetic data (:func:`synthlearn.audits.privacy.audit_site`, as CATphishing's and FedKD's): the
members' and non-members' best SSIM to the images generated for the site's masks (membership inference, AUC with a
bootstrap CI, TPR at 1 % FPR), the copy rate, the negative control (members vs members), the positive control
(noisy copies of a few members) and the reference control (the images generated for the other sites' masks). A
2D study is audited with the 2D SSIM (an ``(C, X, Y, 1)`` image: same 11-pixel window in plane).

Reading it: every synthetic image is drawn for one **member's own mask**, and the server masks its background
with that member's brain outline. So each synthetic image shares its source member's tumour and brain geometry
exactly (all of it disclosed in round 1), and the SSIM, which counts the zero background and the tumour's
edges, puts a synthetic image near its source member whatever its texture; no synthetic image is drawn for a
non-member's mask. A membership AUC or a copy rate above chance here therefore first measures the mask disclosure
(membership is known to the server by construction: it holds the members' masks) and only beyond that what the
generated intensities add. ``own_mask`` separates the two: the SSIM of each synthetic image to the member whose
mask it was drawn for, and the share of them below the copy threshold (copies of their own source; the copy rate
counts copies of any member). The pooled arm (``asyndgan_pooled``) holds out the union of the sites' held-out
cases (so it learns from the same cases as ``asyndgan``) and is audited once against all of them, without a
reference control (no generator there never saw its members).

Fidelity: per-sequence Frechet radiomics distances (:func:`synthlearn.audits.fidelity.fidelity`) between each
site's synthetic images and the members of every site (the cross-site matrix), for the study's own sequences.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from synthlearn.audits.fidelity import fidelity
from synthlearn.audits.privacy import audit_site, normalize_for_ssim, ssim_matrix, stratified_holdout
from synthlearn.data.contract import SEG_VALUES, SEQUENCES, CaseRecord, Labels, SiteRecord
from synthlearn.data.io import CaseArrays, write_json
from synthlearn.evaluate.radiomics import case_id_of
from synthlearn.models.gan import NormName, PatchDiscriminator, ResnetGenerator, Upsampling, sampling_mode
from synthlearn.protocol import (
    Arrays,
    FederationError,
    FederationState,
    RoundProtocol,
    SiteReply,
    run_protocol_inprocess,
)
from synthlearn.strategies.base import REMOTE_SITE_SKIP, ArmContext, ArmOutput
from synthlearn.strategies.catphishing import plot_fid_matrix
from synthlearn.strategies.registry import ArmSpec
from synthlearn.tasks.cache import DatasetCache
from synthlearn.tasks.setup import TrainingSetup
from synthlearn.training.checkpoint import load_checkpoint, save_checkpoint
from synthlearn.training.seeding import derive_seed

log = logging.getLogger(__name__)

#: tumour regions of the conditioning (one channel per non-zero segmentation value)
TUMOUR_VALUES: tuple[int, ...] = tuple(v for v in SEG_VALUES if v)


@dataclasses.dataclass(frozen=True)
class AsynDGANConfig:
    """AsynDGAN settings (the ``[asyndgan]`` table of a study config).

    Attributes:
        iterations: generator steps (rounds after the conditioning disclosure).
        batch_size: masks per site per step (paper: 3 on BraTS).
        generator_features, generator_blocks, generator_norm, dropout, generator_edge_kernel, generator_upsampling:
            :class:`ResnetGenerator` (paper: 64, 9, batch, 0.5, 7, transposed).
        discriminator_features, discriminator_layers, discriminator_norm: :class:`PatchDiscriminator` (paper: 64,
            3, batch).
        lr, beta1, beta2: Adam for both networks (paper: 2e-4, 0.5, 0.999).
        discriminator_lr: the sites' discriminators' learning rate when it differs from the generator's (None =
            ``lr``; a faster discriminator is the two-time-scale rule of Heusel et al. 2017).
        feature_matching: weight of a feature-matching term in what a site returns (0 = none, the paper's pure
            adversarial feedback): the squared distance between the per-channel means, over the batch and every
            position, of each hidden layer of the site's discriminator on its real pairs and on the generated
            pairs (Salimans et al. 2016). Its gradient is still with respect to the generated images only, and it
            reads the real images only through one mean per channel and layer of the step's batch, never per
            image or per position (unlike a paired L1 / perceptual term, which points each generated image at
            its real source).
        gan_loss: ``vanilla`` (the paper's cross entropy; the generator's non-saturating form) or ``lsgan``.
        feedback_clip: per-sample L2 bound of the gradient a site returns (0 = none).
        feedback_noise: standard deviation of the Gaussian noise a site adds to each returned gradient, in units
            of ``feedback_clip`` (GS-WGAN; needs ``feedback_clip``).
        condition_on_labels: the generator also sees the case's label values (one constant channel per value of
            every label column; needed for a classification task: the server labels synthetic cases with them).
        intensity_scale: z-score units that map to 1 in the generator's range.
        samples_per_mask: synthetic images generated per shared mask.
        backend: ``flower`` (the real message path) or ``inprocess`` (the same rounds as function calls).
        start_timeout_s, round_timeout_s: seconds to wait for sites to connect / for a step's replies (a site
            later than that is left out of the step).
        threads_per_site, parallel_sites: as for FedAvg.
        checkpoint_every: the server saves its state every this many steps (each site keeps its discriminator on disk
            after every step: a simulated site may run its next round in another process).
        task_epochs: epochs of the task model on the synthetic cases (None = the study's).
        audit_holdout: share of each site's cases (stratified by the first label column the task uses) the site
            keeps out of everything (masks never disclosed, never seen by its discriminator): the privacy audit's
            non-members (0 = use every case and skip the privacy audit). Fewer than 2 held-out cases at a site
            skip its audit (the tiny phantom's 6 cases a site need 0.5).
        audit: run the privacy and fidelity audits of the synthetic set after synthesis (module docstring).
        masks_from: where the masks the generator draws for come from: ``sites`` (each site discloses its own in
            round 1, the paper's way) or ``catphishing`` (the masks of the CATphishing arm's synthetic cases of each
            site, from the same study run, which must run ``catphishing`` first: no site discloses a real mask; a
            site's discriminator then judges its own real pairs against generated pairs on those masks, both reduced
            to the whole tumour, the only region the CATphishing generator draws).
        fidelity_n: real and synthetic cases per site drawn for the Frechet distances (paper 000: 300 and 300).
    """

    iterations: int = 300
    batch_size: int = 2
    generator_features: int = 16
    generator_blocks: int = 3
    generator_norm: NormName = "batch"
    dropout: float = 0.5
    generator_edge_kernel: int = 7
    generator_upsampling: Upsampling = "transposed"
    discriminator_features: int = 16
    discriminator_layers: int = 2
    discriminator_norm: NormName = "batch"
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    discriminator_lr: float | None = None
    feature_matching: float = 0.0
    gan_loss: Literal["vanilla", "lsgan"] = "vanilla"
    feedback_clip: float = 0.0
    feedback_noise: float = 0.0
    condition_on_labels: bool = True
    intensity_scale: float = 3.0
    samples_per_mask: int = 1
    backend: Literal["flower", "inprocess"] = "flower"
    start_timeout_s: float = 120.0
    round_timeout_s: float = 60.0
    threads_per_site: int = 1
    parallel_sites: int = 0
    checkpoint_every: int = 50
    task_epochs: int | None = None
    audit_holdout: float = 0.2
    audit: bool = True
    fidelity_n: int = 300
    masks_from: Literal["sites", "catphishing"] = "sites"

    def __post_init__(self) -> None:
        positive = {"iterations": self.iterations, "batch_size": self.batch_size, "samples_per_mask":
                    self.samples_per_mask, "generator_features": self.generator_features, "discriminator_features":
                    self.discriminator_features, "discriminator_layers": self.discriminator_layers,
                    "threads_per_site": self.threads_per_site, "checkpoint_every": self.checkpoint_every}
        for key, value in positive.items():
            if int(value) < 1:
                raise ValueError(f"asyndgan.{key} must be >= 1, found {value}")
        if self.generator_blocks < 0:
            raise ValueError(f"asyndgan.generator_blocks must be >= 0, found {self.generator_blocks}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"asyndgan.dropout must be in [0, 1), found {self.dropout}")
        for key in ("lr", "intensity_scale", "start_timeout_s", "round_timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"asyndgan.{key} must be > 0, found {getattr(self, key)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"asyndgan.beta1 and beta2 must be in [0, 1), found {self.beta1}, {self.beta2}")
        if self.generator_upsampling not in ("transposed", "resize"):
            raise ValueError(f"asyndgan.generator_upsampling must be transposed or resize, found "
                             f"{self.generator_upsampling!r}")
        if self.gan_loss not in ("vanilla", "lsgan"):
            raise ValueError(f"asyndgan.gan_loss must be vanilla or lsgan, found {self.gan_loss!r}")
        if self.discriminator_lr is not None and not self.discriminator_lr > 0:
            raise ValueError(f"asyndgan.discriminator_lr must be > 0, found {self.discriminator_lr}")
        if self.feature_matching < 0:
            raise ValueError(f"asyndgan.feature_matching must be >= 0, found {self.feature_matching}")
        if self.feedback_clip < 0 or self.feedback_noise < 0:
            raise ValueError("asyndgan.feedback_clip and feedback_noise must be >= 0")
        if self.feedback_noise > 0 and self.feedback_clip == 0:
            raise ValueError("asyndgan.feedback_noise needs feedback_clip > 0 (the noise is in units of the clip)")
        if self.backend not in ("flower", "inprocess"):
            raise ValueError(f"asyndgan.backend must be flower or inprocess, found {self.backend!r}")
        if self.task_epochs is not None and self.task_epochs < 1:
            raise ValueError(f"asyndgan.task_epochs must be >= 1, found {self.task_epochs}")
        if not 0.0 <= self.audit_holdout < 1.0:
            raise ValueError(f"asyndgan.audit_holdout must be in [0, 1), found {self.audit_holdout}")
        if self.fidelity_n < 2:
            raise ValueError(f"asyndgan.fidelity_n must be >= 2, found {self.fidelity_n}")
        if self.masks_from not in ("sites", "catphishing"):
            raise ValueError(f"asyndgan.masks_from must be sites or catphishing, found {self.masks_from!r}")


# --------------------------------------------------------------------------------------------------- conditioning
def label_sizes(setup: TrainingSetup, cfg: AsynDGANConfig) -> tuple[int, ...]:
    """Values per label column the generator is conditioned on (empty without ``condition_on_labels``)."""
    return tuple(len(values) for _, values in label_columns(setup)) if cfg.condition_on_labels else ()


def label_columns(setup: TrainingSetup) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The study's label columns and values (the glioma defaults when it has none of its own)."""
    from synthlearn.data.contract import GLIOMA_LABELS

    return (setup.labels or GLIOMA_LABELS).columns


def condition_channels(sizes: Sequence[int]) -> int:
    """Channels of the generator's input: brain outline, one per tumour region, one per label value."""
    return 1 + len(TUMOUR_VALUES) + int(sum(sizes))


def make_condition(seg: torch.Tensor, brain: torch.Tensor, codes: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The generator's (and discriminators') conditioning maps.

    Args:
        seg: ``(B, *S)`` segmentation in contract values.
        brain: ``(B, *S)`` brain outline (0/1).
        codes: ``(B, L)`` index of each label column's value (-1 = unknown: its channels stay 0).
        sizes: values per label column (``L`` entries; empty = no label channels).

    Returns:
        ``(B, condition_channels(sizes), *S)`` float in {0, 1}.
    """
    maps = [brain.float().unsqueeze(1)] + [(seg == v).float().unsqueeze(1) for v in TUMOUR_VALUES]
    ones = torch.ones_like(maps[0])
    for col, size in enumerate(sizes):
        for value in range(size):
            hit = (codes[:, col] == value).float().view(-1, *([1] * (maps[0].ndim - 1)))
            maps.append(ones * hit)
    return torch.cat(maps, dim=1)


# ------------------------------------------------------------------------------------------------- audit holdout
def case_key(case: CaseRecord) -> str:
    """``site/case_id``: a case's name in the audit split (unique across the sites the pooled arm pools)."""
    return f"{case.site}/{case.case_id}"


def audit_stratum(setup: TrainingSetup) -> Callable[[CaseRecord], str | None]:
    """The class the audit holdout is stratified by: the first label column the task uses (a multi-task task's
    first head, a classification task's class); none (one stratum) for a segmentation task."""
    spec = setup.task_spec
    if spec.is_multitask and spec.heads:
        extract = spec.heads[0].extract
    elif spec.kind == "classification":
        extract = spec.extract
    else:
        return lambda case: None
    return lambda case: extract(case.labels) if case.labels is not None else None


def audit_split(site: SiteRecord, fraction: float, setup: TrainingSetup) -> tuple[list[str], list[str]]:
    """A site's members (cases its discriminator sees, whose masks it discloses) and held-out cases (neither: the
    privacy audit's non-members): :func:`synthlearn.audits.privacy.stratified_holdout` by :func:`audit_stratum`,
    seeded with the study's seed.

    Returns:
        ``(member_keys, holdout_keys)`` as :func:`case_key` (``site/case_id``), both sorted.
    """
    members, holdout = stratified_holdout(site, fraction, audit_stratum(setup), setup.seed)
    return [f"{site.name}/{i}" for i in members], [f"{site.name}/{i}" for i in holdout]


@dataclasses.dataclass
class SiteData:
    """One site's cases as the GAN sees them.

    Attributes:
        images: ``(N, C, *S)`` float32 in ``[-1, 1]``.
        seg: ``(N, *S)`` uint8 segmentation.
        brain: ``(N, *S)`` uint8 brain outline.
        codes: ``(N, L)`` int16 label value indices (-1 unknown).
    """

    images: torch.Tensor
    seg: torch.Tensor
    brain: torch.Tensor
    codes: torch.Tensor


def generator_range(images: np.ndarray, intensity_scale: float) -> np.ndarray:
    """Preprocessed (z-scored) ``(C, *S)`` images in the generator's range: ``clip(x / intensity_scale, -1, 1)``
    (float32; the zero background stays 0)."""
    return np.clip(np.asarray(images, np.float32) / intensity_scale, -1.0, 1.0)


def load_site_data(cases: Sequence[CaseRecord], setup: TrainingSetup, cfg: AsynDGANConfig,
                   cache: DatasetCache) -> SiteData:
    """A site's preprocessed cases in the generator's range, with their masks and label codes.

    Raises:
        ValueError: a case has no segmentation (the generator draws images for masks), or the site has no case.
    """
    if not cases:
        raise ValueError("asyndgan: the site has no training case")
    view = cache.dataset(list(cases))
    columns = label_columns(setup)
    images, segs, brains, codes = [], [], [], []
    for i, case in enumerate(cases):
        x, seg = view.arrays(i)
        if seg is None:
            raise ValueError(f"asyndgan: case {case.site}/{case.case_id} has no segmentation; the generator draws "
                             "images for masks, so every training case needs seg.nii.gz")
        images.append(generator_range(x, cfg.intensity_scale))
        segs.append(np.asarray(seg, np.uint8))
        brains.append(np.any(np.asarray(x) != 0, axis=0).astype(np.uint8))
        row = []
        for column, values in columns:
            value = case.labels.get(column) if case.labels is not None else None
            row.append(values.index(value) if value in values else -1)
        codes.append(row)
    return SiteData(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(segs)),
                    torch.from_numpy(np.stack(brains)), torch.tensor(codes, dtype=torch.int16).reshape(len(cases), -1))


def catphishing_masks(catphishing_dir: str | Path, sites: Sequence[str], setup: TrainingSetup, cfg: AsynDGANConfig,
                      cache: DatasetCache) -> dict[str, dict[str, torch.Tensor]]:
    """Per site, the masks of the CATphishing arm's synthetic cases (``<catphishing_dir>/synthetic/<site>``, the
    ones its diversity filter kept when it filtered) on the task model's grid: ``{"seg", "brain", "codes"}`` as
    :func:`load_site_data` gives a site's own.

    Raises:
        FileNotFoundError: a site has no synthetic folder there (name it and the arm to run first).
    """
    from synthlearn.data.layouts import open_study
    from synthlearn.synthesis.diversity import read_kept_case_ids

    out = {}
    for site in sites:
        folder = Path(catphishing_dir) / "synthetic" / site
        if not folder.is_dir():
            raise FileNotFoundError(f"asyndgan.masks_from = 'catphishing': {folder} does not exist; run the "
                                    "catphishing arm before asyndgan in the same study (arms = [..., "
                                    "\"catphishing\", \"asyndgan\"])")
        cases = sorted(open_study(folder).sites[0].cases, key=lambda c: c.case_id)
        if (folder / "diversity.json").is_file():
            kept = set(read_kept_case_ids(folder))
            cases = [c for c in cases if c.case_id in kept]
        data = load_site_data(cases, setup, cfg, cache)
        out[site] = {"seg": data.seg, "brain": data.brain, "codes": data.codes}
    return out


# -------------------------------------------------------------------------------------------------------- networks
def build_generator(setup: TrainingSetup, cfg: AsynDGANConfig) -> ResnetGenerator:
    dims = len(setup.preprocess.shape)
    return ResnetGenerator(dims, condition_channels(label_sizes(setup, cfg)), len(setup.sequences),
                           features=cfg.generator_features, n_blocks=cfg.generator_blocks, norm=cfg.generator_norm,
                           dropout=cfg.dropout, edge_kernel=cfg.generator_edge_kernel,
                           upsampling=cfg.generator_upsampling)


def build_discriminator(setup: TrainingSetup, cfg: AsynDGANConfig) -> PatchDiscriminator:
    dims = len(setup.preprocess.shape)
    return PatchDiscriminator(dims, condition_channels(label_sizes(setup, cfg)) + len(setup.sequences),
                              features=cfg.discriminator_features, n_layers=cfg.discriminator_layers,
                              norm=cfg.discriminator_norm)


def _adam(params, cfg: AsynDGANConfig, lr: float | None = None) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=cfg.lr if lr is None else lr, betas=(cfg.beta1, cfg.beta2))


# ---------------------------------------------------------------------------------------------------- the losses
def gan_loss(logits: torch.Tensor, real: bool, kind: str = "vanilla") -> torch.Tensor:
    """The adversarial loss of patch logits against "real" (1) or "fake" (0): binary cross entropy (``vanilla``)
    or least squares (``lsgan``), averaged over patches and batch."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def _pair(condition: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor:
    return images if condition is None else torch.cat([condition, images], dim=1)


def discriminator_step(disc: torch.nn.Module, optimizer: torch.optim.Optimizer, condition: torch.Tensor | None,
                       real: torch.Tensor, fake: torch.Tensor, kind: str = "vanilla", *,
                       fake_condition: torch.Tensor | None = None) -> dict[str, float]:
    """One update of a site's discriminator on real and generated pairs (Algorithm 1's D-update).

    Args:
        condition: ``(B, K, *S)`` conditioning maps (None: an unconditional GAN).
        real, fake: ``(B, C, *S)``.
        fake_condition: the generated pairs' own maps when they were drawn for other masks than the real ones
            (``masks_from = "catphishing"``); default ``condition``.

    Returns:
        ``loss_d`` and the mean probability the discriminator gives real and generated pairs before the update.
    """
    disc.train()
    optimizer.zero_grad(set_to_none=True)
    fake_condition = condition if fake_condition is None else fake_condition
    on_real, on_fake = disc(_pair(condition, real)), disc(_pair(fake_condition, fake.detach()))
    loss = 0.5 * (gan_loss(on_real, True, kind) + gan_loss(on_fake, False, kind))
    loss.backward()
    optimizer.step()
    prob = (lambda t: float(torch.sigmoid(t).mean())) if kind == "vanilla" else (lambda t: float(t.mean()))
    return {"loss_d": float(loss.detach()), "d_real": prob(on_real.detach()), "d_fake": prob(on_fake.detach())}


def feature_means(disc: torch.nn.Module, pairs: torch.Tensor) -> list[torch.Tensor]:
    """Per hidden layer of ``disc``, the mean of each channel over the batch and every position.

    Shapes:
        ``(B, K + C, *S) -> [(C_l,)]``.
    """
    return [f.transpose(0, 1).flatten(1).mean(dim=1) for f in disc.features(pairs)]


def feature_matching_loss(disc: torch.nn.Module, real_pairs: torch.Tensor, fake_pairs: torch.Tensor) -> torch.Tensor:
    """Salimans et al.'s feature matching on a site's discriminator: the sum over hidden layers of the mean squared
    difference between :func:`feature_means` of the real and of the generated pairs (the real side detached)."""
    with torch.no_grad():
        target = feature_means(disc, real_pairs)
    return sum(F.mse_loss(f, t) for f, t in zip(feature_means(disc, fake_pairs), target, strict=True))


def adversarial_feedback(disc: torch.nn.Module, condition: torch.Tensor | None, fake: torch.Tensor,
                         kind: str = "vanilla", *, clip: float = 0.0, noise: float = 0.0,
                         generator: torch.Generator | None = None, feature_matching: float = 0.0,
                         real: torch.Tensor | None = None, real_condition: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, float]:
    """What a site returns: the gradient of the generator's adversarial loss against this site's discriminator
    with respect to the generated images (and that loss). It reads the real images only through the
    discriminator's weights, and with ``feature_matching`` also through one mean per channel and hidden layer of
    the real batch (:func:`feature_matching_loss`).

    Args:
        fake: ``(B, C, *S)`` generated images as received.
        clip: per-sample L2 bound (0 = none); noise: Gaussian noise std in units of ``clip`` (GS-WGAN).
        feature_matching: weight of :func:`feature_matching_loss` added to the adversarial loss (0 = none).
        real, real_condition: the site's real batch ``(B', C, *S)`` and its maps (default ``condition``), needed
            with ``feature_matching``.

    Returns:
        ``(grad, loss_g)``: ``grad`` of ``fake``'s shape; ``loss_g`` the adversarial part.
    """
    x = fake.detach().clone().requires_grad_(True)
    pairs = _pair(condition, x)
    loss = gan_loss(disc(pairs), True, kind)
    adversarial = float(loss.detach())
    if feature_matching > 0:
        if real is None:
            raise ValueError("adversarial_feedback: feature_matching needs the site's real batch")
        real_pairs = _pair(condition if real_condition is None else real_condition, real)
        loss = loss + feature_matching * feature_matching_loss(disc, real_pairs, pairs)
    (grad,) = torch.autograd.grad(loss, x)
    if clip > 0:
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        grad = grad * (clip / norms).clamp(max=1.0).view(-1, *([1] * (grad.ndim - 1)))
        if noise > 0:
            grad = grad + torch.randn(grad.shape, generator=generator) * (noise * clip)
    return grad.detach(), adversarial


def generator_step(optimizer: torch.optim.Optimizer, feedback: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Algorithm 1's G-update at the server: back-propagate each site's returned gradient through the generated
    images it was computed on and step with the mean over the sites (``d/dG (1/N) sum_j loss(D_j)``).

    Args:
        feedback: per answering site, ``(fake, grad)``: the generated batch still attached to the generator's graph
            and the gradient the site returned for it (same shape).
    """
    if not feedback:
        raise ValueError("no site feedback to step the generator with")
    optimizer.zero_grad(set_to_none=True)
    surrogate = sum((fake * grad.to(fake.dtype)).sum() for fake, grad in feedback) / len(feedback)
    surrogate.backward()
    optimizer.step()


# ---------------------------------------------------------------------------------------------------- the protocol
def _flatten_optimizer(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": torch.as_tensor(v) for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def _restore_optimizer(opt: torch.optim.Optimizer, flat: Mapping[str, torch.Tensor]) -> None:
    if not flat:
        return
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        i, _, name = key.partition(".")
        state.setdefault(int(i), {})[name] = value.clone()
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


class AsynDGANProtocol(RoundProtocol):
    """AsynDGAN as a round protocol (module docstring): round 1 gathers each site's masks, each later round is one
    generator step from the sites' discriminator feedback.

    The server's state (checkpointed every ``checkpoint_every`` rounds): ``generator``, ``optimizer`` and one
    ``masks/<site>`` group per site (``seg``, ``brain``, ``codes``). The generator and its optimizer live in this
    object between rounds on the server; each site's discriminator lives in its process and its private folder.
    """

    per_site_messages = True
    tolerate_missing = True

    def __init__(self, setup: TrainingSetup, cfg: AsynDGANConfig, cache: DatasetCache | None = None, *,
                 holdout: Mapping[str, Sequence[str]] | None = None,
                 server_masks: Mapping[str, Mapping[str, torch.Tensor]] | None = None):
        """``holdout``: site -> the :func:`case_key` of the cases it keeps out (None: each site computes its own
        split, :func:`audit_split` with ``cfg.audit_holdout``; the pooled arm passes the union of the sites').
        ``server_masks``: site -> ``{"seg", "brain", "codes"}`` the server already holds (``masks_from =
        "catphishing"``, :func:`catphishing_masks`): round 1 then gathers no mask, and each step's message carries
        the batch's masks to the site."""
        self.server_masks = None if server_masks is None else {k: dict(v) for k, v in server_masks.items()}
        self.setup = setup
        self.cfg = cfg
        self.cache = cache
        self.holdout = None if holdout is None else {k: frozenset(v) for k, v in holdout.items()}
        self.rounds = cfg.iterations + 1
        self.start_timeout_s = cfg.start_timeout_s
        self.round_timeout_s = cfg.round_timeout_s
        self.threads_per_site = cfg.threads_per_site
        self.parallel_sites = cfg.parallel_sites
        self.checkpoint_every = cfg.checkpoint_every
        self.sizes = label_sizes(setup, cfg)
        self._live: tuple[ResnetGenerator, torch.optim.Adam] | None = None
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}

    arm_name = "asyndgan"

    def __getstate__(self) -> dict[str, Any]:  # what is pickled into the sites: settings only
        return {**self.__dict__, "cache": None, "_live": None, "_pending": {}, "server_masks": None}

    def spec(self) -> dict[str, Any]:
        """As :meth:`synthlearn.protocol.RoundProtocol.spec`; a protocol whose holdout the server fixed (the pooled
        bound) is not one a site can rebuild from its settings, so it does not run deployed."""
        if self.holdout is not None:
            raise NotImplementedError("an AsynDGAN protocol with a server-fixed holdout (asyndgan_pooled) does not "
                                      "run deployed")
        return super().spec()

    def timeout_for(self, rnd: int) -> float:
        """Round 1 (every site reads and preprocesses its cases, its process may be starting) waits as long as the
        start; a generator step waits ``round_timeout_s``."""
        return max(self.start_timeout_s, self.round_timeout_s) if rnd == 1 else self.round_timeout_s

    # ------------------------------------------------------------------------------------------------- server side
    def initial_state(self) -> Arrays:
        torch.manual_seed(derive_seed(self.setup.seed, "asyndgan", "generator"))
        gen = build_generator(self.setup, self.cfg)
        state = {"generator": {k: v.detach().clone() for k, v in gen.state_dict().items()}, "optimizer": {}}
        for site, masks in (self.server_masks or {}).items():
            state[f"masks/{site}"] = {k: v.clone() for k, v in masks.items()}
        return state

    def generator(self, state: Arrays) -> tuple[ResnetGenerator, torch.optim.Adam]:
        """The live generator and optimizer (built from ``state`` after a resume)."""
        if self._live is None:
            gen = build_generator(self.setup, self.cfg)
            gen.load_state_dict(state["generator"])
            opt = _adam(gen.parameters(), self.cfg)
            _restore_optimizer(opt, state.get("optimizer", {}))
            self._live = (gen, opt)
        return self._live

    def messages(self, rnd: int, state: Arrays, sites: Sequence[str]) -> dict[str, tuple[Arrays, dict[str, Any]]]:
        """Each site's batch, generated in the sites' sorted order (the order Flower lists its nodes in varies from
        run to run; a batch-norm generator's running statistics depend on it), each with its own seeded dropout
        (:meth:`site_message`): the same seed gives the same run over Flower, run after run (in process, where the
        sites compute on the server's threads, the same to about 1e-3)."""
        return super().messages(rnd, state, sorted(sites))

    def site_message(self, rnd: int, state: Arrays, site: str) -> tuple[Arrays, dict[str, Any]]:
        if rnd == 1:
            return {}, {"phase": "ready" if self.server_masks is not None else "masks"}
        masks = state.get(f"masks/{site}")
        if masks is None:  # its disclosure missed round 1's timeout: it sits the federation out
            return {}, {"phase": "idle"}
        n = int(masks["seg"].shape[0])
        rng = torch.Generator().manual_seed(derive_seed(self.setup.seed, "asyndgan", "batch", rnd, site))
        m = self.cfg.batch_size
        index = torch.randperm(n, generator=rng)[:m] if n >= m else torch.randint(n, (m,), generator=rng)
        gen, _ = self.generator(state)
        gen.train()
        cond = make_condition(masks["seg"][index].long(), masks["brain"][index], masks["codes"][index].long(),
                              self.sizes)
        with torch.random.fork_rng(devices=[]):  # this batch's dropout draws: its own, whatever the order of sites
            torch.manual_seed(derive_seed(self.setup.seed, "asyndgan", "dropout", rnd, site))
            fake = gen(cond)
        self._pending[site] = (fake, rnd)
        if self.server_masks is not None:  # the site has no such masks: they travel with the images
            batch = {key: masks[key][index] for key in ("seg", "brain", "codes")}
            return {"fake": {"images": fake.detach()}, "masks": batch}, {"phase": "step"}
        return {"fake": {"images": fake.detach()}, "batch": {"index": index.to(torch.int32)}}, {"phase": "step"}

    def aggregate(self, rnd: int, state: Arrays, replies: Sequence[SiteReply]) -> tuple[Arrays, dict[str, Any]]:
        if rnd == 1 and self.server_masks is not None:  # nothing disclosed: the sites only said they are ready
            return state, {"masks": {site: int(m["seg"].shape[0]) for site, m in self.server_masks.items()},
                           "masks_from": "catphishing", "ready": sorted(r.site for r in replies)}
        if rnd == 1:
            new = dict(state)
            counts = {}
            for r in replies:
                new[f"masks/{r.site}"] = self._check_masks(r)
                counts[r.site] = int(new[f"masks/{r.site}"]["seg"].shape[0])
            return new, {"masks": counts}
        gen, opt = self.generator(state)
        used = []
        for r in sorted(replies, key=lambda reply: reply.site):  # a fixed sum order, however the replies arrived
            pending = self._pending.get(r.site)
            grad = r.arrays.get("feedback", {}).get("grad")
            if pending is None or pending[1] != rnd or grad is None:
                continue
            fake = pending[0]
            if tuple(grad.shape) != tuple(fake.shape) or not torch.isfinite(grad).all():
                raise FederationError(f"asyndgan round {rnd}: site {r.site} returned a gradient of shape "
                                      f"{tuple(grad.shape)} (expected {tuple(fake.shape)}) or with non-finite values")
            used.append((fake, grad.to(fake.dtype)))
        if not used:  # every site idle or late: the generator does not move this step
            log.warning("asyndgan round %d: no site returned feedback; the generator step is skipped", rnd)
            self._pending.clear()
            return state, {"skipped": True}
        generator_step(opt, used)
        self._pending.clear()
        new = dict(state)
        new["generator"] = {k: v.detach().clone() for k, v in gen.state_dict().items()}
        new["optimizer"] = _flatten_optimizer(opt)
        entry = {key: {r.site: float(r.metrics[key]) for r in replies if key in r.metrics}
                 for key in ("loss_d", "loss_g", "d_real", "d_fake")}
        return new, entry

    def _check_masks(self, reply: SiteReply) -> dict[str, torch.Tensor]:
        masks = reply.arrays.get("masks") or {}
        shape = tuple(int(s) for s in self.setup.preprocess.shape)
        seg, brain, codes = masks.get("seg"), masks.get("brain"), masks.get("codes")
        if seg is None or brain is None or codes is None:
            raise FederationError(f"asyndgan: site {reply.site}'s masks lack seg, brain or codes "
                                  f"(found {sorted(masks)})")
        if tuple(seg.shape[1:]) != shape or seg.shape != brain.shape or codes.shape[0] != seg.shape[0]:
            raise FederationError(f"asyndgan: site {reply.site}'s masks have shapes seg {tuple(seg.shape)}, brain "
                                  f"{tuple(brain.shape)}, codes {tuple(codes.shape)}; expected (N, {shape})")
        bad = set(torch.unique(seg).tolist()) - set(SEG_VALUES)
        if bad:
            raise FederationError(f"asyndgan: site {reply.site}'s masks hold values {sorted(bad)} outside {SEG_VALUES}")
        return {"seg": seg.to(torch.uint8), "brain": brain.to(torch.uint8), "codes": codes.to(torch.int16)}

    # --------------------------------------------------------------------------------------------------- site side
    def training_cases(self, site: SiteRecord) -> list[CaseRecord]:
        """The cases of ``site`` whose masks it discloses and its discriminator sees: all but its audit holdout, in
        the site's order (the order of the disclosed masks)."""
        if self.holdout is not None:
            held = self.holdout.get(site.name, frozenset())
        else:
            held = frozenset(audit_split(site, self.cfg.audit_holdout, self.setup)[1])
        return [c for c in site.cases if case_key(c) not in held]

    def site_round(self, site: SiteRecord, rnd: int, arrays, config, *, state_dir: Path,
                   memory: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        if config.get("phase") == "idle":  # the server has no masks of this site
            return {}, {}
        data = memory.get("data")
        if data is None:
            cache = self.cache or memory.setdefault("cache", DatasetCache(self.setup.preprocess))
            data = memory["data"] = load_site_data(self.training_cases(site), self.setup, self.cfg, cache)
        if config.get("phase") == "masks":
            return {"masks": {"seg": data.seg, "brain": data.brain, "codes": data.codes}}, {"n": len(data.seg)}
        if config.get("phase") == "ready":
            return {}, {"n": len(data.seg)}
        if "masks" in arrays:
            return self._step_on_server_masks(site, rnd, arrays, data, state_dir, memory)
        fake = arrays.get("fake", {}).get("images")
        index = arrays.get("batch", {}).get("index")
        if fake is None or index is None:
            raise ValueError(f"asyndgan round {rnd}: the server's message lacks fake images or the batch index")
        index = index.long()
        n = len(data.seg)
        expected = (len(index), len(self.setup.sequences), *data.seg.shape[1:])
        if tuple(fake.shape) != expected or (index < 0).any() or (index >= n).any():
            raise ValueError(f"asyndgan round {rnd}: fake images of shape {tuple(fake.shape)} for indices "
                             f"{index.tolist()} (expected {expected}, indices below {n})")
        disc, opt = self._discriminator(site.name, rnd, state_dir, memory)
        cond = make_condition(data.seg[index].long(), data.brain[index], data.codes[index].long(), self.sizes)
        stats = discriminator_step(disc, opt, cond, data.images[index], fake.float(), self.cfg.gan_loss)
        rng = torch.Generator().manual_seed(derive_seed(self.setup.seed, "asyndgan", "noise", rnd, site.name))
        grad, loss_g = adversarial_feedback(disc, cond, fake.float(), self.cfg.gan_loss, clip=self.cfg.feedback_clip,
                                            noise=self.cfg.feedback_noise, generator=rng,
                                            feature_matching=self.cfg.feature_matching, real=data.images[index])
        self._keep_discriminator(rnd, disc, opt, state_dir, memory)
        return {"feedback": {"grad": grad}}, {**stats, "loss_g": loss_g}

    def _step_on_server_masks(self, site: SiteRecord, rnd: int, arrays, data: SiteData, state_dir: Path,
                              memory: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        """A step of ``masks_from = "catphishing"``: the fakes come with the masks they were drawn for; the real
        pairs are a random batch of the site's own cases; every mask reduced to the whole tumour (value 1)."""
        fake = arrays.get("fake", {}).get("images")
        masks = arrays["masks"]
        if fake is None or any(masks.get(k) is None for k in ("seg", "brain", "codes")):
            raise ValueError(f"asyndgan round {rnd}: the server's message lacks fake images or their masks")
        b = int(fake.shape[0])
        expected = (b, len(self.setup.sequences), *data.seg.shape[1:])
        if tuple(fake.shape) != expected or tuple(masks["seg"].shape) != (b, *data.seg.shape[1:]):
            raise ValueError(f"asyndgan round {rnd}: fake images {tuple(fake.shape)} with masks "
                             f"{tuple(masks['seg'].shape)} (expected {expected})")
        rng = torch.Generator().manual_seed(derive_seed(self.setup.seed, "asyndgan", "real", rnd, site.name))
        n = len(data.seg)
        index = torch.randperm(n, generator=rng)[:b] if n >= b else torch.randint(n, (b,), generator=rng)
        whole = (lambda seg: (seg > 0).long())
        real_cond = make_condition(whole(data.seg[index]), data.brain[index], data.codes[index].long(), self.sizes)
        fake_cond = make_condition(whole(masks["seg"]), masks["brain"], masks["codes"].long(), self.sizes)
        disc, opt = self._discriminator(site.name, rnd, state_dir, memory)
        stats = discriminator_step(disc, opt, real_cond, data.images[index], fake.float(), self.cfg.gan_loss,
                                   fake_condition=fake_cond)
        noise = torch.Generator().manual_seed(derive_seed(self.setup.seed, "asyndgan", "noise", rnd, site.name))
        grad, loss_g = adversarial_feedback(disc, fake_cond, fake.float(), self.cfg.gan_loss,
                                            clip=self.cfg.feedback_clip, noise=self.cfg.feedback_noise,
                                            generator=noise, feature_matching=self.cfg.feature_matching,
                                            real=data.images[index], real_condition=real_cond)
        self._keep_discriminator(rnd, disc, opt, state_dir, memory)
        return {"feedback": {"grad": grad}}, {**stats, "loss_g": loss_g}

    def _discriminator(self, site: str, rnd: int, state_dir: Path, memory: dict[str, Any]
                       ) -> tuple[PatchDiscriminator, torch.optim.Adam]:
        """The site's discriminator and optimizer as its last step left them.

        A simulation's site may run each round in another worker process (Flower's Ray pool hands a site's round to
        any free actor): ``memory`` is then another process's, or stale. So the networks in ``memory`` are used only
        when this process ran the site's previous step; otherwise they are read from the site's private folder,
        where every step leaves them (:meth:`_keep_discriminator`); a fresh discriminator only at the site's first
        step."""
        if "disc" in memory and memory.get("round") == rnd - 1:
            return memory["disc"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.setup.seed, "asyndgan", "discriminator", site))
            disc = build_discriminator(self.setup, self.cfg)
        opt = _adam(disc.parameters(), self.cfg, self.cfg.discriminator_lr)
        path = Path(state_dir) / "discriminator.pt"
        if rnd > 2 and path.is_file():  # another process ran the last step, a resumed federation, or a moved site
            saved = load_checkpoint(path, restore_rng=False)
            disc.load_state_dict(saved["network"])
            opt.load_state_dict(saved["optimizer"])
            if int(saved["round"]) != rnd - 1:
                log.warning("asyndgan site %s: discriminator of round %s resumed in round %d", site,
                            saved["round"], rnd)
        memory["disc"] = (disc, opt)
        return memory["disc"]

    @staticmethod
    def _keep_discriminator(rnd: int, disc: PatchDiscriminator, opt: torch.optim.Optimizer, state_dir: Path,
                            memory: dict[str, Any]) -> None:
        """After every step: the networks stay in this process's ``memory`` and are written to the site's private
        folder (the next round may run in another process; :meth:`_discriminator`)."""
        memory["round"] = rnd
        save_checkpoint(Path(state_dir) / "discriminator.pt",
                        {"round": rnd, "network": disc.state_dict(), "optimizer": opt.state_dict()})


# --------------------------------------------------------------------------------------------------- synthesis
@torch.no_grad()
def sample_synthetic(gen: ResnetGenerator, masks: Mapping[str, torch.Tensor], sizes: Sequence[int],
                     intensity_scale: float, samples_per_mask: int = 1, *, seed: int = 0,
                     batch_size: int = 4) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Generated cases for every mask (``samples_per_mask`` each, dropout as noise).

    Returns:
        ``(images (C, *S) float32 in z-score units, background 0; seg (*S) uint8; codes (L,))`` per sample.
    """
    sampling_mode(gen)
    torch.manual_seed(seed)
    out = []
    n = int(masks["seg"].shape[0])
    for _ in range(samples_per_mask):
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            cond = make_condition(masks["seg"][idx].long(), masks["brain"][idx], masks["codes"][idx].long(), sizes)
            images = gen(cond) * intensity_scale * masks["brain"][idx].unsqueeze(1).float()
            for j, i in enumerate(idx.tolist()):
                out.append((images[j].numpy().astype(np.float32), masks["seg"][i].numpy().astype(np.uint8),
                            masks["codes"][i].numpy()))
    return out


def grid_affine(setup: TrainingSetup) -> np.ndarray:
    """The ``(4, 4)`` affine of the model's grid: the preprocessing's spacing (1 mm where it sets none)."""
    spacing = setup.preprocess.spacing or (1.0,) * len(setup.preprocess.shape)
    return np.diag([*[float(s) for s in spacing], *([1.0] * (4 - len(spacing)))])


def write_synthetic_study(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], setup: TrainingSetup,
                          folder: str | Path) -> list[CaseRecord]:
    """Write generated cases as a one-site study of the data contract (``folder/synthetic``, ``study.json`` with
    the study's sequences and label columns); case ids carry no site name. Returns its cases."""
    from synthlearn.data.contract import LabelSchema
    from synthlearn.data.io import write_case, write_labels_csv
    from synthlearn.data.layouts import open_study, write_study_json

    folder = Path(folder)
    columns = label_columns(setup)
    affine = grid_affine(setup)
    rows = []
    for k, (images, seg, codes) in enumerate(samples):
        case_id = f"case-{k:05d}"
        write_case(folder / "synthetic", case_id, images, seg, affine, setup.sequences)
        rows.append((case_id, Labels({col: (values[int(c)] if 0 <= int(c) < len(values) else None)
                                      for (col, values), c in zip(columns, list(codes) + [-1] * len(columns))})))
    names = tuple(col for col, _ in columns)
    write_labels_csv(folder / "synthetic" / "labels.csv", rows, names)
    write_study_json(folder, {"synthetic": "train"}, sequences=setup.sequences, labels=LabelSchema(columns))
    return list(open_study(folder).sites[0].cases)


# --------------------------------------------------------------------------------------------------------- the arm
def run(ctx: ArmContext) -> ArmOutput:
    """The AsynDGAN arm: the federation (Flower, or in process), synthesis, the task model on synthetic cases."""
    return run_on_sites(ctx, ctx.train_sites, ctx.arm_config.backend)


def run_on_sites(ctx: ArmContext, sites: Sequence[SiteRecord], backend: str, *,
                 holdout: Mapping[str, Sequence[str]] | None = None) -> ArmOutput:
    """:func:`run` with a discriminator for each of ``sites`` (the training sites; one pooled site for the
    ``asyndgan_pooled`` baseline), then the audits (``audit``).

    Args:
        holdout: site -> the :func:`case_key` of the cases it keeps out (the pooled baseline: the union of the
            training sites' audit holdouts); None: each site's own :func:`audit_split`.
    """
    from synthlearn.tasks.model import train_task_model

    cfg: AsynDGANConfig = ctx.arm_config
    splits = record_splits(ctx, sites, holdout)
    server_masks = None
    if cfg.masks_from == "catphishing":
        if "catphishing" not in ctx.needed:
            raise ValueError("asyndgan.masks_from = 'catphishing' needs the catphishing arm to run before asyndgan in "
                             "the same study (arms = [..., \"catphishing\", \"asyndgan\"])")
        server_masks = catphishing_masks(ctx.needed["catphishing"], [s.name for s in sites], ctx.setup, cfg,
                                         ctx.cache)
    protocol = AsynDGANProtocol(ctx.setup, cfg, holdout=holdout, server_masks=server_masks)
    t0 = time.perf_counter()
    reused = _primary_state(ctx, protocol)
    if reused is not None:  # a further task-model seed: the generator is the primary seed's, the draw is new
        final = reused
    elif backend == "flower":
        if ctx.federate is None:
            raise ValueError("asyndgan.backend = 'flower' needs the study runner's Flower runner (ctx.federate); run "
                             "the arm through `synthlearn study run`, or set asyndgan.backend = 'inprocess'")
        final: FederationState = ctx.federate(protocol, sites, ctx.arm_dir, progress=ctx.progress)
    else:
        protocol.cache = ctx.cache
        final = run_protocol_inprocess(protocol, sites, ctx.arm_dir)
    federation_wall = time.perf_counter() - t0
    gen = build_generator(ctx.setup, cfg)
    gen.load_state_dict(final.states["generator"])
    save_checkpoint(ctx.arm_dir / "generator.pt", {"network": gen.state_dict(), "iterations": cfg.iterations})
    t0 = time.perf_counter()
    samples, by_site = [], {}
    for site in sites:
        masks = final.states.get(f"masks/{site.name}")
        if masks is not None:
            by_site[site.name] = sample_synthetic(gen, masks, protocol.sizes, cfg.intensity_scale,
                                                  cfg.samples_per_mask,
                                                  seed=derive_seed(ctx.setup.seed, "asyndgan", "sample", site.name))
            samples += by_site[site.name]
    cases = write_synthetic_study(samples, ctx.setup, ctx.arm_dir / "synthetic")
    synthesis_wall = time.perf_counter() - t0
    setup = ctx.setup
    if cfg.task_epochs is not None:
        setup = dataclasses.replace(setup, train=dataclasses.replace(setup.train, epochs=cfg.task_epochs))
    t0 = time.perf_counter()
    model = train_task_model(cases, setup, ctx.arm_dir, cache=ctx.cache, progress=ctx.progress, label="asyndgan")
    model.info.update(synthetic_training_cases=len(cases), trained_on="synthetic cases only")
    model.save(ctx.arm_dir / "model")
    steps = [h for h in final.history if h["round"] > 1]
    missing = {}
    for h in steps:
        for s in h.get("missing_sites", []):
            missing[s] = missing.get(s, 0) + 1
    plot_training(final.history, ctx.arm_dir / "figures" / "asyndgan_losses.png")
    plot_samples(samples, ctx.arm_dir / "figures" / "asyndgan_samples.png", ctx.setup.sequences)
    mask_bytes = {s: int(sum(t.numel() * t.element_size() for t in final.states[f"masks/{s}"].values()))
                  for s in (site.name for site in sites) if f"masks/{s}" in final.states}
    extra = {
        "bytes_to_sites": final.bytes_to_sites,
        "backend": backend,
        "iterations": cfg.iterations,
        "discriminators": [site.name for site in sites],
        "synthetic_cases": len(cases),
        "disclosure": {
            "what": "each site's segmentation masks and brain outlines" + (" and label values"
                                                                           if protocol.sizes else "")
            + " (round 1), so that the server can generate images for them; the rest of the traffic is generated "
            "images to the sites and adversarial gradients back",
            "mask_payload_bytes": mask_bytes,
        } if server_masks is None else {
            "what": "none: the server draws images for the masks of the CATphishing arm's synthetic cases and sends "
                    "them with the images; the sites disclose no mask (the traffic is generated images and their "
                    "masks to the sites, adversarial gradients back)",
            "mask_payload_bytes": {},
            "masks_from": "catphishing",
        },
        "steps_without_site": missing,
        "final_losses": {key: steps[-1].get(key, {}) for key in ("loss_d", "loss_g", "d_real", "d_fake")}
        if steps else {},
        "stage_wall_s": {"federation": federation_wall, "synthesis": synthesis_wall},
        "audit_holdout": cfg.audit_holdout,
        "holdout_cases": {s: len(split[1]) for s, split in splits.items()},
    }
    if cfg.audit:
        t0 = time.perf_counter()
        extra.update(run_audits(ctx, cfg, sites, splits, by_site))
        extra["stage_wall_s"]["audits"] = time.perf_counter() - t0
    return ArmOutput(models={ctx.name: model}, bytes_from_sites=final.bytes_from_sites, rounds=final.round,
                     extra=extra)


# ---------------------------------------------------------------------------------------------------------- audits
def record_splits(ctx: ArmContext, sites: Sequence[SiteRecord], holdout: Mapping[str, Sequence[str]] | None
                  ) -> dict[str, tuple[list[str], list[str]]]:
    """Per site, ``(member_keys, holdout_keys)`` (:func:`case_key`), the split each site makes for itself
    (:func:`audit_split`; ``holdout`` when given; a further seed of a multi-seed study: the primary seed's, whose
    generator it reuses), recorded in ``<arm_dir>/holdout/<site>.json``."""
    cfg: AsynDGANConfig = ctx.arm_config
    out = {}
    for site in sites:
        keys = [case_key(c) for c in site.cases]
        primary = Path(ctx.primary_dir) / "holdout" / f"{site.name}.json" if ctx.primary_dir is not None else None
        if primary is not None and primary.is_file():
            held = list(json.loads(primary.read_text())["holdout"])
        elif primary is not None:  # a primary seed from before the audit holdout: it used every case
            held = []
        elif holdout is not None:
            held = sorted(holdout.get(site.name, ()))
        else:
            held = audit_split(site, cfg.audit_holdout, ctx.setup)[1]
        out[site.name] = (sorted(set(keys) - set(held)), sorted(held))
        write_json(ctx.arm_dir / "holdout" / f"{site.name}.json",
                   {"site": site.name, "fraction": cfg.audit_holdout, "members": out[site.name][0],
                    "holdout": out[site.name][1],
                    "note": "the site never discloses the held-out cases' masks and its discriminator never sees "
                            "them: the privacy audit's non-members"})
    return out


def audit_cases(cases: Sequence[CaseRecord], setup: TrainingSetup, cfg: AsynDGANConfig,
                cache: DatasetCache) -> list[CaseArrays]:
    """Real cases as the audits compare them with the generated ones: preprocessed, in the generator's clipped
    range mapped back to z-score units (what the generator could reproduce), on the model's grid
    (:func:`grid_affine`); a 2D study's as ``(C, X, Y, 1)`` (the audits read ``(C, X, Y, Z)``)."""
    view = cache.dataset(list(cases))
    out = []
    for i in range(len(cases)):
        x, seg = view.arrays(i)
        out.append(_as_case(generator_range(x, cfg.intensity_scale) * cfg.intensity_scale, seg, setup))
    return out


def _as_case(images: np.ndarray, seg: np.ndarray | None, setup: TrainingSetup) -> CaseArrays:
    images = np.asarray(images, np.float32)
    if images.ndim == 3:  # (C, X, Y): a singleton last axis
        images, seg = images[..., None], (None if seg is None else np.asarray(seg)[..., None])
    return CaseArrays(images=images, seg=None if seg is None else np.asarray(seg, np.int64), affine=grid_affine(setup))


def own_mask_similarity(members: Sequence[CaseArrays], synthetic: Sequence[CaseArrays],
                        threshold: float) -> dict[str, Any]:
    """The SSIM of each synthetic image to the member whose mask it was drawn for (sample ``j`` of a site was drawn
    for its member ``j mod n``, the order of :func:`sample_synthetic`), each windowed as the privacy audit does.

    Args:
        members: the site's members in the order of its disclosed masks, ``images (C, X, Y, Z)``.
        synthetic: the site's generated cases, ``samples_per_mask * len(members)`` of them.
        threshold: the audit's copy threshold (a distance, 1 - SSIM).

    Returns:
        ``{"n", "ssim_mean", "ssim_median", "ssim_min", "ssim_max", "below_copy_threshold": share of synthetic
        images closer to their own source member than the threshold}``.
    """
    if not members or len(synthetic) % len(members):
        raise ValueError(f"expected samples_per_mask x {len(members)} synthetic cases (one per member's mask), "
                         f"found {len(synthetic)}")
    real = [normalize_for_ssim(m.images) for m in members]
    sims = np.array([ssim_matrix(normalize_for_ssim(s.images)[None], real[j % len(real)][None])[0, 0]
                     for j, s in enumerate(synthetic)])
    return {"n": int(sims.size), "ssim_mean": float(sims.mean()), "ssim_median": float(np.median(sims)),
            "ssim_min": float(sims.min()), "ssim_max": float(sims.max()),
            "below_copy_threshold": float(np.mean(1.0 - sims < threshold))}


def _name_members(result: dict[str, Any], keys: Sequence[str], members: Sequence[CaseArrays]) -> None:
    """audit_site names array cases by position (``train-0000``): give the members their ``site/case_id``."""
    names = {case_id_of(case, i, prefix="train"): keys[i] for i, case in enumerate(members)}
    for pair in result["copy_rate"]["closest"]:
        pair["train"] = names.get(pair["train"], pair["train"])
    result["positive_control"]["memorised_case_ids"] = [names.get(i, i) for i in
                                                        result["positive_control"]["memorised_case_ids"]]


def privacy_audit(ctx: ArmContext, cfg: AsynDGANConfig, real: Mapping[str, tuple[list[str], list[CaseArrays]]],
                  holdout: Mapping[str, list[CaseArrays]], synthetic: Mapping[str, list[CaseArrays]]
                  ) -> dict[str, Any]:
    """Per site, :func:`synthlearn.audits.privacy.audit_site` of the images generated for its masks (module
    docstring): its members against its held-out cases, the reference control from the other sites' synthetic
    images, plus ``own_mask`` (:func:`own_mask_similarity`) and ``wall_s``; or ``{"skipped": why}``.

    Args:
        real: site -> (member keys, member cases), in the order of the site's disclosed masks.
        holdout: site -> its held-out cases.
        synthetic: site -> the images generated for its masks (:func:`sample_synthetic`'s order).
    """
    setup = ctx.setup
    figures = ctx.arm_dir / "figures"
    out: dict[str, Any] = {}
    for site, (keys, members) in real.items():
        held, syn = holdout.get(site, []), synthetic.get(site, [])
        if not held and not members:
            out[site] = {"skipped": REMOTE_SITE_SKIP}
            continue
        if len(held) < 2 or len(members) < 2:
            out[site] = {"skipped": f"needs >= 2 held-out and >= 2 member cases (audit_holdout {cfg.audit_holdout}; "
                                   f"found {len(held)} and {len(members)})"}
            continue
        if not syn:
            out[site] = {"skipped": "the server holds no masks of this site: no image was generated for it"}
            continue
        t0 = time.perf_counter()
        reference = {other: cases for other, cases in synthetic.items() if other != site and cases}
        montage = figures / f"privacy_closest_{site}.png" if tuple(setup.sequences) == SEQUENCES else None
        result = audit_site(members, held, syn, seed=setup.seed, montage_path=montage,
                            reference_synthetic=reference or None, progress=ctx.progress)
        _name_members(result, keys, members)
        if result.get("montage"):
            result["montage"] = str(Path(result["montage"]).relative_to(ctx.arm_dir.parent))
        if len(syn) == cfg.samples_per_mask * len(members):
            result["own_mask"] = own_mask_similarity(members, syn, result["copy_rate"]["threshold"])
        else:  # the server's split and the site's disagree: the pairing of images and masks is unknown
            result["own_mask"] = {"skipped": f"{len(syn)} synthetic images for {len(members)} members "
                                             f"(samples_per_mask {cfg.samples_per_mask})"}
        if not reference:
            result["reference_control_note"] = ("not run: every generated image came from a generator that saw "
                                                "these members (one site, or the pooled baseline)")
        result["wall_s"] = time.perf_counter() - t0
        out[site] = result
    return out


def fidelity_audit(ctx: ArmContext, cfg: AsynDGANConfig, real: Mapping[str, list[CaseArrays]],
                   synthetic: Mapping[str, list[CaseArrays]]) -> dict[str, Any]:
    """:func:`synthlearn.audits.fidelity.fidelity` of each site's synthetic images against every site's members
    (the study's own sequences), with the cross-site figure; or ``{"skipped": why}``. Sites with fewer than 2 real
    or 2 synthetic cases are left out of it."""
    real = {s: c for s, c in real.items() if len(c) >= 2}
    synthetic = {s: c for s, c in synthetic.items() if len(c) >= 2}
    if not real or not synthetic:
        return {"skipped": "needs a site with >= 2 member cases and >= 2 synthetic images"}
    t0 = time.perf_counter()
    try:
        fid = fidelity(real, synthetic, channels=ctx.setup.sequences, n_real=cfg.fidelity_n,
                       n_synthetic=cfg.fidelity_n, seed=ctx.setup.seed, progress=ctx.progress)
    except ValueError as exc:  # e.g. too few cases with usable radiomics features
        log.warning("asyndgan: fidelity audit not run: %s", exc)
        return {"skipped": str(exc)}
    path = plot_fid_matrix(fid, ctx.arm_dir / "figures" / "fid_matrix.png")
    fid["figure"] = str(path.relative_to(ctx.arm_dir.parent))
    fid["real"] = "the members of each site (its cases outside the audit holdout)"
    fid["wall_s"] = time.perf_counter() - t0
    return fid


def run_audits(ctx: ArmContext, cfg: AsynDGANConfig, sites: Sequence[SiteRecord],
               splits: Mapping[str, tuple[list[str], list[str]]],
               samples: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]]) -> dict[str, Any]:
    """``{"privacy": privacy_audit(...), "fidelity": fidelity_audit(...)}`` of the generated images.

    Args:
        splits: site -> (member keys, holdout keys) (:func:`record_splits`).
        samples: site -> the images generated for its masks (:func:`sample_synthetic`).
    """
    real, holdout, synthetic = {}, {}, {}
    for site in sites:
        members, held = set(splits[site.name][0]), set(splits[site.name][1])
        ordered = [c for c in site.cases if case_key(c) in members]  # the order of the disclosed masks
        real[site.name] = ([case_key(c) for c in ordered], audit_cases(ordered, ctx.setup, cfg, ctx.cache))
        holdout[site.name] = audit_cases([c for c in site.cases if case_key(c) in held], ctx.setup, cfg, ctx.cache)
        synthetic[site.name] = [_as_case(x, seg, ctx.setup) for x, seg, _ in samples.get(site.name, [])]
    return {"privacy": privacy_audit(ctx, cfg, real, holdout, synthetic),
            "fidelity": fidelity_audit(ctx, cfg, {s: cases for s, (_, cases) in real.items()}, synthetic)}


def _primary_state(ctx: ArmContext, protocol: AsynDGANProtocol) -> FederationState | None:
    """The primary seed's finished federation, for a further seed of a multi-seed study (None otherwise)."""
    if ctx.primary_dir is None:
        return None
    return FederationState.load_finished(Path(ctx.primary_dir) / "server" / "global.pt", protocol.rounds, "asyndgan")


def plot_training(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """The sites' discriminator and generator losses per step (one line per site, smoothed)."""
    steps = [h for h in history if h.get("round", 0) > 1 and h.get("loss_d")]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sites = sorted({s for h in steps for s in h["loss_d"]})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    panels = ((axes[0], "loss_d", "discriminator loss (site)"), (axes[1], "loss_g", "generator loss (per site's D)"))
    for ax, key, title in panels:
        for s in sites:
            xs = [h["round"] - 1 for h in steps if s in h.get(key, {})]
            ys = np.array([h[key][s] for h in steps if s in h.get(key, {})])
            if len(ys) >= 10:
                k = max(1, len(ys) // 25)
                ys = np.convolve(ys, np.ones(k) / k, mode="same")
            ax.plot(xs, ys, label=s, lw=1)
        ax.set_xlabel("generator step")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_samples(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], path: str | Path,
                 sequences: Sequence[str], n: int = 6) -> Path | None:
    """A grid of generated cases (central slice of each sequence and the mask they were drawn for)."""
    if not samples:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picks = samples[:: max(1, len(samples) // n)][:n]
    cols = len(sequences) + 1
    fig, axes = plt.subplots(len(picks), cols, figsize=(1.6 * cols, 1.6 * len(picks)), squeeze=False)
    for r, (images, seg, _) in enumerate(picks):
        if images.ndim == 4:
            z = int(np.argmax((seg > 0).sum(axis=(0, 1)))) if seg.any() else images.shape[-1] // 2
            images, seg = images[..., z], seg[..., z]
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow((images[c] if c < len(sequences) else seg).T, cmap="gray" if c < len(sequences) else "viridis",
                      origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(sequences[c] if c < len(sequences) else "mask", fontsize=8)
    fig.suptitle("AsynDGAN: generated images for shared masks", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


ARM = ArmSpec(name="asyndgan", run=run, config=AsynDGANConfig, needs=("catphishing",), protocol=AsynDGANProtocol,
              task_kinds=("classification", "segmentation", "multitask"), spatial_dims=(2, 3),
              description="one generator at the server, a discriminator per site; adversarial gradients leave the "
              "sites every step, the server trains on generated images (paper 003)")

__all__ = ["ARM", "AsynDGANConfig", "AsynDGANProtocol", "SiteData", "adversarial_feedback", "audit_cases",
           "audit_split", "audit_stratum", "build_discriminator", "build_generator", "case_key", "catphishing_masks",
           "condition_channels",
           "discriminator_step", "fidelity_audit", "gan_loss", "generator_range", "generator_step", "grid_affine",
           "label_sizes", "load_site_data", "make_condition", "own_mask_similarity", "plot_samples", "plot_training",
           "privacy_audit", "record_splits", "run", "run_audits", "run_on_sites", "sample_synthetic",
           "write_synthetic_study"]
