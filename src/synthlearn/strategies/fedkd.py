"""The ``fedkd`` arm: federated multi-task learning by knowledge distillation of compressed data (Ren et al., paper
001).

No site sends its images or its model's weights. Each round, for every network of the task model:

1. The server sends the global multi-task network (:class:`synthlearn.models.multitask.MultiTaskUNet`).
2. A site **compresses** its training cases into a few synthetic samples per class of the first head (IDH):
   "knowledge refining" with a *compression loss* that makes "the output of the model when processing the compressed
   data as close as possible to its performance when processing the original data, such as the extracted features
   or the predicted classification probability" (the paper). We read it as distribution matching (Zhao & Bilen 2023)
   under the global model: the compressed images are optimised (Adam) so that their mean embedding (the bottleneck's
   global average and, for voxel heads, the heads' trunk averaged over the tumour) equals that of the site's real
   cases of the class, their mean predicted distribution per head equals the real cases' (KL), and the model draws
   their label map on them (segmentation loss). Each compressed image starts from seeded Gaussian noise (never from
   a real case) and is paired with a synthetic tumour label map (concentric spheres: necrosis in an enhancing rim
   in oedema, at a random centre and size) that no real case contributed to. The site also computes **soft
   labels**: the global model's mean predicted distribution, per head, over its real cases of that class, and each
   head's distribution of known labels among them (the compressed samples' targets).
3. The site returns only the compressed samples, their synthetic label maps, the targets and the soft labels
   (:func:`compress_site`; ``bytes_from_sites`` is summed from those messages).
4. The server trains the global model on every site's compressed samples with the multi-task loss (segmentation on
   the synthetic maps, cross-entropy of each head against its targets) plus a *distillation matching loss*: the KL
   divergence between the sites' soft labels and the global model's predictions on the compressed samples
   (temperature ``T``, weight ``distill_weight``) (:func:`server_update`), and sends the model back.

The paper gives the two losses in words, not the optimiser of the compressed data, their number, their labels for
segmentation or the rounds: those are this module's settings (:class:`FedKDConfig`). The rounds run on the same
round protocol as FedAvg (Flower by default).

**Privacy audit** (issue 27; ``audit = true``). The compressed samples are optimised against a site's real cases, so
they go through the shared audit of synthetic data (:func:`synthlearn.audits.privacy.audit_site`, as CATphishing's):

- Each site holds out a stratified share of its cases (``audit_holdout``, by the class of the first head, with the
  split of :func:`synthlearn.audits.privacy.stratified_holdout`; :func:`audit_split`) that it never compresses: the
  audit's **non-members** and the copy rate's reference. Its **members** are the other cases with a known first-head
  class (the ones the compression reads; a case without one contributes to no compressed sample and is left out of
  both groups).
- The server keeps what each site sent (``<arm>/received/<site>/round-RRR.safetensors``: every round's compressed
  sets, or the last round's with ``keep_compressed = "last"``); they already crossed the site boundary.
- After the federation, per site (:func:`privacy_audit`): the members' and non-members' best SSIM to the site's kept
  compressed samples (membership inference, AUC with a bootstrap CI, TPR at 1 % FPR), the copy rate (compressed
  samples closer to a member than 95 % of non-members are), and the controls: the **negative control** (members vs
  members, must read chance), the **positive control** (noisy copies of a few members, what a compression that
  copied its cases would send: must be caught), the **compression positive control** (``privacy_control``: the
  site's compression with the final global model started from ``per_class`` real members per class and their label
  maps instead of noise, as distribution matching commonly starts, Zhao & Bilen 2023; reported in audit_site's
  ``positive_control_generator`` slot: its AUC, members it started from vs non-members) and the **reference
  control** (the same members and non-members attacked with the other sites' compressed samples, which never saw
  them). Like CATphishing's audit, this one reads the real cases where they live (the site's); only the numbers
  would leave it. The SSIM audit is 3D: a 2D study records why it was skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from synthlearn.audits.privacy import audit_site, stratified_holdout
from synthlearn.data.contract import SEQUENCES, CaseRecord, SiteRecord
from synthlearn.data.io import CaseArrays, write_json
from synthlearn.evaluate.radiomics import case_id_of
from synthlearn.protocol import SiteReply, run_protocol_inprocess
from synthlearn.strategies.base import REMOTE_SITE_SKIP, ArmContext, ArmOutput
from synthlearn.strategies.fedavg import TaskModelProtocol, federated_learning_check, task_model_from_states
from synthlearn.strategies.registry import ArmSpec
from synthlearn.tasks.folds import stage_data
from synthlearn.tasks.model import init_model
from synthlearn.tasks.setup import TrainingSetup, model_names, split_name
from synthlearn.training.learning_check import summarise_checks
from synthlearn.training.seeding import derive_seed, numpy_generator, torch_generator
from synthlearn.training.trainer import (
    load_batch,
    make_optimizer,
    segmentation_loss,
)

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class FedKDConfig:
    """FedKD settings (the ``[fedkd]`` table of a study config).

    Attributes:
        rounds: communication rounds.
        per_class: compressed samples per class of the first head, per site and network.
        compress_steps: optimisation steps of the compressed samples per round (:func:`compression_loss`).
        compress_lr: Adam learning rate of the compressed images.
        server_epochs: epochs the server trains the global model per round on the compressed samples.
        server_lr: the server's learning rate (AdamW; the study's ``train.lr`` when 0).
        distill_weight: weight of the distillation matching loss (KL to the sites' soft labels).
        temperature: distillation temperature ``T`` (the KL is scaled by ``T**2``, Hinton et al.).
        backend: ``flower`` (Flower simulation engine, the real message path) or ``inprocess``.
        start_timeout_s, round_timeout_s: seconds to wait for the sites to connect / reply.
        threads_per_site: torch threads in each site's worker.
        parallel_sites: sites computing at the same time (0 = as many as CPU cores allow).
        audit_holdout: share of each site's cases (stratified by the first head's class) the site never compresses:
            the privacy audit's non-members (0 = compress every case and skip the audit). Fewer than 2 held-out
            cases at a site skip its audit (on the tiny phantom's 6 cases a site needs 0.5).
        audit: run the privacy audit of the compressed samples after the federation (module docstring).
        keep_compressed: what the server keeps of what the sites sent, and the audit attacks: ``all`` rounds (at
            32^3, 0.54 MB per compressed sample) or the ``last`` round's.
        privacy_control: run the compression positive control of the audit (module docstring).
    """

    rounds: int = 3
    per_class: int = 2
    compress_steps: int = 20
    compress_lr: float = 0.05
    server_epochs: int = 5
    server_lr: float = 0.0
    distill_weight: float = 1.0
    temperature: float = 2.0
    backend: Literal["flower", "inprocess"] = "flower"
    start_timeout_s: float = 120.0
    round_timeout_s: float = 3600.0
    threads_per_site: int = 1
    parallel_sites: int = 0
    audit_holdout: float = 0.2
    audit: bool = True
    keep_compressed: Literal["all", "last"] = "all"
    privacy_control: bool = True

    def __post_init__(self) -> None:
        for key in ("rounds", "per_class", "server_epochs"):
            if getattr(self, key) < 1:
                raise ValueError(f"fedkd.{key} must be >= 1, found {getattr(self, key)}")
        if self.compress_steps < 0:
            raise ValueError(f"fedkd.compress_steps must be >= 0, found {self.compress_steps}")
        if self.compress_lr <= 0 or self.server_lr < 0:
            raise ValueError("fedkd.compress_lr must be > 0 and server_lr >= 0")
        if self.distill_weight < 0 or self.temperature <= 0:
            raise ValueError("fedkd.distill_weight must be >= 0 and temperature > 0")
        if self.backend not in ("flower", "inprocess"):
            raise ValueError(f"fedkd.backend must be flower or inprocess, found {self.backend!r}")
        if self.start_timeout_s <= 0 or self.round_timeout_s <= 0 or self.threads_per_site < 1:
            raise ValueError("fedkd timeouts must be > 0 and threads_per_site >= 1")
        if not 0.0 <= self.audit_holdout < 1.0:
            raise ValueError(f"fedkd.audit_holdout must be in [0, 1), found {self.audit_holdout}")
        if self.keep_compressed not in ("all", "last"):
            raise ValueError(f"fedkd.keep_compressed must be all or last, found {self.keep_compressed!r}")


def synthetic_label_maps(n: int, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """``n`` synthetic tumour label maps of ``shape`` (2D or 3D): a sphere of oedema (2) holding an enhancing rim (3)
    around a necrotic core (1), at a random centre in the middle half of the grid and a random radius (12-22 % of the
    smallest side). Drawn from ``generator`` alone: no case contributes to them.

    Returns:
        ``(n, *shape)`` int64.
    """
    shape = tuple(int(s) for s in shape)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    out = torch.zeros((n, *shape), dtype=torch.int64)
    side = min(shape)
    for i in range(n):
        centre = [s * (0.25 + 0.5 * float(torch.rand((), generator=generator))) for s in shape]
        radius = side * (0.12 + 0.10 * float(torch.rand((), generator=generator)))
        dist = torch.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
        out[i][dist < radius] = 2
        out[i][dist < 0.6 * radius] = 3
        out[i][dist < 0.35 * radius] = 1
    return out


def _head_terms(head_logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each head against target distributions ``(B, K_h)`` (rows of zeros, no known label: left
    out)."""
    total = head_logits[0].new_zeros(()) if head_logits else torch.zeros(())
    for logits, q in zip(head_logits, targets):
        known = q.sum(1) > 0
        if known.any():
            total = total - (q[known] * F.log_softmax(logits.float()[known], dim=1)).sum(1).mean()
        else:
            total = total + logits.sum() * 0.0
    return total


def _soft_loss(net: torch.nn.Module, x: torch.Tensor, seg: torch.Tensor, targets: Sequence[torch.Tensor]
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The multi-task loss of samples with label maps ``seg`` and per head target distributions ``(B, K_h)``, and per
    head the samples' ``(B, K_h)`` class log-probabilities. A network with voxel heads is scored as it trains: its
    heads' voxel log-probabilities averaged over each map's tumour (what :func:`multitask_voxel_loss` does with hard
    labels; the map gives the tumour, so the loss is smooth in the images); others through ``forward_all``."""
    if getattr(net, "voxel_heads", False):
        seg_logits, voxels = net.forward_voxels(x)
        tumour = (seg > 0).unsqueeze(1).float()
        n = tumour.flatten(1).sum(1).clamp_min(1.0)
        log_cases = [(F.log_softmax(v.float(), 1) * tumour).flatten(2).sum(-1) / n[:, None] for v in voxels]
        terms = seg_logits.new_zeros(()).float()
        for lp, q in zip(log_cases, targets):
            known = q.sum(1) > 0
            if known.any():
                terms = terms - (q[known] * lp[known]).sum(1).mean()
        return segmentation_loss(seg_logits, seg) + terms / max(len(voxels), 1), log_cases
    seg_logits, heads = net.forward_all(x)
    log_cases = [F.log_softmax(h.float(), 1) for h in heads]
    return segmentation_loss(seg_logits, seg) + _head_terms(heads, targets), log_cases


def _embed(net: torch.nn.Module, x: torch.Tensor, seg: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """What the compression matches: ``(B, D)`` embeddings (the bottleneck's global average, and for voxel heads their
    trunk's features averaged over the tumour of ``seg``), the segmentation logits, and per head ``(B, K_h)`` class
    log-probabilities (voxel heads: averaged over the tumour of ``seg``)."""
    pooled: list[torch.Tensor] = []
    seg_logits, feats = net._decode(x, pooled=pooled)
    emb = [pooled[0]]
    if getattr(net, "voxel_heads", False):
        tumour = (seg > 0).unsqueeze(1).float()
        n = tumour.flatten(1).sum(1).clamp_min(1.0)[:, None]
        trunk = net.branch(torch.cat([feats.detach(), x], dim=1))
        emb.append((trunk * tumour).flatten(2).sum(-1) / n)
        log_cases = [(F.log_softmax(h(trunk).float(), 1) * tumour).flatten(2).sum(-1) / n for h in net.heads]
    else:
        _, heads = net.forward_all(x)
        log_cases = [F.log_softmax(h.float(), 1) for h in heads]
    return torch.cat(emb, dim=1), seg_logits, log_cases


def compression_loss(net: torch.nn.Module, syn: torch.Tensor, syn_seg: torch.Tensor, target_embedding: torch.Tensor,
                     target_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The compression loss of one class's compressed samples ``syn (M, C, *S)`` with maps ``syn_seg``: the squared
    distance between their mean embedding and the real cases' ``target_embedding (D,)``, the KL divergence from the
    real cases' mean predicted distribution per head to theirs, and the segmentation loss of their maps."""
    emb, seg_logits, log_cases = _embed(net, syn, syn_seg)
    loss = ((emb.mean(0) - target_embedding) ** 2).sum() + segmentation_loss(seg_logits, syn_seg)
    for lp, q in zip(log_cases, target_probs):
        mean_p = lp.exp().mean(0).clamp_min(1e-8)
        loss = loss + (q * (q.clamp_min(1e-8).log() - mean_p.log())).sum()
    return loss


@dataclasses.dataclass
class CompressedSet:
    """What a site sends for one network: ``images (M, C, *S)`` float32 compressed samples, ``seg (M, *S)`` their
    synthetic label maps, per head ``targets[h] (M, K_h)`` (the distribution of known labels among the real cases
    of the sample's class; the first head one-hot) and ``soft[h] (M, K_h)`` (the global model's mean prediction on
    those real cases)."""

    images: torch.Tensor
    seg: torch.Tensor
    targets: list[torch.Tensor]
    soft: list[torch.Tensor]

    def to_arrays(self) -> dict[str, torch.Tensor]:
        out = {"images": self.images, "seg": self.seg.to(torch.int8)}
        for h, (t, s) in enumerate(zip(self.targets, self.soft)):
            out[f"target{h}"] = t
            out[f"soft{h}"] = s
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, torch.Tensor], n_heads: int) -> CompressedSet:
        expected = {"images", "seg", *(f"target{h}" for h in range(n_heads)), *(f"soft{h}" for h in range(n_heads))}
        if set(arrays) != expected:
            raise ValueError(f"a compressed set holds {sorted(expected)}, found {sorted(arrays)}")
        images = torch.as_tensor(arrays["images"]).float()
        seg = torch.as_tensor(arrays["seg"]).long()
        if images.ndim < 4 or seg.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"compressed images (M, C, *S) and maps (M, *S) disagree: {tuple(images.shape)} vs "
                             f"{tuple(seg.shape)}")
        targets = [torch.as_tensor(arrays[f"target{h}"]).float() for h in range(n_heads)]
        soft = [torch.as_tensor(arrays[f"soft{h}"]).float() for h in range(n_heads)]
        if any(t.shape[0] != images.shape[0] or s.shape != t.shape for t, s in zip(targets, soft)):
            raise ValueError("compressed targets and soft labels must hold one row per sample")
        return cls(images, seg, targets, soft)


