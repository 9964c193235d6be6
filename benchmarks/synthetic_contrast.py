"""Per class, how the tumours of written cases (synthetic or real) look in each sequence (issue 5 diagnosis).

For each site folder given, reads its cases into the generator's working form (``load_site_tensors``: the
config's grid and intensity scale) and prints, per class, the mean contrast of t1, t1c, t2 and flair inside each
case's own whole-tumour mask to the rest of its brain (z-units of that brain) and the mean mask size in voxels:
``diffusion_conditioning.sample_contrast``, so that written synthetic studies, real sites and the benchmark's
samples are measured alike (docs/benchmarks.md, sections 13-14).

Run::

    PYTHONPATH=src python benchmarks/synthetic_contrast.py --config configs/generator_demo.toml \\
        runs/demo/catphishing/synthetic/tcga data/phantom/tcga
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="generator config (grid, label, classes)")
    parser.add_argument("sites", type=Path, nargs="+", help="site folders (case folders + labels.csv)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from diffusion_conditioning import sample_contrast

    from synthlearn.generators.ldm.config import load_generator_config
    from synthlearn.generators.ldm.data import load_site_tensors, open_site

    cfg = load_generator_config(args.config)
    for site in args.sites:
        data = load_site_tensors(open_site(site, cfg), cfg)
        print(json.dumps({"site": str(site), "contrast": sample_contrast(data.x, data.class_index,
                                                                        cfg.class_names)}), flush=True)


if __name__ == "__main__":
    main()
