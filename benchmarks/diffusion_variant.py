"""Retrain only the diffusion stage of a shipped generator artifact with other settings, and ship the result.

The autoencoder of ``--artifact`` is kept (its weights are copied byte for byte); the site's member cases (the
cases the artifact's generator trained on, from ``--holdout-file``) are encoded, and a fresh diffusion UNet is
trained exactly as ``train-generator``'s stage 3 does (:func:`synthlearn.generators.ldm.stages._train_diffusion`,
same seed), with the ``[diffusion]`` keys given by ``--set key=value`` changed. The new artifact (same
autoencoder, the new diffusion model, the latent normalisation its settings ask for) is written to ``--out``
and verifies like any other, so ``synthesize`` and the study's task model read it as usual. Two settings that
differ only in the diffusion stage are then compared on the same autoencoder, at a third of the cost of
training two generators.

Run (one site; about 5 minutes on one core for the demo generator)::

    PYTHONPATH=src python benchmarks/diffusion_variant.py --artifact runs/demo/catphishing/artifacts/tcga \\
        --holdout-file runs/demo/catphishing/holdout/tcga.json --site data/phantom/tcga \\
        --set tumour_weighting=touched --set latent_scaling=global --out /tmp/variant/tcga
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text in ("true", "false"):
        return text == "true"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--holdout-file", type=Path, required=True)
    ap.add_argument("--site", type=Path, required=True, help="the site folder the artifact was trained on")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a [diffusion] setting")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = _value(value)
    if args.out.exists():
        ap.error(f"--out {args.out}: expected a new folder")

    import torch

    from synthlearn.config import from_dict, to_dict
    from synthlearn.data.layouts import open_study
    from synthlearn.models.diffusion import ClassConditionedUNet, DiffusionConfig
    from synthlearn.runtime import configure_threads
    from synthlearn.generators.artifact import load_weights, write_artifact
    from synthlearn.generators.ldm.sample import load_generator
    from synthlearn.generators.ldm.config import GeneratorConfig
    from synthlearn.generators.ldm.data import load_site_tensors
    from synthlearn.generators.ldm.stages import (
        _train_diffusion,
        encode_site,
        latent_normalisation,
        latent_tumour_map,
        setup_runtime,
    )
    from synthlearn.training.seeding import torch_generator

    configure_threads(args.threads)
    t0 = time.perf_counter()
    gen = load_generator(args.artifact)
    dcfg = from_dict(DiffusionConfig, {**to_dict(gen.cfg.diffusion), **overrides})
    cfg: GeneratorConfig = dataclasses.replace(gen.cfg, diffusion=dcfg)
    manifest = dict(gen.manifest)
    seed = int(manifest["seed"])
    split = json.loads(args.holdout_file.read_text())
    site = open_study(args.site).sites[0]
    members = tuple(c for c in site.cases if c.case_id in set(split["members"]))
    data = load_site_tensors(members, cfg)
    rt = setup_runtime(cfg)
    mu, sigma = encode_site(gen.autoencoder, data.x, rt, flips=cfg.augment_flip)
    classes = torch.cat([data.class_index] * (2 if cfg.augment_flip else 1))
    norm = latent_normalisation(mu, sigma, torch_generator(seed, "latent-scale"), dcfg.latent_scaling)
    tumour = latent_tumour_map(data.x, cfg.latent_shape, flips=cfg.augment_flip, mode=dcfg.tumour_weighting)
    torch.manual_seed(seed)
    dm = ClassConditionedUNet(dcfg, cfg.autoencoder.latent_channels, len(cfg.class_names))
    ckpt = args.out.parent / f".{args.out.name}.diffusion.pt"
    ckpt.unlink(missing_ok=True)
    history, ema = _train_diffusion(dm, mu, sigma, classes,
                                    (torch.tensor(norm["latent_shift"]), torch.tensor(norm["latent_scale"])), cfg, rt,
                                    seed=seed, ckpt=ckpt, progress=False, tumour=tumour)
    ckpt.unlink(missing_ok=True)
    for key in ("format", "format_version", "files", "manifest_sha256", "latent_shift", "latent_scale"):
        manifest.pop(key, None)
    manifest.update(norm, config=to_dict(cfg), figures=[])
    manifest["training"] = {**manifest["training"], "diffusion_variant": overrides,
                            "final_losses": {**manifest["training"]["final_losses"], "diffusion": {"mse": history["mse"][-1]}}}
    weights = {"autoencoder.safetensors": load_weights(args.artifact, "autoencoder.safetensors"),
               "superres.safetensors": load_weights(args.artifact, "superres.safetensors"),
               "diffusion.safetensors": ema if ema is not None else dm.state_dict()}
    write_artifact(args.out, weights=weights, manifest=manifest)
    print(json.dumps({"out": str(args.out), "overrides": overrides, "final_mse": history["mse"][-1],
                      "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
