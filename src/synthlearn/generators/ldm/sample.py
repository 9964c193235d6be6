"""Sampling a site's latent diffusion generator at the server: load a verified artifact, run the sampling loop,
decode, and write the samples as a site folder of the data contract (:func:`synthesize`).

The sampling loop of the class-conditional latent diffusion model, written out in plain sight:

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

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from synthlearn.config import ConfigError, from_dict
from synthlearn.data.contract import Labels
from synthlearn.data.io import write_case, write_json, write_labels_csv
from synthlearn.generators.artifact import MANIFEST, ArtifactError, load_weights, verify_artifact
from synthlearn.generators.ldm.config import GeneratorConfig
from synthlearn.generators.ldm.stages import latent_norm_tensors
from synthlearn.models.autoencoder import GeneratorAutoencoder
from synthlearn.models.diffusion import ClassConditionedUNet, DiffusionConfig, build_scheduler
from synthlearn.models.refiner import TumourRefiner
from synthlearn.models.superres import SuperResolution
from synthlearn.runinfo import file_sha256
from synthlearn.synthesis.cases import SYNTHETIC_TUMOUR_LABEL, centred_affine, postprocess_sample
from synthlearn.training.seeding import derive_seed

log = logging.getLogger(__name__)


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


class LoadedGenerator:
    """A verified artifact's networks, ready to sample (eval mode, on ``device``).

    Attributes:
        cfg: the :class:`synthlearn.generators.ldm.config.GeneratorConfig` it was trained with.
        manifest: the manifest.
        autoencoder: :class:`synthlearn.models.autoencoder.GeneratorAutoencoder`.
        superres: :class:`synthlearn.models.superres.SuperResolution`.
        diffusion: :class:`synthlearn.models.diffusion.ClassConditionedUNet`.
        refiner: :class:`synthlearn.models.refiner.TumourRefiner`, or None (no fourth stage).
    """

    def __init__(self, cfg, manifest: dict[str, Any], autoencoder, superres, diffusion, refiner=None):
        self.cfg = cfg
        self.manifest = manifest
        self.autoencoder = autoencoder
        self.superres = superres
        self.diffusion = diffusion
        self.refiner = refiner

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def latent_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, scale)`` ``(C,)`` each: the diffusion model saw ``(z - shift) * scale``
        (:func:`synthlearn.generators.ldm.stages.latent_norm_tensors`)."""
        return latent_norm_tensors(self.manifest, self.cfg.autoencoder.latent_channels)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, latent_channels, *latent_shape)`` at the autoencoder's scale -> ``(B, 5, *shape)``; ``classes``
        ``(B,)`` (the conditioned class of each latent) is needed when the decoder is class-conditional."""
        return self.superres(self.autoencoder.decode(latents, classes))

    @torch.no_grad()
    def refine(self, decoded: torch.Tensor, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Decoded cases ``(B, C, *shape)`` with the refiner's tumour crops (:func:`synthlearn.generators.ldm.refine.
        refine_cases`; ``classes`` ``(B,)``, the noise from ``generator``); unchanged without a refiner."""
        if self.refiner is None:
            return decoded
        from synthlearn.generators.ldm.refine import refine_cases

        return refine_cases(self.refiner, self.cfg.refiner, decoded, classes, generator)


