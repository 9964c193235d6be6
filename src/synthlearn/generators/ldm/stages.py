"""The three training stages of a site's latent diffusion generator (paper 000, "Methods") and what they share.

1. **autoencoder** (:mod:`synthlearn.models.autoencoder`): L1 + KL (+ patch adversarial after
   ``adv_start_epoch``, + perceptual when weights are given) on 4 sequences + whole-tumour mask;
2. **super-resolution** (:mod:`synthlearn.models.superres`): encoder frozen, decoder + UNet module
   fine-tuned with L1 + SSIM (+ perceptual);
3. **diffusion** (:mod:`synthlearn.models.diffusion`): the frozen encoder's latents, scaled to unit
   variance, DDPM noise-prediction loss, class by cross-attention with label dropout.

Every random choice of epoch ``e`` of stage ``s`` (order, flips, patches, latent noise, timesteps, label
dropout) comes from a ``torch.Generator`` seeded with ``(seed, s, e)``; each stage checkpoints after every epoch
and resumes from it (:func:`synthlearn.generators.ldm.train.train_generator` drives them). Scale: bf16/fp16
autocast, CUDA when available, DDP under ``torchrun`` (:class:`Runtime`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synthlearn.models.autoencoder import (
    MASK_CHANNEL,
    GeneratorAutoencoder,
    build_discriminator,
    decode_latent,
    kl_loss,
    make_perceptual_loss,
    mask_dice_loss,
    reconstruction_l1,
)
from synthlearn.models.diffusion import ClassConditionedUNet, build_scheduler, drop_labels
from synthlearn.models.superres import SuperResolution
from synthlearn.training.checkpoint import load_checkpoint, save_checkpoint
from synthlearn.training.seeding import torch_generator
from synthlearn.training.trainer import poly_lr


from synthlearn.generators.ldm.config import STAGES, GeneratorConfig

log = logging.getLogger(__name__)

#: ``on_epoch(stage, epochs_done, epochs_total)``, called after every epoch of a stage (e.g. a site process's
#: progress report)
EpochHook = Callable[[str, int, int], None]

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


def _epoch_means(history: dict[str, list[float]], sums: dict[str, float], count: int, rt: Runtime
                 ) -> dict[str, float]:
    """The epoch's mean of every loss over all ranks (:func:`_reduce`), appended to ``history``."""
    sums, count = _reduce(sums, count, rt)
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
                       classes: torch.Tensor | None = None,
                       on_epoch: EpochHook | None = None,
                       dp_reports: dict[str, Any] | None = None) -> dict[str, list[float]]:
    """Stage 1 on ``x_work`` ``(N, 5, *working_shape)`` (``classes`` ``(N,)``, -1 = unknown: what a
    class-conditional decoder decodes with); returns the per-epoch loss history. With ``privacy.dp_sgd``
    (:mod:`synthlearn.generators.ldm.dp`) every step is DP-SGD over cases and the component's accounting goes into
    ``dp_reports["autoencoder"]``."""
    from monai.losses import PatchAdversarialLoss

    acfg = cfg.autoencoder
    if acfg.kind == "space_to_depth":
        return {}  # nothing to learn: the rearrangement is exact
    disc = build_discriminator(acfg, cfg.channels).to(rt.device) if acfg.adv_weight > 0 else None
    perceptual = make_perceptual_loss(acfg)
    if perceptual is not None:
        perceptual = perceptual.to(rt.device)
    opt = torch.optim.Adam(ae.ae.parameters(), lr=acfg.lr)
    opt_d = torch.optim.Adam(disc.parameters(), lr=acfg.disc_lr) if disc is not None else None
    scaler = torch.amp.GradScaler("cuda", enabled=rt.precision == "fp16")
    history: dict[str, list[float]] = {}
    start = 0
    n = x_work.shape[0]
    dpt = None
    if cfg.privacy.dp_sgd:
        from synthlearn.generators.ldm.dp import DPTraining

        dpt = DPTraining(_AutoencoderStep(ae), opt, cfg.privacy, "autoencoder", n, acfg.batch_size, acfg.epochs)
    if ckpt.is_file():
        state = load_checkpoint(ckpt, map_location=rt.device)
        ae.ae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            disc.load_state_dict(state["discriminator"])
            opt_d.load_state_dict(state["disc_optimizer"])
        if dpt is not None:
            dpt.load_state_dict(state["dp"])
        history, start = state["history"], int(state["epoch"])
        if start < acfg.epochs:
            log.info("autoencoder: resuming from epoch %d/%d (%s)", start, acfg.epochs, ckpt)
    if start >= acfg.epochs:
        if dpt is not None:
            dp_reports["autoencoder"] = dpt.report()
            dpt.close()
        return history
    if dpt is not None:
        history = _train_autoencoder_dp(ae, x_work, cfg, rt, dpt, seed=seed, ckpt=ckpt, progress=progress,
                                        classes=classes, on_epoch=on_epoch, history=history, start=start)
        dp_reports["autoencoder"] = dpt.report()
        dpt.close()
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
        means = _epoch_means(history, sums, count, rt)
        log.info("autoencoder epoch %d/%d: %s", epoch + 1, acfg.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in means.items()))
        if rt.is_main:
            payload = {"epoch": epoch + 1, "model": ae.ae.state_dict(), "optimizer": opt.state_dict(),
                       "history": history}
            if disc is not None:
                payload.update(discriminator=disc.state_dict(), disc_optimizer=opt_d.state_dict())
            save_checkpoint(ckpt, payload)
        rt.barrier()
        if on_epoch is not None:
            on_epoch("autoencoder", epoch + 1, acfg.epochs)
    ae.ae.to(memory_format=torch.contiguous_format)
    return history


