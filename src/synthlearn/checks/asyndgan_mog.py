"""AsynDGAN's mixture-of-Gaussians check (paper 003, Fig. 3): three sites each hold one Gaussian; one generator
learning from the three sites' discriminators should cover all three modes, a GAN trained at one site only its own.

As in the paper, the auxiliary variable is the component ``x`` in {1, 2, 3} (site j holds the samples with
``x = j``); the generator draws ``y`` given ``x`` and dropout-free input noise, each discriminator judges ``(x, y)``
pairs. The mixture is ``x`` uniform, ``y | x=j ~ N(mean_j, variance_j)`` with the paper's N(-3, 2), N(1, 1),
N(3, 0.5) (second parameter: the variance).

The sites and the server run the arm's own steps (:func:`synthlearn.strategies.asyndgan.discriminator_step`,
:func:`~synthlearn.strategies.asyndgan.adversarial_feedback`, :func:`~synthlearn.strategies.asyndgan.generator_step`)
on 1D samples with small MLPs, in one process (the messages are the same tensors; the image arm carries them over
Flower). Methods compared, each over several seeds:

- ``asyndgan``: one generator, one discriminator per site, only gradients on generated samples leave a site;
- ``site-<k>``: a GAN trained on site k's data alone (the paper's single-site baseline);
- ``pooled``: one GAN with one discriminator on the pooled data of the three sites (centralized, Syn-All).

Figures: the 1-Wasserstein distance of 20 000 generated samples to the true mixture (the three sites' data pooled
with their sizes as weights), and per mode whether it is recovered: the generated density within
``MODE_WINDOW`` of the mode's mean is at least half the mixture's there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from synthlearn.strategies.asyndgan import adversarial_feedback, discriminator_step, generator_step

#: the paper's three sites: (mean, variance)
SITES: tuple[tuple[float, float], ...] = ((-3.0, 2.0), (1.0, 1.0), (3.0, 0.5))
#: half-width of the window around a mode's mean in which coverage is judged
MODE_WINDOW = 0.25


@dataclasses.dataclass(frozen=True)
class MoGConfig:
    """Settings of the check.

    Attributes:
        iterations: generator steps.
        batch_size: samples per site per step.
        noise_dim: the generator's input noise.
        hidden: width of both MLPs (two hidden layers).
        lr: Adam learning rate (betas 0.5, 0.999 as the arm).
        samples_per_site: data points each site holds.
        n_eval: generated samples per method for the figures.
        seeds: seeds to repeat every method over.
    """

    iterations: int = 2000
    batch_size: int = 64
    noise_dim: int = 4
    hidden: int = 64
    lr: float = 1e-3
    samples_per_site: int = 2000
    n_eval: int = 20000
    seeds: tuple[int, ...] = (0, 1, 2)


def _mlp(inp: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inp, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, 1))


def site_data(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each site's data: ``(x, y)`` with ``x`` the ``(n, 3)`` one-hot component (its own) and ``y`` ``(n, 1)``."""
    rng = np.random.default_rng(seed)
    out = []
    for j, (mu, var) in enumerate(SITES):
        x = torch.zeros(n, len(SITES))
        x[:, j] = 1.0
        out.append((x, torch.tensor(rng.normal(mu, np.sqrt(var), size=(n, 1)), dtype=torch.float32)))
    return out


def train_gan(data: Sequence[tuple[torch.Tensor, torch.Tensor]], cfg: MoGConfig, seed: int) -> nn.Module:
    """One conditional generator ``(noise, x) -> y`` trained against one discriminator per entry of ``data``
    (AsynDGAN with several entries; a plain GAN with one), with the arm's site and server steps."""
    torch.manual_seed(seed)
    k = len(SITES)
    gen = _mlp(cfg.noise_dim + k, cfg.hidden)
    discs = [_mlp(1 + k, cfg.hidden) for _ in data]
    g_opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    d_opts = [torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=(0.5, 0.999)) for d in discs]
    rng = torch.Generator().manual_seed(seed)
    for _ in range(cfg.iterations):
        feedback = []
        for (x_all, y_all), disc, d_opt in zip(data, discs, d_opts):
            idx = torch.randint(len(y_all), (cfg.batch_size,), generator=rng)  # site j's batch of auxiliary x
            x = x_all[idx]
            fake = gen(torch.cat([torch.randn(cfg.batch_size, cfg.noise_dim, generator=rng), x], 1))  # server
            discriminator_step(disc, d_opt, x, y_all[idx], fake)                   # at site j
            grad, _ = adversarial_feedback(disc, x, fake)                          # site j returns only this
            feedback.append((fake, grad))
        generator_step(g_opt, feedback)                                            # the server
    return gen.eval()