def _finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def validate_manifest(manifest: dict[str, Any], cfg: GeneratorConfig, path: Path) -> None:
    """Check every field of a latent diffusion generator's manifest that sampling reads, against its config and
    against each other.

    Raises:
        ArtifactError: naming the manifest, the field, what was expected and what was found (e.g. class names in
            another order than the label's, which would swap the classes of every synthetic case; a latent scale that
            disagrees with the recorded spread of the latents).
    """
    def bad(field: str, expected: str) -> ArtifactError:
        return ArtifactError(f"{path}: {field}: expected {expected}, found {manifest.get(field)!r}")

    if manifest.get("label") != cfg.label:
        raise bad("label", f"{cfg.label!r} (the config's)")
    if manifest.get("class_names") != list(cfg.class_names):
        raise bad("class_names", f"{list(cfg.class_names)} (the canonical order of {cfg.label}: a class's index is "
                                 f"what the diffusion model was conditioned on)")
    counts = manifest.get("class_counts")
    if not isinstance(counts, dict) or set(counts) - set(cfg.class_names) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()):
        raise bad("class_counts", f"a count >= 0 for classes among {list(cfg.class_names)}")
    for field, want in (("shape", list(cfg.shape)), ("latent_shape", list(cfg.latent_shape)),
                        ("latent_channels", cfg.autoencoder.latent_channels)):
        if manifest.get(field) != want:
            raise bad(field, f"{want} (the config's)")
    voxel = manifest.get("voxel_size_mm")
    if not isinstance(voxel, list) or len(voxel) != 3 or not all(_finite_positive(v) for v in voxel):
        raise bad("voxel_size_mm", "three sizes > 0 (mm)")
    factor = manifest.get("latent_scale_factor")
    if not _finite_positive(factor):
        raise bad("latent_scale_factor", "a finite number > 0")
    means, stds = manifest.get("latent_channel_mean"), manifest.get("latent_channel_std")
    if means is not None or stds is not None:  # written with the per-channel statistics: they must agree
        channels = cfg.autoencoder.latent_channels
        if not (isinstance(means, list) and isinstance(stds, list) and len(means) == len(stds) == channels
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in means)
                and all(_finite_positive(v) for v in stds)):
            raise bad("latent_channel_std", f"{channels} finite spreads > 0 beside {channels} finite means")
        grand = sum(means) / channels
        std = math.sqrt(sum(sd ** 2 + (m - grand) ** 2 for m, sd in zip(means, stds)) / channels)
        if not 0.8 < factor * std < 1.25:
            raise ArtifactError(f"{path}: latent_scale_factor: expected about 1 / {std:.4g} = {1 / std:.4g} (the "
                                f"latents' spread the manifest records), found {factor!r}")
    try:
        latent_norm_tensors(manifest, cfg.autoencoder.latent_channels)
    except ValueError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    if not isinstance(manifest.get("seed"), int) or manifest["seed"] < 0:
        raise bad("seed", "an integer >= 0")