def compress_site(net: torch.nn.Module, dataset, head_targets: Sequence[Sequence[int]], head_sizes: Sequence[int],
                  cfg: FedKDConfig, *, seed: int, name: str, start_from: Sequence[int] | None = None
                  ) -> CompressedSet | None:
    """A site's compressed samples and soft labels for network ``name`` (module docstring, step 2).

    Args:
        net: the global multi-task network (its weights are not changed).
        dataset: the site's training cases for this network (``len`` and ``arrays(i) -> (image, seg)``).
        head_targets: per case a class per head, -1 = unknown.
        head_sizes: classes per head.
        cfg: compression settings.
        seed, name: the draw of the noise and the label maps (``(seed, name)``).
        start_from: THE PRIVACY AUDIT'S POSITIVE CONTROL, never what a site sends (None: noise and synthetic maps,
            the arm): indices of cases of ``dataset`` whose images and label maps the compressed samples start from;
            each class gets one sample per listed case of that class (``cfg.per_class`` is then not used).

    Returns:
        The compressed set, or None when the site has no case with a known first-head label.
    """
    y = torch.as_tensor(np.asarray(head_targets, dtype=np.int64)).reshape(len(dataset), len(head_sizes))
    if start_from is not None and any(not 0 <= int(i) < len(dataset) for i in start_from):
        raise ValueError(f"start_from: expected case indices in [0, {len(dataset)}), found {list(start_from)}")
    images, seg = load_batch(dataset, list(range(len(dataset))))
    net.eval()
    gen = torch_generator(seed, "fedkd-compress", name)
    out_images, out_seg, out_targets, out_soft = [], [], [[] for _ in head_sizes], [[] for _ in head_sizes]
    for c in range(head_sizes[0]):
        members = (y[:, 0] == c).nonzero().flatten()
        if len(members) == 0:
            continue
        xr, sr, yr = images[members], seg[members], y[members]
        with torch.no_grad():
            emb_real, _, log_real = _embed(net, xr, sr)
        soft = [lp.exp().mean(0) for lp in log_real]
        target = emb_real.mean(0)
        dists = []
        for h, k in enumerate(head_sizes):
            known = yr[:, h][yr[:, h] >= 0]
            dists.append(torch.bincount(known, minlength=k).float() / max(len(known), 1))
        if start_from is None:
            m = cfg.per_class
            syn_seg = synthetic_label_maps(m, images.shape[2:], gen)
            syn = torch.randn((m, *images.shape[1:]), generator=gen).requires_grad_(True)
        else:
            starts = [int(i) for i in start_from if int(y[int(i), 0]) == c]
            if not starts:
                continue
            m = len(starts)
            syn_seg = seg[starts].clone()
            syn = images[starts].clone().requires_grad_(True)
        syn_targets = [d.expand(m, -1) for d in dists]
        opt = torch.optim.Adam([syn], lr=cfg.compress_lr)
        for _ in range(cfg.compress_steps):
            loss = compression_loss(net, syn, syn_seg, target, soft)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out_images.append(syn.detach())
        out_seg.append(syn_seg)
        for h in range(len(head_sizes)):
            out_targets[h].append(syn_targets[h].detach().clone())
            out_soft[h].append(soft[h].expand(m, -1).clone())
    net.zero_grad(set_to_none=True)
    if not out_images:
        return None
    return CompressedSet(torch.cat(out_images), torch.cat(out_seg), [torch.cat(t) for t in out_targets],
                         [torch.cat(s) for s in out_soft])


