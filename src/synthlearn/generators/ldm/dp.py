"""DP-SGD for a site's generator (issue 28 item 4): the autoencoder and the diffusion model trained with per-patient
clipping and Gaussian noise (Abadi et al. 2016) through Opacus, each with its own accountant.

What a patient is: one case of the site. The autoencoder's training set holds one row per case (its flips are
augmentations of that row); the diffusion model's holds two latents per case (the case and its mirror image), so
here a step samples *cases* (Poisson, rate ``q = batch_size / N``) and takes one of the two latents of each case
drawn, and the per-sample gradient is the case's. Per-sample gradients come from Opacus's ``GradSampleModule`` in
its functorch mode (on the demo's 3D autoencoder its default hooks were 4.5x a plain step, functorch 1.9x;
benchmarks.md section 30); every loss is the batch mean of per-case losses (the shipped losses that normalise over
the whole batch, such as the tumour-weighted L1, are taken case by case here), so that a case's gradient depends on
that case alone.

Accounting: Opacus's RDP accountant; the noise multiplier of each component is chosen before it trains so that
its steps at its sampling rate spend ``target_epsilon * share`` at ``delta`` (``privacy.autoencoder_share``; the
diffusion model the rest). The two components see the same cases, so the generator's per-patient epsilon is their
sum (basic composition, an upper bound). The accountant's history goes into every epoch's checkpoint and is read
back on resume: a resumed run spends exactly what an uninterrupted one does. ``target_epsilon = 0`` keeps the
clipping and the Poisson sampling and adds no noise (epsilon infinite: the privacy-utility curve's reference).

Not covered by the guarantee (listed in the manifest): the latent normalisation (2 numbers per latent channel from
the members' latents), the class counts and the per-epoch training losses in the manifest. The adversarial term
(its discriminator reads the members' images without noise) and stage 2 are refused under DP-SGD
(:class:`synthlearn.generators.ldm.config.PrivacyConfig`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

#: what the manifest says the guarantee does not cover
NOT_COVERED = ("latent_scale / latent_shift (per-channel statistics of the members' latents)",
               "class_counts", "training.history and final_losses (per-epoch mean losses)")


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]`` of a generator config: DP-SGD for the autoencoder and the diffusion model.

    Attributes:
        dp_sgd: train both components with DP-SGD (per-case clipping, Gaussian noise, Poisson sampling).
        target_epsilon: the generator's per-patient epsilon at ``delta``, split over the two components; 0 = clip
            and sample as DP-SGD does but add no noise (epsilon infinite).
        delta: the delta of the guarantee (below 1 / cases; the default suits sites of up to ~10^4 cases).
        max_grad_norm: the per-case gradient's clipping norm C.
        autoencoder_share: the share of ``target_epsilon`` the autoencoder spends (the diffusion model the rest).
    """

    dp_sgd: bool = False
    target_epsilon: float = 10.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    autoencoder_share: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon >= 0):
            raise ValueError(f"privacy.target_epsilon must be a finite number >= 0 (0 = no noise), found "
                             f"{self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), found {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"privacy.max_grad_norm must be > 0, found {self.max_grad_norm}")
        if not 0 < self.autoencoder_share < 1:
            raise ValueError(f"privacy.autoencoder_share must be in (0, 1), found {self.autoencoder_share}")

    def component_epsilon(self, component: str) -> float:
        """The epsilon budget of ``autoencoder`` or ``diffusion`` (0 = no noise)."""
        share = self.autoencoder_share if component == "autoencoder" else 1.0 - self.autoencoder_share
        return self.target_epsilon * share


def poisson_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` batches of ``range(n)``, each item in each batch independently with probability ``batch_size / n``
    (the sampling the RDP accountant assumes; a batch may be empty)."""
    q = min(1.0, batch_size / n)
    return [torch.nonzero(torch.rand(n, generator=generator) < q).flatten() for _ in range(steps)]


class DPTraining:
    """One component's DP-SGD: its per-sample-gradient module, noisy optimiser and accountant.

    Args:
        module: what the stage calls forward on (its parameters are the component's).
        optimizer: the component's optimiser (Adam / AdamW); wrapped, its state stays its own.
        cfg: the privacy settings.
        component: ``autoencoder`` or ``diffusion`` (which share of the budget it spends).
        n: cases in the training set; ``batch_size``: the expected batch; ``epochs``: full passes planned.

    Attributes:
        model: the ``GradSampleModule`` to call instead of ``module``.
        optimizer: the ``DPOptimizer`` to step instead of ``optimizer``.
        sample_rate, steps_per_epoch, noise_multiplier.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, cfg: PrivacyConfig, component: str,
                 n: int, batch_size: int, epochs: int):
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.optimizers import DPOptimizer

        if n < 1:
            raise ValueError(f"DP-SGD needs >= 1 case, found {n}")
        self.cfg, self.component = cfg, component
        self.sample_rate = min(1.0, batch_size / n)
        self.batch_size = batch_size
        self.steps_per_epoch = max(1, math.ceil(n / batch_size))
        self.target_epsilon = cfg.component_epsilon(component)
        if self.target_epsilon > 0:
            self.noise_multiplier = float(get_noise_multiplier(
                target_epsilon=self.target_epsilon, target_delta=cfg.delta, sample_rate=self.sample_rate,
                steps=self.steps_per_epoch * epochs, accountant="rdp"))
        else:
            self.noise_multiplier = 0.0
        self.model = GradSampleModule(module, batch_first=True, loss_reduction="mean", force_functorch=True)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=cfg.max_grad_norm, expected_batch_size=batch_size,
                                     loss_reduction="mean")
        self.accountant = RDPAccountant()

    def epoch_batches(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        """This epoch's Poisson batches of the ``n`` cases."""
        return poisson_batches(n, self.batch_size, self.steps_per_epoch, generator)

    def step(self, loss: torch.Tensor | None, noise: torch.Generator) -> None:
        """Back-propagate ``loss`` (the batch mean of per-case losses; None for an empty batch), clip per case, add
        the noise drawn from ``noise`` and step; the accountant records the step."""
        self.optimizer.generator = noise
        if loss is None:  # an empty Poisson batch still takes its (noise-only) step
            for p in self.optimizer.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        else:
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (inf without noise, 0 before any step)."""
        if not self.accountant.history:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return float(self.accountant.get_epsilon(delta=self.cfg.delta))

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the accountant's steps (``[[noise, rate, steps], ...]``) and the noise."""
        return {"history": [[float(a), float(b), int(c)] for a, b, c in self.accountant.history],
                "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accountant from :meth:`state_dict` (a resume spends what an uninterrupted run does)."""
        if abs(float(state["noise_multiplier"]) - self.noise_multiplier) > 1e-9 * max(1.0, self.noise_multiplier):
            raise ValueError(f"the checkpoint's DP noise multiplier {state['noise_multiplier']} differs from this "
                             f"run's {self.noise_multiplier}: resume needs the same privacy settings")
        self.accountant.history = [(float(a), float(b), int(c)) for a, b, c in state["history"]]

    def report(self) -> dict[str, Any]:
        """The manifest's entry of this component."""
        eps = self.epsilon()
        return {"epsilon": None if math.isinf(eps) else eps, "target_epsilon": self.target_epsilon or None,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": int(sum(c for _, _, c in self.accountant.history)), "max_grad_norm": self.cfg.max_grad_norm,
                "expected_batch_size": self.batch_size}

    def close(self) -> None:
        """Remove Opacus's hooks (the module is used plainly afterwards)."""
        self.model._close()


def manifest_entry(cfg: PrivacyConfig, components: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``privacy`` block: per-component epsilon and their sum per patient (None = infinite)."""
    if not cfg.dp_sgd:
        return {"dp_sgd": False}
    eps = [c["epsilon"] for c in components.values()]
    total = None if any(e is None for e in eps) else float(sum(eps))
    return {"dp_sgd": True, "unit": "patient (one case of the site)", "delta": cfg.delta, "accountant": "rdp (Opacus)",
            "components": components, "epsilon_total": total,
            "composition": "sum of the components' epsilons (both see the same cases)",
            "not_covered": list(NOT_COVERED)}


__all__ = ["NOT_COVERED", "DPTraining", "PrivacyConfig", "manifest_entry", "poisson_batches"]
