"""Does a site's diffusion model put the class into its samples? (issue 4 item 6, issue 5 diagnosis)

On a trained generator artifact's frozen autoencoder (e.g. a demo run's ``catphishing/artifacts/tcga``), this
trains fresh diffusion UNets on the site's member latents (the cases the artifact's generator trained on, from
its ``holdout/<site>.json``) with the settings given, and after each third of the epochs draws ``--per-class``
latents per class (DDIM, ``--steps``) at several guidance scales and reports:

- ``latent_auc``: a logistic regression trained on the real posterior means (flattened) scores the sampled
  latents; AUC of their conditioned class. Says whether the class is in the latents at all.
- ``tstr``: **train on synthetic, test on real**, the CATphishing question on a cheap model: a logistic
  regression on tumour features (volume, centroid, extent, surface ratio; per sequence the mean inside the
  tumour and its contrast to a 2-voxel shell; ``generator_quality.tumour_features``) fitted on the decoded
  samples, AUC on the real cases of the study's test sites. (The CNN of the study is what finally counts;
  with 2 x ``--per-class`` samples this proxy moves by about +/-0.1 between runs.)
- ``contrast``: per class, the mean contrast of each sequence inside each decoded sample's own mask to the rest
  of its brain (z-units of that brain; t1, t1c, t2, flair) and the mean mask size: whether the samples show
  the classes' tumour appearance the way the real members do;
- the same numbers for the artifact's own diffusion model (``--artifact-diffusion``), and ``tstr`` and
  ``contrast`` of the real member cases and of their autoencoder reconstructions, the ceiling the diffusion
  model can reach.

Run (about 4 minutes per variant at 700 steps on one busy core)::

    PYTHONPATH=src python benchmarks/diffusion_conditioning.py --artifact runs/demo/catphishing/artifacts/tcga \\
        --holdout-file runs/demo/catphishing/holdout/tcga.json --study data/phantom \\
        --variant "old:channels=32,64,64;class_in_timestep=0;lr=5e-4;epochs=40" \\
        --variant "new:channels=16,32,32;class_in_timestep=1;lr=1e-3;epochs=70"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _features(x: torch.Tensor):
    """Tumour features of one generator-scale case ``(5, X, Y, Z)`` (largest mask component), or None."""
    from generator_quality import tumour_features

    from synthlearn.synthesis.cases import largest_component

    arr = x.numpy()
    mask = largest_component(arr[4] > 0.5)
    if not mask.any():
        return None
    img = arr[:4]
    brain = img.mean(0) > 0.1
    z = np.zeros_like(img)
    for c in range(4):
        v = img[c][brain]
        z[c][brain] = (v - v.mean()) / (v.std() + 1e-6)
    f = tumour_features(z, mask.astype(np.int8))
    if f is None:  # fewer than 5 tumour voxels
        return None
    keep = list(range(9)) + [9 + 6 * c + k for c in range(4) for k in (0, 5)]  # shape/location, mean, contrast
    return f[keep]


def feature_matrix(xs: torch.Tensor, ys: torch.Tensor):
    rows, labels = [], []
    for x, y in zip(xs, ys):
        f = _features(x)
        if f is not None:
            rows.append(f)
            labels.append(int(y))
    return np.stack(rows), np.asarray(labels)


def _lr():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))


def tstr_auc(xs, ys, test) -> float:
    from sklearn.metrics import roc_auc_score

    f, y = feature_matrix(xs, ys)
    if len(np.unique(y)) < 2:
        return float("nan")
    clf = _lr().fit(f, y)
    return float(roc_auc_score(test[1], clf.predict_proba(test[0])[:, 1]))


def sample_contrast(out: torch.Tensor, cls: torch.Tensor, names) -> dict:
    """Per class, mean z-contrast (over the decoded brain) of each sequence inside each decoded sample's own
    thresholded mask, and the mean mask size: ``{class: [t1, t1c, t2, flair, voxels]}``."""
    from synthlearn.synthesis.cases import BRAIN_FLOOR

    rows: dict[str, list] = {}
    for x, c in zip(out.float(), cls):
        brain = x[:4].mean(0) > BRAIN_FLOOR  # as synthesize (sampling.brain_threshold)
        tumour = (x[4] > 0.5) & brain
        rest = brain & ~tumour
        if tumour.sum() < 2 or not rest.any():
            continue
        row = [float((x[k][tumour].mean() - x[k][rest].mean()) / x[k][brain].std().clamp_min(1e-6)) for k in range(4)]
        rows.setdefault(names[int(c)], []).append(row + [float(tumour.sum())])
    return {k: [round(float(v), 2) for v in np.mean(r, axis=0)] for k, r in sorted(rows.items())}


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value;...`` -> (name, DiffusionConfig overrides); a bad key or value names the variant."""
    from synthlearn.models.diffusion import DiffusionConfig

    name, sep, body = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value;..., found no NAME:")
    known = {f.name for f in dataclasses.fields(DiffusionConfig)}
    out: dict = {}
    for item in filter(None, body.split(";")):
        key, _, value = item.partition("=")
        if key not in known:
            raise SystemExit(f"--variant {text!r}: {key!r} is not a diffusion setting; expected one of {sorted(known)}")
        try:
            if key == "channels":
                out[key] = tuple(int(v) for v in value.split(","))
            elif key == "class_in_timestep":
                out[key] = bool(int(value))
            elif key in ("epochs", "batch_size"):
                out[key] = int(value)
            else:
                out[key] = float(value)
        except ValueError:
            raise SystemExit(f"--variant {text!r}: {key}={value!r} is not a valid value") from None
    return name, out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--holdout-file", type=Path, required=True)
    parser.add_argument("--study", type=Path, default=Path("data/phantom"))
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:key=value;... over diffusion settings (channels, class_in_timestep, lr, epochs, "
                             "batch_size, ema_decay, tumour_weight, ...)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--per-class", type=int, default=24)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--artifact-diffusion", action="store_true", help="also score the artifact's own model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]  # bad input fails before any loading

    from synthlearn.runtime import configure_threads

    configure_threads(args.threads)
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from synthlearn.data.layouts import open_study
    from synthlearn.models.diffusion import ClassConditionedUNet
    from synthlearn.generators.ldm.sample import load_generator
    from synthlearn.generators.ldm.sample import sample_latents
    from synthlearn.generators.ldm.data import load_site_tensors
    from synthlearn.generators.ldm.stages import (
        _train_diffusion,
        encode_site,
        latent_scale_factor,
        latent_tumour_map,
        setup_runtime,
    )
    from synthlearn.training.seeding import torch_generator

    gen = load_generator(args.artifact)
    cfg = gen.cfg
    split = json.loads(args.holdout_file.read_text())
    study = open_study(args.study)
    site = next(s for s in study.sites if s.name == split.get("site", args.artifact.name))
    members = tuple(c for c in site.cases if c.case_id in set(split["members"]))
    data = load_site_tensors(members, cfg)
    test_cases = tuple(c for s in study.sites_with_role("test") for c in s.cases)
    test_data = load_site_tensors(test_cases, cfg)
    test = feature_matrix(test_data.x, test_data.class_index)
    rt = setup_runtime(cfg)
    mu, sigma = encode_site(gen.autoencoder, data.x, rt, flips=cfg.augment_flip)
    tumour = latent_tumour_map(data.x, cfg.latent_shape, flips=cfg.augment_flip)
    classes = torch.cat([data.class_index] * (2 if cfg.augment_flip else 1))
    scale = latent_scale_factor(mu, sigma, torch_generator(0, "latent-scale"))
    latent_clf = LogisticRegression(max_iter=3000, C=0.1).fit(mu.flatten(1).numpy(), classes.numpy())
    with torch.no_grad():
        recon = torch.cat([gen.decode(gen.autoencoder.encode(data.x[i:i + 8])[0], data.class_index[i:i + 8])
                           for i in range(0, len(data.x), 8)])
    results = [{"name": "ceiling", "real_members_tstr": round(tstr_auc(data.x, data.class_index, test), 3),
                "reconstructions_tstr": round(tstr_auc(recon, data.class_index, test), 3),
                "real_members_contrast": sample_contrast(data.x, data.class_index, cfg.class_names),
                "reconstructions_contrast": sample_contrast(recon, data.class_index, cfg.class_names),
                "n_members": len(members), "n_test": int(len(test[1]))}]
    print(json.dumps(results[-1]), flush=True)
    n_cls = len(cfg.class_names)
    cls = torch.arange(n_cls).repeat_interleave(args.per_class)

    def score(model, dcfg, row):
        for g in args.guidance:
            with torch.no_grad():
                z = sample_latents(model, dcfg, cls, cfg.latent_shape, cfg.autoencoder.latent_channels,
                                   generator=torch.Generator().manual_seed(1), scale_factor=scale,
                                   num_inference_steps=args.steps, guidance_scale=g)
                out = torch.cat([gen.decode(z[i:i + 8], cls[i:i + 8]) for i in range(0, len(z), 8)])
            proba = latent_clf.predict_proba(z.flatten(1).numpy())[:, 1]
            row[f"g{g:g}"] = {"latent_auc": round(float(roc_auc_score(cls.numpy(), proba)), 3),
                              "tstr": round(tstr_auc(out, cls, test), 3),
                              "contrast": sample_contrast(out, cls, cfg.class_names)}
        print(json.dumps(row), flush=True)
        results.append(row)

    if args.artifact_diffusion:
        score(gen.diffusion, cfg.diffusion, {"name": "artifact", "epochs": cfg.diffusion.epochs})
    for name, over in variants:
        dcfg = dataclasses.replace(cfg.diffusion, **over)
        torch.manual_seed(0)
        model = ClassConditionedUNet(dcfg, cfg.autoencoder.latent_channels, n_cls)
        ckpt = Path(f"/tmp/diffusion_conditioning_{name}.pt")
        ckpt.unlink(missing_ok=True)
        train_s = 0.0
        for epochs in sorted({dcfg.epochs // 3, 2 * dcfg.epochs // 3, dcfg.epochs} - {0}):
            stage = dataclasses.replace(cfg, diffusion=dataclasses.replace(dcfg, epochs=epochs))
            t0 = time.perf_counter()
            _, ema = _train_diffusion(model, mu, sigma, classes, scale, stage, rt, seed=0, ckpt=ckpt, progress=False,
                                      tumour=tumour)
            train_s += time.perf_counter() - t0
            steps = epochs * -(-len(mu) // dcfg.batch_size)
            shipped = model
            if ema is not None:  # what an artifact would ship
                shipped = ClassConditionedUNet(dcfg, cfg.autoencoder.latent_channels, n_cls)
                shipped.load_state_dict(ema)
            score(shipped, dcfg, {"name": name, "epochs": epochs, "steps": steps, "train_s": round(train_s, 1)})
        ckpt.unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
