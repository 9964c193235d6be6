"""FedGAN's sweep (paper 002): federations of 3, 5, 7 and 10 fundus sites with a pathological non-IID and an IID
split of the diabetic-retinopathy grades, one study each (``configs/check_fedgan_sweep.toml``: centralized, local,
FedAvg and FedGAN on the same sites and the same test site), read back per federation size:

- **realism**, read two ways, as the paper's wording ("the mean output of a discriminator") allows: ``realism_own``,
  the federation's own averaged discriminator's mean output (probability "real") on fresh generated images (what a
  GAN's training curves show, near 0.5 at equilibrium); and ``realism``, a discriminator trained centrally on the
  federation's real training images against FedGAN's generated ones (:data:`REALISM_STEPS` Adam steps on half of
  each), its mean output on the other half of the generated images, with ``realism_real`` the same with other real
  images in the generated ones' place (what realistic images score; the discriminator over-fits small sets);
- a **Frechet distance** (:func:`synthlearn.audits.fidelity.frechet_distance`, the shared audits') between the
  real test images and the generated ones, in the feature space of one fixed **reader**: a grade model trained
  once on the pretraining pool (a disjoint population, the same test site), its encoder's deepest features
  averaged over the image: the paper's Inception network replaced by a network trained on this kind of data, as
  nothing is downloaded, and the same for every federation so that the distances compare;
- **per-grade coverage**: the share of each grade's generated images that the reader calls that grade (a grade
  the generator lost scores near 0);
- the downstream grade model's **accuracy** and **quadratic weighted kappa** on the test site for every arm.

The total number of training images is the same at every size (the paper splits one dataset over more sites), so
more sites means fewer images each. The DCGAN is pretrained once on a disjoint pool (the pool's ``pretrained.pt``
is reused by every federation) and fine-tuned by each federation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
#: the paper's realism at 3, 5, 7 and 10 sites (it falls as the sites grow)
PAPER_REALISM = {3: 0.43, 5: 0.37, 7: 0.36, 10: 0.35}
REALISM_STEPS = 300
ARMS = ("centralized", "local", "fedavg", "fedgan")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The sweep's federations and data.

    Attributes:
        sizes: numbers of sites.
        splits: grade splits (:func:`synthlearn.data.phantom.fundus.make_fundus_study`).
        total_images: training images of a federation, split evenly over its sites.
        test_images: images of the test site (the same at every size and split).
        grades_per_site: grades a site holds under the non-IID split.
        seed: the phantom's and the studies' seed.
        config: the study config each federation runs.
    """

    sizes: tuple[int, ...] = (3, 5, 7, 10)
    splits: tuple[str, ...] = ("non-iid", "iid")
    total_images: int = 210
    test_images: int = 200
    grades_per_site: int = 2
    seed: int = 0
    config: Path = CONFIGS / "check_fedgan_sweep.toml"

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes must be numbers of sites >= 1, found {list(self.sizes)}")
        bad = sorted(set(self.splits) - {"iid", "non-iid"})
        if not self.splits or bad:
            raise ValueError(f"splits must be iid and/or non-iid, found {list(self.splits)}")
        if self.total_images < 2 * max(self.sizes):
            raise ValueError(f"total_images {self.total_images} gives fewer than 2 images a site at {max(self.sizes)} "
                             "sites")


def run_fedgan_config(run_dir: Path):
    """The run's ``[fedgan]`` settings (:class:`synthlearn.strategies.fedgan.FedGANConfig`)."""
    from synthlearn.config import from_dict
    from synthlearn.strategies.fedgan import FedGANConfig

    return from_dict(FedGANConfig, json.loads((run_dir / "config.json").read_text()).get("fedgan", {}))


