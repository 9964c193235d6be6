"""Would a class-conditional decoder keep the class the autoencoder loses? A probe on a finished run (issues 4-5).

``benchmarks/synthetic_gap.py`` showed that with ``make demo-long``'s generators a task model trained on the
autoencoder's reconstructions of the members reaches 0.80 (real members: 0.94) and the samples keep almost all
of that (0.78): the autoencoder is the limit, and what it loses most is the T2 contrast of the tumour between
the classes. This probe takes each generator site's shipped artifact, keeps its encoder, and fine-tunes the
decoder (``post_quant_conv`` + ``decoder``; stage 2 frozen) on the members' posterior means for ``--steps``
steps with the stage-1 loss (tumour-weighted L1 + mask Dice), in two variants from the same start:

- ``control``: the decoder alone (what the extra steps give by themselves);
- ``class``: the decoder plus a learned per-class vector added to its input (after ``post_quant_conv``), zero at
  the start, so the decoder can render what the latent does not carry about the class.

Each variant's reconstructions of the members (the ``class`` variant decoding with each case's own class) are
written as contract sites beside the run's real test sites, a task model is trained on each with ``synthlearn
study run --arms centralized`` (the study config given), and the script prints per variant the combined test AUC
and the tumour's mean z-scored intensity per class, as ``synthetic_gap.py`` does for its rows. Nothing here is
used by synthlearn itself; it only says whether the idea is worth building into the generator.

Run (about 10-15 minutes on two cores for three sites and 400 steps)::

    PYTHONPATH=src python benchmarks/decoder_class_probe.py --run runs/demo_long --config configs/demo_long.toml \\
        --study data/phantom --out /tmp/decoder_probe --steps 400
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS = ("control", "class")


def finetune_site(run: Path, study_dir: Path, site: str, variant: str, steps: int, lr: float, out: Path,
                  seed: int = 0) -> None:
    """Fine-tune one site's decoder (one variant) and write the members' reconstructions to ``out``."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic_gap import _write_site

    from synthlearn.data.layouts import open_study
    from synthlearn.models.autoencoder import mask_dice_loss, reconstruction_l1
    from synthlearn.generators.ldm.sample import load_generator
    from synthlearn.generators.ldm.data import load_site_tensors

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    arm = run / "catphishing"
    split = json.loads((arm / "holdout" / f"{site}.json").read_text())
    gen = load_generator(arm / "artifacts" / site)
    cfg, acfg = gen.cfg, gen.cfg.autoencoder
    real = next(s for s in open_study(study_dir).sites if s.name == site)
    members = tuple(c for c in real.cases if c.case_id in set(split["members"]))
    data = load_site_tensors(members, cfg)
    x, y = data.x.float(), data.class_index.long()
    ae = gen.autoencoder.ae
    with torch.no_grad():
        mu = torch.cat([ae.encode(x[i:i + 4])[0] for i in range(0, len(x), 4)])
    k = len(cfg.class_names)
    embed = torch.nn.Parameter(torch.zeros(k, mu.shape[1]))

    def decode(z: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        h = ae.post_quant_conv(z)
        if variant == "class":
            h = h + embed[cls][:, :, None, None, None]
        return ae.decoder(h)

    params = list(ae.post_quant_conv.parameters()) + list(ae.decoder.parameters())
    for p in ae.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": params, "lr": lr}]
    if variant == "class":
        groups.append({"params": [embed], "lr": 1e-2})
    opt = torch.optim.Adam(groups)
    g = torch.Generator().manual_seed(seed)
    ae.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (2,), generator=g)
        recon = decode(mu[idx], y[idx]).float()
        loss = (reconstruction_l1(recon, x[idx], acfg.mask_weight, acfg.tumour_weight, acfg.enhancement_weight)
                + acfg.mask_dice_weight * mask_dice_loss(recon, x[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{site} {variant} step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    ae.eval()
    with torch.no_grad():
        decoded = torch.cat([gen.superres(decode(mu[i:i + 4], y[i:i + 4])) for i in range(0, len(x), 4)])
    cases = [(f"{variant}-{c.case_id}", decoded[i].float().numpy(), cfg.class_names[int(y[i])])
             for i, c in enumerate(members)]
    _write_site(out, cases, cfg.label, cfg.shape, data.voxel_size)
    torch.save({"post_quant_conv": ae.post_quant_conv.state_dict(), "decoder": ae.decoder.state_dict(),
                "class_vectors": embed.detach() if variant == "class" else None}, out.parent / f"{site}.decoder.pt")
    if variant == "class":
        print(f"{site} class vectors (norm per class): {[round(float(v), 3) for v in embed.detach().norm(dim=1)]}")


def sample_site(run: Path, site: str, variant: str, weights: Path | None, per_class: int, guidance: float, seed: int,
                out: Path) -> None:
    """Draw ``per_class`` cases per class from the site's shipped diffusion model (the arm's sampler, unchanged)
    and decode them with the variant's fine-tuned decoder (``weights``; None = the artifact's own decoder).

    The latents of a draw depend only on the artifact, the seed and the guidance, so every variant decodes the
    same latents: the rows differ only by their decoder.
    """
    import torch

    import synthlearn.generators.ldm.sample as artifact_mod
    import synthlearn.generators.ldm.sample as sampling_mod
    from synthlearn.generators.ldm.sample import synthesize

    torch.set_num_threads(1)
    load, sample = artifact_mod.load_generator, sampling_mod.sample_latents
    current: dict = {}

    def sample_recording(diffusion, dcfg, labels, *args, **kwargs):  # synthesize draws one class per batch
        current["labels"] = labels
        return sample(diffusion, dcfg, labels, *args, **kwargs)

    def load_patched(*args, **kwargs):
        gen = load(*args, **kwargs)
        if weights is None:
            return gen
        state = torch.load(weights, weights_only=True)
        ae = gen.autoencoder.ae
        ae.post_quant_conv.load_state_dict(state["post_quant_conv"])
        ae.decoder.load_state_dict(state["decoder"])
        vectors = state["class_vectors"]

        @torch.no_grad()
        def decode(latents, classes=None):
            h = ae.post_quant_conv(latents)
            if vectors is not None:
                h = h + vectors[current["labels"]][:, :, None, None, None]
            return gen.superres(ae.decoder(h))

        gen.decode = decode
        return gen

    artifact_mod.load_generator, sampling_mod.sample_latents = load_patched, sample_recording
    try:
        synthesize(run / "catphishing" / "artifacts" / site, per_class, out, seed=seed, guidance=guidance,
                   progress=False)
    finally:
        artifact_mod.load_generator, sampling_mod.sample_latents = load, sample


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished study run with a catphishing arm")
    parser.add_argument("--config", type=Path, required=True, help="the study config for the task models (TOML)")
    parser.add_argument("--study", type=Path, required=True, help="the real study the run used")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=2, help="site fine-tunings at once (one thread each)")
    parser.add_argument("--sample-guidance", type=float, default=None,
                        help="also draw the run's cases per class from each site's diffusion model at this guidance "
                             "and decode them with each variant's decoder and the artifact's own (one row each)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of that draw (the same for every decoder)")
    parser.add_argument("--no-recon-rows", action="store_true",
                        help="train task models only on the drawn cases (the reconstruction rows are skipped)")
    parser.add_argument("--task-seeds", type=int, nargs="+", default=[0], help="task-model seeds per row")
    parser.add_argument("--one", nargs=3, metavar=("SITE", "VARIANT", "DEST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.lr <= 0 or args.workers < 1:
        raise SystemExit(f"--steps, --workers: expected >= 1 and --lr > 0, found {args.steps}, {args.workers}, "
                         f"{args.lr}")
    if args.sample_guidance is not None and args.sample_guidance < 0:
        raise SystemExit(f"--sample-guidance: expected a scale >= 0, found {args.sample_guidance}")
    if not (args.study / "study.json").is_file():
        raise SystemExit(f"--study {args.study}: expected a study folder with study.json, found none")
    if not args.config.is_file():
        raise SystemExit(f"--config {args.config}: expected a study config TOML, found no such file")
    if args.one:
        site, variant, dest = args.one
        finetune_site(args.run, args.study, site, variant, args.steps, args.lr, Path(dest))
        return []
    holdouts = sorted((args.run / "catphishing" / "holdout").glob("*.json"))
    if not holdouts:
        raise SystemExit(f"{args.run}/catphishing/holdout: expected <site>.json files of a finished catphishing arm")
    sites = [json.loads(h.read_text())["site"] for h in holdouts]
    meta = json.loads((args.study / "study.json").read_text())
    from synthlearn.data.layouts import open_study

    tests = [s for s in open_study(args.study).sites if s.role == "test"]
    jobs = []
    for variant in VARIANTS:
        root = args.out / "studies" / variant
        for site in sites:
            dest = root / f"{variant}_{site}"
            if not (dest / "labels.csv").is_file():
                jobs.append([sys.executable, __file__, "--run", str(args.run), "--config", str(args.config), "--study",
                             str(args.study), "--out", str(args.out), "--steps", str(args.steps), "--lr", str(args.lr),
                             "--one", site, variant, str(dest)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(args.workers) as pool:
        runs = pool.map(lambda cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, check=False), jobs)
        for proc in runs:
            print(proc.stdout[-600:], proc.stderr[-600:] if proc.returncode else "", flush=True)
            if proc.returncode:
                raise SystemExit(f"a fine-tuning failed (rc {proc.returncode})")
    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic_gap import centralized_test, tumour_stats, write_study

    from synthlearn.study import load_study_config
    from synthlearn.tasks import get_task

    scfg = load_study_config(args.config)
    task = get_task(scfg.task)
    studies = {} if args.no_recon_rows else {f"recon:{v}": (args.out / "studies" / v, [f"{v}_{s}" for s in sites])
                                               for v in VARIANTS}
    if args.sample_guidance is not None:
        per_class = int(json.loads((args.run / "config.json").read_text())["catphishing"]["per_class"])
        tag = f"g{args.sample_guidance:g}_s{args.sample_seed}"
        for variant in ("artifact",) + VARIANTS:
            root = args.out / "studies" / f"{tag}_{variant}"
            for site in sites:
                dest = root / f"{variant}_{site}"
                if not (dest / "labels.csv").is_file():
                    weights = None if variant == "artifact" else args.out / "studies" / variant / f"{site}.decoder.pt"
                    sample_site(args.run, site, variant, weights, per_class, args.sample_guidance, args.sample_seed,
                                dest)
            studies[f"{tag}:{variant}"] = (root, [f"{variant}_{s}" for s in sites])
    rows = []
    for name, (root, train_sites) in studies.items():
        write_study(root, meta, train_sites, tests)
        st = open_study(root)
        row = {"row": name, "steps": args.steps, "auc": {},
               "tumour_stats": tumour_stats([c for s in st.sites if s.role == "train" for c in s.cases], task,
                                            scfg.preprocess)}
        for seed in args.task_seeds:
            cfg_file = args.out / f"task_seed{seed}.toml"
            cfg_file.write_text(f'base = "{args.config.resolve()}"\nseed = {seed}\n')
            run_dir = args.out / "runs" / name.replace(":", "_") / f"seed{seed}"
            res = centralized_test(cfg_file, root, run_dir)["combined"]
            row["auc"][seed] = [round(res["auc"], 3)] + [round(v, 3) for v in res["auc_ci"]]
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "probe.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
