"""The privacy audit's generator positive control: a site's generator deliberately over-fitted to a few cases.

Issue 5 item 3 and ``../shared/design/PRIVACY.md``: a membership attack only counts when it catches a
generator that is known to leak. This builds one from the site's own artifact, at the site (it reads real
cases), starting from the shipped weights: first the decoder and stage-2 module are fine-tuned with the
stage-2 losses on ``case_ids`` only (a handful of members, no flips; the encoder stays frozen) for
``decoder_steps`` steps, then the diffusion UNet with its own loss, optimiser and label dropout on those
cases' latents for ``steps`` steps, i.e. tens to hundreds of passes over each case. (The decoder step matters:
the demo's 32^3 autoencoder renders a case only a little closer to itself than to other cases, so a diffusion
model that memorises latents alone emits blurred copies that the SSIM attack barely tells apart;
docs/benchmarks.md.) Its samples, drawn with the usual
:func:`synthlearn.generators.ldm.sample.synthesize`, then stand in for what a memorising generator emits; the audit
(:func:`synthlearn.audits.privacy.audit_site` with ``control_synthetic``) must tell those cases from
held-out ones.

The control's artifact is an ordinary verified artifact (the same networks, the same manifest fields) marked
``"positive_control"`` in its manifest; it never leaves the site and is never used for training anything.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def train_memorising_generator(artifact_dir: str | Path, site_dir: str | Path, case_ids: Sequence[str],
                               out: str | Path, *, steps: int = 300, decoder_steps: int = 100, decoder_lr: float = 5e-4,
                               seed: int = 0, progress: bool = False) -> Path:
    """Fine-tune a site's decoder and diffusion model on ``case_ids`` alone and write the over-fitted artifact.

    Args:
        artifact_dir: the site's verified generator artifact (``train-generator``'s output).
        site_dir: the site's folder (the cases are read here, at the site).
        case_ids: the few member cases to memorise (>= 1; at least one labelled for the artifact's label).
        out: the control artifact folder (new or empty; replaced if it holds a previous control).
        steps: diffusion optimiser steps on those cases' latents (>= 1); the batch is all of them (at most the
            config's diffusion batch size).
        decoder_steps: stage-2 optimiser steps (decoder + super-resolution module, the artifact's stage-2 losses,
            no flips) on those cases first (0 = keep the shipped decoder). Without it the control's samples are
            at best the shipped autoencoder's reconstructions of the memorised cases, which on the demo's
            32^3 autoencoder are barely closer to them (SSIM ~0.5) than to held-out cases (~0.45).
        decoder_lr: the decoder fine-tuning's learning rate.
        seed: seeds the fine-tuning's noise, timesteps and label dropout.
        progress: tqdm bars.

    Returns:
        ``out``: ``manifest.json`` (with ``"positive_control": {"memorised_cases", "steps", ...}`` and class
        counts of the memorised cases) and the three ``.safetensors`` files.

    Raises:
        ValueError: no case ids, unknown ids, or bad ``steps``; FileNotFoundError / ArtifactError: bad artifact.
    """
    from synthlearn.generators.artifact import write_artifact
    from synthlearn.generators.ldm.sample import load_generator
    from synthlearn.generators.ldm.data import load_site_tensors, open_site
    from synthlearn.generators.ldm.stages import _train_diffusion, _train_superres, encode_site, setup_runtime

    case_ids = list(case_ids)
    if not case_ids:
        raise ValueError("train_memorising_generator needs at least one case id to memorise, found none")
    for name, value in (("steps", steps), ("decoder_steps", decoder_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "steps" else 0):
            raise ValueError(f"{name} must be an integer >= {1 if name == 'steps' else 0}, found {value!r}")
    if not decoder_lr > 0:
        raise ValueError(f"decoder_lr must be > 0, found {decoder_lr!r}")
    out = Path(out)
    t0 = time.perf_counter()
    gen = load_generator(artifact_dir)
    cfg, manifest = gen.cfg, gen.manifest
    cases = open_site(site_dir, cfg, case_ids)
    data = load_site_tensors(cases, cfg)
    rt = setup_runtime(cfg if torch.cuda.is_available() else dataclasses.replace(cfg, device="cpu", precision="fp32"))
    for module in (gen.autoencoder, gen.superres, gen.diffusion):
        module.to(rt.device)
    out.mkdir(parents=True, exist_ok=True)
    n = data.x.shape[0]
    histories = {}
    decoder_done = 0
    if decoder_steps and cfg.autoencoder.kind == "space_to_depth":
        decoder_steps = 0  # an exact rearrangement: there is no decoder to fine-tune, the diffusion model memorises
    if decoder_steps:
        batch = min(n, 4)
        per_epoch = math.ceil(n / batch)
        decoder_done = math.ceil(decoder_steps / per_epoch) * per_epoch
        sr_cfg = dataclasses.replace(cfg, augment_flip=False, superres=dataclasses.replace(
            cfg.superres, epochs=decoder_done // per_epoch, batch_size=batch, lr=decoder_lr))
        ckpt = out / "memorising_decoder.pt"
        ckpt.unlink(missing_ok=True)
        gen.autoencoder.train()
        gen.superres.train()
        histories["decoder"] = _train_superres(gen.autoencoder, gen.superres, data.x, sr_cfg, rt, seed=seed,
                                               ckpt=ckpt, progress=progress, classes=data.class_index)
        ckpt.unlink(missing_ok=True)
        gen.autoencoder.eval()
        gen.superres.eval()
    mu, sigma = encode_site(gen.autoencoder, data.x, rt, flips=False)
    # the latents repeated so that one epoch (one checkpoint write) holds ~10 steps
    repeat = max(1, math.ceil(10 * min(n, cfg.diffusion.batch_size) / n))
    classes = data.class_index.repeat(repeat)
    mu, sigma = mu.repeat(repeat, *([1] * (mu.dim() - 1))), sigma.repeat(repeat, *([1] * (sigma.dim() - 1)))
    batch = min(n, cfg.diffusion.batch_size)
    per_epoch = math.ceil(mu.shape[0] / batch)
    epochs = math.ceil(steps / per_epoch)
    tuned = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, epochs=epochs, batch_size=batch,
                                                                  ema_decay=0.0))
    ckpt = out / "memorising.pt"
    ckpt.unlink(missing_ok=True)  # a control is cheap: start over rather than resume a different one
    gen.diffusion.train()
    history, _ = _train_diffusion(gen.diffusion, mu, sigma, classes, gen.latent_norm, tuned, rt, seed=seed,
                                  ckpt=ckpt, progress=progress)
    ckpt.unlink(missing_ok=True)
    names = cfg.class_names
    counts = {name: int((data.class_index == i).sum()) for i, name in enumerate(names)}
    control_manifest = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files",
                                                                     "manifest_sha256")}
    control_manifest.update(
        class_counts=counts,
        class_prevalence={k: v / max(1, sum(counts.values())) for k, v in counts.items()},
        figures=[],
        positive_control={
            "what": "the site's generator with its decoder and diffusion UNet fine-tuned on a few member cases only "
                    "(a privacy audit control that must be caught; never shipped, never trained on)",
            "memorised_cases": n, "steps": epochs * per_epoch, "batch_size": batch,
            "decoder_steps": decoder_done,
            "decoder_final_l1": histories["decoder"]["l1"][-1] if "decoder" in histories else None,
            "final_mse": history["mse"][-1] if history.get("mse") else None,
            "wall_time_s": round(time.perf_counter() - t0, 1)})
    weights = {"autoencoder.safetensors": gen.autoencoder.ae.state_dict(),
               "superres.safetensors": gen.superres.state_dict(),
               "diffusion.safetensors": gen.diffusion.state_dict()}
    if gen.refiner is not None:  # shipped as it is: the control memorises through the decoder and the diffusion UNet
        weights["refiner.safetensors"] = gen.refiner.state_dict()
    write_artifact(out, weights=weights, manifest=control_manifest, replace=True)
    log.info("memorising control: %d cases, %d steps, final mse %.4g -> %s (%.1f s)", n,
             control_manifest["positive_control"]["steps"], control_manifest["positive_control"]["final_mse"] or 0,
             out, time.perf_counter() - t0)
    return out


__all__ = ["train_memorising_generator"]