def _per_case_autoencoder_loss(recon: torch.Tensor, xb: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                               cfg: GeneratorConfig, perceptual: nn.Module | None) -> tuple[torch.Tensor, dict]:
    """Stage 1's loss as the batch mean of per-case losses (DP-SGD: a case's gradient depends on that case alone);
    returns it and the batch means of its terms."""
    acfg = cfg.autoencoder
    terms: dict[str, list[torch.Tensor]] = {"l1": [], "kl": [], "mask_dice": []}
    if perceptual is not None:
        terms["perceptual"] = []
    total = []
    for i in range(xb.shape[0]):
        r, x = recon[i : i + 1], xb[i : i + 1]
        l1 = reconstruction_l1(r, x, acfg.mask_weight, acfg.tumour_weight, acfg.enhancement_weight)
        kl = kl_loss(mu[i : i + 1], sigma[i : i + 1])
        dice = mask_dice_loss(r, x)
        loss = l1 + acfg.kl_weight * kl + acfg.mask_dice_weight * dice
        terms["l1"].append(l1)
        terms["kl"].append(kl)
        terms["mask_dice"].append(dice)
        if perceptual is not None:
            p_loss = perceptual(r, x)
            loss = loss + acfg.perceptual_weight * p_loss
            terms["perceptual"].append(p_loss)
        total.append(loss)
    return torch.stack(total).mean(), {k: float(torch.stack(v).mean().detach()) for k, v in terms.items()}