def server_update(net: torch.nn.Module, sets: Sequence[CompressedSet], setup: TrainingSetup, cfg: FedKDConfig, *,
                  rnd: int, name: str) -> list[float]:
    """Train the global network in place on the sites' compressed sets (module docstring, step 4): per batch the
    multi-task loss on the compressed samples (segmentation on their maps, each head's cross-entropy against its
    targets) plus ``distill_weight * T**2 * KL(soft labels || softmax(logits / T))``. Returns the epoch losses."""
    images = torch.cat([s.images for s in sets])
    seg = torch.cat([s.seg for s in sets])
    n_heads = len(sets[0].targets)
    targets = [torch.cat([s.targets[h] for s in sets]) for h in range(n_heads)]
    soft = [torch.cat([s.soft[h] for s in sets]) for h in range(n_heads)]
    lr = cfg.server_lr or setup.train.lr
    optimizer = make_optimizer(net, dataclasses.replace(setup.train, lr=lr))
    t = cfg.temperature
    net.train()
    losses = []
    bs = setup.train.batch_size
    for epoch in range(cfg.server_epochs):
        order = torch.randperm(len(images), generator=torch_generator(setup.seed, "fedkd-server", name, rnd, epoch))
        torch.manual_seed(derive_seed(setup.seed, "fedkd-dropout", name, rnd, epoch))
        total, batches = 0.0, 0
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            loss, log_cases = _soft_loss(net, images[idx], seg[idx], [q[idx] for q in targets])
            if cfg.distill_weight > 0:
                kl = sum(F.kl_div(F.log_softmax(lp / t, 1), p[idx].clamp_min(1e-8) ** (1.0 / t)
                                  / (p[idx].clamp_min(1e-8) ** (1.0 / t)).sum(1, keepdim=True), reduction="batchmean")
                         for lp, p in zip(log_cases, soft))
                loss = loss + cfg.distill_weight * t * t * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"fedkd {name}: server loss became {value} in round {rnd}; "
                                         "lower fedkd.server_lr")
            total += value
            batches += 1
        losses.append(total / max(batches, 1))
    net.eval()
    return losses


