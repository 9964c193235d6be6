"""Does a site's autoencoder keep the tumour, and the class, in its reconstructions? (issues 4 and 5)

Trains fresh CATphishing autoencoders (stage 1 only) on one site's member cases (the cases a demo run's
generator trained on, from ``holdout/<site>.json``) with the settings given, and after each entry of
``--epochs`` (training continues from the previous one, so with ``lr_schedule = "poly"`` give one entry: the
decay is tied to the last epoch) reports, on the members' reconstructions (posterior mean, decoded):

- ``mae``: mean absolute error of the four sequences over the volume (generator scale, brain ~0.2-1.0);
- ``tumour_mae``: the same inside the real whole-tumour mask (the tumour carries the class);
- ``dice`` / ``holdout_dice``: Dice of the thresholded mask channel with the real mask, members / the site's
  held-out cases;
- ``tstr`` and ``tstr_by_group``: a logistic regression on tumour features (``diffusion_conditioning``:
  shape and place, per-sequence mean inside the tumour, contrast to its shell) trained on the
  reconstructions, AUC on the study's real test cases; the same for the real members is the ceiling;
- ``sigma`` / ``mu_std``: mean posterior standard deviation and spread of the posterior means;
- ``class_contrast``: per class, the mean contrast of each sequence inside the real tumour mask to the rest of
  the brain (z-scored over the real brain, t1, t1c, t2, flair), of the reconstructions; the ``real members``
  row gives the same for the real cases. The class difference in these (wildtype minus mutant) is what the
  task model reads, so a reconstruction that shrinks or flips it loses the class before any diffusion model.

``--stage2-lr LR [LR ...]``: after the last entry of ``--epochs``, a copy of the autoencoder goes through the
config's stage 2 (decoder + super-resolution module, ``superres.epochs``) at each learning rate, and the same
figures are reported for the refined reconstructions (``stage2_lr``): what the artifact ships.

Run (about 7 minutes per variant at 10 epochs on one busy core)::

    PYTHONPATH=src python benchmarks/autoencoder_stability.py --study data/phantom --site egd \\
        --holdout-file runs/demo/catphishing/holdout/egd.json --epochs 10 \\
        --variant "constant:lr_schedule=constant" --variant "poly:lr_schedule=poly"
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GROUPS = {"shape_place": list(range(9)), "mean": [9 + 2 * c for c in range(4)],
          "contrast": [10 + 2 * c for c in range(4)], "all": list(range(17))}


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """``NAME:key=value;...`` -> (name, AutoencoderConfig overrides, GeneratorConfig overrides); ``latent_shape``
    is the one generator-level key. A bad key or value names the variant."""
    from synthlearn.models.autoencoder import AutoencoderConfig

    name, sep, body = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value;..., found no NAME:")
    fields = {f.name: f for f in dataclasses.fields(AutoencoderConfig)}
    ae: dict = {}
    top: dict = {}
    for item in filter(None, body.split(";")):
        key, _, value = item.partition("=")
        if key not in fields and key != "latent_shape":
            raise SystemExit(f"--variant {text!r}: {key!r} is not an autoencoder setting; expected latent_shape or "
                             f"one of {sorted(fields)}")
        try:
            if key in ("channels", "latent_shape"):
                parsed = tuple(int(v) for v in value.split(","))
            elif key == "lr_schedule":
                parsed = value
            elif isinstance(getattr(AutoencoderConfig(), key), int):
                parsed = int(value)
            else:
                parsed = float(value)
        except ValueError:
            raise SystemExit(f"--variant {text!r}: {key}={value!r} is not a valid value") from None
        (top if key == "latent_shape" else ae)[key] = parsed
    return name, ae, top


def _tstr_groups(xs, ys, test) -> dict[str, float]:
    from diffusion_conditioning import _lr, feature_matrix
    from sklearn.metrics import roc_auc_score

    try:
        f, y = feature_matrix(xs, ys)
    except ValueError:  # no case with a tumour mask
        return {g: float("nan") for g in GROUPS}
    if len(np.unique(y)) < 2:
        return {g: float("nan") for g in GROUPS}
    return {g: round(float(roc_auc_score(test[1], _lr().fit(f[:, i], y).predict_proba(test[0][:, i])[:, 1])), 3)
            for g, i in GROUPS.items()}


def _dice(rec: torch.Tensor, x: torch.Tensor) -> float:
    p, t = rec[:, 4] > 0.5, x[:, 4] > 0.5
    inter = (p & t).sum((1, 2, 3)).float()
    return round(float((2 * inter / ((p.sum((1, 2, 3)) + t.sum((1, 2, 3))).float() + 1e-6)).mean()), 3)


def class_contrast(images: torch.Tensor, x: torch.Tensor, class_index: torch.Tensor, names) -> dict:
    """Per class, mean (over cases) z-contrast of each sequence inside the real mask of ``x`` to the rest of
    the real brain. ``images``: ``(N, >=4, X, Y, Z)`` to score, ``x``: ``(N, 5, X, Y, Z)`` the real cases."""
    out: dict[str, list] = {}
    for i in range(len(x)):
        brain = x[i, :4].abs().sum(0) > 1e-3
        tumour = (x[i, 4] > 0.5) & brain
        rest = brain & ~tumour
        if not tumour.any() or not rest.any():
            continue
        row = []
        for c in range(4):
            v = images[i, c].float()
            sd = v[brain].std().clamp_min(1e-6)
            row.append(float((v[tumour].mean() - v[rest].mean()) / sd))
        out.setdefault(names[int(class_index[i])], []).append(row)
    return {k: [round(float(m), 2) for m in np.mean(v, axis=0)] for k, v in sorted(out.items())}


@torch.no_grad()
def _scores(ae, decode, data, held, test, names) -> dict:
    """Reconstruction figures of ``decode(posterior mean)`` for the members (and the held-out cases' Dice)."""
    ae.eval()
    rec = torch.cat([decode(ae.ae.encode(data.x[i:i + 4])[0]) for i in range(0, len(data.x), 4)])
    hrec = torch.cat([decode(ae.ae.encode(held.x[i:i + 4])[0]) for i in range(0, len(held.x), 4)])
    mu, sigma = ae.ae.encode(data.x[:8])
    tumour = data.x[:, 4:5] > 0.5
    err = (rec[:, :4] - data.x[:, :4]).abs()
    groups = _tstr_groups(rec, data.class_index, test)
    return {"mae": round(float(err.mean()), 4),
            "tumour_mae": round(float((err * tumour).sum() / (4 * tumour.sum())), 4),
            "dice": _dice(rec, data.x), "holdout_dice": _dice(hrec, held.x), "tstr": groups["all"],
            "tstr_by_group": groups, "sigma": round(float(sigma.mean()), 3), "mu_std": round(float(mu.std()), 3),
            "class_contrast": class_contrast(rec, data.x, data.class_index, names)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path("data/phantom"))
    parser.add_argument("--site", required=True)
    parser.add_argument("--holdout-file", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("configs/generator_demo.toml"))
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value;... (autoencoder keys)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[10])
    parser.add_argument("--stage2-lr", type=float, nargs="*", default=[])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant] or [("config", {}, {})]

    from synthlearn.runtime import configure_threads

    configure_threads(args.threads)
    from diffusion_conditioning import feature_matrix

    from synthlearn.data.layouts import open_study
    from synthlearn.models.autoencoder import GeneratorAutoencoder
    from synthlearn.models.superres import SuperResolution
    from synthlearn.generators.ldm.config import load_generator_config
    from synthlearn.generators.ldm.data import load_site_tensors
    from synthlearn.generators.ldm.stages import _train_autoencoder, _train_superres, setup_runtime

    base = load_generator_config(args.config)
    try:
        split = json.loads(args.holdout_file.read_text())
        members = set(split["members"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--holdout-file {args.holdout_file}: expected a demo run's holdout/<site>.json with a "
                         f"'members' list, found {type(exc).__name__}: {exc}") from None
    study = open_study(args.study)
    site = next((s for s in study.sites if s.name == args.site), None)
    if site is None:
        raise SystemExit(f"--site {args.site}: not a site of {args.study}; found {[s.name for s in study.sites]}")
    member_cases = tuple(c for c in site.cases if c.case_id in members)
    held_cases = tuple(c for c in site.cases if c.case_id not in members)
    data, held = load_site_tensors(member_cases, base), load_site_tensors(held_cases, base)
    test_data = load_site_tensors(tuple(c for s in study.sites_with_role("test") for c in s.cases), base)
    test = feature_matrix(test_data.x, test_data.class_index)
    results = [{"name": "real members", "site": args.site, "n_members": len(member_cases),
                "tstr_by_group": _tstr_groups(data.x, data.class_index, test),
                "class_contrast": class_contrast(data.x, data.x, data.class_index, base.class_names)}]
    print(json.dumps(results[-1]), flush=True)
    for name, ae_over, top in variants:
        cfg = dataclasses.replace(base, autoencoder=dataclasses.replace(base.autoencoder, **ae_over), **top)
        rt = setup_runtime(cfg)
        torch.manual_seed(0)
        ae = GeneratorAutoencoder(cfg.autoencoder, cfg.shape, cfg.latent_shape)
        ckpt = Path(f"/tmp/autoencoder_stability_{args.site}_{name}.pt")
        ckpt.unlink(missing_ok=True)
        train_s = 0.0
        for epochs in sorted(set(args.epochs)):
            stage = dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder, epochs=epochs))
            t0 = time.perf_counter()
            _train_autoencoder(ae, data.x, stage, rt, seed=0, ckpt=ckpt, progress=False)
            train_s += time.perf_counter() - t0
            row = {"name": name, "epochs": epochs, "train_s": round(train_s),
                   **_scores(ae, lambda z: ae.ae.decode(z), data, held, test, cfg.class_names)}
            print(json.dumps(row), flush=True)
            results.append(row)
            ae.train()
        for lr in args.stage2_lr:
            refined = copy.deepcopy(ae)
            stage = dataclasses.replace(cfg, superres=dataclasses.replace(cfg.superres, lr=lr))
            torch.manual_seed(0)
            sr = SuperResolution(stage.superres, stage.shape)
            sr_ckpt = ckpt.with_name(ckpt.stem + f"_sr{lr:g}.pt")
            sr_ckpt.unlink(missing_ok=True)
            _train_superres(refined, sr, data.x, stage, rt, seed=0, ckpt=sr_ckpt, progress=False)
            sr_ckpt.unlink(missing_ok=True)
            sr.eval()
            row = {"name": name, "stage2_lr": lr,
                   **_scores(refined, lambda z, r=refined, m=sr: m.refine(m.upsample(r.ae.decode(z))), data, held, test,
                                   cfg.class_names)}
            print(json.dumps(row), flush=True)
            results.append(row)
        ckpt.unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
