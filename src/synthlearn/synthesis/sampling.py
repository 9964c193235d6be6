"""The sampling loop of the class-conditional latent diffusion model, written out in plain sight.

DDIM (Song et al. 2021, deterministic with ``eta = 0``) or DDPM (Ho et al. 2020) with MONAI's schedulers
(``set_timesteps`` / ``timesteps`` / ``step``, the diffusers interface) and classifier-free guidance
(Ho & Salimans 2022)::

    x_T ~ N(0, I)                                       (drawn from the caller's torch.Generator)
    for t in scheduler.timesteps:                       (e.g. 999, 979, ..., 0 for 50 DDIM steps)
        eps_c = model(x_t, t, class)                    (conditional prediction: noise, or velocity v)
        eps_u = model(x_t, t, null)                     (unconditional, when guidance != 1)
        eps   = eps_u + g * (eps_c - eps_u)             (g = 1: purely conditional; g applies only while
                                                         t / T lies in the guidance interval, 1 outside it)
        x_{t-1} = scheduler.step(eps, t, x_t)           (DDPM draws its noise from the same generator)
    return x_0 / scale_factor + shift                    (back to the autoencoder's latent scale; per channel)

Same generator state, same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from synthlearn.models.diffusion import DiffusionConfig, build_scheduler


@torch.no_grad()
def guided_noise(model: nn.Module, x: torch.Tensor, t: int, class_index: torch.Tensor, null_class: int,
                 guidance_scale: float) -> torch.Tensor:
    """Classifier-free guided noise prediction at timestep ``t``.

    Args:
        model: ``model(x, timesteps, class_index)`` -> noise, e.g.
            :class:`synthlearn.models.diffusion.ClassConditionedUNet`.
        x: ``(B, C, x, y, z)`` noisy latents.
        t: the timestep.
        class_index: ``(B,)`` long class indices.
        null_class: index of the unconditional class.
        guidance_scale: ``g``; 1 = conditional prediction only (one network call), 0 = unconditional only.
    """
    timesteps = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    if guidance_scale == 1.0:
        return model(x, timesteps, class_index)
    null = torch.full_like(class_index, null_class)
    if guidance_scale == 0.0:
        return model(x, timesteps, null)
    both = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([null, class_index]))
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    diffusion_cfg: DiffusionConfig,
    class_index: torch.Tensor,
    latent_shape: Sequence[int],
    latent_channels: int,
    *,
    generator: torch.Generator,
    scale_factor: float | torch.Tensor = 1.0,
    shift: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    scheduler: Literal["ddim", "ddpm"] = "ddim",
    eta: float = 0.0,
    null_class: int | None = None,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    progress: bool = False,
) -> torch.Tensor:
    """Draw latents conditioned on ``class_index``.

    Args:
        model: the class-conditioned noise predictor (put in eval mode here).
        diffusion_cfg: its training schedule (T, betas): the sampler must use the same.
        class_index: ``(B,)`` long, one class per sample.
        latent_shape: spatial latent shape ``(x, y, z)``.
        latent_channels: latent channels ``C``.
        generator: every random draw comes from it (initial noise; DDPM / DDIM-eta>0 step noise).
        scale_factor: the latent scale used in training, one number or one per channel ``(C,)``; the result is
            divided by it.
        shift: ``(C,)`` per-channel shift subtracted in training (None = 0); added back after the division.
        num_inference_steps: DDIM steps (DDPM: must equal T for the exact ancestral sampler; fewer steps
            use MONAI's strided DDPM).
        guidance_scale: classifier-free guidance ``g`` (>= 0).
        scheduler: ``ddim`` or ``ddpm``.
        eta: DDIM stochasticity (0 = deterministic).
        null_class: index of the null class (default: ``model.null_class``).
        guidance_interval: ``(lo, hi)`` fractions of the training timesteps: ``guidance_scale`` applies at
            steps with ``lo <= t / T <= hi`` and the purely conditional prediction (g = 1) elsewhere
            (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"); ``(0, 1)`` = every step.
        progress: tqdm bar over the timesteps.

    Returns:
        ``(B, C, *latent_shape)`` latents at the autoencoder's scale.
    """
    torch.set_flush_denormal(True)
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, found {guidance_scale}")
    if num_inference_steps < 1 or num_inference_steps > diffusion_cfg.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {diffusion_cfg.num_train_timesteps}], "
                         f"found {num_inference_steps}")
    lo, hi = (float(v) for v in guidance_interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, found {guidance_interval}")
    if class_index.ndim != 1:
        raise ValueError(f"class_index must be 1D (B,), found shape {tuple(class_index.shape)}")
    if null_class is None:
        null_class = int(model.null_class)
    device = next(model.parameters()).device
    model.eval()
    sched = build_scheduler(diffusion_cfg, scheduler)
    sched.set_timesteps(num_inference_steps, device=device)
    shape = (class_index.shape[0], latent_channels, *(int(s) for s in latent_shape))
    x = torch.randn(shape, generator=generator, device=generator.device).to(device)
    class_index = class_index.to(device)
    steps = sched.timesteps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{scheduler} sampling", leave=False)
    for t in steps:
        frac = int(t) / diffusion_cfg.num_train_timesteps
        g = guidance_scale if lo <= frac <= hi else 1.0
        eps = guided_noise(model, x, int(t), class_index, null_class, g)
        if scheduler == "ddim":
            x, _ = sched.step(eps, int(t), x, eta=eta, generator=generator)
        else:
            x, _ = sched.step(eps, int(t), x, generator=generator)
    if isinstance(scale_factor, torch.Tensor) and scale_factor.ndim == 1:
        scale_factor = scale_factor.to(x.device, x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
    x = x / scale_factor
    if shift is not None:
        x = x + shift.to(x.device, x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
    return x
