"""Train the demo's site generators (configs/generator_demo.toml) on each training site's members, as the
CATphishing arm of `make demo` does, for the release gate's and DP-SGD's measurements (docs/benchmarks.md 30).

Each (site, seed) trains in its own single-thread process; a finished artifact is kept and skipped, an unfinished
one resumes. The privacy holdout is the arm's (`privacy_holdout(site, 0.25, "idh", seed)`), written beside the
artifact as ``holdout.json`` (it stays at the site).

Run::

    PYTHONPATH=src .venv/bin/python benchmarks/train_gate_generators.py --study data/phantom \\
        --out runs/gate/healthy --seeds 0 1 [--config configs/generator_demo.toml] [--jobs 3]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SITES = ("tcga", "utsw", "egd")


def _train(site_dir: str, config: str, out: str, seed: int) -> tuple[str, float]:
    from synthlearn.data.layouts import open_site
    from synthlearn.generators.ldm.train import train_generator
    from synthlearn.runtime import configure_threads
    from synthlearn.strategies.catphishing_site import load_generator_for_task, privacy_holdout

    configure_threads(1)
    t0 = time.perf_counter()
    site = open_site(site_dir)
    members, holdout = privacy_holdout(site, 0.25, "idh", seed)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "holdout.json").write_text(json.dumps({"members": members, "holdout": holdout}, indent=1))
    artifact = folder / "artifact"
    if not (artifact / "manifest.json").is_file():
        train_generator(Path(site_dir), load_generator_for_task(config, "idh"), artifact, seed=seed,
                        case_ids=members, progress=False)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--config", default="configs/generator_demo.toml")
    parser.add_argument("--sites", nargs="+", default=list(SITES))
    parser.add_argument("--jobs", type=int, default=3)
    args = parser.parse_args()
    jobs = [(str(args.study / s), args.config, str(args.out / f"seed-{k}" / s), k)
            for k in args.seeds for s in args.sites]
    with ProcessPoolExecutor(args.jobs) as pool:
        for out, wall in pool.map(_train, *zip(*jobs)):
            print(f"{out}: {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
