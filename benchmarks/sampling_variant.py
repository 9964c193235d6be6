"""Score a CATphishing arm's generators again with other sampling settings, or with their refiner retrained.

The site generators of a demo-sized arm take ~20 minutes on two cores; sampling and the task model ~3-4 minutes a
seed. This probe keeps a finished arm's artifacts (``--from``: a study run folder whose ``catphishing`` arm trained
them) and changes only what happens after them, so that a setting is judged on the same generators:

- ``--set sampling.KEY=VALUE`` (e.g. ``sampling.steps=12``, ``sampling.mask_threshold=0.35``): the copies' manifests
  get the new sampling settings (re-digested with :func:`synthlearn.generators.artifact.amend_manifest`; the
  weights are untouched);
- ``--set refiner.KEY=VALUE`` (e.g. ``refiner.epochs=20``): each site's refiner is trained again from the same
  seed with the new settings on the same members' reconstructions (what the site would have shipped with them;
  the other three stages are the artifact's), and the copy ships it;
- ``--reuse-synthetic``: copy the source arm's synthetic draws too (for settings of the task model only, e.g.
  ``[catphishing] task_augment_noise`` in ``--config``).

Then ``synthlearn study run --config CONFIG`` runs on the copy (the arm resumes from the copied artifacts) and the
arm's IDH AUC per seed and mean +/- SD is printed. ``CONFIG`` is a study config with ``arms = ["catphishing"]``,
e.g. ``base = "configs/demo.toml"``, ``arms = ["catphishing"]``, ``[catphishing] audit = false``,
``privacy_control_generator = false``.

Run::

    PYTHONPATH=src python benchmarks/sampling_variant.py --from runs/rp_ref --config /tmp/rp/study_ref.toml \\
        --study data/phantom --out /tmp/variants/steps12 --set sampling.steps=12
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SECTIONS = ("sampling", "refiner")


def parse_settings(items: list[str]) -> dict[str, dict[str, object]]:
    """``["sampling.steps=12", ...]`` -> ``{"sampling": {"steps": 12}}`` (values parsed as JSON, else strings)."""
    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in SECTIONS or not name:
            raise SystemExit(f"--set {item!r}: expected sampling.KEY=VALUE or refiner.KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def retrain_refiner(artifact: Path, site_dir: Path, members: list[str], config: dict) -> dict[str, float]:
    """Train ``artifact``'s refiner again with the refiner settings of ``config`` (a generator config dict) and
    replace its weights and manifest in place; returns the final losses."""
    import torch
    from safetensors.torch import save_file

    from synthlearn.config import from_dict, to_dict
    from synthlearn.generators.artifact import DIGEST_KEY, MANIFEST, manifest_digest, read_manifest
    from synthlearn.generators.ldm.config import GeneratorConfig
    from synthlearn.generators.ldm.data import load_site_tensors, open_site
    from synthlearn.generators.ldm.refine import reconstruction_pairs, train_refiner
    from synthlearn.generators.ldm.sample import load_generator
    from synthlearn.models.refiner import TumourRefiner
    from synthlearn.runinfo import file_sha256

    generator = load_generator(artifact)
    manifest = read_manifest(artifact)
    cfg = from_dict(GeneratorConfig, config)
    if cfg.refiner.epochs < 1:
        raise SystemExit("refiner.epochs must be >= 1 to retrain the refiner")
    data = load_site_tensors(open_site(site_dir, cfg, members), cfg)
    seed = int(manifest["seed"])
    with torch.random.fork_rng():  # as train_generator: the refiner's initial weights from the seed
        torch.manual_seed(seed)
        refiner = TumourRefiner(cfg.refiner, cfg.channels, len(cfg.class_names))
    ae, sr = generator.autoencoder.eval(), generator.superres.eval()
    real, decoded, classes = reconstruction_pairs(lambda v: ae.encode(v)[0], lambda z, c: sr(ae.decode(z, c)),
                                                  data.x, data.class_index, cfg.augment_flip)
    ckpt = artifact.parent / f".{artifact.name}.refiner-ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir()
    history = train_refiner(refiner, real, decoded, classes, cfg.refiner, seed=seed, ckpt=ckpt / "refiner.pt",
                            device=torch.device("cpu"))
    shutil.rmtree(ckpt)
    weights = artifact / "refiner.safetensors"
    save_file({k: v.detach().contiguous() for k, v in refiner.state_dict().items()}, str(weights))
    manifest["config"] = json.loads(json.dumps(to_dict(cfg)))
    manifest["files"]["refiner.safetensors"] = {"sha256": file_sha256(weights), "bytes": weights.stat().st_size}
    finals = {k: v[-1] for k, v in history.items() if v}
    manifest["training"]["final_losses"]["refiner"] = finals
    manifest["training"]["epochs"]["refiner"] = cfg.refiner.epochs
    manifest["training"]["history"]["refiner"] = history
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    (artifact / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return finals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", required=True, type=Path,
                    help="a study run folder whose catphishing arm holds artifacts/ and holdout/")
    ap.add_argument("--config", required=True, type=Path, help="study config (arms = [\"catphishing\"])")
    ap.add_argument("--study", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="new run folder (must not exist)")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--reuse-synthetic", action="store_true", help="copy the source arm's synthetic draws too")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    from synthlearn.generators.artifact import amend_manifest, read_manifest, verify_artifact

    src = args.source / "catphishing"
    sites = sorted(p.name for p in (src / "artifacts").iterdir() if p.is_dir()) if (src / "artifacts").is_dir() else []
    if not sites or not (src / "holdout").is_dir():
        print(f"{src}: expected artifacts/<site>/ and holdout/ of a catphishing arm", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"{args.out}: exists; give a new run folder", file=sys.stderr)
        return 2
    settings = parse_settings(args.settings)
    if args.reuse_synthetic and settings:
        print("--reuse-synthetic keeps the source's draws, so --set would change nothing they hold; give one or the "
              "other", file=sys.stderr)
        return 2
    for site in sites:
        config = verify_artifact(src / "artifacts" / site)["config"]
        for section, values in settings.items():
            unknown = set(values) - set(config.get(section, {}))
            if unknown:
                print(f"--set: {src / 'artifacts' / site}'s config has no {section} key(s) {sorted(unknown)}",
                      file=sys.stderr)
                return 2
        if not (args.study / site).is_dir():
            print(f"{args.study / site}: site folder not found (the artifacts' site {site})", file=sys.stderr)
            return 2
    arm = args.out / "catphishing"
    arm.mkdir(parents=True)
    shutil.copytree(src / "artifacts", arm / "artifacts")
    shutil.copytree(src / "holdout", arm / "holdout")
    if args.reuse_synthetic:
        shutil.copytree(src / "synthetic", arm / "synthetic")
        for seed_dir in sorted((src / "seeds").glob("*")) if (src / "seeds").is_dir() else []:
            if (seed_dir / "synthetic").is_dir():
                shutil.copytree(seed_dir / "synthetic", arm / "seeds" / seed_dir.name / "synthetic")
    t0 = time.perf_counter()
    for site in sites:
        artifact = arm / "artifacts" / site
        config = read_manifest(artifact)["config"]
        for section, values in settings.items():
            config[section].update(values)
        if "refiner" in settings:
            members = json.loads((arm / "holdout" / f"{site}.json").read_text())["members"]
            finals = retrain_refiner(artifact, args.study / site, members, config)
            print(f"{site}: refiner retrained ({finals})", flush=True)
        elif settings:
            amend_manifest(artifact, "config", config)
        verify_artifact(artifact)
    prep_s = time.perf_counter() - t0
    cli = Path(sys.executable).with_name("synthlearn")  # the venv's console script beside its python
    cmd = [str(cli), "study", "run", "--config", str(args.config), "--study",
           str(args.study), "--out", str(args.out), "-q"]
    t1 = time.perf_counter()
    subprocess.run(cmd, check=True)
    arm_result = json.loads((args.out / "results.json").read_text())["arms"]["catphishing"]
    aucs = [arm_result["per_seed"][k]["test"]["combined"]["auc"] for k in sorted(arm_result["per_seed"], key=int)]
    over = arm_result["over_seeds"]["auc"]
    print(f"{args.out.name}: IDH AUC per seed {' '.join(f'{a:.3f}' for a in aucs)}; mean {over['mean']:.3f} +/- "
          f"{over['sd']:.3f}; preparation {prep_s:.0f} s, study run {time.perf_counter() - t1:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
