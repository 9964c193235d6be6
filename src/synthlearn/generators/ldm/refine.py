"""The generator's fourth stage: the pixel-space tumour refiner (:mod:`synthlearn.models.refiner`), trained and applied.

Training (:func:`train_refiner`) runs at the site after the autoencoder, on pairs made by
:func:`reconstruction_pairs`: each member case (and its mirror image when the generator flips) beside its
reconstruction by the site's frozen autoencoder (posterior mean, decoded, through stage 2). Sampling
(:func:`refine_cases`) runs at the server inside ``synthesize``, after the decoder: it draws each decoded case's
tumour-crop residual with DDIM and pastes it back.

Every random choice of epoch ``e`` (order, jitter, augmentation level, noise, timesteps) comes from
``torch_generator(seed, "refiner", e)``; the stage checkpoints after every epoch and resumes from it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from synthlearn.models.diffusion import build_scheduler
from synthlearn.models.refiner import (
    RefinerConfig,
    TumourRefiner,
    augment_condition,
    paste_residuals,
    take_crops,
    tumour_corners,
)
from synthlearn.training.checkpoint import load_checkpoint, save_checkpoint
from synthlearn.training.seeding import torch_generator
from synthlearn.training.trainer import poly_lr

log = logging.getLogger(__name__)


@torch.no_grad()
def reconstruction_pairs(encode: Callable[[torch.Tensor], torch.Tensor],
                         decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                         classes: torch.Tensor, flips: bool, batch_size: int = 4
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(real, decoded, classes)``: the cases ``x`` ``(N, C, *shape)`` (and their mirror images when ``flips``:
    ``N' = 2N``) beside ``decode(encode(case), class)``, ``(N', C, *shape)`` each, and the classes ``(N',)``.

    ``encode`` maps cases to the posterior mean; ``decode(latent, classes)`` maps it back to the case grid.
    """
    real = torch.cat([x, x.flip(-3)]) if flips else x
    cls = torch.cat([classes, classes]) if flips else classes
    decoded = torch.cat([decode(encode(real[i : i + batch_size]), cls[i : i + batch_size]).float().cpu()
                         for i in range(0, len(real), batch_size)])
    return real.float(), decoded, cls


