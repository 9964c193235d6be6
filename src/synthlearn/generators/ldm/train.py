"""Training a site's CATphishing generator: autoencoder, super-resolution stage, latent diffusion.

:func:`train_generator` runs at a hospital on its own site folder and writes the artifact the site ships
once (:mod:`synthlearn.generators.artifact`). Three plain loops, top to bottom (paper 000, "Methods"):

1. **autoencoder** (:mod:`synthlearn.models.autoencoder`): L1 + KL (+ patch adversarial after
   ``adv_start_epoch``, + perceptual when weights are given) on 4 sequences + whole-tumour mask;
2. **super-resolution** (:mod:`synthlearn.models.superres`): encoder frozen, decoder + UNet module
   fine-tuned with L1 + SSIM (+ perceptual);
3. **diffusion** (:mod:`synthlearn.models.diffusion`): the frozen encoder's latents, scaled to unit
   variance, DDPM noise-prediction loss, class by cross-attention with label dropout.

Every random choice of epoch ``e`` of stage ``s`` (order, flips, patches, latent noise, timesteps, label
dropout) comes from a ``torch.Generator`` seeded with ``(seed, s, e)``. After every epoch a checkpoint with
the weights, optimizer states, loss history and RNG state is written atomically to
``ARTIFACT_DIR/checkpoints/``; a killed run started again with the same arguments resumes from it and ends
with the same weights as an uninterrupted run. When all stages are done the folder is replaced by the
artifact (checkpoints removed: they hold nothing a site should ship).

Scale: bf16/fp16 autocast (``precision``), CUDA when available, and DDP under ``torchrun`` (WORLD_SIZE > 1:
every rank trains on its share of each epoch's batches, rank 0 writes checkpoints and the artifact).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from synthlearn.config import to_dict
from synthlearn.models.autoencoder import (
    GeneratorAutoencoder,
    make_perceptual_loss,
)
from synthlearn.models.diffusion import ClassConditionedUNet
from synthlearn.models.refiner import TumourRefiner
from synthlearn.models.superres import SuperResolution
from synthlearn.training.seeding import torch_generator


from synthlearn.generators.ldm.config import GeneratorConfig
from synthlearn.generators.ldm.dp import manifest_entry
from synthlearn.generators.ldm.data import load_site_tensors, open_site
from synthlearn.generators.ldm.stages import (
    _train_autoencoder,
    _train_diffusion,
    _train_superres,
    encode_site,
    latent_normalisation,
    latent_tumour_map,
    plot_loss_curves,
    setup_runtime,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ driver


def _run_identity(cfg: GeneratorConfig, seed: int, fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {"config": to_dict(cfg), "seed": seed, "data_sha256": fingerprint["sha256"]}


def _prepare_out(out: Path, identity: dict[str, Any]) -> Path:
    """Check ``out`` is new, empty or an unfinished run of the same config/seed/data; return the checkpoint
    folder (created)."""
    ckpt_dir = out / "checkpoints"
    run_file = ckpt_dir / "run.json"
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out}: expected a folder for the artifact, found a file")
        entries = [p.name for p in out.iterdir()]
        if "manifest.json" in entries:
            raise ValueError(f"--out {out}: already holds a finished artifact (manifest.json); choose a new folder")
        if entries and not run_file.is_file():
            raise ValueError(f"--out {out}: expected a new or empty folder (or an unfinished train-generator run), "
                             f"found {sorted(entries)[:10]}")
        if run_file.is_file():
            previous = json.loads(run_file.read_text())
            if previous != json.loads(json.dumps(identity)):
                diff = [k for k in identity if previous.get(k) != json.loads(json.dumps(identity[k]))]
                raise ValueError(f"{run_file}: an unfinished run with a different {', '.join(diff)} is in {out}; "
                                 f"resume needs the same site, config and seed, or use a new --out")
            log.info("resuming the unfinished generator training in %s", out)
            return ckpt_dir
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    from synthlearn.data.io import write_json

    write_json(run_file, identity)
    return ckpt_dir


def train_generator(site_dir: Path, cfg: GeneratorConfig, out: Path, seed: int = 0, *,
                    case_ids: Sequence[str] | None = None, progress: bool = True,
                    on_epoch: Callable[[str, int, int], None] | None = None) -> Path:
    """Train a site's generator and write its artifact.

    Args:
        site_dir: one site folder of the data contract (case folders with the four sequences and ``seg``,
            ``labels.csv`` with the ``cfg.label`` column).
        cfg: the generator settings (e.g. ``load_generator_config("configs/generator_cpu.toml")``).
        out: the artifact folder (new or empty; an unfinished run of the same site/config/seed resumes).
        seed: every random choice derives from it; same seed, same artifact bytes (CPU, one thread).
        case_ids: train on these cases of the site only (default: all); the others stay unseen by the
            generator (the privacy audit's non-members). The manifest records the count, never the ids.
        progress: tqdm bars.
        on_epoch: called as ``on_epoch(stage, epochs_done, epochs_total)`` after every epoch of every stage (a
            site process reports its progress with it).

    Returns:
        ``out``, holding ``manifest.json``, three ``.safetensors`` files (four with a refiner) and
        ``loss_curves.png``.

    Raises:
        FileNotFoundError / ValueError: bad site data, config or ``out`` (nothing is written).
    """
    from synthlearn import __version__
    from synthlearn.runinfo import data_fingerprint, file_sha256, version_info
    from synthlearn.generators.artifact import write_artifact

    site_dir, out = Path(site_dir), Path(out)
    if not isinstance(cfg, GeneratorConfig):
        raise TypeError(f"cfg must be a GeneratorConfig, found {type(cfg).__name__}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, found {seed!r}")
    if cfg.autoencoder.perceptual_weights and not Path(cfg.autoencoder.perceptual_weights).is_file():
        make_perceptual_loss(cfg.autoencoder)  # raises FileNotFoundError with the fix, before anything is written
    t0 = time.perf_counter()
    cases = open_site(site_dir, cfg, case_ids)
    fingerprint = data_fingerprint(cases, include_ids=False)
    rt = setup_runtime(cfg)
    identity = _run_identity(cfg, seed, fingerprint)
    if rt.is_main:
        ckpt_dir = _prepare_out(out, identity)
    rt.barrier()
    ckpt_dir = out / "checkpoints"

    data = load_site_tensors(cases, cfg)
    names = cfg.class_names
    counts = {name: int((data.class_index == i).sum()) for i, name in enumerate(names)}
    unlabelled = int((data.class_index < 0).sum())
    log.info("site %s: %d cases, %s = %s, %d unlabelled; grid %s, latent %dx%s", site_dir, len(cases), cfg.label,
             counts, unlabelled, cfg.shape, cfg.autoencoder.latent_channels, cfg.latent_shape)

    torch.manual_seed(seed)  # initial weights: same seed, same network
    ae = GeneratorAutoencoder(cfg.autoencoder, cfg.shape, cfg.latent_shape, len(names), cfg.channels).to(rt.device)
    sr = SuperResolution(cfg.superres, cfg.shape, cfg.channels).to(rt.device)
    dm = ClassConditionedUNet(cfg.diffusion, cfg.autoencoder.latent_channels, len(names)).to(rt.device)

    x_work = ae.to_working(data.x) if ae.working_shape != tuple(cfg.shape) else data.x
    histories: dict[str, dict[str, list[float]]] = {}
    if cfg.privacy.dp_sgd and rt.world_size > 1:
        raise ValueError("privacy.dp_sgd runs on one process; DDP (torchrun) with DP-SGD is not supported")
    dp_reports: dict[str, Any] = {}
    histories["autoencoder"] = _train_autoencoder(ae, x_work, cfg, rt, seed=seed, ckpt=ckpt_dir / "autoencoder.pt",
                                                  progress=progress, classes=data.class_index, on_epoch=on_epoch,
                                                  dp_reports=dp_reports)
    histories["superres"] = _train_superres(ae, sr, data.x, cfg, rt, seed=seed, ckpt=ckpt_dir / "superres.pt",
                                            progress=progress, classes=data.class_index, on_epoch=on_epoch)
    mu, sigma = encode_site(ae, data.x, rt, flips=cfg.augment_flip)
    classes = torch.cat([data.class_index] * (2 if cfg.augment_flip else 1))
    norm = latent_normalisation(mu, sigma, torch_generator(seed, "latent-scale"), cfg.diffusion.latent_scaling)
    log.info("latents: global scale factor %.4f; per channel mean %s, std %s (%s scaling)",
             norm["latent_scale_factor"], [round(v, 3) for v in norm["latent_channel_mean"]],
             [round(v, 3) for v in norm["latent_channel_std"]], cfg.diffusion.latent_scaling)
    tumour = latent_tumour_map(data.x, cfg.latent_shape, flips=cfg.augment_flip, mode=cfg.diffusion.tumour_weighting)
    histories["diffusion"], ema = _train_diffusion(
        dm, mu, sigma, classes, (torch.tensor(norm["latent_shift"]), torch.tensor(norm["latent_scale"])), cfg, rt,
        seed=seed, ckpt=ckpt_dir / "diffusion.pt", progress=progress, tumour=tumour, on_epoch=on_epoch,
        dp_reports=dp_reports)
    refiner = None
    if cfg.refiner.epochs:  # the fourth stage: on the main process only (small; its pairs need the whole site)
        with torch.random.fork_rng():  # its initial weights from the seed, whatever the stages before drew
            torch.manual_seed(seed)
            refiner = TumourRefiner(cfg.refiner, cfg.channels, len(names))
        if rt.is_main:
            from synthlearn.generators.ldm.refine import reconstruction_pairs, train_refiner

            ae.eval()
            sr.eval()
            real, decoded, pair_classes = reconstruction_pairs(
                lambda v: ae.encode(v.to(rt.device))[0], lambda z, c: sr(ae.decode(z, c.to(rt.device))),
                data.x, data.class_index, cfg.augment_flip)
            refiner.to(rt.device)
            histories["refiner"] = train_refiner(refiner, real, decoded, pair_classes, cfg.refiner, seed=seed,
                                                 ckpt=ckpt_dir / "refiner.pt", device=rt.device, progress=progress,
                                                 on_epoch=on_epoch)
    if not rt.is_main:
        rt.barrier()
        return out

    figure = plot_loss_curves(histories, ckpt_dir / "loss_curves.png")
    config = to_dict(cfg)
    perceptual_note: dict[str, Any]
    if cfg.autoencoder.perceptual_weights:
        pw = Path(cfg.autoencoder.perceptual_weights)
        config["autoencoder"]["perceptual_weights"] = pw.name  # no local paths leave the site
        perceptual_note = {"used": True, "weights_file": pw.name, "weights_sha256": file_sha256(pw)}
    else:
        perceptual_note = {"used": False, "reason": "no weights given (autoencoder.perceptual_weights is empty); "
                                                    "synthlearn never downloads weights"}
    total = sum(counts.values())
    finals = {stage: {k: v[-1] for k, v in h.items() if v} for stage, h in histories.items()}
    manifest = {
        "package": {"synthlearn": __version__, **version_info()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "config": config,
        "label": cfg.label,
        "class_names": list(names),
        "class_counts": counts,
        "class_prevalence": {k: (v / total if total else 0.0) for k, v in counts.items()},
        "unlabelled_cases": unlabelled,
        "data_fingerprint": fingerprint,
        "shape": list(cfg.shape),
        "working_shape": list(ae.working_shape),
        "latent_shape": list(cfg.latent_shape),
        "latent_channels": cfg.autoencoder.latent_channels,
        **norm,
        "voxel_size_mm": list(data.voxel_size),
        "intensity_scale": "per sequence, z-scored over the brain at the case's resolution, fitted to the grid, "
                           "then brain 0.5th/99.5th percentiles -> 0.2/1.0, clipped to [0.2, 1.5]; "
                           "background 0 (synthlearn.synthesis.cases.generator_intensities)",
        "perceptual_loss": perceptual_note,
        "privacy": manifest_entry(cfg.privacy, dp_reports),
        "training": {"epochs": {s: len(next(iter(h.values()), [])) for s, h in histories.items()},
                     "final_losses": finals, "history": histories,
                     "wall_time_s": round(time.perf_counter() - t0, 1), "device": str(rt.device),
                     "precision": cfg.precision, "world_size": rt.world_size,
                     "diffusion_weights": "ema" if ema is not None else "last"},
        "figures": ["loss_curves.png"],
    }
    weights = {
        "autoencoder.safetensors": ae.ae.state_dict(),
        "superres.safetensors": sr.state_dict(),
        "diffusion.safetensors": ema if ema is not None else dm.state_dict(),
    }
    if refiner is not None:
        weights["refiner.safetensors"] = refiner.state_dict()
    write_artifact(out, weights=weights, manifest=manifest, files={"loss_curves.png": figure}, replace=True)
    log.info("generator artifact written to %s (%.1f s)", out, time.perf_counter() - t0)
    rt.barrier()
    return out