@torch.no_grad()
def generate(gen: nn.Module, n: int, noise_dim: int, seed: int) -> np.ndarray:
    """``n`` samples of the generated mixture: ``x`` uniform over the components, ``y = G(noise, x)``."""
    rng = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.one_hot(torch.randint(len(SITES), (n,), generator=rng), len(SITES)).float()
    return gen(torch.cat([torch.randn(n, noise_dim, generator=rng), x], 1)).numpy().ravel()


def mixture_sample(data: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    return torch.cat([y for _, y in data]).numpy().ravel()


def evaluate(samples: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """1-Wasserstein distance to ``truth`` and, per site's mode, whether it is recovered."""
    from scipy.stats import wasserstein_distance

    out: dict[str, Any] = {"w1": float(wasserstein_distance(samples, truth))}
    recovered = []
    for mu, _ in SITES:
        gen_mass = float(np.mean(np.abs(samples - mu) <= MODE_WINDOW))
        true_mass = float(np.mean(np.abs(truth - mu) <= MODE_WINDOW))
        recovered.append(bool(gen_mass >= 0.5 * true_mass))
    out["modes_recovered"] = recovered
    out["n_modes"] = int(sum(recovered))
    return out


def run_check(out_dir: str | Path, cfg: MoGConfig = MoGConfig(), *, progress: bool = True) -> dict[str, Any]:
    """Every method over every seed; writes ``results.json`` and ``histograms.png`` to ``out_dir``.

    Returns:
        ``{"config", "methods": {name: {"per_seed": [...], "w1_mean", "w1_sd", "modes_mean"}}}``.
    """
    from tqdm import tqdm

    from synthlearn.data.io import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = ["asyndgan", "pooled", *(f"site-{k + 1}" for k in range(len(SITES)))]
    per_seed: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    shown: dict[str, np.ndarray] = {}
    truth_shown = None
    jobs = [(seed, m) for seed in cfg.seeds for m in methods]
    for seed, method in tqdm(jobs, desc="mixture of Gaussians", disable=not progress):
        data = site_data(seed, cfg.samples_per_site)
        truth = mixture_sample(data)
        if method == "asyndgan":
            sets = data
        elif method == "pooled":
            sets = [(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))]
        else:
            sets = [data[int(method.split("-")[1]) - 1]]
        gen = train_gan(sets, cfg, seed)
        samples = generate(gen, cfg.n_eval, cfg.noise_dim, 10_000 + seed)
        per_seed[method].append({"seed": seed, **evaluate(samples, truth)})
        if seed == cfg.seeds[0]:
            shown[method], truth_shown = samples, truth
    summary = {}
    for m in methods:
        w1 = np.array([r["w1"] for r in per_seed[m]])
        modes = np.array([r["n_modes"] for r in per_seed[m]])
        summary[m] = {"per_seed": per_seed[m], "w1_mean": float(w1.mean()), "w1_sd": float(w1.std(ddof=1))
                      if len(w1) > 1 else 0.0, "modes_mean": float(modes.mean()),
                      "all_modes_every_seed": bool((modes == len(SITES)).all())}
    result = {"check": "asyndgan-mog", "sites": [{"mean": mu, "sd": sd} for mu, sd in SITES],
              "config": dataclasses.asdict(cfg), "methods": summary}
    write_json(out_dir / "results.json", result)
    plot_histograms(shown, truth_shown, out_dir / "histograms.png", cfg.seeds[0])
    return result


def plot_histograms(samples: dict[str, np.ndarray], truth: np.ndarray, path: Path, seed: int) -> Path:
    """One panel per method: its generated samples' histogram over the true mixture's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.linspace(-10, 8, 121)
    fig, axes = plt.subplots(1, len(samples), figsize=(3.0 * len(samples), 2.6), sharey=True)
    for ax, (name, s) in zip(np.atleast_1d(axes), samples.items()):
        ax.hist(truth, bins=bins, density=True, color="0.75", label="mixture of the 3 sites")
        ax.hist(s, bins=bins, density=True, histtype="step", color="C3", lw=1.4, label="generated")
        for mu, _ in SITES:
            ax.axvline(mu, color="0.4", lw=0.6, ls=":")
        ax.set_title(name, fontsize=9)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"AsynDGAN mixture-of-Gaussians check (seed {seed})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "MODE_WINDOW",
    "SITES",
    "MoGConfig",
    "evaluate",
    "generate",
    "mixture_sample",
    "plot_histograms",
    "run_check",
    "site_data",
    "train_gan",
]
