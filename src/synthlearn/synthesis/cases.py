"""Turning decoded generator output into cases of the data contract.

The generator works on five channels: the four sequences in the generator's intensity scale (brain in
about [0.2, 1.5], background exactly 0; see :func:`generator_intensities`) and the whole-tumour mask. A
decoded sample becomes a case by:

1. **brain**: voxels whose mean over the four sequences exceeds ``brain_threshold`` (the lowest brain
   intensity of the scale, :data:`BRAIN_FLOOR`: every real brain voxel is at or above it in every sequence, so
   a decoded voxel below it is the decoder's blurred brain edge), largest connected component, holes filled;
   the background is set to exactly 0 (the contract's skull-stripped convention, on which preprocessing's
   crop and z-score rely);
2. **tumour**: the mask channel thresholded at ``mask_threshold`` inside the brain, keeping the largest
   connected component (26-connectivity; :func:`largest_component`);
3. writing the four sequences (float32) and the segmentation with :func:`synthlearn.data.io.write_case`
   (valid affine from the artifact's voxel size, centred on the origin, no site or patient strings in the
   header). The generator models the whole tumour only (paper 000), so the segmentation holds
   :data:`SYNTHETIC_TUMOUR_LABEL` for every tumour voxel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from synthlearn.data.contract import SEQUENCES
from synthlearn.data.preprocess import brain_mask

#: segmentation value of synthetic tumour voxels (whole tumour; sub-compartments are not generated)
SYNTHETIC_TUMOUR_LABEL = 1
#: brain intensities of the generator scale start here (background is 0)
BRAIN_FLOOR = 0.2
#: upper clip of the generator scale
INTENSITY_CEIL = 1.5


def generator_intensities(images: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Map each sequence of ``(4, X, Y, Z)`` images to the generator scale: brain in
    ``[BRAIN_FLOOR, INTENSITY_CEIL]``, background exactly 0.

    Per sequence, brain voxels (non-zero in any sequence) are mapped linearly so that their ``low_pct`` and
    ``high_pct`` percentiles land on ``BRAIN_FLOOR`` and 1, then clipped. The map is affine inside the
    brain, so the z-score that task preprocessing applies later sees the same intensity distribution up to
    the clipped tails; keeping the brain away from 0 lets the decoder's background be told from dark brain.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (C, X, Y, Z), found shape {images.shape}")
    brain = brain_mask(images)
    out = np.zeros_like(images)
    if not brain.any():
        return out
    for c in range(images.shape[0]):
        vals = images[c][brain].astype(np.float64)
        lo, hi = np.percentile(vals, [low_pct, high_pct])
        span = hi - lo if hi - lo > 1e-8 else 1.0
        mapped = BRAIN_FLOOR + (1.0 - BRAIN_FLOOR) * (vals - lo) / span
        out[c][brain] = np.clip(mapped, BRAIN_FLOOR, INTENSITY_CEIL).astype(np.float32)
    return out


def largest_component(mask: np.ndarray, connectivity: int = 3) -> np.ndarray:
    """Largest connected component of a boolean mask (``connectivity`` 1, 2 or 3 as in scipy: 3 = 26-
    neighbourhood in 3D); an empty mask stays empty. Ties go to the lowest label (scan order)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labels, n = ndimage.label(mask, structure=structure)
    if n == 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def count_components(mask: np.ndarray, connectivity: int = 3) -> int:
    """Number of connected components of a boolean mask."""
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return int(ndimage.label(np.asarray(mask, dtype=bool), structure=structure)[1])


@dataclasses.dataclass(frozen=True)
class SyntheticCase:
    """A decoded sample made into a case.

    Attributes:
        images: ``(4, X, Y, Z)`` float32, background exactly 0.
        seg: ``(X, Y, Z)`` int8, :data:`SYNTHETIC_TUMOUR_LABEL` on the kept tumour component.
        tumour_components: connected components of the thresholded mask before keeping the largest.
        tumour_voxels: voxels of the kept component.
        brain_voxels: voxels of the brain.
    """

    images: np.ndarray
    seg: np.ndarray
    tumour_components: int
    tumour_voxels: int
    brain_voxels: int


