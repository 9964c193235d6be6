"""The release gate (issue 28 item 3): before a generator artifact leaves its site, the site attacks it with its
own data and refuses to export it past configured thresholds, unless a person overrides the refusal with a reason
that then travels in the manifest.

What the gate runs, at the site, on the site's members (the cases the generator trained on) and its privacy
holdout (cases it never saw; :func:`synthlearn.strategies.catphishing_site.privacy_holdout`):

1. **Black-box**: ``n_per_class`` cases are sampled from the artifact and the privacy audit
   (:func:`synthlearn.audits.privacy.audit_site`) runs on them: the SSIM membership inference with its negative
   control (members vs members: at chance) and positive control (noisy copies of members: caught), and the copy
   rate (the share of samples nearer a member than 95 % of held-out cases are). If the positive control is missed,
   the attack could not even catch copies, so its passing the generator means nothing: the gate refuses. The
   negative control is reported, not gated on: it is a test at the 5 % level on a random split of the members (it
   was off chance in 3 of 12 healthy demo decisions), and an attack biased off chance would refuse more, not
   less.
2. **White-box loss threshold** (Yeom et al. 2018; for diffusion models Matsumoto et al. 2023, Carlini et al.
   2023): each case's diffusion loss, the mean over ``loss_timesteps`` timesteps spread over the first half of the
   noise schedule and ``loss_noises`` noise draws, the same draws for every case, at the case's latent (the
   artifact's encoder, posterior mean) and class. A member the model has memorised has a loss far below the
   held-out cases': the gate counts *exposed members*, members whose log loss lies more than ``outlier_z``
   held-out standard deviations below the held-out mean, and also reads the attack's AUC.

Refused when any of: copy rate > ``max_copy_rate``; the SSIM attack's AUC above ``max_membership_auc`` with 95 %
confidence (its bootstrap CI's low end above it); the same for the loss attack (``max_loss_auc``); more exposed
members than ``max_exposed``; a missed positive control. The thresholds' defaults are measured on the phantom
(docs/benchmarks.md section 30: every deliberately memorising generator refused, healthy ones passed).

What the manifest receives (``release_gate``; :func:`record_release`): the decision, every check's figure and
threshold, the numbers of members, held-out and sampled cases, and, for an override, the reason a person gave. No
case id, path or image leaves: the figures are aggregate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthlearn.protocol import FederationError
from synthlearn.training.seeding import numpy_generator, torch_generator

log = logging.getLogger(__name__)


class ReleaseRefused(FederationError):
    """The gate refused an artifact and no override reason was given; ``decision`` holds the checks. (A
    :class:`synthlearn.protocol.FederationError`: the site declined to send; ``synthlearn`` exits with code 3.)"""

    def __init__(self, message: str, decision: dict[str, Any] | None = None):
        super().__init__(message)
        self.decision = decision or {}

    def __reduce__(self):  # crosses process boundaries (a site's worker process) with its decision
        return (type(self), (str(self), self.decision))


@dataclasses.dataclass(frozen=True)
class ReleaseGateConfig:
    """The gate's sampling, attacks and thresholds (``[catphishing] release_gate_*`` / ``site gate`` options).

    Attributes:
        n_per_class: cases sampled per class for the black-box audit.
        steps: their sampling steps (None: the artifact's).
        max_copy_rate: the largest share of samples allowed nearer a member than 95 % of held-out cases are.
        max_membership_auc: the SSIM attack's AUC the gate tolerates (refused when its 95 % CI lies above it).
        max_loss_auc: the same for the white-box loss attack.
        outlier_z: a member is exposed when its log diffusion loss lies this many held-out SDs below their mean.
        max_exposed: exposed members tolerated.
        loss_timesteps: timesteps of the loss attack (spread over the first half of the noise schedule).
        loss_noises: noise draws per timestep.
        require_controls: refuse when the audit's positive control (noisy copies of members) is missed.
        n_bootstrap: bootstrap resamples of the AUC intervals.
    """

    n_per_class: int = 16
    steps: int | None = None
    max_copy_rate: float = 0.10
    max_membership_auc: float = 0.75
    max_loss_auc: float = 0.75
    outlier_z: float = 4.0
    max_exposed: int = 0
    loss_timesteps: int = 8
    loss_noises: int = 4
    require_controls: bool = True
    n_bootstrap: int = 1000

    def __post_init__(self) -> None:
        for name in ("n_per_class", "loss_timesteps", "loss_noises", "n_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"release gate: {name} must be an integer >= 1, found {value!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"release gate: steps must be an integer >= 1 or absent, found {self.steps!r}")
        if not 0 <= self.max_copy_rate <= 1:
            raise ValueError(f"release gate: max_copy_rate must be in [0, 1], found {self.max_copy_rate}")
        for name in ("max_membership_auc", "max_loss_auc"):
            if not 0.5 <= getattr(self, name) <= 1:
                raise ValueError(f"release gate: {name} must be in [0.5, 1], found {getattr(self, name)}")
        if not (math.isfinite(self.outlier_z) and self.outlier_z > 0):
            raise ValueError(f"release gate: outlier_z must be > 0, found {self.outlier_z}")
        if isinstance(self.max_exposed, bool) or not isinstance(self.max_exposed, int) or self.max_exposed < 0:
            raise ValueError(f"release gate: max_exposed must be an integer >= 0, found {self.max_exposed!r}")


@torch.no_grad()
def diffusion_losses(generator, x: torch.Tensor, class_index: torch.Tensor, *, timesteps: int, noises: int,
                     seed: int, batch_size: int = 8) -> np.ndarray:
    """Each case's diffusion loss under a loaded generator (the white-box attack's statistic).

    Args:
        generator: :class:`synthlearn.generators.ldm.sample.LoadedGenerator`.
        x: ``(N, C, *shape)`` the cases in the generator's working form
            (:func:`synthlearn.generators.ldm.data.load_site_tensors`).
        class_index: ``(N,)`` their classes (-1 = unknown: the null class).
        timesteps, noises: ``timesteps`` timesteps evenly spread over [5 %, 50 %] of the schedule, ``noises`` draws
            each; the same draws for every case (seeded by ``seed``).

    Returns:
        ``(N,)`` float64: the mean squared error of the model's prediction (noise or velocity, as trained) over
        the latent, averaged over the timesteps and draws.
    """
    from synthlearn.models.diffusion import build_scheduler

    cfg = generator.cfg
    dm, ae = generator.diffusion, generator.autoencoder
    scheduler = build_scheduler(cfg.diffusion, "ddpm")
    shift, scale = generator.latent_norm
    shift, scale = (t.view(1, -1, *([1] * len(cfg.latent_shape))) for t in (shift, scale))
    total = cfg.diffusion.num_train_timesteps
    steps = sorted({int(round(f * (total - 1))) for f in np.linspace(0.05, 0.5, timesteps)})
    latent = (cfg.autoencoder.latent_channels, *cfg.latent_shape)
    g = torch_generator(seed, "release-gate", "loss-noise")
    draws = torch.randn((len(steps), noises, *latent), generator=g)
    null = dm.null_class
    losses = np.zeros(x.shape[0], dtype=np.float64)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        mu, _ = ae.encode(xb)
        z = (mu.float() - shift) * scale
        cls = class_index[start : start + batch_size]
        cls = torch.where(cls >= 0, cls, torch.full_like(cls, null))
        acc = torch.zeros(xb.shape[0], dtype=torch.float64)
        for k, t in enumerate(steps):
            tt = torch.full((xb.shape[0],), t, dtype=torch.long)
            for m in range(noises):
                noise = draws[k, m].expand_as(z)
                noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=tt)
                target = noise if cfg.diffusion.prediction_type == "epsilon" else scheduler.get_velocity(z, noise, tt)
                pred = dm(noisy, tt, cls).float()
                acc += (pred - target).pow(2).flatten(1).mean(1).double()
        losses[start : start + xb.shape[0]] = (acc / (len(steps) * noises)).numpy()
    return losses


def loss_attack(member_losses: np.ndarray, holdout_losses: np.ndarray, *, outlier_z: float, n_bootstrap: int,
                seed: int) -> dict[str, Any]:
    """The white-box loss-threshold attack's figures: the AUC of ``-loss`` (members positive) with its CI, and the
    members whose log loss lies more than ``outlier_z`` held-out SDs below the held-out mean."""
    from synthlearn.audits.privacy import attack_metrics

    m, h = np.log(np.asarray(member_losses, np.float64)), np.log(np.asarray(holdout_losses, np.float64))
    result = attack_metrics(-m, -h, n_bootstrap=n_bootstrap, rng=numpy_generator(seed, "release-gate", "loss"))
    sd = float(h.std(ddof=1)) if h.size > 1 else 0.0
    z = (m - h.mean()) / sd if sd > 0 else np.zeros_like(m)
    result.update(exposed=int((z < -outlier_z).sum()), member_min_z=float(z.min()), holdout_log_sd=sd,
                  member_loss_median=float(np.exp(np.median(m))), holdout_loss_median=float(np.exp(np.median(h))))
    return result


def release_gate(artifact_dir: str | Path, site_dir: str | Path, members: Sequence[str], holdout: Sequence[str],
                 cfg: ReleaseGateConfig = ReleaseGateConfig(), *, seed: int = 0, work_dir: str | Path | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Run the gate's attacks on an artifact at its site and decide (module docstring).

    Args:
        artifact_dir: the site's verified artifact.
        site_dir: the site's folder (its cases are read here, at the site).
        members: ids of the cases the generator trained on (>= 2); holdout: ids it never saw (>= 2).
        cfg: sampling, attacks and thresholds.
        seed: seeds the samples, the audit's controls and bootstraps, and the loss attack's noise.
        work_dir: where the samples are written (removed afterwards); default: beside the artifact.
        progress: progress bars.

    Returns:
        ``{"passed": bool, "failed": [check names], "checks": {name: {"value", "threshold", "passed", ...}},
        "n_members", "n_holdout", "n_synthetic", "seed", "config", "wall_s"}`` (JSON-ready, finite, no case ids).

    Raises:
        ValueError: fewer than 2 members or held-out cases, or ids that are not the site's cases.
    """
    from synthlearn.audits.privacy import audit_site
    from synthlearn.config import to_dict
    from synthlearn.data.layouts import open_site
    from synthlearn.data.preprocess import PreprocessConfig
    from synthlearn.generators.ldm.data import load_site_tensors
    from synthlearn.generators.ldm.sample import load_generator, synthesize

    t0 = time.perf_counter()
    artifact_dir, site_dir = Path(artifact_dir), Path(site_dir)
    if len(members) < 2 or len(holdout) < 2:
        raise ValueError(f"the release gate needs >= 2 member and >= 2 held-out cases, found {len(members)} and "
                         f"{len(holdout)} (catphishing.holdout_fraction > 0 keeps cases out of the generator)")
    site = open_site(site_dir)
    by_id = {c.case_id: c for c in site.cases}
    unknown = [c for c in [*members, *holdout] if c not in by_id]
    if unknown:
        raise ValueError(f"{site_dir}: the gate's members / held-out cases name {unknown[:5]}, not cases of this site")
    generator = load_generator(artifact_dir)
    gcfg = generator.cfg
    work = Path(work_dir) if work_dir is not None else artifact_dir.parent / f".{artifact_dir.name}.gate"
    shutil.rmtree(work, ignore_errors=True)
    try:
        samples = synthesize(artifact_dir, cfg.n_per_class, work / "samples", seed=seed, steps=cfg.steps,
                             progress=progress)
        synthetic = list(open_site(samples).cases)
        audit = audit_site([by_id[c] for c in members], [by_id[c] for c in holdout], synthetic,
                           preprocess=PreprocessConfig(shape=gcfg.shape, mode=gcfg.fit_mode), seed=seed,
                           n_bootstrap=cfg.n_bootstrap, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m_data = load_site_tensors(tuple(by_id[c] for c in members), gcfg)
    h_data = load_site_tensors(tuple(by_id[c] for c in holdout), gcfg)
    kw = dict(timesteps=cfg.loss_timesteps, noises=cfg.loss_noises, seed=seed)
    loss = loss_attack(diffusion_losses(generator, m_data.x, m_data.class_index, **kw),
                       diffusion_losses(generator, h_data.x, h_data.class_index, **kw),
                       outlier_z=cfg.outlier_z, n_bootstrap=cfg.n_bootstrap, seed=seed)
    membership = audit["membership"]
    checks = {
        "copy_rate": {"value": audit["copy_rate"]["rate"], "threshold": cfg.max_copy_rate,
                      "passed": audit["copy_rate"]["rate"] <= cfg.max_copy_rate,
                      "rule": "share of samples nearer a member than 95 % of held-out cases are <= threshold"},
        "membership_ssim": {"value": membership["auc"], "ci_low": membership["ci_low"],
                            "ci_high": membership["ci_high"], "threshold": cfg.max_membership_auc,
                            "passed": membership["ci_low"] <= cfg.max_membership_auc,
                            "rule": "SSIM attack AUC not above the threshold with 95 % confidence"},
        "membership_loss": {"value": loss["auc"], "ci_low": loss["ci_low"], "ci_high": loss["ci_high"],
                            "threshold": cfg.max_loss_auc, "passed": loss["ci_low"] <= cfg.max_loss_auc,
                            "rule": "white-box loss attack AUC not above the threshold with 95 % confidence"},
        "exposed_members": {"value": loss["exposed"], "member_min_z": loss["member_min_z"],
                            "threshold": cfg.max_exposed, "passed": loss["exposed"] <= cfg.max_exposed,
                            "rule": f"members with a log diffusion loss > {cfg.outlier_z:g} held-out SDs below the "
                                    f"held-out mean <= threshold"},
        "controls": {"value": {"negative_at_chance": audit["negative_control_ok"],
                               "positive_caught": audit["positive_control_caught"],
                               "negative_auc": audit["negative_control"]["auc"],
                               "positive_auc": audit["positive_control"]["auc"]},
                     "passed": audit["positive_control_caught"] or not cfg.require_controls,
                     "rule": "the audit's positive control (noisy copies of members) caught; the negative control "
                             "is reported only"},
    }
    failed = [name for name, check in checks.items() if not check["passed"]]
    decision = {"passed": not failed, "failed": failed, "checks": checks, "n_members": len(members),
                "n_holdout": len(holdout), "n_synthetic": len(synthetic), "seed": seed, "config": to_dict(cfg),
                "loss_attack": {k: loss[k] for k in ("member_loss_median", "holdout_loss_median", "holdout_log_sd")},
                "wall_s": round(time.perf_counter() - t0, 1)}
    log.info("release gate %s: %s (copy rate %.3f, SSIM AUC %.3f [%.3f, %.3f], loss AUC %.3f [%.3f, %.3f], "
             "exposed %d)", artifact_dir, "passed" if not failed else f"REFUSED ({', '.join(failed)})",
             checks["copy_rate"]["value"], membership["auc"], membership["ci_low"], membership["ci_high"],
             loss["auc"], loss["ci_low"], loss["ci_high"], loss["exposed"])
    return decision


def describe_refusal(decision: dict[str, Any]) -> str:
    """One line per failed check: its figure against its threshold."""
    lines = []
    for name in decision["failed"]:
        check = decision["checks"][name]
        if name == "controls":
            lines.append(f"controls: the positive control (copies of members) was not caught (AUC "
                         f"{check['value']['positive_auc']:.3f})")
        elif "ci_low" in check:
            lines.append(f"{name}: AUC {check['value']:.3f} [95 % CI {check['ci_low']:.3f}, {check['ci_high']:.3f}] "
                         f"above {check['threshold']}")
        else:
            lines.append(f"{name}: {check['value']:.3g} > {check['threshold']}")
    return "; ".join(lines)


def record_release(artifact_dir: str | Path, decision: dict[str, Any], override_reason: str = "") -> dict[str, Any]:
    """Write the gate's decision into the artifact's manifest (``release_gate``) so that it travels with it.

    A refused artifact is released only with ``override_reason`` (recorded with the decision); without one this
    raises :class:`ReleaseRefused` and leaves the artifact unchanged.

    Returns:
        The amended manifest.
    """
    from synthlearn.generators.artifact import amend_manifest

    reason = override_reason.strip()
    if not decision["passed"] and not reason:
        raise ReleaseRefused(f"{artifact_dir}: the release gate refused this generator ({describe_refusal(decision)}); "
                             f"it stays at the site. Export it anyway only with a recorded reason (site gate "
                             f"--override-reason / catphishing.release_gate_override)", decision)
    entry = {**decision, "released": True, "overridden": not decision["passed"],
             "override_reason": reason if not decision["passed"] else None}
    return amend_manifest(artifact_dir, "release_gate", entry)


__all__ = ["ReleaseGateConfig", "ReleaseRefused", "describe_refusal", "diffusion_losses", "loss_attack",
           "record_release", "release_gate"]