def audit_split(site: SiteRecord, fraction: float, setup: TrainingSetup) -> tuple[list[str], list[str]]:
    """A site's cases it may compress and its held-out cases, which it never compresses (the privacy audit's
    non-members): :func:`synthlearn.audits.privacy.stratified_holdout` by the class of the task's first head,
    seeded with the run's seed. Computed at the site from its own cases (and again by the arm, to record it).

    Returns:
        ``(member_ids, holdout_ids)``, both sorted.
    """
    heads = setup.task_spec.stages[0].heads
    first = heads[0] if heads else None
    return stratified_holdout(site, fraction, lambda case: first.extract(case.labels) if first else None, setup.seed)


def keep_received(folder: str | Path, site: str, rnd: int, arrays: Mapping[str, Mapping[str, torch.Tensor]], *,
                  keep: Literal["all", "last"] = "all") -> Path:
    """Write what ``site`` sent in round ``rnd`` (per network, its compressed set's arrays) to
    ``folder/<site>/round-RRR.safetensors`` (keys ``<network>::<array>``; written to a temporary file, then renamed);
    with ``keep = "last"`` the site's earlier rounds are removed. Returns the file."""
    from safetensors.torch import save_file

    if keep not in ("all", "last"):
        raise ValueError(f"keep must be all or last, found {keep!r}")
    out = Path(folder) / site
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"round-{int(rnd):03d}.safetensors"
    tensors = {f"{name}::{key}": torch.as_tensor(v).detach().cpu().contiguous().clone()
               for name, group in arrays.items() for key, v in group.items()}
    tmp = out / f".{path.name}.tmp"
    save_file(tensors, str(tmp), metadata={"site": site, "round": str(int(rnd)), "what": "fedkd compressed sets"})
    os.replace(tmp, path)
    if keep == "last":
        for old in out.glob("round-*.safetensors"):
            if old != path:
                old.unlink()
    return path