def _real_and_synthetic(run_dir: Path, setup, cache) -> tuple[np.ndarray, ...]:
    """(real training images, real test images, synthetic images, synthetic grade indices, synthetic masks), each
    ``(N, C, S, S)`` in the generator's range of the run's ``[fedgan]`` settings (``(N,)`` for the grades,
    ``(N, S, S)`` for the masks, +-1)."""
    from synthlearn.data.layouts import open_study
    from synthlearn.strategies.fedgan import load_images

    cfg = run_fedgan_config(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    study = open_study(config["study"])
    train = [c for s in study.sites_with_role("train") for c in s.cases]
    test = [c for s in study.sites_with_role("test") for c in s.cases]
    synthetic = list(open_study(run_dir / "fedgan" / "synthetic").sites[0].cases)
    real, _ = load_images(train, setup, cfg, cache)
    held, _ = load_images(test, setup, cfg, cache)
    fake, grades = load_images(synthetic, setup, cfg, cache)
    c = len(setup.sequences)
    return real[:, :c].numpy(), held[:, :c].numpy(), fake[:, :c].numpy(), grades.numpy(), fake[:, c].numpy()


def realism(real: np.ndarray, fake: np.ndarray, seed: int, steps: int = REALISM_STEPS) -> float:
    """The paper's realism: a DCGAN discriminator trained on half of ``real`` (label 1) against half of ``fake``
    (label 0), then its mean sigmoid output on the other half of ``fake``."""
    from synthlearn.models.dcgan import DCGANConfig, DCGANDiscriminator
    from synthlearn.training.dcgan import realism_score

    rng = np.random.default_rng(seed)
    r, f = rng.permutation(len(real)), rng.permutation(len(fake))
    r_train, f_train, f_test = real[r[: len(r) // 2]], fake[f[: len(f) // 2]], fake[f[len(f) // 2:]]
    cfg = DCGANConfig(image_size=real.shape[-1], channels=real.shape[1], discriminator_width=32)
    torch.manual_seed(seed)
    disc = DCGANDiscriminator(cfg)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    x = torch.from_numpy(np.concatenate([r_train, f_train])).float()
    y = torch.cat([torch.ones(len(r_train)), torch.zeros(len(f_train))])
    gen = torch.Generator().manual_seed(seed)
    disc.train()
    done = 0
    while done < steps:
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 32):
            idx = order[i:i + 32]
            if len(idx) < 2 or done >= steps:
                continue
            loss = torch.nn.functional.binary_cross_entropy_with_logits(disc(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
    return float(realism_score(disc, torch.from_numpy(f_test).float()))


def model_features(model, images: np.ndarray, intensity_scale: float) -> np.ndarray:
    """``(N, F)``: the deepest encoder features of the task model's first network, averaged over each image
    (``images`` ``(N, C, S, S)`` in the generator's range; the network reads z-score units: the range times
    ``intensity_scale``)."""
    net = next(iter(model.networks.values()))
    net.eval()
    x = torch.from_numpy(images).float() * intensity_scale
    feats = []
    with torch.no_grad():
        for i in range(0, len(x), 64):
            h = x[i:i + 64]
            for block in net.encoder:
                h = block(h)
            feats.append(h.mean(dim=(2, 3)))
    return torch.cat(feats).numpy().astype(np.float64)


def coverage(model, fake: np.ndarray, grades: np.ndarray, class_names: Sequence[str], folder: Path, setup,
             cache) -> dict[str, float | None]:
    """Per grade, the share of its generated images the (real-trained) model calls that grade."""
    from synthlearn.data.layouts import open_study

    cases = list(open_study(folder).sites[0].cases)
    probs = model.predict(cache.dataset(cases), progress=False)
    pred = np.asarray(probs).argmax(1)
    out: dict[str, float | None] = {}
    for k, name in enumerate(class_names):
        sel = grades == k
        out[name] = float((pred[sel] == k).mean()) if sel.any() else None
    return out


def own_realism(run_dir: Path, setup, fake: np.ndarray, masks: np.ndarray, grades: np.ndarray) -> float | None:
    """The federation's own averaged discriminator (``fedgan/server/global.pt``, its DCGAN rebuilt from the run's
    ``[fedgan]`` settings and ``setup``) on the generated images (generator range, with their mask channel): its
    mean sigmoid output; None without the checkpoint."""
    from synthlearn.models.dcgan import DCGANDiscriminator
    from synthlearn.protocol import FederationState
    from synthlearn.strategies.fedgan import dcgan_config
    from synthlearn.training.dcgan import realism_score

    path = run_dir / "fedgan" / "server" / "global.pt"
    if not path.is_file():
        return None
    dcfg = dcgan_config(setup, run_fedgan_config(run_dir))
    disc = DCGANDiscriminator(dcfg)
    disc.load_state_dict(FederationState.load_or_start(path, dict).states["discriminator"])
    x = torch.from_numpy(np.concatenate([fake, masks[:, None]], axis=1)).float()
    labels = torch.from_numpy(grades).long() if dcfg.num_classes else None
    return float(realism_score(disc, x, labels=labels))


def score_run(run_dir: Path, seed: int, reader_dir: Path | None = None) -> dict[str, Any]:
    """One federation's figures from its study folder (module docstring); ``reader_dir``: the fixed reader's
    model folder (default: the federation's own centralized model)."""
    from synthlearn.audits.fidelity import frechet_distance
    from synthlearn.tasks.cache import DatasetCache
    from synthlearn.tasks.model import TaskModel

    results = json.loads((run_dir / "results.json").read_text())
    arms = {}
    for arm in ARMS:
        block = results["arms"].get(arm)
        if block is None:
            continue
        comb = block["test"]["combined"]
        arms[arm] = {"acc": comb.get("acc"), "quadratic_kappa": comb.get("quadratic_kappa"), "auc": comb.get("auc"),
                     "bytes_from_sites": block.get("bytes_from_sites"), "wall_s": block.get("wall_s")}
    out: dict[str, Any] = {"arms": arms}
    if "fedgan" not in results["arms"]:
        return out
    model = TaskModel.load(reader_dir or run_dir / "centralized" / "model")
    setup = model.setup
    cache = DatasetCache(setup.preprocess)
    real, test, fake, grades, masks = _real_and_synthetic(run_dir, setup, cache)
    out["realism_own"] = own_realism(run_dir, setup, fake, masks, grades)
    out["realism"] = realism(real, fake, seed)
    half = len(real) // 2  # the control: other real images in the place of the generated ones (~0.5)
    out["realism_real"] = realism(real[:half], real[half:], seed)
    scale = run_fedgan_config(run_dir).intensity_scale
    test_features = model_features(model, test, scale)
    out["frechet"] = float(frechet_distance(test_features, model_features(model, fake, scale)))
    out["frechet_real"] = float(frechet_distance(test_features, model_features(model, real, scale)))
    out["coverage"] = coverage(model, fake, grades, results["class_names"], run_dir / "fedgan" / "synthetic", setup,
                               cache)
    return out


def run_sweep(out_dir: str | Path, cfg: SweepConfig = SweepConfig(), *, progress: bool = True) -> dict[str, Any]:
    """Write the phantoms, run every federation's study (resumable: finished studies are kept), score them and
    write ``check.json``, ``table.md`` and ``sweep.png`` into ``out_dir``."""
    from synthlearn.data.io import atomic_write_text, write_json
    from synthlearn.data.phantom.fundus import make_fundus_study
    from synthlearn.study import load_study_config, run_study

    out = Path(out_dir)
    data = out / "data"
    t_start = time.perf_counter()
    pool = data / "pool"
    if not (pool / "study.json").is_file():
        shutil.rmtree(pool, ignore_errors=True)
        make_fundus_study(pool, "fundus", split="pool", n_sites=1, cases_per_site=cfg.total_images,
                          test_cases=cfg.test_images, seed=cfg.seed, progress=progress)
    reader = out / "reader"
    run_study(load_study_config(cfg.config, {"study": str(pool), "seed": cfg.seed, "arms": ["centralized"]}), reader,
              progress=progress)
    reader_model = reader / "centralized" / "model"
    rows: dict[str, dict[str, Any]] = {}
    pretrained = ""
    for split in cfg.splits:
        for n in cfg.sizes:
            key = f"{split}-{n}"
            study = data / key
            if not (study / "study.json").is_file():
                shutil.rmtree(study, ignore_errors=True)
                make_fundus_study(study, "fundus", split=split, n_sites=n, cases_per_site=cfg.total_images // n,
                                  test_cases=cfg.test_images, grades_per_site=cfg.grades_per_site, seed=cfg.seed,
                                  progress=progress)
            overrides: dict[str, Any] = {"study": str(study), "seed": cfg.seed,
                                         "fedgan": {"pretrain_study": str(pool)}}
            if pretrained:
                overrides["fedgan"] = {"pretrain_study": str(pool), "pretrain_epochs": 0, "pretrained": pretrained}
            t0 = time.perf_counter()
            run_study(load_study_config(cfg.config, overrides), out / key, progress=progress)
            wall = time.perf_counter() - t0
            if not pretrained and (out / key / "fedgan" / "pretrained.pt").is_file():
                pretrained = str(out / key / "fedgan" / "pretrained.pt")
            rows[key] = {"split": split, "sites": n, "images_per_site": cfg.total_images // n, "wall_s": wall,
                         **score_run(out / key, cfg.seed, reader_model)}
            log.info("fedgan sweep %s: %s", key, {k: v for k, v in rows[key].items() if k != "arms"})
    summary = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
               "rows": rows, "paper_realism": PAPER_REALISM, "wall_s": time.perf_counter() - t_start,
               "trend": trends(rows, cfg)}
    write_json(out / "check.json", summary)
    atomic_write_text(out / "table.md", format_table(summary))
    plot_sweep(summary, out / "sweep.png")
    write_sweep_report(summary, out)
    return summary


def run_sweep_seeds(out_dir: str | Path, cfg: SweepConfig, seeds: Sequence[int], *, progress: bool = True
                    ) -> dict[str, Any]:
    """The sweep once per seed (phantoms, studies and scores all seeded), each in ``out_dir/seed-<k>`` (a seed whose
    ``check.json`` was written with the same settings is read back, not re-run), then their figures over the seeds
    (:func:`combine_seeds`) in ``out_dir``: ``check.json``, ``table.md``, ``sweep.png``."""
    from synthlearn.data.io import atomic_write_text, write_json

    out = Path(out_dir)
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        seed_cfg = dataclasses.replace(cfg, seed=int(seed))
        folder = out / f"seed-{seed}"
        done = folder / "check.json"
        wanted = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(seed_cfg).items()}
        if done.is_file() and json.loads(done.read_text()).get("config") == json.loads(json.dumps(wanted)):
            log.info("fedgan sweep seed %d: complete in %s, read back", seed, folder)
            per_seed[int(seed)] = json.loads(done.read_text())
        else:
            per_seed[int(seed)] = run_sweep(folder, seed_cfg, progress=progress)
    summary = combine_seeds(per_seed)
    write_json(out / "check.json", summary)
    atomic_write_text(out / "table.md", format_over_seeds(summary))
    plot_over_seeds(summary, out / "sweep.png")
    return summary


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    return {"mean": float(np.mean(vals)) if vals else None,
            "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "values": vals}


def combine_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One sweep's figures over seeds: per federation the mean, SD (n - 1) and values of both realism readings, the
    Frechet distances and each arm's kappa and accuracy; per split the realism (own D) slope per seed, its mean and
    SD, how many seeds it falls on, and the drop from the smallest to the next federation per seed.

    Args:
        per_seed: seed -> a :func:`run_sweep` summary.
    """
    seeds = sorted(per_seed)
    keys = list(per_seed[seeds[0]]["rows"])
    rows: dict[str, dict[str, Any]] = {}
    for key in keys:
        got = [per_seed[s]["rows"][key] for s in seeds if key in per_seed[s]["rows"]]
        row: dict[str, Any] = {"split": got[0]["split"], "sites": got[0]["sites"],
                               "images_per_site": got[0]["images_per_site"], "n_seeds": len(got)}
        for name in ("realism_own", "realism", "realism_real", "frechet", "frechet_real"):
            row[name] = _stats([r.get(name) for r in got])
        row["arms"] = {arm: {m: _stats([r["arms"].get(arm, {}).get(m) for r in got])
                             for m in ("quadratic_kappa", "acc")} for arm in ARMS}
        row["coverage"] = {g: _stats([(r.get("coverage") or {}).get(g) for r in got])
                           for g in (got[0].get("coverage") or {})}
        rows[key] = row
    trend: dict[str, Any] = {}
    for split in sorted({r["split"] for r in rows.values()}):
        slopes = [per_seed[s]["trend"].get(split, {}).get("realism_own_slope_per_site") for s in seeds]
        sizes = sorted(r["sites"] for r in rows.values() if r["split"] == split)
        drops = []
        if len(sizes) > 1:
            first, second = f"{split}-{sizes[0]}", f"{split}-{sizes[1]}"
            drops = [per_seed[s]["rows"][second]["realism_own"] - per_seed[s]["rows"][first]["realism_own"]
                     for s in seeds if per_seed[s]["rows"].get(first, {}).get("realism_own") is not None
                     and per_seed[s]["rows"].get(second, {}).get("realism_own") is not None]
        change = f"realism_own_change_{sizes[0]}_to_{sizes[1]}_sites" if len(sizes) > 1 else "realism_own_change"
        trend[split] = {"realism_own_slope_per_site": _stats(slopes),
                        "seeds_where_realism_falls": int(sum(1 for v in slopes if v is not None and v < 0)),
                        "n_seeds": len(seeds), change: _stats(drops)}
    return {"seeds": seeds, "rows": rows, "trend": trend, "paper_realism": per_seed[seeds[0]]["paper_realism"],
            "wall_s_per_seed": {s: per_seed[s].get("wall_s") for s in seeds}}


def format_over_seeds(summary: dict[str, Any]) -> str:
    """:func:`combine_seeds` as a Markdown table (mean +/- SD over the seeds) and one line per split on the trend."""
    def ms(st: dict[str, Any], d: int = 2) -> str:
        if st.get("mean") is None:
            return "-"
        return f"{st['mean']:.{d}f}" + (f" +/- {st['sd']:.{d}f}" if st.get("sd") is not None else "")

    header = ("| split | sites | images a site | realism, own D (paper) | per seed | Frechet | kappa centralized | "
              "kappa FedAvg | kappa FedGAN |")
    lines = [f"over seeds {', '.join(map(str, summary['seeds']))} (mean +/- SD)", "", header,
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"].values():
        paper = summary["paper_realism"].get(row["sites"], summary["paper_realism"].get(str(row["sites"])))
        per_seed = " ".join(f"{v:.2f}" for v in row["realism_own"]["values"])
        lines.append(f"| {row['split']} | {row['sites']} | {row['images_per_site']} | {ms(row['realism_own'])} "
                     f"({paper if paper is not None else '-'}) | {per_seed} | {ms(row['frechet'])} | "
                     f"{ms(row['arms']['centralized']['quadratic_kappa'])} | "
                     f"{ms(row['arms']['fedavg']['quadratic_kappa'])} | "
                     f"{ms(row['arms']['fedgan']['quadratic_kappa'])} |")
    for split, t in summary["trend"].items():
        change = next((v for k, v in t.items() if k.startswith("realism_own_change")), {})
        name = next((k for k in t if k.startswith("realism_own_change")), "realism_own_change")
        lines += ["", (f"{split}: realism (own D) slope {ms(t['realism_own_slope_per_site'], 4)} per site, negative "
                       f"on {t['seeds_where_realism_falls']} of {t['n_seeds']} seeds; {name.replace('_', ' ')}: "
                       f"{ms(change, 3)}")]
    return "\n".join(lines) + "\n"


def plot_over_seeds(summary: dict[str, Any], path: str | Path) -> Path:
    """Realism (own D) and FedGAN's kappa against the sites, mean +/- SD over the seeds per split, with the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for split, style in (("non-iid", "-"), ("iid", "--")):
        rows = sorted((r for r in summary["rows"].values() if r["split"] == split), key=lambda r: r["sites"])
        if not rows:
            continue
        n = [r["sites"] for r in rows]
        for ax, get in ((axes[0], lambda r: r["realism_own"]),
                        (axes[1], lambda r: r["arms"]["fedgan"]["quadratic_kappa"])):
            ax.errorbar(n, [get(r)["mean"] for r in rows], yerr=[get(r)["sd"] or 0.0 for r in rows], fmt=style,
                        marker="o", capsize=3, label=f"FedGAN {split}")
    paper = sorted((int(k), v) for k, v in summary["paper_realism"].items())
    axes[0].plot([k for k, _ in paper], [v for _, v in paper], "k:", marker="x", label="paper 002")
    seeds = ", ".join(map(str, summary["seeds"]))
    for ax, title in zip(axes, (f"realism, own D (mean +/- SD, seeds {seeds})", "FedGAN grade model's kappa")):
        ax.set_xlabel("sites")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep_report(summary: dict[str, Any], out: Path) -> Path:
    """``out/report.html`` (and ``report.md``): the table, the sweep's figure, and per federation FedGAN's
    generated images per grade and its loss curves."""
    from synthlearn.report.html import write_document

    table = format_table(summary).splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:] if line.startswith("|")]
    notes = [line for line in table if line and not line.startswith("|")]
    blocks: list[tuple[str, Any]] = [
        ("h", (1, "FedGAN sweep: federation size and grade split (paper 002)")),
        ("p", ("Realism: a discriminator trained on the federation's real training images against FedGAN's generated "
               "ones, its mean output on held-out generated images (the real-vs-real control, other real images in "
               "the generated ones' place, is in check.json: what realistic images would score). Frechet: distance "
               "to the real test images in the centralized grade model's features (in brackets the real training "
               "images' own). Coverage: per grade, the share of its generated images the centralized model calls "
               "that grade. C / L: centralized / local (mean of the site models).")),
        ("table", ([c.strip() for c in table[0].strip("|").split("|")], rows)),
        *[("p", note) for note in notes],
        ("figure", (out / "sweep.png", "realism, Frechet distance and the grade models' kappa against the sites")),
    ]
    for key in summary["rows"]:
        for name, caption in (("fedgan_samples.png", "generated images per grade"),
                              ("fedgan_losses.png", "sites' losses per round")):
            path = out / key / "fedgan" / "figures" / name
            if path.is_file():
                blocks.append(("figure", (path, f"{key}: FedGAN's {caption}")))
    return write_document(out, "FedGAN sweep", blocks)[0]


def trends(rows: dict[str, dict[str, Any]], cfg: SweepConfig) -> dict[str, Any]:
    """Per split: the slope of both realism readings, the Frechet distance and FedGAN's kappa against the number of
    sites (least squares), and whether realism (the federation's own discriminator's) falls as the sites grow (the
    paper's finding)."""
    out = {}
    for split in cfg.splits:
        sel = sorted((r["sites"], r) for r in rows.values() if r["split"] == split and "realism" in r)
        if len(sel) < 2:
            continue
        n = np.array([s for s, _ in sel], float)
        entry = {}
        for name, get in (("realism_own", lambda r: r.get("realism_own")), ("realism", lambda r: r["realism"]),
                          ("frechet", lambda r: r["frechet"]),
                          ("fedgan_kappa", lambda r: r["arms"].get("fedgan", {}).get("quadratic_kappa"))):
            y = [get(r) for _, r in sel]
            if any(v is None for v in y):
                continue
            entry[f"{name}_slope_per_site"] = float(np.polyfit(n, np.array(y, float), 1)[0])
        entry["realism_falls"] = entry.get("realism_own_slope_per_site", entry.get("realism_slope_per_site", 0.0)) < 0
        out[split] = entry
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The sweep as a Markdown table."""
    header = ("| split | sites | images a site | realism, own D (paper) | realism, central D (real-vs-real control) "
              "| Frechet (real: test vs train) | coverage per grade | accuracy C / L / FedAvg / FedGAN "
              "| kappa C / L / FedAvg / FedGAN |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]

    def f(v, d=2):
        return "-" if v is None else f"{v:.{d}f}"

    for row in summary["rows"].values():
        arms = row.get("arms", {})
        acc = " / ".join(f(arms.get(a, {}).get("acc")) for a in ARMS)
        kappa = " / ".join(f(arms.get(a, {}).get("quadratic_kappa")) for a in ARMS)
        cov = " ".join(f(v) for v in (row.get("coverage") or {}).values())
        paper = summary["paper_realism"].get(row["sites"], summary["paper_realism"].get(str(row["sites"])))
        real = "-" if row.get("realism") is None else f"{row['realism']:.2g}"
        lines.append(f"| {row['split']} | {row['sites']} | {row['images_per_site']} | {f(row.get('realism_own'))} "
                     f"({f(paper)}) | {real} (control {f(row.get('realism_real'))}) | {f(row.get('frechet'), 3)} "
                     f"({f(row.get('frechet_real'), 3)}) | {cov} | {acc} | {kappa} |")
    for split, t in summary.get("trend", {}).items():
        lines.append("")
        slope = t.get("realism_own_slope_per_site", float("nan"))
        lines.append(f"{split}: realism (own D) slope {slope:+.4f} per site "
                     f"({'falls' if t.get('realism_falls') else 'does not fall'} as sites grow); Frechet slope "
                     f"{t.get('frechet_slope_per_site', float('nan')):+.3f}; FedGAN kappa slope "
                     f"{t.get('fedgan_kappa_slope_per_site', float('nan')):+.4f}")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: dict[str, Any], path: str | Path) -> Path:
    """Realism (with the paper's), Frechet distance and each arm's kappa against the number of sites, per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    splits = sorted({r["split"] for r in summary["rows"].values()})
    styles = {"non-iid": "-", "iid": "--"}
    for split in splits:
        rows = sorted((r for r in summary["rows"].values() if r["split"] == split), key=lambda r: r["sites"])
        n = [r["sites"] for r in rows]
        axes[0].plot(n, [r.get("realism_own") for r in rows], styles.get(split, "-"), marker="o",
                     label=f"FedGAN {split} (own D)")
        axes[1].plot(n, [r.get("frechet") for r in rows], styles.get(split, "-"), marker="o", label=split)
        for arm in ARMS:
            axes[2].plot(n, [r["arms"].get(arm, {}).get("quadratic_kappa") for r in rows], styles.get(split, "-"),
                         marker="o", label=f"{arm} {split}")
    paper = sorted((int(k), v) for k, v in summary["paper_realism"].items())
    axes[0].plot([k for k, _ in paper], [v for _, v in paper], "k:", marker="x", label="paper 002")
    for ax, title in zip(axes, ("realism (its discriminator's mean output)", "Frechet distance to real test images",
                                "grade model's quadratic kappa")):
        ax.set_xlabel("sites")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["ARMS", "PAPER_REALISM", "SweepConfig", "combine_seeds", "coverage", "format_over_seeds", "format_table",
           "model_features", "plot_over_seeds", "plot_sweep", "realism", "run_fedgan_config", "run_sweep",
           "run_sweep_seeds", "score_run", "trends", "write_sweep_report"]
