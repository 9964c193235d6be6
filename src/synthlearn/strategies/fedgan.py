"""The ``fedgan`` arm: FedGAN (paper 002), a DCGAN pretrained on a public pool and fine-tuned by federated
averaging of its generator *and* discriminator across the sites.

Paper 002 trains a DCGAN on diabetic-retinopathy fundus images at 3, 5, 7 and 10 sites: every round each site
trains both networks for some local epochs on its own images, sends them to the server, and the server averages
them weighted by the sites' image counts (FedAvg, McMahan et al. 2017, applied to both players of the GAN; the
BatchNorm running statistics are part of the averaged state). Before round 1 the server may pretrain the pair on
a large pool it may see (``pretrain_study``: e.g. the pooled fundus images of a disjoint population); the sites
then fine-tune it. What leaves a site is the two networks' weights each round (as in FedAvg), never an image.

After the federation the server draws ``per_class`` images per class of the task's label column from the
averaged generator (class-conditional by default; an unconditional generator cannot label its images, so a
classification study needs ``conditional = true``), writes them as a one-site study of the data contract, and
trains the same task model as the other arms on them.

Images: the study's preprocessed cases (the task model's grid and z-score per channel), mapped to the
generator's ``[-1, 1]`` as ``clip(x / intensity_scale, -1, 1)`` (:func:`synthlearn.strategies.asyndgan.
generator_range`), plus one channel for the case's segmentation (``seg > 0`` as +1, else -1; the whole image
when a case has none): the generator draws an image and its mask together, as CATphishing's draws the tumour with
the sequences, because the task model reads a case's class on its mask (the tumour of a glioma slice, the camera's
field of view of a fundus image). Generated images are mapped back, their mask thresholded at 0 (written as
:data:`synthlearn.synthesis.cases.SYNTHETIC_TUMOUR_LABEL`), and pixels whose channels all stay within
``background_threshold`` of 0 are set to exactly 0 (the contract's background, e.g. outside a fundus camera's
circular field of view; not where that would leave less than 1 % of the image). The grid must be square with a
power-of-two side >= 32 (DCGAN's 4x4 seed doubled).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from synthlearn.data.contract import CaseRecord, SiteRecord
from synthlearn.models.dcgan import DCGANConfig, DCGANDiscriminator, DCGANGenerator, init_dcgan_weights
from synthlearn.protocol import (
    Arrays,
    FederationError,
    FederationState,
    RoundProtocol,
    SiteReply,
    run_protocol_inprocess,
)
from synthlearn.strategies.asyndgan import generator_range, write_synthetic_study
from synthlearn.strategies.base import ArmContext, ArmOutput
from synthlearn.strategies.fedavg import weighted_average
from synthlearn.strategies.registry import ArmSpec
from synthlearn.tasks.cache import DatasetCache
from synthlearn.tasks.setup import TrainingSetup
from synthlearn.training.checkpoint import load_checkpoint, save_checkpoint
from synthlearn.training.dcgan import sample_dcgan, train_dcgan_epochs
from synthlearn.training.seeding import derive_seed

log = logging.getLogger(__name__)

NETWORKS = ("generator", "discriminator")


@dataclasses.dataclass(frozen=True)
class FedGANConfig:
    """FedGAN settings (the ``[fedgan]`` table of a study config).

    Attributes:
        rounds: communication rounds.
        local_epochs: epochs of both networks at each site per round.
        latent_dim, generator_width, discriminator_width, lr, beta1, batch_size, label_smoothing:
            :class:`synthlearn.models.dcgan.DCGANConfig` (paper 002: DCGAN, Adam 2e-4, beta1 0.5).
        conditional: class-conditional DCGAN on the task's label (needed to label the synthetic images).
        minibatch_std: the discriminator sees its features' spread across the batch
            (:class:`synthlearn.models.dcgan.DCGANConfig`; against mode collapse, not in paper 002).
        conditioning: how the discriminator sees the class (:class:`synthlearn.models.dcgan.DCGANConfig`).
        preprocessing: what the GAN learns from: ``study``: the task model's preprocessing (crop, fit, z-score; the
            module docstring), so generated images are in the units the task model reads; ``paper``: paper 002's
            (:func:`synthlearn.data.fundus_preprocess.preprocess_fundus`: resize to the grid, CLAHE, per-image
            normalisation, gamma, [-1, 1]) on each image min-max scaled to [0, 1], and generated images are written
            back in [0, 1]. ``paper`` images carry CLAHE's contrast, which the real test images do not: the
            downstream comparison with the other arms uses ``study``.
        paper_clahe_clip, paper_gamma: ``preprocess_fundus``'s ``clahe_clip`` and ``gamma`` (``paper`` only).
        intensity_scale: z-score units that map to 1 in the generator's range.
        background_threshold: generated pixels whose channels all lie within this of 0 (generator range) are
            written as exact background 0.
        pretrain_study: a study folder whose training sites the server pools to pretrain both networks before
            round 1 (paper 002: a large public pool); "" = start from DCGAN's random initialisation.
        pretrain_epochs: epochs of that pretraining.
        pretrained: a ``pretrained.pt`` an earlier ``fedgan`` run wrote (its networks after pretraining) to start
            from instead of pretraining again (e.g. every federation of a sweep shares one pool); its networks must
            fit this study's DCGAN. "" = pretrain as ``pretrain_study`` says.
        per_class: synthetic images drawn per class.
        backend: ``flower`` (the real message path) or ``inprocess`` (the same rounds as function calls).
        start_timeout_s, round_timeout_s, threads_per_site, parallel_sites: as for FedAvg.
        task_epochs: epochs of the task model on the synthetic images (None = the study's).
    """

    rounds: int = 10
    local_epochs: int = 1
    latent_dim: int = 64
    generator_width: int = 32
    discriminator_width: int = 32
    conditional: bool = True
    minibatch_std: bool = True
    conditioning: Literal["projection", "concat"] = "concat"
    lr: float = 2e-4
    beta1: float = 0.5
    batch_size: int = 32
    label_smoothing: float = 0.0
    preprocessing: Literal["study", "paper"] = "study"
    paper_clahe_clip: float = 0.01
    paper_gamma: float = 1.0
    intensity_scale: float = 3.0
    background_threshold: float = 0.02
    pretrain_study: str = ""
    pretrain_epochs: int = 0
    pretrained: str = ""
    per_class: int = 100
    backend: Literal["flower", "inprocess"] = "flower"
    start_timeout_s: float = 120.0
    round_timeout_s: float = 3600.0
    threads_per_site: int = 1
    parallel_sites: int = 0
    task_epochs: int | None = None

    def __post_init__(self) -> None:
        for key in ("rounds", "local_epochs", "latent_dim", "generator_width", "discriminator_width", "batch_size",
                    "per_class", "threads_per_site"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"fedgan.{key} must be >= 1, found {getattr(self, key)}")
        for key in ("lr", "intensity_scale", "start_timeout_s", "round_timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"fedgan.{key} must be > 0, found {getattr(self, key)}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"fedgan.beta1 must be in [0, 1), found {self.beta1}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"fedgan.label_smoothing must be in [0, 0.5), found {self.label_smoothing}")
        if not 0 <= self.background_threshold < 1:
            raise ValueError(f"fedgan.background_threshold must be in [0, 1), found {self.background_threshold}")
        if self.pretrain_epochs < 0:
            raise ValueError(f"fedgan.pretrain_epochs must be >= 0, found {self.pretrain_epochs}")
        if self.pretrained and self.pretrain_epochs:
            raise ValueError("fedgan.pretrained and fedgan.pretrain_epochs exclude each other: start from a pretrained "
                             "pair, or pretrain one")
        if self.pretrain_epochs and not self.pretrain_study:
            raise ValueError("fedgan.pretrain_epochs > 0 needs fedgan.pretrain_study (the pool to pretrain on)")
        if self.preprocessing not in ("study", "paper"):
            raise ValueError(f"fedgan.preprocessing must be study or paper, found {self.preprocessing!r}")
        if not 0 < self.paper_clahe_clip <= 1 or not self.paper_gamma > 0:
            raise ValueError(f"fedgan.paper_clahe_clip must be in (0, 1] and paper_gamma > 0, found "
                             f"{self.paper_clahe_clip}, {self.paper_gamma}")
        if self.backend not in ("flower", "inprocess"):
            raise ValueError(f"fedgan.backend must be flower or inprocess, found {self.backend!r}")
        if self.task_epochs is not None and self.task_epochs < 1:
            raise ValueError(f"fedgan.task_epochs must be >= 1, found {self.task_epochs}")


def dcgan_config(setup: TrainingSetup, cfg: FedGANConfig) -> DCGANConfig:
    """The DCGAN of a study: its grid's side, its channels, the task's classes when conditional.

    Raises:
        ValueError: the study is not 2D on a square grid whose side is a power of two >= 32.
    """
    shape = tuple(int(s) for s in setup.preprocess.shape)
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 32 or shape[0] & (shape[0] - 1):
        raise ValueError(f"fedgan: DCGAN draws square 2D images with a power-of-two side >= 32; the study's "
                         f"preprocessed grid is {shape} (set [preprocess] shape, e.g. [64, 64])")
    return DCGANConfig(image_size=shape[0], channels=len(setup.sequences) + 1, latent_dim=cfg.latent_dim,
                       generator_width=cfg.generator_width, discriminator_width=cfg.discriminator_width,
                       num_classes=len(setup.task_spec.class_names) if cfg.conditional else 0, lr=cfg.lr,
                       beta1=cfg.beta1, batch_size=cfg.batch_size, label_smoothing=cfg.label_smoothing,
                       minibatch_std=cfg.minibatch_std, conditioning=cfg.conditioning)


def build_networks(dcfg: DCGANConfig, seed: int) -> tuple[DCGANGenerator, DCGANDiscriminator]:
    """A freshly initialised generator and discriminator (DCGAN's N(0, 0.02) init), the same for a seed."""
    torch.manual_seed(seed)
    gen, disc = DCGANGenerator(dcfg), DCGANDiscriminator(dcfg)
    gen.apply(init_dcgan_weights)
    disc.apply(init_dcgan_weights)
    return gen, disc


def load_images(cases: Sequence[CaseRecord], setup: TrainingSetup, cfg: FedGANConfig,
                cache: DatasetCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Cases as the GAN sees them: images ``(N, C + 1, S, S)`` float32 in ``[-1, 1]`` (the C channels, then the
    mask: +1 where ``seg > 0``, -1 elsewhere; +1 everywhere for a case without a segmentation) and class indices
    ``(N,)`` long of the task's label (-1 unknown).

    Raises:
        ValueError: no case.
    """
    if not cases:
        raise ValueError("fedgan: no case to train on")
    task = setup.task_spec
    images, labels = [], []
    if cfg.preprocessing == "paper":
        side = int(setup.preprocess.shape[0])
        arrays = [paper_arrays(case, side, cfg) for case in cases]
    else:
        view = cache.dataset(list(cases))
        arrays = [view.arrays(i) for i in range(len(cases))]
    for case, (x, seg) in zip(cases, arrays):
        if cfg.preprocessing == "study":
            x = generator_range(x, cfg.intensity_scale)
        mask = np.ones(x.shape[1:], np.float32) if seg is None else np.where(np.asarray(seg) > 0, 1.0, -1.0)
        images.append(np.concatenate([x, mask[None].astype(np.float32)]))
        label = task.label(case.labels) if case.labels is not None else None
        labels.append(-1 if label is None else int(label))
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long)


def paper_arrays(case: CaseRecord, side: int, cfg: FedGANConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """A case as paper 002 preprocesses it: ``(C, side, side)`` float32 in [-1, 1] (min-max to [0, 1], then
    :func:`synthlearn.data.fundus_preprocess.preprocess_fundus`) and its segmentation resized (nearest) or None."""
    from skimage.transform import resize

    from synthlearn.data.fundus_preprocess import preprocess_fundus
    from synthlearn.data.io import read_case

    arrays = read_case(case, seg_optional=True)
    img = arrays.images.reshape(arrays.images.shape[0], *arrays.images.shape[1:3]).astype(np.float64)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    x = preprocess_fundus(img, side, clahe_clip=cfg.paper_clahe_clip, gamma=cfg.paper_gamma)
    seg = None
    if arrays.seg is not None:
        seg = resize(arrays.seg.reshape(arrays.seg.shape[:2]), (side, side), order=0, preserve_range=True,
                     anti_aliasing=False).astype(np.int64)
    return x.astype(np.float32), seg


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train(gen, disc, images: torch.Tensor, labels: torch.Tensor, dcfg: DCGANConfig, epochs: int, seed: int
           ) -> dict[str, list[float]]:
    known = labels >= 0
    if dcfg.num_classes and not bool(known.all()):
        images, labels = images[known], labels[known]  # a conditional GAN learns from labelled images only
        if not len(labels):
            raise ValueError("fedgan: a class-conditional GAN needs labelled images; none has the task's label")
    history, _, _ = train_dcgan_epochs(gen, disc, images, labels if dcfg.num_classes else None, dcfg,
                                       epochs=epochs, seed=seed)
    return history


def pretrain(setup: TrainingSetup, cfg: FedGANConfig, cache: DatasetCache, dcfg: DCGANConfig
             ) -> tuple[Arrays, dict[str, Any]]:
    """Both networks pretrained at the server on the training sites of ``cfg.pretrain_study`` (or freshly
    initialised without one), and what to record about it.

    Raises:
        FileNotFoundError / ValueError: the pool is missing, or its sequences differ from the study's.
    """
    from synthlearn.data.layouts import open_study

    gen, disc = build_networks(dcfg, derive_seed(setup.seed, "fedgan", "init"))
    info: dict[str, Any] = {"pretrain_study": cfg.pretrain_study or None, "pretrain_epochs": cfg.pretrain_epochs}
    if cfg.pretrain_study and cfg.pretrain_epochs:
        root = Path(cfg.pretrain_study)
        if not root.is_dir():
            raise FileNotFoundError(f"fedgan.pretrain_study {root}: no such study folder")
        pool = open_study(root)
        if tuple(pool.sequences) != tuple(setup.sequences):
            raise ValueError(f"fedgan.pretrain_study {root}: its sequences {list(pool.sequences)} differ from the "
                             f"study's {list(setup.sequences)}")
        cases = [c for s in pool.sites_with_role("train") for c in s.cases]
        images, labels = load_images(cases, setup, cfg, cache)
        t0 = time.perf_counter()
        history = _train(gen, disc, images, labels, dcfg, cfg.pretrain_epochs, derive_seed(setup.seed, "fedgan",
                                                                                           "pretrain"))
        info.update(pretrain_images=len(cases), pretrain_wall_s=time.perf_counter() - t0,
                    pretrain_final={k: v[-1] for k, v in history.items() if v})
    return {"generator": _state(gen), "discriminator": _state(disc)}, info


def load_pretrained(path: Path, dcfg: DCGANConfig) -> tuple[Arrays, dict[str, Any]]:
    """The networks and record of a ``pretrained.pt`` (:func:`run` writes one into its arm folder).

    Raises:
        FileNotFoundError: no such file.
        ValueError: its networks do not fit ``dcfg``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fedgan.pretrained {path}: no such file (a fedgan run's <arm>/pretrained.pt)")
    saved = load_checkpoint(path, restore_rng=False)
    gen, disc = DCGANGenerator(dcfg), DCGANDiscriminator(dcfg)
    try:
        gen.load_state_dict(saved["states"]["generator"])
        disc.load_state_dict(saved["states"]["discriminator"])
    except (KeyError, RuntimeError) as exc:
        raise ValueError(f"fedgan.pretrained {path}: its networks do not fit this study's DCGAN "
                         f"({str(exc).splitlines()[0]})") from exc
    return saved["states"], dict(saved.get("info", {}))


class FedGANProtocol(RoundProtocol):
    """FedGAN as a round protocol: the server sends both networks, each site trains them ``local_epochs`` on its
    images and returns them with its image count, the server averages each network weighted by the counts
    (:func:`synthlearn.strategies.fedavg.weighted_average`, BatchNorm statistics included)."""

    arm_name = "fedgan"

    def __init__(self, setup: TrainingSetup, cfg: FedGANConfig, initial: Arrays | None = None,
                 cache: DatasetCache | None = None):
        self.setup = setup
        self.cfg = cfg
        self.dcfg = dcgan_config(setup, cfg)
        self.cache = cache
        self._initial = initial
        self.rounds = cfg.rounds
        self.start_timeout_s = cfg.start_timeout_s
        self.round_timeout_s = cfg.round_timeout_s
        self.threads_per_site = cfg.threads_per_site
        self.parallel_sites = cfg.parallel_sites

    def __getstate__(self) -> dict[str, Any]:  # what is pickled into the sites: settings only
        return {**self.__dict__, "cache": None, "_initial": None}

    def initial_state(self) -> Arrays:
        if self._initial is not None:
            return self._initial
        gen, disc = build_networks(self.dcfg, derive_seed(self.setup.seed, "fedgan", "init"))
        return {"generator": _state(gen), "discriminator": _state(disc)}

    def site_round(self, site: SiteRecord, rnd: int, arrays, config, *, state_dir: Path,
                   memory: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        missing = [n for n in NETWORKS if n not in arrays]
        if missing:
            raise ValueError(f"fedgan round {rnd}: the server's message lacks {missing}")
        if "data" not in memory:
            cache = self.cache or memory.setdefault("cache", DatasetCache(self.setup.preprocess))
            memory["data"] = load_images(list(site.cases), self.setup, self.cfg, cache)
        images, labels = memory["data"]
        gen, disc = DCGANGenerator(self.dcfg), DCGANDiscriminator(self.dcfg)
        try:
            gen.load_state_dict(arrays["generator"])
            disc.load_state_dict(arrays["discriminator"])
        except RuntimeError as exc:
            raise ValueError(f"fedgan round {rnd}: the server's networks do not fit this site's DCGAN "
                             f"({str(exc).splitlines()[0]})") from exc
        history = _train(gen, disc, images, labels, self.dcfg, self.cfg.local_epochs,
                         derive_seed(self.setup.seed, "fedgan", "site", site.name, rnd))
        metrics = {"n": int((labels >= 0).sum()) if self.dcfg.num_classes else len(labels)}
        metrics.update({key: float(values[-1]) for key, values in history.items() if values})
        return {"generator": _state(gen), "discriminator": _state(disc)}, metrics

    def aggregate(self, rnd: int, state: Arrays, replies: Sequence[SiteReply]) -> tuple[Arrays, dict[str, Any]]:
        if not replies:
            raise FederationError(f"fedgan round {rnd}: no site replied")
        weights = [float(r.metrics.get("n", 0)) for r in replies]
        new = dict(state)
        for name in NETWORKS:
            states = [r.arrays.get(name) for r in replies]
            if any(s is None for s in states):
                raise FederationError(f"fedgan round {rnd}: a site's reply lacks its {name}")
            expected = {k: tuple(v.shape) for k, v in state[name].items()}
            for r, s in zip(replies, states):
                if {k: tuple(v.shape) for k, v in s.items()} != expected:
                    raise FederationError(f"fedgan round {rnd}: site {r.site}'s {name} has other keys or shapes "
                                          "than the server's")
            new[name] = weighted_average(states, weights)
        entry = {key: {r.site: float(r.metrics[key]) for r in replies if key in r.metrics}
                 for key in ("d", "g", "d_real", "d_fake")}
        entry["images"] = {r.site: int(r.metrics.get("n", 0)) for r in replies}
        return new, entry


# --------------------------------------------------------------------------------------------------- synthesis
def sample_images(gen: DCGANGenerator, dcfg: DCGANConfig, cfg: FedGANConfig, class_names: Sequence[str], *,
                  seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``per_class`` images per class (``per_class`` in all when unconditional): ``(images (C, S, S) float32 in
    z-score units with an exact zero background, seg (S, S) uint8, codes (1,) class index or -1)``."""
    from synthlearn.synthesis.cases import SYNTHETIC_TUMOUR_LABEL

    classes = list(range(len(class_names))) if dcfg.num_classes else [-1]
    out = []
    for k in classes:
        labels = torch.full((cfg.per_class,), k, dtype=torch.long) if k >= 0 else None
        drawn = sample_dcgan(gen, cfg.per_class, labels=labels, seed=derive_seed(seed, "fedgan", "sample", k))
        for x in drawn.numpy().astype(np.float32):
            images, mask = x[:-1], x[-1] > 0
            floor = -1.0 if cfg.preprocessing == "paper" else 0.0  # the background's value in the generator range
            background = np.all(np.abs(images - floor) <= cfg.background_threshold, axis=0)
            if background.mean() > 0.99:  # an image (nearly) all background keeps its values: never an empty case
                background[:] = False
            scaled = (images + 1) / 2 if cfg.preprocessing == "paper" else images * cfg.intensity_scale
            images = np.where(background, 0.0, scaled).astype(np.float32)
            seg = (mask & ~background).astype(np.uint8) * SYNTHETIC_TUMOUR_LABEL
            out.append((images, seg, np.array([k])))
    return out


def _synthetic_codes(samples, setup: TrainingSetup) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each sample's class written in the task's label column (the other columns unknown, -1).

    Raises:
        ValueError: the task's classes are not values of its label column (a derived task such as tumour type).
    """
    from synthlearn.strategies.asyndgan import label_columns

    task = setup.task_spec
    columns = label_columns(setup)
    names = [c for c, _ in columns]
    values = dict(columns).get(task.label_column, ())
    if task.label_column not in names or any(c not in values for c in task.class_names):
        raise ValueError(f"fedgan: the task {task.name}'s classes {list(task.class_names)} are not the values of one "
                         f"label column of the study ({dict(columns)})")
    col = names.index(task.label_column)
    out = []
    for images, seg, codes in samples:
        row = np.full(len(names), -1, dtype=np.int64)
        if int(codes[0]) >= 0:
            row[col] = values.index(task.class_names[int(codes[0])])
        out.append((images, seg, row))
    return out


# --------------------------------------------------------------------------------------------------------- the arm
def run(ctx: ArmContext) -> ArmOutput:
    """The FedGAN arm: pretraining at the server, the federation, synthesis, the task model on synthetic images."""
    from synthlearn.tasks.model import train_task_model

    cfg: FedGANConfig = ctx.arm_config
    if ctx.setup.task_spec.kind != "classification":
        raise ValueError(f"fedgan draws labelled images for a classification task, found a {ctx.setup.task_spec.kind} "
                         "task")
    if not cfg.conditional:
        raise ValueError("fedgan.conditional = false draws unlabelled images, which no classification task model can "
                         "learn from; set fedgan.conditional = true")
    dcfg = dcgan_config(ctx.setup, cfg)
    t0 = time.perf_counter()
    final = _primary_state(ctx, cfg)
    info: dict[str, Any] = {}
    if final is None:
        pretrain_path = ctx.arm_dir / "pretrained.pt"
        if pretrain_path.is_file() or cfg.pretrained:
            initial, info = load_pretrained(pretrain_path if pretrain_path.is_file() else Path(cfg.pretrained), dcfg)
            if not pretrain_path.is_file():
                save_checkpoint(pretrain_path, {"states": initial, "info": info})
                info = {**info, "pretrained_from": str(cfg.pretrained)}
        else:
            initial, info = pretrain(ctx.setup, cfg, ctx.cache, dcfg)
            save_checkpoint(pretrain_path, {"states": initial, "info": info})
        protocol = FedGANProtocol(ctx.setup, cfg, initial)
        if cfg.backend == "flower":
            if ctx.federate is None:
                raise ValueError("fedgan.backend = 'flower' needs the study runner's Flower runner (ctx.federate); "
                                 "run the arm through `synthlearn study run`, or set fedgan.backend = 'inprocess'")
            final = ctx.federate(protocol, ctx.train_sites, ctx.arm_dir, progress=ctx.progress)
        else:
            protocol.cache = ctx.cache
            final = run_protocol_inprocess(protocol, ctx.train_sites, ctx.arm_dir)
    federation_wall = time.perf_counter() - t0
    gen = DCGANGenerator(dcfg)
    gen.load_state_dict(final.states["generator"])
    t0 = time.perf_counter()
    class_names = ctx.setup.task_spec.class_names
    samples = sample_images(gen, dcfg, cfg, class_names, seed=ctx.setup.seed)
    cases = write_synthetic_study(_synthetic_codes(samples, ctx.setup), ctx.setup, ctx.arm_dir / "synthetic")
    synthesis_wall = time.perf_counter() - t0
    setup = ctx.setup
    if cfg.task_epochs is not None:
        setup = dataclasses.replace(setup, train=dataclasses.replace(setup.train, epochs=cfg.task_epochs))
    model = train_task_model(cases, setup, ctx.arm_dir, cache=ctx.cache, progress=ctx.progress, label="fedgan")
    model.info.update(synthetic_training_cases=len(cases), trained_on="synthetic images only")
    model.save(ctx.arm_dir / "model")
    plot_losses(final.history, ctx.arm_dir / "figures" / "fedgan_losses.png")
    plot_grid(samples, class_names, ctx.setup.sequences, ctx.arm_dir / "figures" / "fedgan_samples.png")
    extra = {
        "bytes_to_sites": final.bytes_to_sites,
        "backend": cfg.backend,
        **info,
        "synthetic_cases": len(cases),
        "synthetic_per_class": cfg.per_class,
        "final_losses": {key: final.history[-1].get(key, {}) for key in ("d", "g", "d_real", "d_fake")}
        if final.history else {},
        "stage_wall_s": {"federation": federation_wall, "synthesis": synthesis_wall},
    }
    return ArmOutput(models={ctx.name: model}, bytes_from_sites=final.bytes_from_sites, rounds=final.round,
                     extra=extra)


def _primary_state(ctx: ArmContext, cfg: FedGANConfig) -> FederationState | None:
    """The primary seed's finished federation, for a further seed of a multi-seed study (None otherwise)."""
    if ctx.primary_dir is None:
        return None
    return FederationState.load_finished(Path(ctx.primary_dir) / "server" / "global.pt", cfg.rounds, "fedgan")


# ---------------------------------------------------------------------------------------------------------- figures
def plot_losses(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Each site's last local-epoch discriminator and generator losses per round."""
    rounds = [h for h in history if h.get("d")]
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sites = sorted({s for h in rounds for s in h["d"]})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in ((axes[0], "d", "discriminator loss"), (axes[1], "g", "generator loss")):
        for s in sites:
            xs = [h["round"] for h in rounds if s in h.get(key, {})]
            ax.plot(xs, [h[key][s] for h in rounds if s in h.get(key, {})], label=s, lw=1, marker=".")
        ax.set_xlabel("round")
        ax.set_title(f"{title} (site, last local epoch)")
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_grid(samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], class_names: Sequence[str],
              sequences: Sequence[str], path: str | Path, per_row: int = 8) -> Path | None:
    """Generated images, one row per class (RGB when the study has three channels, else the first channel)."""
    if not samples:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {}
    for images, _, codes in samples:
        rows.setdefault(int(codes[0]), []).append(images)
    keys = sorted(rows)
    fig, axes = plt.subplots(len(keys), per_row, figsize=(1.1 * per_row, 1.2 * len(keys)), squeeze=False)
    for r, k in enumerate(keys):
        for c in range(per_row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(rows[k]):
                img = rows[k][c]
                img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)  # each image to its own range
                ax.imshow(np.moveaxis(img[:3], 0, -1).transpose(1, 0, 2) if len(sequences) == 3 else img[0].T,
                          cmap=None if len(sequences) == 3 else "gray", origin="lower")
            if c == 0:
                ax.set_ylabel(class_names[k] if 0 <= k < len(class_names) else "all", fontsize=8)
    fig.suptitle("FedGAN: generated images per class", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


ARM = ArmSpec(name="fedgan", run=run, config=FedGANConfig, task_kinds=("classification",), spatial_dims=(2,),
              protocol=FedGANProtocol,
              description="a DCGAN pretrained at the server, fine-tuned by FedAvg of generator and discriminator "
              "across the sites; the task model trains on its images (paper 002)")

__all__ = ["ARM", "FedGANConfig", "FedGANProtocol", "build_networks", "dcgan_config", "load_images", "load_pretrained",
           "paper_arrays", "plot_grid", "plot_losses", "pretrain", "run", "sample_images"]