def load_received(folder: str | Path, site: str) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """What :func:`keep_received` kept of ``site``: round -> network -> array name -> tensor (empty when none)."""
    from safetensors.torch import load_file

    out: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for path in sorted((Path(folder) / site).glob("round-*.safetensors")):
        rnd = int(path.stem.removeprefix("round-"))
        for key, value in load_file(str(path)).items():
            name, array = key.rsplit("::", 1)
            out.setdefault(rnd, {}).setdefault(name, {})[array] = value
    return out


class FedKDProtocol(TaskModelProtocol):
    """FedKD as a round protocol: the server sends every network's global weights; a site returns, per network, its
    compressed set (:func:`compress_site`) of its cases outside its audit holdout (:func:`audit_split`); the server
    trains each network on the sites' sets (:func:`server_update`). What a site returns is checked on arrival (names
    and shapes) and, with ``received_dir``, kept there (:func:`keep_received`) for the privacy audit.

    Args:
        setup, cfg, cache: as :class:`synthlearn.strategies.fedavg.TaskModelProtocol`.
        received_dir: the server's folder for what the sites sent (None: nothing kept).
    """

    arm_name = "fedkd"

    def __init__(self, setup: TrainingSetup, cfg: FedKDConfig, cache=None, *, received_dir: str | Path | None = None):
        super().__init__(setup, cfg, cache)
        self.received_dir = None if received_dir is None else Path(received_dir).resolve()

    def site_round(self, site: SiteRecord, rnd: int, arrays, config, *, state_dir: Path,
                   memory: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        cache = self.site_cache(memory)
        data = stage_data(site.cases, self.setup)
        held_out = set(audit_split(site, self.cfg.audit_holdout, self.setup)[1])
        out: dict[str, dict[str, torch.Tensor]] = {}
        metrics: dict[str, Any] = {}
        for name in model_names(self.setup):
            stage, fold = split_name(name)
            sd = data[stage]
            idx = [i for i in sd.training_indices(fold, self.setup.n_folds) if sd.cases[i].case_id not in held_out]
            if not idx:
                continue
            net = init_model(self.setup, name)
            net.load_state_dict({k: torch.as_tensor(v) for k, v in arrays[name].items()})
            comp = compress_site(net, cache.dataset([sd.cases[i] for i in idx]), [sd.targets[i] for i in idx],
                                 sd.stage.head_sizes, self.cfg, seed=derive_seed(self.setup.seed, site.name, rnd),
                                 name=name)
            if comp is not None:
                for key, value in comp.to_arrays().items():
                    out.setdefault(name, {})[key] = value
                metrics[f"n::{name}"] = len(idx)
        return out, metrics

    def aggregate(self, rnd: int, state, replies: Sequence[SiteReply]) -> tuple[dict[str, StateDict], dict[str, Any]]:
        new_state: dict[str, StateDict] = {}
        losses: dict[str, list[float]] = {}
        for name in model_names(self.setup):
            stage = self.setup.task_spec.stage(split_name(name)[0])
            sets = [CompressedSet.from_arrays(r.arrays[name], len(stage.heads)) for r in replies if name in r.arrays]
            net = init_model(self.setup, name)
            net.load_state_dict({k: torch.as_tensor(v) for k, v in state[name].items()})
            if sets:
                losses[name] = server_update(net, sets, self.setup, self.cfg, rnd=rnd, name=name)
            new_state[name] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        if self.received_dir is not None:
            for r in replies:
                keep_received(self.received_dir, r.site, rnd, r.arrays, keep=self.cfg.keep_compressed)
        return new_state, {"server_loss": losses,
                           "compressed": {r.site: {n: int(a["images"].shape[0]) for n, a in r.arrays.items()}
                                          for r in replies}}


# ----------------------------------------------------------------------------------------------- privacy audit
def _as_cases(images: torch.Tensor, seg: torch.Tensor) -> list[CaseArrays]:
    """``(N, C, X, Y, Z)`` images and ``(N, X, Y, Z)`` maps as cases for :func:`audit_site` (identity affine: the
    audit compares voxels on the model's grid)."""
    eye = np.eye(4)
    return [CaseArrays(images=x.numpy().astype(np.float32), seg=m.numpy().astype(np.int64), affine=eye)
            for x, m in zip(images.detach().float().cpu(), seg.detach().long().cpu())]


def audit_compressed(members: tuple[torch.Tensor, torch.Tensor], holdout: tuple[torch.Tensor, torch.Tensor],
                     compressed: tuple[torch.Tensor, torch.Tensor], *, member_ids: Sequence[str] | None = None,
                     control: tuple[torch.Tensor, torch.Tensor, Sequence[int]] | None = None,
                     reference: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None, seed: int = 0,
                     montage_path: str | Path | None = None, n_bootstrap: int = 1000) -> dict[str, Any]:
    """The privacy audit of one site's compressed samples: :func:`synthlearn.audits.privacy.audit_site` (SSIM
    membership inference with its negative and positive controls, copy rate) with the members, non-members and
    compressed samples as the model reads them (preprocessed, on its grid), every one windowed over the whole grid
    (``ssim_region = "grid"``: a compressed sample, optimised from noise, has no zero background to find a brain by).

    Args:
        members: ``(images (Nm, C, X, Y, Z), seg (Nm, X, Y, Z))``: the cases the site compressed, >= 2.
        holdout: likewise, its held-out cases (never compressed), >= 2.
        compressed: ``(images (Ns, C, X, Y, Z), seg (Ns, X, Y, Z))``: what the site sent, >= 1.
        member_ids: the members' names in the result (default ``train-<i>``).
        control: the compression positive control: ``(images (Nc, C, X, Y, Z), seg (Nc, X, Y, Z), indices)``, a
            compression started from the members at ``indices`` (:func:`compression_control`); audit_site reports
            it as ``positive_control_generator``. None: not run.
        reference: the reference control: other sites' compressed samples by site, ``(images, seg)`` each.
        seed: seeds the controls and the bootstraps.
        montage_path: PNG of the closest compressed/member pairs (drawn for the four contract sequences only).
        n_bootstrap: bootstrap resamples of the AUC CIs.

    Returns:
        audit_site's dict, members named by ``member_ids``.
    """
    train = _as_cases(*members)
    if member_ids is not None and len(member_ids) != len(train):
        raise ValueError(f"member_ids: expected one per member ({len(train)}), found {len(member_ids)}")
    control_cases = control_ids = None
    if control is not None:
        control_cases = _as_cases(control[0], control[1])
        control_ids = [case_id_of(train[int(i)], int(i), prefix="train") for i in control[2]]
    channels = int(members[0].shape[1])
    result = audit_site(train, _as_cases(*holdout), _as_cases(*compressed), seed=seed, n_bootstrap=n_bootstrap,
                        montage_path=montage_path if channels == len(SEQUENCES) else None,
                        control_synthetic=control_cases, control_case_ids=control_ids,
                        reference_synthetic={k: _as_cases(*v) for k, v in (reference or {}).items()} or None,
                        ssim_region="grid")
    if member_ids is not None:  # audit_site names array cases by position (case_id_of): give them their ids
        names = {case_id_of(c, i, prefix="train"): str(member_ids[i]) for i, c in enumerate(train)}
        for pair in result["copy_rate"]["closest"]:
            pair["train"] = names.get(pair["train"], pair["train"])
        for key in ("positive_control", "positive_control_generator"):
            if key in result:
                result[key]["memorised_case_ids"] = [names.get(i, i) for i in result[key]["memorised_case_ids"]]
    return result


def compression_control(net: torch.nn.Module, site: SiteRecord, members: Sequence[CaseRecord], setup: TrainingSetup,
                        cfg: FedKDConfig, cache, *, name: str) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """THE COMPRESSION POSITIVE CONTROL, never sent: network ``name``'s compression of the site's ``members`` among
    its training cases, started from ``cfg.per_class`` of them per class of the first head (seeded) and their label
    maps instead of noise (:func:`compress_site` ``start_from``), with the same steps and loss.

    Returns:
        ``(images (Nc, C, *S), seg (Nc, *S), indices into members of the cases it started from)``, or None when no
        member has a known first-head class.
    """
    stage, fold = split_name(name)
    sd = stage_data(site.cases, setup)[stage]
    position = {c.case_id: i for i, c in enumerate(members)}
    idx = [i for i in sd.training_indices(fold, setup.n_folds) if sd.cases[i].case_id in position]
    cases, targets = [sd.cases[i] for i in idx], [sd.targets[i] for i in idx]
    starts = []
    for c in range(sd.stage.head_sizes[0]):
        of_class = [j for j, t in enumerate(targets) if t[0] == c]
        order = numpy_generator(setup.seed, "fedkd-privacy-control", site.name, c).permutation(len(of_class))
        starts += [of_class[k] for k in order[:cfg.per_class]]
    if not starts:
        return None
    comp = compress_site(net, cache.dataset(cases), targets, sd.stage.head_sizes, cfg, name=name, start_from=starts,
                         seed=derive_seed(setup.seed, "fedkd-privacy-control", site.name))
    return comp.images, comp.seg, [position[cases[j].case_id] for j in starts]


def privacy_audit(ctx: ArmContext, cfg: FedKDConfig, states: Mapping[str, Mapping[str, torch.Tensor]]
                  ) -> dict[str, Any]:
    """Per training site, the audit of the compressed samples the server kept (module docstring): site ->
    :func:`audit_compressed`'s dict + ``{"rounds", "n_compressed", "wall_s"}``, or ``{"skipped": why}``.

    Args:
        ctx: the arm's context (its ``arm_dir/received`` holds what the sites sent).
        cfg: the arm's settings.
        states: the final global networks (the compression positive control compresses with the first).
    """
    setup = ctx.setup
    first_head = setup.task_spec.stages[0].heads[0]
    kept: dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}
    for site in ctx.train_sites:
        rounds = load_received(ctx.arm_dir / "received", site.name)
        sets = [a for r in sorted(rounds) for a in rounds[r].values()]
        if sets:
            kept[site.name] = (torch.cat([a["images"] for a in sets]).float(),
                               torch.cat([a["seg"] for a in sets]).long(), sorted(rounds))
    control_net = None
    if cfg.privacy_control:
        name = model_names(setup)[0]
        control_net = init_model(setup, name)
        control_net.load_state_dict({k: torch.as_tensor(v) for k, v in states[name].items()})
    out: dict[str, Any] = {}
    for site in ctx.train_sites:
        if not site.cases:
            out[site.name] = {"skipped": REMOTE_SITE_SKIP}
            continue
        member_ids, holdout_ids = audit_split(site, cfg.audit_holdout, setup)
        by_id = {c.case_id: c for c in site.cases}
        # only cases with a known first-head class enter the compression: the others are neither group
        members = [by_id[i] for i in member_ids if first_head.label(by_id[i].labels) is not None]
        holdout = [by_id[i] for i in holdout_ids if first_head.label(by_id[i].labels) is not None]
        if setup.preprocess.spatial_dims != 3:
            out[site.name] = {"skipped": "the SSIM audit is 3D; this study's cases are 2D"}
            continue
        if site.name not in kept:
            out[site.name] = {"skipped": f"the server kept no compressed samples of this site ({ctx.arm_dir.name}/"
                                         f"received/{site.name})"}
            continue
        if len(holdout) < 2 or len(members) < 2:
            out[site.name] = {"skipped": f"needs >= 2 held-out and >= 2 member cases with a known {first_head.name} "
                                         f"class (audit_holdout {cfg.audit_holdout}; found {len(holdout)} and "
                                         f"{len(members)})"}
            continue
        t0 = time.perf_counter()
        real = {role: load_batch(ctx.cache.dataset(cases), list(range(len(cases))))
                for role, cases in (("members", members), ("holdout", holdout))}
        control = None
        if control_net is not None:
            control = compression_control(control_net, site, members, setup, cfg, ctx.cache,
                                          name=model_names(setup)[0])
        images, seg, rounds = kept[site.name]
        result = audit_compressed(real["members"], real["holdout"], (images, seg),
                                  member_ids=[f"{c.site}/{c.case_id}" for c in members], control=control,
                                  reference={o: v[:2] for o, v in kept.items() if o != site.name} or None,
                                  seed=setup.seed, montage_path=ctx.arm_dir / "figures" / f"privacy_closest_{site.name}.png")
        if result.get("montage"):
            result["montage"] = str(Path(result["montage"]).relative_to(ctx.arm_dir.parent))
        result.update(rounds=rounds, n_compressed=int(images.shape[0]), wall_s=time.perf_counter() - t0)
        out[site.name] = result
    return out


