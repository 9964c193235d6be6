"""Where does a generator lose the tumour's class contrast: the autoencoder, the diffusion model or the sampling?

For one site's artifact it prints, per class and sequence, the tumour's mean minus the rest of the brain's mean in
the generator's intensity scale (brain 0.2-1.0), the tumour's volume (voxels of the case grid) and the brain's SD per
sequence, for four kinds of cases:

- the site's members as the generator saw them (``real members``);
- their reconstructions: posterior mean, decoded with the class (the autoencoder alone);
- samples at several guidance settings, decoded (the diffusion model and its sampling), and the same refined.

A stage that keeps the real rows' contrasts passes the class on; one that does not is where it is lost.

Run (about 3-5 minutes on one core with 16 samples per class)::

    PYTHONPATH=src python benchmarks/generator_content.py --artifact runs/rp_ref/catphishing/artifacts/tcga \\
        --site data/phantom/tcga --holdout runs/rp_ref/catphishing/holdout/tcga.json --per-class 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SEQUENCES = ("t1", "t1c", "t2", "flair")
#: (label, guidance scale, guidance interval); None: the artifact's own
GUIDANCE = (("samples, artifact's guidance", None, None), ("samples, guidance 1", 1.0, (0.0, 1.0)),
            ("samples, guidance 3 throughout", 3.0, (0.0, 1.0)), ("samples, guidance 5 throughout", 5.0, (0.0, 1.0)))


def class_contrasts(x, classes, n_classes: int):
    """``x`` ``(N, >=5, *shape)`` generator-scale cases (the tumour mask in channel ``MASK_CHANNEL``), ``classes``
    ``(N,)``: ``(n_classes, 4)``, per class the mean over its cases of the tumour's mean minus the rest of the
    brain's per sequence (NaN for a class with no case holding both)."""
    import torch

    from synthlearn.models.autoencoder import MASK_CHANNEL

    x = x.float()
    tumour = x[:, MASK_CHANNEL] > 0.5
    brain = (x[:, :4].mean(1) > 0.1) & ~tumour
    out = torch.full((n_classes, 4), float("nan"))
    for c in range(n_classes):
        idx = [int(i) for i in torch.nonzero(classes == c).flatten() if tumour[i].any() and brain[i].any()]
        if idx:
            out[c] = torch.tensor([[(x[i, s][tumour[i]].mean() - x[i, s][brain[i]].mean()).item() for s in range(4)]
                                   for i in idx]).mean(0)
    return out


def contrast_rows(x, classes, class_names: list[str], tag: str) -> list[str]:
    """One line per class of ``x`` ``(N, >=5, *shape)`` / ``classes`` ``(N,)``: the tumour-minus-brain mean per
    sequence (:func:`class_contrasts`), the mean tumour volume and the brain's SD per sequence."""
    import torch

    from synthlearn.models.autoencoder import MASK_CHANNEL

    x = x.float()
    tumour = x[:, MASK_CHANNEL] > 0.5
    brain = (x[:, :4].mean(1) > 0.1) & ~tumour
    contrasts = class_contrasts(x, classes, len(class_names))
    lines = []
    for c, name in enumerate(class_names):
        idx = [int(i) for i in torch.nonzero(classes == c).flatten() if tumour[i].any() and brain[i].any()]
        if not idx:
            lines.append(f"{tag:34s} {name:9s} (no case with a tumour)")
            continue
        sd = torch.stack([x[i, :4][:, brain[i]].std(1) for i in idx]).mean(0)
        vol = float(tumour[idx].flatten(1).sum(1).float().mean())
        diff = contrasts[c].tolist()
        lines.append(f"{tag:34s} {name:9s} " + " ".join(f"{s} {d:+.3f}" for s, d in zip(SEQUENCES, diff))
                     + f"  volume {vol:5.0f}  brain SD " + " ".join(f"{v:.3f}" for v in sd.tolist()))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, type=Path)
    ap.add_argument("--site", required=True, type=Path, help="the site folder the artifact was trained on")
    ap.add_argument("--holdout", required=True, type=Path, help="the arm's holdout/<site>.json (its members)")
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the artifact's)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    if args.per_class < 1:
        print("--per-class must be >= 1", file=sys.stderr)
        return 2
    for path in (args.artifact, args.site, args.holdout):
        if not path.exists():
            print(f"{path}: not found", file=sys.stderr)
            return 2

    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    from synthlearn.generators.ldm.data import load_site_tensors, open_site
    from synthlearn.generators.ldm.refine import reconstruction_pairs
    from synthlearn.generators.ldm.sample import load_generator, sample_latents

    gen = load_generator(args.artifact)
    cfg = gen.cfg
    names = list(cfg.class_names)
    members = json.loads(args.holdout.read_text())["members"]
    data = load_site_tensors(open_site(args.site, cfg, members), cfg)
    for line in contrast_rows(data.x, data.class_index, names, "real members"):
        print(line, flush=True)
    _, recon, _ = reconstruction_pairs(lambda v: gen.autoencoder.encode(v)[0], gen.decode, data.x, data.class_index,
                                       flips=False)
    for line in contrast_rows(recon, data.class_index, names, "reconstructions"):
        print(line, flush=True)
    shift, scale = gen.latent_norm
    steps = args.steps or cfg.sampling.steps
    labels = torch.arange(len(names)).repeat_interleave(args.per_class)
    for tag, scale_g, interval in GUIDANCE:
        generator = torch.Generator().manual_seed(args.seed)
        g = cfg.sampling.guidance_scale if scale_g is None else scale_g
        iv = tuple(cfg.sampling.guidance_interval) if interval is None else interval
        with torch.no_grad():
            z = torch.cat([sample_latents(gen.diffusion, cfg.diffusion, labels[i:i + 16], cfg.latent_shape,
                                          cfg.autoencoder.latent_channels, generator=generator, scale_factor=scale,
                                          shift=shift, num_inference_steps=steps, guidance_scale=g,
                                          guidance_interval=iv)
                           for i in range(0, len(labels), 16)])
            decoded = gen.decode(z, labels)
            refined = gen.refine(decoded, labels, generator)
        for line in contrast_rows(decoded, labels, names, f"{tag} ({g:g}, {list(iv)})"):
            print(line, flush=True)
        if gen.refiner is not None:
            for line in contrast_rows(refined, labels, names, "  refined"):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