def load_generator(artifact_dir: str | Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """Verify an artifact (:func:`verify_artifact`) and build its networks from the manifest's config.

    Raises:
        FileNotFoundError / ArtifactError: naming the offending file.
    """

    root = Path(artifact_dir)
    manifest = verify_artifact(root)
    try:
        config = manifest["config"]
        if isinstance(config.get("diffusion"), dict) and "class_in_timestep" not in config["diffusion"]:
            # written before the option existed (synthlearn 0.1 artifacts): cross-attention conditioning only
            config = {**config, "diffusion": {**config["diffusion"], "class_in_timestep": False}}
        cfg = from_dict(GeneratorConfig, config)
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{root / MANIFEST}: 'config' is not a valid generator config ({exc})") from exc
    validate_manifest(manifest, cfg, root / MANIFEST)
    ae = GeneratorAutoencoder(cfg.autoencoder, cfg.shape, cfg.latent_shape, len(cfg.class_names), cfg.channels)
    sr = SuperResolution(cfg.superres, cfg.shape, cfg.channels)
    dm = ClassConditionedUNet(cfg.diffusion, cfg.autoencoder.latent_channels, len(cfg.class_names))
    modules = [(ae.ae, "autoencoder.safetensors"), (sr, "superres.safetensors"), (dm, "diffusion.safetensors")]
    refiner = None
    if cfg.refiner.epochs:
        refiner = TumourRefiner(cfg.refiner, cfg.channels, len(cfg.class_names))
        modules.append((refiner, "refiner.safetensors"))
    for module, name in modules:
        state = load_weights(root, name)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ArtifactError(f"{root / name}: weights do not fit the network of the manifest's config "
                                f"({str(exc).splitlines()[0]})") from exc
    for module in (ae, sr, dm) + ((refiner,) if refiner is not None else ()):
        module.to(device).eval()
    return LoadedGenerator(cfg, manifest, ae, sr, dm, refiner)


def synthesize(artifact_dir, per_class: int, out, seed: int = 0, *, steps: int | None = None,
               guidance: float | None = None, guidance_interval: Sequence[float] | None = None,
               scheduler: str | None = None, batch_size: int | None = None, refine: bool = True,
               device: str = "cpu", progress: bool = True):
    """Generate ``per_class`` cases of every class the site trained on and write them as a contract site.

    Runs at the server. The artifact is verified first (:func:`synthlearn.generators.artifact.verify_artifact`:
    a tampered or incomplete artifact is refused). For class ``c`` the latents come from the DDIM/DDPM loop of
    :func:`sample_latents` with a ``torch.Generator`` seeded from
    ``(seed, "synthesize", c)``, are decoded (decoder + stage-2 module; with a refiner, its tumour crops are drawn
    from the same generator, :meth:`LoadedGenerator.refine`) and made into cases by
    :func:`postprocess_sample`; a sample whose largest tumour component is smaller than
    ``sampling.min_tumour_voxels`` is drawn again (at most ``max_draws_per_case`` draws per case; a shortfall
    is logged and recorded). Classes with no training case at the site are skipped (logged).

    The output folder is written next to ``out`` and renamed into place at the end: a failure leaves
    nothing. It holds ``<case_id>/{t1,t1c,t2,flair,seg}.nii.gz`` (case ids ``syn-<class>-00000``),
    ``labels.csv`` with the conditioned class in the artifact's label column (other columns blank) and
    ``synthesis.json`` (artifact SHA-256, seed, sampler settings, counts).

    Args:
        artifact_dir: the artifact folder of ``train-generator``.
        per_class: cases per class (>= 1).
        out: the site folder to write (must not exist, or be empty).
        seed: same seed, same cases.
        steps, guidance, guidance_interval, scheduler, batch_size: override the artifact's ``sampling``
            defaults.
        refine: apply the artifact's refiner stage when it has one (False: the decoded cases as they are, to
            see what the refiner adds; ``synthesis.json`` records which).
        device: torch device for sampling.
        progress: tqdm bar over cases.

    Returns:
        ``out``.
    """
    torch.set_flush_denormal(True)
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, found {per_class!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, found {seed!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: expected a new or empty folder, found "
                         f"{'a file' if not out.is_dir() else sorted(p.name for p in out.iterdir())[:10]}")
    t0 = time.perf_counter()
    gen_model = load_generator(artifact_dir, device=device)
    cfg, manifest = gen_model.cfg, gen_model.manifest
    sampling = cfg.sampling
    scheduler = sampling.scheduler if scheduler is None else scheduler
    if scheduler not in ("ddim", "ddpm"):
        raise ValueError(f"scheduler must be ddim or ddpm, found {scheduler!r}")
    if steps is None:  # ancestral DDPM uses every training timestep; DDIM the artifact's default
        steps = cfg.diffusion.num_train_timesteps if scheduler == "ddpm" else sampling.steps
    steps = int(steps)
    guidance = sampling.guidance_scale if guidance is None else float(guidance)
    batch_size = sampling.batch_size if batch_size is None else int(batch_size)
    interval = tuple(float(v) for v in (sampling.guidance_interval if guidance_interval is None
                                        else guidance_interval))
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, found {guidance_interval}")
    if not 1 <= steps <= cfg.diffusion.num_train_timesteps:
        raise ValueError(f"steps must be in [1, {cfg.diffusion.num_train_timesteps}], found {steps}")
    if guidance < 0 or batch_size < 1:
        raise ValueError(f"guidance must be >= 0 and batch_size >= 1, found {guidance}, {batch_size}")
    names = gen_model.class_names
    counts = manifest["class_counts"]
    classes = [c for c in names if counts.get(c, 0) > 0]
    for c in names:
        if c not in classes:
            log.warning("class %s: no training case at this site; no %s cases are generated", c, c)
    latent_shift, latent_scale = gen_model.latent_norm
    affine = centred_affine(cfg.shape, manifest["voxel_size_mm"])
    total = per_class * len(classes)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    summary: dict = {}
    try:
        rows = []
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="synthesize", unit="case", disable=not progress)
        for c in classes:
            c_index = names.index(c)
            generator = torch.Generator(device=torch.device(device))
            generator.manual_seed(derive_seed(seed, "synthesize", c))
            made, draws, rejected, components = 0, 0, 0, []
            max_draws = per_class * sampling.max_draws_per_case
            while made < per_class and draws < max_draws:
                b = min(batch_size, per_class - made, max_draws - draws)
                labels = torch.full((b,), c_index, dtype=torch.long)
                latents = sample_latents(
                    gen_model.diffusion, cfg.diffusion, labels,
                    cfg.latent_shape, cfg.autoencoder.latent_channels, generator=generator,
                    scale_factor=latent_scale, shift=latent_shift, num_inference_steps=steps,
                    guidance_scale=guidance, scheduler=scheduler, eta=sampling.eta,
                    guidance_interval=interval)  # type: ignore[arg-type]
                decoded = gen_model.decode(latents, labels).float()
                if refine:
                    decoded = gen_model.refine(decoded, labels, generator)
                decoded = decoded.cpu().numpy()
                draws += b
                for sample in decoded:
                    case = postprocess_sample(sample, mask_threshold=sampling.mask_threshold,
                                              brain_threshold=sampling.brain_threshold)
                    if case.tumour_voxels < sampling.min_tumour_voxels or made >= per_class:
                        rejected += 1
                        continue
                    case_id = f"syn-{c}-{made:05d}"
                    write_case(tmp, case_id, case.images, case.seg, affine)
                    rows.append((case_id, Labels(**{cfg.label: c})))
                    components.append(case.tumour_components)
                    made += 1
                    bar.update(1)
            if made < per_class:
                log.warning("class %s: %d of %d cases made; %d draws had no tumour of >= %d voxels", c, made,
                            per_class, rejected, sampling.min_tumour_voxels)
            summary[c] = {"cases": made, "draws": draws, "rejected_no_tumour": rejected,
                          "one_component_share": (float(np.mean(np.asarray(components) == 1)) if components else None)}
        bar.close()
        if not rows:
            raise ValueError(
                f"{artifact_dir}: the generator produced no sample with a tumour of >= "
                f"{sampling.min_tumour_voxels} voxels in {sum(v['draws'] for v in summary.values())} draws "
                f"(mask threshold {sampling.mask_threshold}); it is under-trained for this config: train longer, "
                f"or lower sampling.min_tumour_voxels (0 accepts samples without tumour)")
        write_labels_csv(tmp / "labels.csv", rows)
        write_json(tmp / "synthesis.json", {
            "artifact_manifest_sha256": file_sha256(Path(artifact_dir) / MANIFEST),
            "label": cfg.label, "per_class": per_class, "seed": seed, "scheduler": scheduler, "steps": steps,
            "guidance_scale": guidance, "guidance_interval": list(interval), "eta": sampling.eta,
            "refiner": ({"applied": True, "steps": cfg.refiner.steps, "crop": list(cfg.refiner.crop),
                         "sample_level": cfg.refiner.sample_level} if refine and gen_model.refiner is not None
                        else {"applied": False}),
            "mask_threshold": sampling.mask_threshold, "brain_threshold": sampling.brain_threshold,
            "brain_from": "brain mask channel > 0.5" if cfg.background == "filled" else "mean of the sequences > "
                          "brain_threshold",
            "seg_value": SYNTHETIC_TUMOUR_LABEL, "classes": summary,
            "wall_time_s": round(time.perf_counter() - t0, 1)})
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the site folder is meant to be shared
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%d synthetic cases written to %s (%.1f s): %s", len(rows), out, time.perf_counter() - t0,
             json.dumps(summary))
    return out


__all__ = ["LoadedGenerator", "guided_noise", "load_generator", "sample_latents", "synthesize", "validate_manifest"]