def run(ctx: ArmContext) -> ArmOutput:
    """The FedKD arm: rounds on Flower (or in process) with each site's audit holdout left out of its compression,
    the final global model as a task model, then the privacy audit of the compressed samples (``audit``)."""
    cfg: FedKDConfig = ctx.arm_config
    for site in ctx.train_sites:  # the split each site computes for itself, recorded
        members, holdout = audit_split(site, cfg.audit_holdout, ctx.setup)
        write_json(ctx.arm_dir / "holdout" / f"{site.name}.json",
                   {"site": site.name, "fraction": cfg.audit_holdout, "members": members, "holdout": holdout,
                    "note": "the site never compresses its held-out cases: the privacy audit's non-members"})
    protocol = FedKDProtocol(ctx.setup, cfg, received_dir=ctx.arm_dir / "received")
    if cfg.backend == "flower":
        if ctx.federate is None:
            raise ValueError("fedkd.backend = 'flower' needs the study runner's Flower runner (ctx.federate); run the "
                             "arm through `synthlearn study run`, or set fedkd.backend = 'inprocess'")
        final = ctx.federate(protocol, ctx.train_sites, ctx.arm_dir, progress=ctx.progress)
    else:
        protocol.cache = ctx.cache
        final = run_protocol_inprocess(protocol, ctx.train_sites, ctx.arm_dir)
    info = {"rounds": final.round, "history": final.history, "backend": cfg.backend,
            "bytes_to_sites": final.bytes_to_sites}
    model = task_model_from_states(final.states, ctx.setup, info)
    history = [{"loss": {}} for _ in final.history]  # the sites report no training loss: the check reads the maps
    checks = federated_learning_check(model, ctx.train_sites, ctx.setup, history, ctx.cache)
    model.info.update(learning_check=checks, learning_summary=summarise_checks(checks))
    model.save(ctx.arm_dir / "model")
    extra: dict[str, Any] = {"bytes_to_sites": final.bytes_to_sites, "backend": cfg.backend,
                             "audit_holdout": cfg.audit_holdout}
    if cfg.audit:
        t0 = time.perf_counter()
        extra["privacy"] = privacy_audit(ctx, cfg, final.states)
        extra["audit_wall_s"] = time.perf_counter() - t0
    return ArmOutput(models={ctx.name: model}, bytes_from_sites=final.bytes_from_sites, rounds=final.round,
                     extra=extra)


ARM = ArmSpec(name="fedkd", run=run, config=FedKDConfig, task_kinds=("multitask",), spatial_dims=(2, 3),
              protocol=FedKDProtocol,
              description="sites send compressed samples and soft labels, never images or weights; the server "
                          "trains the multi-task model on them with a distillation loss (paper 001)")

__all__ = ["ARM", "CompressedSet", "FedKDConfig", "FedKDProtocol", "audit_compressed", "audit_split", "compress_site",
           "compression_control", "compression_loss", "keep_received", "load_received", "privacy_audit", "server_update",
           "synthetic_label_maps"]
