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
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from synthlearn.data.contract import SiteRecord
from synthlearn.protocol import SiteReply, run_protocol_inprocess
from synthlearn.strategies.base import ArmContext, ArmOutput
from synthlearn.strategies.fedavg import TaskModelProtocol, federated_learning_check, task_model_from_states
from synthlearn.strategies.registry import ArmSpec
from synthlearn.tasks.folds import stage_data
from synthlearn.tasks.model import init_model
from synthlearn.tasks.setup import TrainingSetup, model_names, split_name
from synthlearn.training.learning_check import summarise_checks
from synthlearn.training.seeding import derive_seed, torch_generator
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
                  cfg: FedKDConfig, *, seed: int, name: str) -> CompressedSet | None:
    """A site's compressed samples and soft labels for network ``name`` (module docstring, step 2).

    Args:
        net: the global multi-task network (its weights are not changed).
        dataset: the site's training cases for this network (``len`` and ``arrays(i) -> (image, seg)``).
        head_targets: per case a class per head, -1 = unknown.
        head_sizes: classes per head.
        cfg: compression settings.
        seed, name: the draw of the noise and the label maps (``(seed, name)``).

    Returns:
        The compressed set, or None when the site has no case with a known first-head label.
    """
    y = torch.as_tensor(np.asarray(head_targets, dtype=np.int64)).reshape(len(dataset), len(head_sizes))
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
        m = cfg.per_class
        syn_seg = synthetic_label_maps(m, images.shape[2:], gen)
        syn = torch.randn((m, *images.shape[1:]), generator=gen).requires_grad_(True)
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


class FedKDProtocol(TaskModelProtocol):
    """FedKD as a round protocol: the server sends every network's global weights; a site returns, per network, its
    compressed set (:func:`compress_site`); the server trains each network on the sites' sets
    (:func:`server_update`). What a site returns is checked on arrival (names and shapes)."""

    def site_round(self, site: SiteRecord, rnd: int, arrays, config, *, state_dir: Path,
                   memory: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        cache = self.site_cache(memory)
        data = stage_data(site.cases, self.setup)
        out: dict[str, dict[str, torch.Tensor]] = {}
        metrics: dict[str, Any] = {}
        for name in model_names(self.setup):
            stage, fold = split_name(name)
            sd = data[stage]
            idx = sd.training_indices(fold, self.setup.n_folds)
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
        return new_state, {"server_loss": losses,
                           "compressed": {r.site: {n: int(a["images"].shape[0]) for n, a in r.arrays.items()}
                                          for r in replies}}


def run(ctx: ArmContext) -> ArmOutput:
    """The FedKD arm: rounds on Flower (or in process), then the final global model as a task model."""
    cfg: FedKDConfig = ctx.arm_config
    protocol = FedKDProtocol(ctx.setup, cfg)
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
    return ArmOutput(models={ctx.name: model}, bytes_from_sites=final.bytes_from_sites, rounds=final.round,
                     extra={"bytes_to_sites": final.bytes_to_sites, "backend": cfg.backend})


ARM = ArmSpec(name="fedkd", run=run, config=FedKDConfig, task_kinds=("multitask",), spatial_dims=(2, 3),
              description="sites send compressed samples and soft labels, never images or weights; the server "
                          "trains the multi-task model on them with a distillation loss (paper 001)")

__all__ = ["ARM", "CompressedSet", "FedKDConfig", "FedKDProtocol", "compress_site", "compression_loss",
           "server_update", "synthetic_label_maps"]