def _train_autoencoder_dp(ae: GeneratorAutoencoder, x_work: torch.Tensor, cfg: GeneratorConfig, rt: Runtime,
                          dpt: Any, *, seed: int, ckpt: Path, progress: bool, classes: torch.Tensor | None,
                          on_epoch: EpochHook | None, history: dict[str, list[float]], start: int
                          ) -> dict[str, list[float]]:
    """Stage 1 with DP-SGD (:class:`synthlearn.generators.ldm.dp.DPTraining`): Poisson batches of cases, the
    per-case loss, per-case clipping and noise; no adversarial term (refused by the config)."""
    acfg = cfg.autoencoder
    perceptual = make_perceptual_loss(acfg)
    if perceptual is not None:
        perceptual = perceptual.to(rt.device)
    f = acfg.downsample_factor
    n = x_work.shape[0]
    for epoch in range(start, acfg.epochs):
        gen = torch_generator(seed, "autoencoder", epoch)
        noise = torch_generator(seed, "autoencoder-dp-noise", epoch)
        dpt.model.train()
        sums: dict[str, float] = {}
        batches = dpt.epoch_batches(n, gen)
        count = 0
        for i, idx in enumerate(_progress(batches, len(batches), f"autoencoder (DP) {epoch + 1}/{acfg.epochs}",
                                          progress)):
            if acfg.lr_schedule == "poly":
                _set_lr(dpt.optimizer, poly_lr(acfg.lr, epoch * len(batches) + i, acfg.epochs * len(batches)))
            if len(idx) == 0:
                dpt.step(None, noise)
                continue
            xb = x_work[idx]
            cb = classes[idx].to(rt.device) if classes is not None else None
            if cfg.augment_flip:
                xb = _random_flip(xb, gen)
            eps = _latent_eps((xb.shape[0], acfg.latent_channels, *(s // f for s in xb.shape[-3:])), gen)
            xb, eps = xb.to(rt.device), eps.to(rt.device)
            with rt.autocast():
                recon, mu, sigma = dpt.model(xb, eps, cb)
                loss, terms = _per_case_autoencoder_loss(recon.float(), xb, mu, sigma, cfg, perceptual)
            dpt.step(loss, noise)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            count += len(idx)
        means = _epoch_means(history, sums, count, rt)
        log.info("autoencoder (DP) epoch %d/%d: %s; epsilon %.3g", epoch + 1, acfg.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in means.items()), dpt.epsilon())
        if rt.is_main:
            save_checkpoint(ckpt, {"epoch": epoch + 1, "model": ae.ae.state_dict(),
                                   "optimizer": dpt.optimizer.original_optimizer.state_dict(), "history": history,
                                   "dp": dpt.state_dict()})
        rt.barrier()
        if on_epoch is not None:
            on_epoch("autoencoder", epoch + 1, acfg.epochs)
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
                    classes: torch.Tensor | None = None,
                    on_epoch: EpochHook | None = None) -> dict[str, list[float]]:
    """Stage 2: decoder + SR module on the frozen encoder, ``x`` ``(N, 5, *shape)`` (``classes`` ``(N,)`` for a
    class-conditional decoder)."""
    from monai.losses import SSIMLoss

    scfg = cfg.superres
    if scfg.epochs == 0 and not ckpt.is_file():
        return {}  # no stage 2 (e.g. the demo's: its case grid is the autoencoder's grid)
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
        means = _epoch_means(history, sums, count, rt)
        log.info("superres epoch %d/%d: %s", epoch + 1, scfg.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in means.items()))
        if rt.is_main:
            save_checkpoint(ckpt, {"epoch": epoch + 1, "autoencoder": ae.ae.state_dict(), "superres": sr.state_dict(),
                                   "optimizer": opt.state_dict(), "history": history})
        rt.barrier()
        if on_epoch is not None:
            on_epoch("superres", epoch + 1, scfg.epochs)
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
                     on_epoch: EpochHook | None = None, dp_reports: dict[str, Any] | None = None,
                     ) -> tuple[dict[str, list[float]], dict[str, torch.Tensor] | None]:
    """Stage 3: DDPM noise (or velocity) prediction on scaled latents; ``classes`` -1 = unknown (trained as the
    null class). ``scale``: one factor, or ``(shift, scale)`` per channel ``(C,)`` each (the model sees
    ``(z - shift) * scale``; :func:`latent_normalisation`). ``tumour``: :func:`latent_tumour_map` of the same
    latents; with ``diffusion.tumour_weight`` != 1 the loss at each position is weighted ``1 + (tumour_weight - 1)
    * map`` (ignored when None). With ``privacy.dp_sgd``: DP-SGD over *cases* (the ``N' = copies * N`` latents
    are ``copies`` blocks of the N cases, :func:`encode_site`'s order; a step draws cases and one latent of each),
    the accounting in ``dp_reports["diffusion"]``."""
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
    n = mu.shape[0]
    copies = 2 if cfg.augment_flip else 1
    dpt = None
    if cfg.privacy.dp_sgd:
        from synthlearn.generators.ldm.dp import DPTraining

        if n % copies:
            raise ValueError(f"DP-SGD: expected {copies} latents per case, found {n} latents")
        dpt = DPTraining(model, opt, cfg.privacy, "diffusion", n // copies, dcfg.batch_size, dcfg.epochs)
    if ckpt.is_file():
        state = load_checkpoint(ckpt, map_location=rt.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema = state["ema"]
        if dpt is not None:
            dpt.load_state_dict(state["dp"])
        history, start = state["history"], int(state["epoch"])
        if start < dcfg.epochs:
            log.info("diffusion: resuming from epoch %d/%d (%s)", start, dcfg.epochs, ckpt)
    if start >= dcfg.epochs:
        if dpt is not None:
            dp_reports["diffusion"] = dpt.report()
            dpt.close()
        return history, ema
    run = rt.wrap(model) if dpt is None else dpt.model
    null = model.null_class
    targets = torch.where(classes >= 0, classes, torch.full_like(classes, null))
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
        if dpt is None:
            batches = _batches(n, dcfg.batch_size, gen, rt)
        else:  # cases by Poisson sampling, then one of each case's latents (the case or its mirror image)
            noise_gen = torch_generator(seed, "diffusion-dp-noise", epoch)
            batches = [cases + (n // copies) * torch.randint(0, copies, cases.shape, generator=gen)
                       for cases in dpt.epoch_batches(n // copies, gen)]
        for idx in _progress(batches, len(batches), f"diffusion {epoch + 1}/{dcfg.epochs}", progress):
            if dpt is not None and len(idx) == 0:
                dpt.step(None, noise_gen)
                continue
            z = (mu[idx] + sigma[idx] * torch.randn(mu[idx].shape, generator=gen) - shift_c) * scale_c
            noise = torch.randn(z.shape, generator=gen)
            t = torch.randint(0, dcfg.num_train_timesteps, (z.shape[0],), generator=gen)
            cls = drop_labels(targets[idx], dcfg.label_dropout, null, gen)
            noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=t)
            target = noise if dcfg.prediction_type == "epsilon" else scheduler.get_velocity(z, noise, t)
            noisy, target, t, cls = noisy.to(rt.device), target.to(rt.device), t.to(rt.device), cls.to(rt.device)
            with rt.autocast():
                pred = run(noisy, t, cls).float()
                w = None if weights is None else weights[idx].to(rt.device)
                if dpt is None:
                    loss = weighted_mse(pred, target, w)
                else:  # the batch mean of per-case losses
                    loss = torch.stack([weighted_mse(pred[i : i + 1], target[i : i + 1],
                                                     None if w is None else w[i : i + 1])
                                        for i in range(pred.shape[0])]).mean()
            if dpt is None:
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                _clip(model, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
            else:
                dpt.step(loss, noise_gen)
            if ema is not None:
                _ema_update(ema, model, dcfg.ema_decay)
            sums["mse"] += float(loss.detach()) * len(idx)
            count += len(idx)
        means = _epoch_means(history, sums, count, rt)
        if (epoch + 1) % max(1, dcfg.epochs // 10) == 0 or epoch + 1 == dcfg.epochs:
            log.info("diffusion epoch %d/%d: mse %.4g", epoch + 1, dcfg.epochs, means["mse"])
        if rt.is_main:
            payload = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                       "history": history}
            if ema is not None:
                payload["ema"] = ema
            if dpt is not None:
                payload["dp"] = dpt.state_dict()
            save_checkpoint(ckpt, payload)
        rt.barrier()
        if on_epoch is not None:
            on_epoch("diffusion", epoch + 1, dcfg.epochs)
    if dpt is not None:
        dp_reports["diffusion"] = dpt.report()
        dpt.close()
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