def train_refiner(model: TumourRefiner, real: torch.Tensor, decoded: torch.Tensor, classes: torch.Tensor,
                  cfg: RefinerConfig, *, seed: int, ckpt: Path, device: torch.device, progress: bool = False,
                  on_epoch: Callable[[str, int, int], None] | None = None) -> dict[str, list[float]]:
    """Train the refiner on ``(real, decoded, classes)`` of :func:`reconstruction_pairs`; returns the per-epoch
    loss history (``{"mse": [...]}``; empty with ``cfg.epochs == 0``).

    The residual scale (``model.residual_scale``, 1 / SD of ``real - decoded`` in the tumour crops) is set before
    the first epoch. Classes ``-1`` (unknown) train as the reserved index ``num_classes``. Learning rate: poly decay
    over the steps (a resumed run continues the same curve).
    """
    if cfg.epochs == 0:
        return {}
    if real.shape != decoded.shape or real.shape[0] != classes.shape[0]:
        raise ValueError(f"refiner: real {tuple(real.shape)}, decoded {tuple(decoded.shape)} and classes "
                         f"{tuple(classes.shape)} must describe the same cases")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scheduler = build_scheduler(cfg, "ddpm")  # type: ignore[arg-type]
    history: dict[str, list[float]] = {}
    start = 0
    if ckpt.is_file():
        state = load_checkpoint(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], int(state["epoch"])
        if start < cfg.epochs:
            log.info("refiner: resuming from epoch %d/%d (%s)", start, cfg.epochs, ckpt)
    else:
        corners = tumour_corners(decoded, cfg.crop)
        spread = float((take_crops(real, corners, cfg.crop) - take_crops(decoded, corners, cfg.crop)).std())
        if not spread > 0:
            raise ValueError(f"refiner: the reconstructions equal the cases in every tumour crop (residual SD "
                             f"{spread}); nothing to refine, set refiner.epochs = 0")
        model.residual_scale.fill_(1.0 / spread)
        log.info("refiner: residual SD %.4f in the %s crops around the decoded tumours", spread, list(cfg.crop))
    if start >= cfg.epochs:
        return history
    n = real.shape[0]
    targets = torch.where(classes >= 0, classes, torch.full_like(classes, model.num_classes)).long()
    scale = float(model.residual_scale)
    steps_per_epoch = -(-n // cfg.batch_size)
    model.train()
    from tqdm.auto import tqdm

    for epoch in range(start, cfg.epochs):
        gen = torch_generator(seed, "refiner", epoch)
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        batches = [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        for i, idx in enumerate(tqdm(batches, desc=f"refiner {epoch + 1}/{cfg.epochs}", leave=False,
                                     disable=not progress)):
            for group in opt.param_groups:
                group["lr"] = poly_lr(cfg.lr, epoch * steps_per_epoch + i, cfg.epochs * steps_per_epoch)
            corners = tumour_corners(decoded[idx], cfg.crop, cfg.jitter, gen)
            dec = take_crops(decoded[idx], corners, cfg.crop)
            residual = (take_crops(real[idx], corners, cfg.crop) - dec) * scale
            level = torch.rand(len(idx), generator=gen)
            condition = augment_condition(dec, level, cfg, gen)
            noise = torch.randn(residual.shape, generator=gen)
            t = torch.randint(0, cfg.num_train_timesteps, (len(idx),), generator=gen)
            noisy = scheduler.add_noise(original_samples=residual, noise=noise, timesteps=t)
            target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(residual, noise, t)
            pred = model(noisy.to(device), t.to(device), condition.to(device), level.to(device),
                         targets[idx].to(device)).float()
            loss = F.mse_loss(pred, target.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history.setdefault("mse", []).append(total / max(count, 1))
        if (epoch + 1) % max(1, cfg.epochs // 10) == 0 or epoch + 1 == cfg.epochs:
            log.info("refiner epoch %d/%d: mse %.4g", epoch + 1, cfg.epochs, history["mse"][-1])
        save_checkpoint(ckpt, {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                               "history": history})
        if on_epoch is not None:
            on_epoch("refiner", epoch + 1, cfg.epochs)
    model.eval()
    return history


@torch.no_grad()
def refine_cases(model: TumourRefiner, cfg: RefinerConfig, decoded: torch.Tensor, classes: torch.Tensor,
                 generator: torch.Generator, steps: int | None = None) -> torch.Tensor:
    """Decoded cases ``(B, C, *shape)`` with their tumour crops refined: a residual drawn by DDIM (``steps``,
    default ``cfg.steps``; eta 0, the initial noise from ``generator``) given the decoded crop at augmentation
    level ``cfg.sample_level`` and the class ``classes`` ``(B,)``, pasted back with :func:`paste_residuals`."""
    steps = cfg.steps if steps is None else int(steps)
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise ValueError(f"refiner steps must be in [1, {cfg.num_train_timesteps}], found {steps}")
    device = next(model.parameters()).device
    model.eval()
    decoded = decoded.float()
    corners = tumour_corners(decoded, cfg.crop)
    crops = take_crops(decoded, corners, cfg.crop)
    level = torch.full((len(crops),), float(cfg.sample_level))
    condition = augment_condition(crops, level, cfg, generator) if cfg.sample_level > 0 else crops
    sched = build_scheduler(cfg, "ddim")  # type: ignore[arg-type]
    sched.set_timesteps(steps, device=device)
    x = torch.randn(crops.shape, generator=generator, device=generator.device).to(device)
    condition, level, cls = condition.to(device), level.to(device), classes.long().to(device)
    for t in sched.timesteps:
        timesteps = torch.full((len(x),), int(t), dtype=torch.long, device=device)
        x, _ = sched.step(model(x, timesteps, condition, level, cls), int(t), x)
    residual = x.float().cpu() / float(model.residual_scale)
    return paste_residuals(decoded.cpu(), residual, corners, cfg.taper).to(decoded.device)


__all__ = ["reconstruction_pairs", "refine_cases", "train_refiner"]