def postprocess_sample(decoded: np.ndarray, *, mask_threshold: float = 0.5,
                       brain_threshold: float = BRAIN_FLOOR) -> SyntheticCase:
    """Split the mask channel off a decoded sample, threshold it, keep the largest tumour component.

    Args:
        decoded: ``(5, X, Y, Z)``: four sequences in the generator scale, then the whole-tumour mask; or
            ``(6, X, Y, Z)`` with the brain mask last (a ``background = "filled"`` generator): the brain is then that
            channel above 0.5 (largest component, holes filled) and ``brain_threshold`` is not used.
        mask_threshold: threshold of the mask channel.
        brain_threshold: threshold of the mean of the four sequences that separates brain from background.
            At half the floor (0.1, the earlier default) the decoder's blurred edge joined the brain: 7-10 %
            more brain voxels than the real cases, whose dark shell lowered the brain mean that the task's
            z-score subtracts, shifting every tumour (docs/benchmarks.md, section 17).
    """
    decoded = np.asarray(decoded, dtype=np.float32)
    if decoded.ndim != 4 or decoded.shape[0] not in (len(SEQUENCES) + 1, len(SEQUENCES) + 2):
        raise ValueError(f"decoded sample must be (5, X, Y, Z) (4 sequences + tumour mask) or (6, X, Y, Z) (+ brain "
                         f"mask), found shape {decoded.shape}")
    if not np.isfinite(decoded).all():
        raise ValueError("decoded sample holds NaN or inf values")
    images = np.clip(decoded[: len(SEQUENCES)], 0.0, INTENSITY_CEIL)
    if decoded.shape[0] == len(SEQUENCES) + 2:
        brain = largest_component(decoded[len(SEQUENCES) + 1] > 0.5)
    else:
        brain = largest_component(images.mean(axis=0) > brain_threshold)
    brain = ndimage.binary_fill_holes(brain)
    tumour_raw = (decoded[len(SEQUENCES)] > mask_threshold) & brain
    n_components = count_components(tumour_raw)
    tumour = largest_component(tumour_raw)
    images = np.where(brain[None], np.maximum(images, 1e-3), 0.0).astype(np.float32)
    seg = np.where(tumour, SYNTHETIC_TUMOUR_LABEL, 0).astype(np.int8)
    return SyntheticCase(images=images, seg=seg, tumour_components=n_components,
                         tumour_voxels=int(tumour.sum()), brain_voxels=int(brain.sum()))


def centred_affine(shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-world affine with the given voxel size (mm), the volume centred on the origin."""
    if len(shape) != 3 or len(voxel_size) != 3 or min(voxel_size) <= 0:
        raise ValueError(f"shape and voxel_size must be 3 values (voxel_size > 0), found {shape}, {voxel_size}")
    affine = np.diag([float(v) for v in voxel_size] + [1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * v for n, v in zip(shape, voxel_size)]
    return affine


def synthesize(artifact_dir, per_class: int, out, seed: int = 0, *, steps: int | None = None,
               guidance: float | None = None, guidance_interval: Sequence[float] | None = None,
               scheduler: str | None = None, batch_size: int | None = None,
               device: str = "cpu", progress: bool = True):
    """Generate ``per_class`` cases of every class the site trained on and write them as a contract site.

    Runs at the server. The artifact is verified first (:func:`synthlearn.synthesis.artifact.verify_artifact`:
    a tampered or incomplete artifact is refused). For class ``c`` the latents come from the DDIM/DDPM loop of
    :func:`synthlearn.synthesis.sampling.sample_latents` with a ``torch.Generator`` seeded from
    ``(seed, "synthesize", c)``, are decoded (decoder + stage-2 module) and made into cases by
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
        device: torch device for sampling.
        progress: tqdm bar over cases.

    Returns:
        ``out``.
    """
    import json
    import logging
    import os
    import shutil
    import tempfile
    import time
    from pathlib import Path

    import torch

    from synthlearn.data.contract import Labels
    from synthlearn.data.io import write_case, write_json, write_labels_csv
    from synthlearn.runinfo import file_sha256
    from synthlearn.synthesis.artifact import MANIFEST, load_generator
    from synthlearn.synthesis.sampling import sample_latents
    from synthlearn.training.seeding import derive_seed

    log = logging.getLogger(__name__)
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
                decoded = gen_model.decode(latents, labels).float().cpu().numpy()
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
