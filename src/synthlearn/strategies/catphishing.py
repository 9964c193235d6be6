"""The ``catphishing`` arm (paper 000): every training site trains a generator on its own cases and ships
it once; the server samples synthetic cases, filters them for diversity and trains the task model on the
pooled synthetic data only.

What happens, in order (each step resumes from what a previous run left in the arm folder):

1. **At each site** (a separate process that is given only that site's folder, so no site's code can read
   another site's cases): :func:`synthlearn.generators.ldm.train.train_generator` on the site's cases minus a
   stratified privacy holdout (``holdout_fraction``; the held-out cases never reach the generator and are
   the non-members of the membership audit). The artifact (safetensors + SHA-256 manifest) is what crosses
   the site boundary: ``bytes_from_sites`` is the sum of the artifacts' file sizes.
2. **At the server**: :func:`synthlearn.generators.ldm.sample.synthesize` verifies each artifact (a tampered one
   is refused) and writes ``per_class`` cases per class; the diversity filter
   (:func:`synthlearn.synthesis.diversity.filter_site`: whole-tumour radiomics, pairwise distances within
   the site, drop one case of every pair closer than the ``diversity_percentile``-th percentile) keeps the
   training set; the task model is trained on the kept cases of every site, pooled, with the same trainer
   and setup as every other arm.
3. **Audits** (``audit = true``): per-sequence Frechet radiomics distances real vs synthetic per site and
   the cross-site matrix (:func:`synthlearn.audits.fidelity.fidelity`), BRISQUE and PIQE real vs
   synthetic, and per site the SSIM membership inference with its negative and positive controls and the
   copy rate with a montage of the closest pairs (:func:`synthlearn.audits.privacy.audit_site`), and its
   **reference control**: the same members and non-members attacked with the other sites' synthetic cases
   (generators that never saw them), which measures what the split alone gives. The audits read the real
   cases at the site that owns them (the server can send a site the other sites' synthetic cases); only
   their numbers would leave a site.
   The **generator positive control** (``privacy_control_generator``) runs at each site too: the site's
   generator with its decoder and diffusion UNet fine-tuned on ``privacy_control_cases`` members only
   (:func:`synthlearn.generators.ldm.memorising.train_memorising_generator`), sampled like the real one; the
   membership attack must catch the cases it memorised. It is never shipped or trained on.
   **Recognition** (:func:`recognition_audit`, when the study's ``centralized`` arm ran before this one):
   the task model trained on the real training cases classifies the kept synthetic cases; the share
   recognised as the class they were conditioned on (balanced over classes; chance = 1 / classes) says
   whether the samples carry the class in a form a model of real scans reads (issue 4's quality check).

Arm folder::

    catphishing/artifacts/<site>/         what each site ships (manifest.json, *.safetensors, loss curves)
    catphishing/holdout/<site>.json       the site's privacy holdout (stays at the site)
    catphishing/synthetic/<site>/         the server's synthetic cases (a site folder of the data contract)
                                          + synthesis.json + diversity.json
    catphishing/privacy_control/<site>/   the generator positive control: its artifact and samples (stays at the site)
    catphishing/model/                    the task model trained on synthetic data
    catphishing/figures/                  FID matrix, synthetic vs real grid, privacy montages
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from synthlearn.audits.recognition import recognition_audit
from synthlearn.config import to_dict
from synthlearn.data.contract import CaseRecord, SiteRecord
from synthlearn.data.io import write_json
from synthlearn.generators.ldm.release_gate import ReleaseGateConfig, ReleaseRefused
from synthlearn.strategies.base import ArmContext, ArmOutput
from synthlearn.strategies.catphishing_site import (
    GENERATOR_LABEL,
    ArtifactUploadProtocol,
    gate_artifact,
    gate_summary,
    load_generator_for_task,
    privacy_holdout,
)
from synthlearn.strategies.registry import ArmSpec
from synthlearn.tasks.model import train_task_model
from synthlearn.training.seeding import derive_seed, numpy_generator

log = logging.getLogger(__name__)

#: the arm whose real-data model :func:`recognition_audit` applies to the synthetic cases
RECOGNITION_REFERENCE = "centralized"


@dataclasses.dataclass(frozen=True)
class CatphishingConfig:
    """The CATphishing arm (``[catphishing]`` of a study config).

    Attributes:
        generator: generator config TOML (``configs/generator_*.toml``; a relative path is looked up in the
            working directory, then in the synthlearn repository).
            Its ``label`` is set from the study task (``idh`` or ``tumor_type``).
        per_class: synthetic cases generated per class per site (paper: 1600).
        steps: sampling steps (None: the generator config's ``sampling.steps``).
        guidance: classifier-free guidance scale (None: the generator config's).
        holdout_fraction: share of each site's cases (stratified by class) kept out of generator training
            as the non-members of the privacy audit (0 = train on every case and skip the membership audit).
        diversity_filter: apply the diversity filter (paper: yes).
        diversity_percentile: the filter's percentile (paper: 20).
        diversity_threshold_from: ``pairs`` (percentile of all pairwise distances, the paper's words) or
            ``nearest`` (percentile of each case's nearest-neighbour distance); see
            :func:`synthlearn.synthesis.diversity.diversity_keep_mask`.
        parallel_sites: sites training their generators at the same time (0 = as many as CPU cores allow).
        threads_per_site: torch threads of each site's process.
        audit: run the fidelity, image-quality and privacy audits.
        fidelity_extractor: ``radiomics`` (default, needs no weights) or ``torch`` with ``fidelity_weights``.
        fidelity_weights: a TorchScript/state-dict file of a feature network for the Frechet distance (user
            supplied; nothing is downloaded).
        fidelity_n: real and synthetic cases per site for the Frechet distances (paper: 300 vs 300).
        quality_n: cases per site scored with BRISQUE and PIQE.
        privacy_n_synthetic: synthetic cases per site the membership attack compares against (None: all
            generated cases).
        task_augment_noise: ``train.augment_noise`` of the task model trained on the synthetic cases (the
            decoded cases carry no scanner noise, the real test cases do); None: the study's ``train`` value.
        task_augment_intensity: ``train.augment_intensity`` of that task model (random gamma, contrast and
            brightness per sequence: the decoder renders each sequence's tumour contrast a little off); None: the
            study's ``train`` value.
        task_epochs: ``train.epochs`` of the task model trained on the synthetic cases; None: the study's
            ``train`` value. With many more synthetic than real cases, fewer passes keep the number of
            training steps near the other arms' (the model and everything else stay the same).
        privacy_control_generator: run the generator positive control of the membership audit (a generator
            deliberately over-fitted to a few members at each site must be caught; issue 5 item 3).
        refiner: sample with the generators' refiner stage where they have one (``refiner.epochs`` > 0 in the
            generator config; :mod:`synthlearn.models.refiner`); false draws the same latents without it, to
            measure what the refiner adds on the same artifacts.
        privacy_control_cases: members it memorises per site (stratified by class). With 2 cases, 60 decoder
            and 300 diffusion steps the control was caught at all three demo sites of run 10 but not at one of
            run 11 (AUC 0.864), where 600 diffusion steps (the default) or 120 decoder steps caught it (1.000;
            docs/benchmarks.md section 11); about 4 minutes for three sites on two cores.
        privacy_control_decoder_steps: its decoder fine-tuning steps on those cases (0 = the shipped decoder).
        privacy_control_steps: its diffusion fine-tuning steps on their latents.
        privacy_control_per_class: samples per class it draws (at the arm's steps and guidance).
        transport: how an artifact reaches the server: ``folder`` (each site's generator trained in a process of
            its own here, the artifact copied as a folder) or ``flower`` (one round over the federation's channel,
            :class:`synthlearn.strategies.catphishing_site.ArtifactUploadProtocol`: in simulation, or across
            machines with ``synthlearn server start``; verified on arrival).
        start_timeout_s: ``flower``: seconds the server waits for every site to connect.
        upload_timeout_s: ``flower``: seconds the server waits for the artifacts (the sites' generator training
            counts in it).
        release_gate: run the release gate at each site before its artifact leaves
            (:mod:`synthlearn.generators.ldm.release_gate`: SSIM membership inference with its controls, copy rate,
            white-box loss attack; a refused artifact stops the arm unless overridden). Absent: on with
            ``transport = "flower"`` (artifacts leave over a network), off with ``folder`` (one machine; ``audit``
            runs the same attacks after the fact). Needs ``holdout_fraction`` > 0 (>= 2 held-out cases a site).
        release_gate_override: a reason to release a refused artifact anyway (recorded in its manifest). Applies
            in simulation; a deployed site takes its override only from ``synthlearn site join --release-override``.
        gate: the gate's sampling, attacks and thresholds (``[catphishing.gate]``,
            :class:`synthlearn.generators.ldm.release_gate.ReleaseGateConfig`).
    """

    generator: str = "configs/generator_cpu.toml"
    per_class: int = 1600
    steps: int | None = None
    guidance: float | None = None
    holdout_fraction: float = 0.25
    diversity_filter: bool = True
    diversity_percentile: float = 20.0
    diversity_threshold_from: Literal["pairs", "nearest"] = "pairs"
    parallel_sites: int = 0
    threads_per_site: int = 1
    audit: bool = True
    fidelity_extractor: Literal["radiomics", "torch"] = "radiomics"
    fidelity_weights: str = ""
    fidelity_n: int = 300
    quality_n: int = 300
    privacy_n_synthetic: int | None = None
    task_augment_noise: float | None = None
    task_augment_intensity: float | None = None
    task_epochs: int | None = None
    privacy_control_generator: bool = True
    refiner: bool = True
    privacy_control_cases: int = 2
    privacy_control_decoder_steps: int = 60
    privacy_control_steps: int = 600
    privacy_control_per_class: int = 4
    transport: Literal["folder", "flower"] = "folder"
    start_timeout_s: float = 120.0
    upload_timeout_s: float = 172800.0
    release_gate: bool | None = None
    release_gate_override: str = ""
    gate: ReleaseGateConfig = dataclasses.field(default_factory=ReleaseGateConfig)

    @property
    def gate_on(self) -> bool:
        """Whether the release gate runs (``release_gate``, or by default with the ``flower`` transport)."""
        return self.release_gate if self.release_gate is not None else self.transport == "flower"

    def __post_init__(self) -> None:
        if self.release_gate is not None and not isinstance(self.release_gate, bool):
            raise ValueError(f"catphishing.release_gate must be true or false, found {self.release_gate!r}")
        if self.gate_on and self.holdout_fraction <= 0:
            raise ValueError("catphishing.release_gate needs held-out cases at every site (holdout_fraction > 0): the "
                             "gate attacks the generator with members against cases it never saw; or set "
                             "release_gate = false")
        if self.transport not in ("folder", "flower"):
            raise ValueError(f"catphishing.transport must be folder or flower, found {self.transport!r}")
        if self.start_timeout_s <= 0 or self.upload_timeout_s <= 0:
            raise ValueError("catphishing.start_timeout_s and upload_timeout_s must be > 0")
        if self.per_class < 1:
            raise ValueError(f"catphishing.per_class must be >= 1, found {self.per_class}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"catphishing.holdout_fraction must be in [0, 1), found {self.holdout_fraction}")
        if not 0.0 < self.diversity_percentile < 100.0:
            raise ValueError(f"catphishing.diversity_percentile must be in (0, 100), found "
                             f"{self.diversity_percentile}")
        if self.parallel_sites < 0 or self.threads_per_site < 1:
            raise ValueError(f"catphishing.parallel_sites must be >= 0 and threads_per_site >= 1, found "
                             f"{self.parallel_sites}, {self.threads_per_site}")
        if self.fidelity_n < 2 or self.quality_n < 1:
            raise ValueError(f"catphishing.fidelity_n must be >= 2 and quality_n >= 1, found {self.fidelity_n}, "
                             f"{self.quality_n}")
        if self.task_augment_noise is not None and not 0 <= self.task_augment_noise < 10:
            raise ValueError(f"catphishing.task_augment_noise must be in [0, 10) (z-score units) or absent, found "
                             f"{self.task_augment_noise}")
        if self.task_augment_intensity is not None and not 0 <= self.task_augment_intensity < 1:
            raise ValueError(f"catphishing.task_augment_intensity must be in [0, 1) or absent, found "
                             f"{self.task_augment_intensity}")
        if self.task_epochs is not None and (isinstance(self.task_epochs, bool) or not isinstance(self.task_epochs, int)
                                             or self.task_epochs < 1):
            raise ValueError(f"catphishing.task_epochs must be an integer >= 1 or absent, found {self.task_epochs!r}")
        for name, low in (("privacy_control_cases", 1), ("privacy_control_decoder_steps", 0),
                          ("privacy_control_steps", 1), ("privacy_control_per_class", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"catphishing.{name} must be an integer >= {low}, found {value!r}")
        if self.fidelity_extractor == "torch" and not self.fidelity_weights:
            raise ValueError("catphishing.fidelity_extractor = 'torch' needs fidelity_weights = '<path to a feature "
                             "network>' (synthlearn never downloads weights); or use 'radiomics'")


# ------------------------------------------------------------------------------------ site and server steps
def _site_worker(site_dir: str, gcfg, out: str, seed: int, case_ids: list[str], threads: int, site: str = "",
                 epochs_done=None) -> float:
    """Runs in its own process, given one site's folder only: train that site's generator, reporting every epoch
    of every stage on the ``epochs_done`` queue as ``(site, stage, done, total)``."""
    from synthlearn.generators.ldm.train import train_generator
    from synthlearn.runtime import configure_threads

    configure_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    hook = None
    if epochs_done is not None:
        def hook(stage: str, done: int, total: int) -> None:
            epochs_done.put((site, stage, done, total))
    t0 = time.perf_counter()
    train_generator(Path(site_dir), gcfg, Path(out), seed=seed, case_ids=case_ids, progress=False, on_epoch=hook)
    return time.perf_counter() - t0


def _gate_worker(artifact: str, site_dir: str, members: list[str], holdout: list[str], cfg: CatphishingConfig,
                 seed: int, state_dir: str, threads: int) -> dict[str, Any]:
    """Runs at a site, given that site's folder only: the release gate on its artifact (:func:`gate_artifact`)."""
    from synthlearn.runtime import configure_threads

    configure_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    entry = gate_artifact(artifact, site_dir, members, holdout, cfg, seed, cfg.release_gate_override, state_dir)
    return {"wall_s": time.perf_counter() - t0, "entry": entry}


def _server_worker(artifact: str, out: str, per_class: int, seed: int, steps: int | None, guidance: float | None,
                   label: str, filter_cfg: tuple[bool, float, str] | None, threads: int, refine: bool = True) -> dict:
    """Runs at the server: synthesize from one artifact, then the diversity filter on its cases."""
    from synthlearn.runtime import configure_threads
    from synthlearn.generators.ldm.sample import synthesize
    from synthlearn.synthesis.diversity import filter_site

    configure_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    if not (Path(out) / "synthesis.json").is_file():
        synthesize(Path(artifact), per_class, Path(out), seed=seed, steps=steps, guidance=guidance, refine=refine,
                   progress=False)
    t1 = time.perf_counter()
    if filter_cfg is not None and not (Path(out) / "diversity.json").is_file():
        _, percentile, threshold_from = filter_cfg
        filter_site(out, percentile, threshold_from=threshold_from, label_column=label)
    return {"synthesis_s": t1 - t0, "filter_s": time.perf_counter() - t1}


def _control_worker(artifact: str, site_dir: str, case_ids: list[str], out: str, steps: int, decoder_steps: int,
                    per_class: int, seed: int, sample_steps: int | None, guidance: float | None,
                    threads: int) -> dict[str, Any]:
    """Runs at a site, given that site's folder only: the generator positive control (over-fit, then sample).
    A control that fails (e.g. its samples have no tumour) is reported, not fatal: ``{"wall_s", "error"}``."""
    from synthlearn.runtime import configure_threads
    from synthlearn.generators.ldm.sample import synthesize
    from synthlearn.generators.ldm.memorising import train_memorising_generator

    configure_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    root = Path(out)
    error = None
    if not (root / "synthetic" / "synthesis.json").is_file():
        try:
            train_memorising_generator(Path(artifact), Path(site_dir), case_ids, root / "artifact", steps=steps,
                                       decoder_steps=decoder_steps, seed=seed)
            synthesize(root / "artifact", per_class, root / "synthetic", seed=seed, steps=sample_steps,
                       guidance=guidance, progress=False)
        except (ValueError, RuntimeError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    return {"wall_s": time.perf_counter() - t0, "error": error}


def control_cases(members: list[str], site: SiteRecord, label: str, n: int, seed: int) -> list[str]:
    """The ``n`` members the generator positive control memorises: drawn class by class in turn (seeded), sorted."""
    by_class: dict[str, list[str]] = {}
    labels = {c.case_id: c.labels.get(label) or "unknown" for c in site.cases}
    for cid in sorted(members):
        by_class.setdefault(labels[cid], []).append(cid)
    queues = {cls: [ids[i] for i in numpy_generator(seed, "privacy-control", site.name, cls).permutation(len(ids))]
              for cls, ids in sorted(by_class.items())}
    chosen: list[str] = []
    while len(chosen) < min(n, len(members)):
        for cls in sorted(queues):
            if queues[cls] and len(chosen) < n:
                chosen.append(queues[cls].pop(0))
    return sorted(chosen)


def _pool(n_jobs: int, cfg: CatphishingConfig) -> ProcessPoolExecutor:
    import multiprocessing

    cpus = os.cpu_count() or 1
    parallel = cfg.parallel_sites or max(1, min(n_jobs, cpus // cfg.threads_per_site))
    return ProcessPoolExecutor(max_workers=max(1, min(parallel, n_jobs)),
                               mp_context=multiprocessing.get_context("spawn"))


def _run_jobs(jobs: dict[str, tuple], fn, cfg: CatphishingConfig, desc: str, progress: bool,
              epochs_per_job: int = 0) -> dict[str, Any]:
    """Run ``fn(*args)`` for every site in worker processes, with a progress bar over sites or, with
    ``epochs_per_job``, over every site's epochs: ``fn`` then also gets ``site`` and a queue on which it reports
    ``(site, stage, done, total)`` after each epoch, shown per site beside the bar."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, wait
    from queue import Empty

    from tqdm.auto import tqdm

    if not jobs:
        return {}
    results = {}
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(_pool(len(jobs), cfg))
        queue = None
        if epochs_per_job:
            queue = stack.enter_context(multiprocessing.get_context("spawn").Manager()).Queue()
        futures = {pool.submit(fn, *args, *((site, queue) if queue is not None else ())): site
                   for site, args in jobs.items()}
        total, unit = (len(futures) * epochs_per_job, "epoch") if queue is not None else (len(futures), "site")
        bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)
        where: dict[str, str] = {}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            if queue is not None:
                try:
                    while True:
                        site, stage, n, of = queue.get_nowait()
                        where[site] = f"{stage} {n}/{of}"
                        bar.update(1)
                        bar.set_postfix_str(", ".join(f"{k}: {v}" for k, v in sorted(where.items())))
                except Empty:
                    pass
            for fut in done:
                site = futures[fut]
                try:
                    results[site] = fut.result()
                except Exception as exc:
                    if isinstance(exc, ReleaseRefused):
                        raise ReleaseRefused(f"catphishing: site {site}: {exc}", exc.decision) from None
                    raise RuntimeError(f"catphishing: {desc} failed at site {site}: {type(exc).__name__}: "
                                       f"{exc}") from exc
                if queue is None:
                    bar.update(1)
                where[site] = "done"
                log.info("catphishing: %s done for site %s", desc, site)
        bar.close()
    return results


def _kept_cases(syn_dir: Path, use_filter: bool) -> tuple[list[CaseRecord], list[CaseRecord]]:
    """All synthetic cases of a site folder and those the diversity filter kept."""
    from synthlearn.data.layouts import open_study
    from synthlearn.synthesis.diversity import read_kept_case_ids

    cases = sorted(open_study(syn_dir).sites[0].cases, key=lambda c: c.case_id)
    if not use_filter:
        return cases, cases
    kept = set(read_kept_case_ids(syn_dir))
    return cases, [c for c in cases if c.case_id in kept]


# ------------------------------------------------------------------------------------------------ figures
def plot_fid_matrix(result: dict, path: Path) -> Path:
    """Heatmaps of the cross-site Frechet distance (synthetic site rows x real site columns), one panel per
    sequence (paper Table 3)."""
    from synthlearn.report.plots import _pyplot

    plt = _pyplot()
    seqs = result["sequences"]
    fig, axes = plt.subplots(1, len(seqs), figsize=(3.2 * len(seqs), 3.2), squeeze=False)
    for ax, s in zip(axes[0], seqs):
        m = np.asarray(result["matrix"][s], dtype=float)
        im = ax.imshow(m, cmap="viridis")
        ax.set_title(f"{s}: Frechet radiomics distance", fontsize=8)
        ax.set_xticks(range(len(result["real_sites"])), [f"real {x}" for x in result["real_sites"]],
                      rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(result["synthetic_sites"])), [f"syn {x}" for x in result["synthetic_sites"]],
                      fontsize=7)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < np.nanmean(m) else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pair_by_class(real: list[CaseRecord], synthetic: list[CaseRecord], label: str,
                  n: int) -> list[tuple[CaseRecord, CaseRecord]]:
    """Up to ``n`` (real, synthetic) pairs of one site with the same ``label`` class in each pair, the classes
    taken in turn (so two pairs of a binary label show one case of each class), in the cases' order."""
    def by_class(cases: list[CaseRecord]) -> dict[Any, list[CaseRecord]]:
        out: dict[Any, list[CaseRecord]] = {}
        for c in cases:
            out.setdefault(c.labels.get(label), []).append(c)
        return out

    rb, sb = by_class(real), by_class(synthetic)
    classes = [k for k in sb if k in rb]
    pairs: list[tuple[CaseRecord, CaseRecord]] = []
    i = 0
    while len(pairs) < n and any(i < min(len(rb[k]), len(sb[k])) for k in classes):
        for k in classes:
            if i < min(len(rb[k]), len(sb[k])) and len(pairs) < n:
                pairs.append((rb[k][i], sb[k][i]))
        i += 1
    return pairs


def draw_synthetic_vs_real(real: dict[str, list[CaseRecord]], synthetic: dict[str, list[CaseRecord]],
                           label: str, path: Path, per_site: int = 2) -> Path:
    """Paper Fig. 2: for each site, ``per_site`` real and synthetic cases of the same class (the classes in turn,
    :func:`pair_by_class`) with their tumour contours, rows alternating real / synthetic."""
    from synthlearn.report.grid import draw_case_grid

    cases, titles = [], []
    for site in synthetic:
        for a, b in pair_by_class(list(real.get(site, [])), list(synthetic[site]), label, per_site):
            cases += [a, b]
            titles += [f"REAL {site} {a.case_id}: {label} {a.labels.get(label)}",
                       f"SYNTHETIC {site} {b.case_id}: {label} {b.labels.get(label)}"]
    return draw_case_grid(cases, path, title="Real (odd rows) vs synthetic (even rows) cases per site, same class "
                          "in each pair", row_titles=titles)


# --------------------------------------------------------------------------------------------------- audits
def privacy_attack_set(synthetic: list, n: int | None, seed: int, site: str) -> list:
    """The synthetic cases of ``site`` the membership attack compares against: all of them, or a seeded
    subset of ``n`` (``CatphishingConfig.privacy_n_synthetic``) in their original order."""
    if n is None or len(synthetic) <= n:
        return list(synthetic)
    idx = numpy_generator(seed, "privacy-synthetic", site).choice(len(synthetic), n, replace=False)
    return [synthetic[i] for i in sorted(idx)]


def run_audits(ctx: ArmContext, cfg: CatphishingConfig, label: str, members: dict[str, list[str]],
               holdout: dict[str, list[str]], generated: dict[str, list[CaseRecord]],
               kept: dict[str, list[CaseRecord]],
               controls: dict[str, tuple[list[str], list[CaseRecord]]] | None = None) -> dict[str, Any]:
    """Fidelity, image quality and privacy of every site's synthetic data (see the module docstring);
    ``controls``: site -> (memorised member ids, samples) of the generator positive control."""
    from synthlearn.audits.fidelity import TorchFeatures, fidelity
    from synthlearn.audits.quality import image_quality
    from synthlearn.audits.privacy import audit_site

    pre = ctx.setup.preprocess
    figures = ctx.arm_dir / "figures"
    real = {s.name: list(s.cases) for s in ctx.train_sites}
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    extractor: Any = "radiomics"
    if cfg.fidelity_extractor == "torch":
        extractor = TorchFeatures(weights_path=cfg.fidelity_weights)
    fid = fidelity(real, kept, extractor=extractor, n_real=cfg.fidelity_n, n_synthetic=cfg.fidelity_n,
                   seed=ctx.setup.seed, preprocess=pre, progress=ctx.progress)
    fid["figure"] = str(plot_fid_matrix(fid, figures / "fid_matrix.png").relative_to(ctx.arm_dir.parent))
    fid["wall_s"] = time.perf_counter() - t0
    out["fidelity"] = fid
    t0 = time.perf_counter()
    iq = image_quality(real, kept, n_real=cfg.quality_n, n_synthetic=cfg.quality_n, seed=ctx.setup.seed,
                       preprocess=pre)
    iq["wall_s"] = time.perf_counter() - t0
    out["image_quality"] = iq
    draw_synthetic_vs_real(real, kept, label, figures / "synthetic_vs_real.png")
    privacy: dict[str, Any] = {}
    by_id = {s.name: {c.case_id: c for c in s.cases} for s in ctx.train_sites}
    # the synthetic cases each site's attack compares against
    attacked = {site: privacy_attack_set(syn, cfg.privacy_n_synthetic, ctx.setup.seed, site)
                for site, syn in generated.items()}
    for site in generated:
        if not holdout[site] or len(holdout[site]) < 2 or len(members[site]) < 2:
            privacy[site] = {"skipped": f"needs >= 2 held-out and >= 2 member cases (holdout_fraction "
                                        f"{cfg.holdout_fraction}; found {len(holdout[site])} and {len(members[site])})"}
            continue
        t0 = time.perf_counter()
        memorised, control = (controls or {}).get(site, (None, None))
        # the reference control: the other sites' generators never saw this site's cases
        reference = {other: syn for other, syn in attacked.items() if other != site and syn}
        result = audit_site([by_id[site][i] for i in members[site]], [by_id[site][i] for i in holdout[site]],
                            attacked[site], preprocess=pre, seed=ctx.setup.seed,
                            montage_path=figures / f"privacy_closest_{site}.png", control_synthetic=control,
                            control_case_ids=memorised, reference_synthetic=reference or None,
                            progress=ctx.progress)
        if result.get("montage"):
            result["montage"] = str(Path(result["montage"]).relative_to(ctx.arm_dir.parent))
        result["wall_s"] = time.perf_counter() - t0
        privacy[site] = result
    out["privacy"] = privacy
    ref_arm = ctx.needed.get(RECOGNITION_REFERENCE)
    ref_dir = (ref_arm / "model") if ref_arm is not None else None
    if ref_dir is not None and (ref_dir / "model.json").is_file():
        from synthlearn.tasks.model import TaskModel

        t0 = time.perf_counter()
        rec = recognition_audit(TaskModel.load(ref_dir), kept, seed=ctx.setup.seed, progress=ctx.progress)
        rec["wall_s"] = time.perf_counter() - t0
        out["recognition"] = rec
    else:
        out["recognition"] = {"skipped": f"no {RECOGNITION_REFERENCE} model in this run; run the "
                                         f"{RECOGNITION_REFERENCE} arm before catphishing to get it"}
    return out


# ------------------------------------------------------------------------------------------------------ arm
def run(ctx: ArmContext) -> ArmOutput:
    """Train one generator per training site, synthesize, filter, train the task model on synthetic data."""
    from synthlearn.generators.artifact import artifact_bytes, read_manifest, verify_artifact

    cfg: CatphishingConfig = ctx.arm_config
    task = ctx.setup.task
    label = GENERATOR_LABEL[task]
    gcfg = load_generator_for_task(cfg.generator, task)
    seed = ctx.setup.seed
    arm_dir = ctx.arm_dir
    sites = {s.name: s for s in ctx.train_sites}
    for s in ctx.train_sites:
        if s.path is None:
            raise ValueError(f"catphishing: training site {s.name} has no folder; every site trains its generator "
                             f"on its own folder")

    # 1. at each site: privacy holdout, then the generator on the remaining cases. A further seed of a multi-seed
    # run (ctx.primary_dir) reuses the primary seed's holdout and generators: only the synthetic draw and the task
    # model depend on the seed.
    primary = ctx.primary_dir
    remote = not any(s.cases for s in ctx.train_sites)  # a deployed study: the sites' cases are on their machines
    if remote:
        _deploy_check(cfg)
    members, holdout = {}, {}
    for name, site in sites.items():
        if remote:
            members[name], holdout[name] = [], []  # the site keeps its split
            continue
        if primary is not None:
            split = json.loads((primary / "holdout" / f"{name}.json").read_text())
            members[name], holdout[name] = list(split["members"]), list(split["holdout"])
            continue
        members[name], holdout[name] = privacy_holdout(site, cfg.holdout_fraction, label, seed)
        write_json(arm_dir / "holdout" / f"{name}.json",
                   {"site": name, "fraction": cfg.holdout_fraction, "members": members[name],
                    "holdout": holdout[name], "note": "stays at the site: the privacy audit's non-members"})
    artifacts = {name: (primary or arm_dir) / "artifacts" / name for name in sites}
    if primary is not None:
        missing = [str(a) for a in artifacts.values() if not (a / "manifest.json").is_file()]
        if missing:
            raise ValueError(f"catphishing (seed {seed}): the primary seed's generator artifacts are missing: {missing}")
    todo = [name for name in sites if not (artifacts[name] / "manifest.json").is_file()]
    log.info("catphishing: training %d site generator(s) (%d already done)", len(todo), len(sites) - len(todo))
    t0 = time.perf_counter()
    upload: dict[str, dict[str, Any]] = {}
    upload_bytes = 0
    if cfg.transport == "flower":
        if todo:  # one round over the federation's channel: every site trains and sends its artifact
            if ctx.federate is None:
                raise ValueError("catphishing.transport = 'flower' needs the study runner's Flower runner "
                                 "(ctx.federate); run the arm through `synthlearn study run` or `server start`")
            final = ctx.federate(ArtifactUploadProtocol(ctx.setup, cfg, received_dir=arm_dir / "artifacts"),
                                 ctx.train_sites, arm_dir / "upload", progress=ctx.progress)
            upload = final.history[-1]["artifacts"] if final.history else {}
            upload_bytes = final.bytes_from_sites
        walls = {name: entry["wall_s"] for name, entry in upload.items()}
    else:
        jobs = {name: (str(sites[name].path), gcfg, str(artifacts[name]), seed, members[name], cfg.threads_per_site)
                for name in todo}
        learned_ae = gcfg.autoencoder.kind != "space_to_depth"  # a space-to-depth stage 1 has nothing to train
        stage_epochs = (gcfg.autoencoder.epochs * learned_ae + gcfg.superres.epochs + gcfg.diffusion.epochs
                        + gcfg.refiner.epochs)
        walls = _run_jobs(jobs, _site_worker, cfg, "site generators", ctx.progress, epochs_per_job=stage_epochs)
        if cfg.gate_on:  # before anything leaves a site: every artifact without a released decision is gated
            jobs = {name: (str(artifacts[name]), str(sites[name].path), members[name], holdout[name], cfg, seed,
                           str(arm_dir / "release_gate" / name), cfg.threads_per_site)
                    for name in sites if not (read_manifest(artifacts[name]).get("release_gate") or {}).get("released")}
            gate_t0 = time.perf_counter()
            _run_jobs(jobs, _gate_worker, cfg, "release gate", ctx.progress)
            log.info("catphishing: release gate at %d site(s) in %.0f s", len(jobs), time.perf_counter() - gate_t0)
    generator_wall = time.perf_counter() - t0
    shipped = {}
    for name in sites:
        verify_artifact(artifacts[name])  # what arrives at the server is checked before use
        manifest = read_manifest(artifacts[name])
        counts = upload.get(name, {})
        shipped[name] = {"bytes": artifact_bytes(artifacts[name]),
                         "training_cases": counts.get("training_cases", len(members[name])),
                         "holdout_cases": counts.get("holdout_cases", len(holdout[name])),
                         "class_counts": manifest["class_counts"],
                         "wall_s": walls.get(name, manifest["training"]["wall_time_s"]),
                         "release_gate": gate_summary(manifest.get("release_gate")),
                         "privacy": manifest.get("privacy", {"dp_sgd": False})}

    # 2. at the server: synthesize, filter, train the task model on the pooled kept cases
    syn_dirs = {name: arm_dir / "synthetic" / name for name in sites}
    filter_cfg = (True, cfg.diversity_percentile, cfg.diversity_threshold_from) if cfg.diversity_filter else None
    jobs = {name: (str(artifacts[name]), str(syn_dirs[name]), cfg.per_class, derive_seed(seed, "synthesize", name),
                   cfg.steps, cfg.guidance, label, filter_cfg, cfg.threads_per_site, cfg.refiner)
            for name in sites if not ((syn_dirs[name] / "synthesis.json").is_file()
                                      and (filter_cfg is None or (syn_dirs[name] / "diversity.json").is_file()))}
    t0 = time.perf_counter()
    server_times = _run_jobs(jobs, _server_worker, cfg, "synthesis + diversity filter", ctx.progress)
    synthesis_wall = time.perf_counter() - t0
    generated, kept, synthetic = {}, {}, {}
    for name in sites:
        generated[name], kept[name] = _kept_cases(syn_dirs[name], cfg.diversity_filter)
        synthesis = json.loads((syn_dirs[name] / "synthesis.json").read_text())
        entry: dict[str, Any] = {"generated": len(generated[name]), "kept": len(kept[name]),
                                 "per_class": synthesis["classes"], **server_times.get(name, {})}
        if cfg.diversity_filter:
            div = json.loads((syn_dirs[name] / "diversity.json").read_text())
            entry["diversity"] = {k: div[k] for k in ("n_before", "n_after", "percentile", "threshold_from",
                                                      "threshold", "per_class", "n_close_pairs")}
        synthetic[name] = entry
    pooled = [c for name in sites for c in kept[name]]
    if not pooled:
        raise ValueError("catphishing: no synthetic case survived synthesis and filtering; see "
                         f"{arm_dir / 'synthetic'}")
    log.info("catphishing: training the task model on %d synthetic cases (%s)", len(pooled),
             ", ".join(f"{n}: {len(kept[n])}/{len(generated[n])} kept" for n in sites))
    t0 = time.perf_counter()
    setup = ctx.setup
    train_over = {k: v for k, v in (("augment_noise", cfg.task_augment_noise),
                                    ("augment_intensity", cfg.task_augment_intensity), ("epochs", cfg.task_epochs))
                  if v is not None}  # the arm's own task-training settings; everything else is the study's
    if train_over:
        setup = dataclasses.replace(setup, train=dataclasses.replace(setup.train, **train_over))
    model = train_task_model(pooled, setup, arm_dir, cache=ctx.cache, progress=ctx.progress,
                             label="catphishing")
    task_wall = time.perf_counter() - t0
    model.info.update(synthetic_training_cases=len(pooled), trained_on="synthetic cases only")
    model.save(arm_dir / "model")  # model.json records what it was trained on

    extra: dict[str, Any] = {
        "generators": shipped,
        "synthetic": synthetic,
        "diversity": {n: {"generated": synthetic[n]["generated"], "kept": synthetic[n]["kept"],
                          "kept_share": synthetic[n]["kept"] / max(1, synthetic[n]["generated"])} for n in sites},
        "holdout_fraction": cfg.holdout_fraction,
        "transport": cfg.transport,
        **({"upload_message_bytes": upload_bytes} if upload_bytes else {}),
        "stage_wall_s": {"site_generators": generator_wall, "synthesis_and_filter": synthesis_wall,
                         "task_model": task_wall},
    }
    if primary is not None:
        extra["audits"] = f"run once, with the primary seed's synthetic cases ({primary})"
    if cfg.audit and primary is None:
        t0 = time.perf_counter()
        controls: dict[str, tuple[list[str], list[CaseRecord]]] = {}
        failed: dict[str, str] = {}
        if cfg.privacy_control_generator:
            from synthlearn.data.layouts import open_study

            control_dirs = {name: arm_dir / "privacy_control" / name for name in sites}
            memorised = {name: control_cases(members[name], sites[name], label, cfg.privacy_control_cases, seed)
                         for name in sites if len(holdout[name]) >= 2 and len(members[name]) >= 2}
            jobs = {name: (str(artifacts[name]), str(sites[name].path), memorised[name], str(control_dirs[name]),
                           cfg.privacy_control_steps, cfg.privacy_control_decoder_steps, cfg.privacy_control_per_class,
                           derive_seed(seed, "privacy-control", name), cfg.steps, cfg.guidance, cfg.threads_per_site)
                    for name in memorised}
            done = _run_jobs(jobs, _control_worker, cfg, "privacy: generator positive controls", ctx.progress)
            failed = {name: r["error"] for name, r in done.items() if r["error"]}
            for name, error in failed.items():
                log.warning("catphishing: the generator positive control failed at site %s: %s", name, error)
            controls = {name: (memorised[name], list(open_study(control_dirs[name] / "synthetic").sites[0].cases))
                        for name in memorised if name not in failed}
            extra["stage_wall_s"]["privacy_controls"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        extra.update(run_audits(ctx, cfg, label, members, holdout, generated, kept, controls))
        for name, error in failed.items():  # these sites were audited (same condition as the control)
            extra["privacy"][name].update(positive_control_generator={"skipped": f"the control failed: {error}"},
                                          positive_control_generator_caught=False)
        extra["stage_wall_s"]["audits"] = time.perf_counter() - t0
    return ArmOutput(models={ctx.name: model}, bytes_from_sites=sum(v["bytes"] for v in shipped.values()),
                     rounds=1, extra=extra)


def _deploy_check(cfg: CatphishingConfig) -> None:
    if cfg.transport != "flower" or cfg.audit:
        raise ValueError("catphishing across machines (the training sites' cases are not at the server) needs "
                         f"[catphishing] transport = 'flower' and audit = false (found transport = {cfg.transport!r}, "
                         f"audit = {cfg.audit}): the audits read each site's cases")


def _check(cfg: CatphishingConfig, task: str) -> None:
    load_generator_for_task(cfg.generator, task)  # a missing or bad generator config fails before any training


def _signature(cfg: CatphishingConfig, task: str) -> dict[str, Any]:
    return {"generator": to_dict(load_generator_for_task(cfg.generator, task))}  # its content, not its path


ARM = ArmSpec(name="catphishing", run=run, config=CatphishingConfig, needs=(RECOGNITION_REFERENCE,), check=_check,
              signature=_signature, generic_data=False, protocol=ArtifactUploadProtocol, deploy_check=_deploy_check,
              description="a generator trained at each site, shipped once; the server trains on its synthetic cases only "
              "(paper 000)")

__all__ = ["ARM", "CatphishingConfig", "GENERATOR_LABEL", "RECOGNITION_REFERENCE", "draw_synthetic_vs_real",
           "control_cases", "load_generator_for_task", "pair_by_class", "plot_fid_matrix", "privacy_holdout",
           "run", "run_audits"]
