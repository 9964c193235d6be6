"""A trained task model and how it is trained: per stage a k-fold ensemble of networks, checked for learning.

A trained task model (:class:`TaskModel`) is a folder that holds everything needed to rebuild and apply it without
the study config (``synthlearn evaluate`` reads it)::

    <model>/model.json            format, task, class names, stages -> fold weight files, network config,
                                  preprocessing config, seed, training cases per fold, learning checks
    <model>/<stage>/fold-<k>.pt   state dict (loaded with ``weights_only=True``)

:func:`train_task_model` is what the centralized arm does with the training sites' real cases, a local arm with
one site's, and a synthetic-data arm with the synthetic cases.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthlearn.config import from_dict, to_dict
from synthlearn.data.contract import CaseRecord
from synthlearn.data.datasets import CaseDataset
from synthlearn.data.io import write_json
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.models.classifier import build_classifier
from synthlearn.tasks.cache import DatasetCache
from synthlearn.tasks.definitions import Stage, Task
from synthlearn.tasks.folds import stage_data
from synthlearn.tasks.setup import TrainingSetup, model_names, split_name
from synthlearn.training.learning_check import check_learning, summarise_checks
from synthlearn.training.seeding import derive_seed
from synthlearn.training.segmentation import (
    check_multitask_learning,
    check_segmentation_learning,
    predict_label_maps,
)
from synthlearn.training.trainer import predict_head_probabilities, predict_probabilities, train_model

log = logging.getLogger(__name__)

MODEL_FORMAT = "synthlearn-task-model/1"


def build_network(setup: TrainingSetup, stage: Stage) -> torch.nn.Module:
    """The network of ``stage``: the voxel classifier UNet, or for a multi-task stage the multi-task UNet (Ren et al.,
    :class:`synthlearn.models.multitask.MultiTaskUNet`) with the ``[model]`` widths, groups and dropout."""
    if stage.heads:
        from synthlearn.models.multitask import MultiTaskUNet

        return MultiTaskUNet(setup.preprocess.spatial_dims, len(setup.sequences), stage.num_classes, stage.head_sizes,
                             channels=setup.model.channels, norm_num_groups=setup.model.norm_num_groups,
                             dropout=setup.model.dropout, pool=setup.model.multitask_pool)
    return build_classifier(setup.model, out_channels=stage.num_classes, in_channels=len(setup.sequences),
                            spatial_dims=setup.preprocess.spatial_dims)


def init_model(setup: TrainingSetup, name: str) -> torch.nn.Module:
    """A freshly initialised network for model ``name``; the same (seed, name) gives the same weights in
    every arm."""
    stage, _ = split_name(name)
    torch.manual_seed(derive_seed(setup.seed, "init", name))
    return build_network(setup, setup.task_spec.stage(stage))


class TaskModel:
    """A trained task model: per stage a k-fold ensemble of networks, and the preprocessing they expect.

    Args:
        setup: how it was trained (task, preprocessing, network config...).
        networks: model name (``<stage>/fold-<k>``) -> network.
        info: free-form facts saved in ``model.json`` (training cases per fold, arm, site...).
    """

    def __init__(self, setup: TrainingSetup, networks: dict[str, torch.nn.Module], info: dict | None = None):
        missing = [n for n in model_names(setup) if n not in networks]
        if missing:
            raise ValueError(f"task model lacks network(s) {missing}")
        self.setup = setup
        self.networks = networks
        self.info = dict(info or {})

    @property
    def task(self) -> Task:
        return self.setup.task_spec

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.setup.preprocess

    def predict_stages(self, dataset, *, progress: bool = False) -> dict[str, np.ndarray]:
        """Stage name -> ``(N, stage classes)`` probabilities (fold ensemble mean) for a dataset view
        (anything with ``len`` and ``arrays(i)``, e.g. :class:`CaseDataset`)."""
        out = {}
        cfg = self.setup.train
        for stage in self.task.stages:
            nets = [self.networks[f"{stage.name}/fold-{k}"] for k in range(self.setup.n_folds)]
            out[stage.name] = predict_probabilities(nets, dataset, bf16=cfg.bf16, device=cfg.device,
                                                    batch_size=cfg.batch_size, progress=progress)
        return out

    def predict_label_maps(self, dataset) -> np.ndarray:
        """A segmentation model's ``(N, *S)`` int64 label maps on the preprocessed grid (the fold ensemble's mean
        softmax, arg-max; :func:`synthlearn.training.segmentation.predict_label_maps`)."""
        if not self.task.segments:
            raise ValueError(f"task {self.task.name} is not a segmentation task")
        stage = self.task.stages[0]
        cfg = self.setup.train
        nets = [self.networks[f"{stage.name}/fold-{k}"] for k in range(self.setup.n_folds)]
        return predict_label_maps(nets, dataset, batch_size=cfg.batch_size, bf16=cfg.bf16, device=cfg.device)

    def predict_heads(self, dataset) -> dict[str, np.ndarray]:
        """A multi-task model's classification heads: head name -> ``(N, head classes)`` probabilities (the fold
        ensemble's mean softmax)."""
        if not self.task.is_multitask:
            raise ValueError(f"task {self.task.name} has no classification heads")
        stage = self.task.stages[0]
        cfg = self.setup.train
        nets = [self.networks[f"{stage.name}/fold-{k}"] for k in range(self.setup.n_folds)]
        probs = predict_head_probabilities(nets, dataset, batch_size=cfg.batch_size, bf16=cfg.bf16, device=cfg.device)
        return {head.name: p for head, p in zip(stage.heads, probs)}

    def predict(self, dataset, *, progress: bool = False) -> np.ndarray:
        """Final ``(N, task classes)`` probabilities (two-stage tasks combined, :meth:`Task.combine`)."""
        return self.task.combine(self.predict_stages(dataset, progress=progress))

    def predict_cases(self, cases: Sequence[CaseRecord], *, progress: bool = False) -> np.ndarray:
        """:meth:`predict` on case records (their sequences the model's, :meth:`CaseRecord.with_sequences`),
        preprocessed exactly as in training."""
        cases = [c.with_sequences(self.setup.sequences) for c in cases]
        return self.predict(CaseDataset(cases, self.preprocess), progress=progress)

    def save(self, folder: str | Path) -> Path:
        """Write the model folder (weights first, ``model.json`` last, so a folder with ``model.json`` is
        complete)."""
        folder = Path(folder)
        files = {}
        for name, net in self.networks.items():
            rel = f"{name}.pt"
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".pt.tmp")
            torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
            tmp.replace(path)
            files[name] = rel
        setup = to_dict(self.setup)
        meta = {
            "format": MODEL_FORMAT,
            "task": self.task.name,
            "class_names": list(self.task.class_names),
            "stages": {s.name: {"class_names": list(s.class_names),
                                "folds": [files[f"{s.name}/fold-{k}"] for k in range(self.setup.n_folds)]}
                       for s in self.task.stages},
            "setup": setup,
            "preprocess": setup["preprocess"],
            "model": setup["model"],
            "info": self.info,
        }
        write_json(folder / "model.json", meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> TaskModel:
        """Rebuild a model saved by :meth:`save`.

        Raises:
            FileNotFoundError: no ``model.json`` (an incomplete or absent model).
            ValueError: unknown format or unreadable weights.
        """
        folder = Path(folder)
        meta_path = folder / "model.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: no trained task model here (incomplete run?)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
        setup_dict: dict[str, Any] = dict(meta["setup"])
        if device is not None:
            setup_dict["train"] = {**setup_dict["train"], "device": device}
        setup = from_dict(TrainingSetup, setup_dict)
        networks = {}
        for name in model_names(setup):
            stage, k = split_name(name)
            path = folder / meta["stages"][stage]["folds"][k]
            net = build_network(setup, setup.task_spec.stage(stage))
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ValueError(f"{path}: unreadable weights ({type(exc).__name__}: {exc})") from exc
            net.load_state_dict(state)
            networks[name] = net.eval()
        return cls(setup, networks, meta.get("info"))


def check_network(net: torch.nn.Module, dataset, targets: list[int], losses, setup: TrainingSetup,
                  stage: Stage) -> dict[str, Any]:
    """The learning check of one network of ``stage``: :func:`synthlearn.training.learning_check.check_learning`
    for a classification stage, :func:`synthlearn.training.segmentation.check_segmentation_learning` for a
    segmentation stage."""
    if stage.heads:
        return check_multitask_learning(net, dataset, targets, losses, setup.train, stage)
    if stage.segmentation:
        return check_segmentation_learning(net, dataset, losses, setup.train)
    return check_learning(net, dataset, targets, losses, setup.train, stage.num_classes, stage.class_names)


def _train_checked(setup: TrainingSetup, name: str, dataset, targets: list[int], stage: Stage, ckpt_dir: Path, *,
                   progress: bool, label: str, on_epoch=None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train network ``name`` from its initialisation, check that it learned
    (:func:`synthlearn.training.learning_check.check_learning`) and, with ``train.retrain_collapsed = n``, train
    it again from the next seeds' initialisations (``seed + 1``, ``seed + 2``... up to ``n`` times) until one
    learns. Returns the network and its check (``retried_seeds`` lists every seed tried when it retried)."""
    tried: list[int] = []
    for attempt in range(setup.train.retrain_collapsed + 1):
        run_setup = setup if attempt == 0 else dataclasses.replace(setup, seed=setup.seed + attempt)
        suffix = "" if attempt == 0 else f".retry{attempt}"
        net = init_model(run_setup, name)
        ckpt = ckpt_dir / f"{name}{suffix}.pt"
        outcome = train_model(net, dataset, targets, setup.train, seed=run_setup.seed, name=name, checkpoint_path=ckpt,
                              progress=progress, num_classes=stage.num_classes, on_epoch=on_epoch,
                              segmentation=stage.segmentation, heads=stage.head_sizes)
        check = check_network(net, dataset, targets, outcome.losses, setup, stage)
        check.update(seed=run_setup.seed, losses=outcome.losses)
        tried.append(run_setup.seed)
        if not check["learned"]:
            log.warning("%s %s (seed %d) did not learn: %s", label or "task model", name, run_setup.seed,
                        "; ".join(check["reasons"]))
        if check["learned"] or attempt == setup.train.retrain_collapsed:
            break
        log.warning("%s %s: retraining with seed %d (train.retrain_collapsed = %d)", label or "task model", name,
                    setup.seed + attempt + 1, setup.train.retrain_collapsed)
    for attempt in range(len(tried)):
        (ckpt_dir / f"{name}{'' if attempt == 0 else f'.retry{attempt}'}.pt").unlink(missing_ok=True)
    if len(tried) > 1:
        check["retried_seeds"] = tried
    return net, check


class ArrayCases:
    """Preprocessed cases held as ``(image (4, X, Y, Z), seg (X, Y, Z))`` arrays: ``len`` and ``arrays(i)``, what the
    trainer reads. It pickles, so a worker process trains on exactly the arrays the parent preprocessed."""

    def __init__(self, items: list[tuple[np.ndarray, np.ndarray]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.items[index]


def _network_worker(setup: TrainingSetup, name: str, cases: ArrayCases, targets: list[int], ckpt_dir: str, label: str,
                    epochs_done) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Runs in its own process (one torch thread): :func:`_train_checked` of one network; reports each epoch on
    the ``epochs_done`` queue."""
    from synthlearn.runtime import configure_threads

    configure_threads(1)
    logging.basicConfig(level=logging.WARNING)
    stage = setup.task_spec.stage(split_name(name)[0])
    net, check = _train_checked(setup, name, cases, targets, stage, Path(ckpt_dir), progress=False, label=label,
                                on_epoch=lambda *_: epochs_done.put(1))
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}, check


def _train_in_parallel(setup: TrainingSetup, jobs: dict[str, tuple[Any, list[int]]], ckpt_dir: Path, *,
                       progress: bool, label: str) -> dict[str, tuple[torch.nn.Module, dict[str, Any]]]:
    """Train the networks of ``jobs`` (name -> (dataset, targets)) in ``train.parallel_networks`` worker processes,
    each with one torch thread, with one progress bar over all their epochs."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from queue import Empty

    from tqdm.auto import tqdm

    ctx = multiprocessing.get_context("spawn")
    workers = min(setup.train.parallel_networks, len(jobs))
    out: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = {}
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = {}
        for name, (dataset, targets) in jobs.items():
            cases = ArrayCases([dataset.arrays(i) for i in range(len(dataset))])
            futures[pool.submit(_network_worker, setup, name, cases, targets, str(ckpt_dir), label, queue)] = name
        bar = tqdm(total=len(jobs) * setup.train.epochs, desc=f"{label or 'task model'}: {len(jobs)} networks",
                   unit="epoch", disable=not progress, leave=False)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            try:
                while True:
                    queue.get_nowait()
                    bar.update(1)
            except Empty:
                pass
            for fut in done:
                name = futures[fut]
                state, check = fut.result()
                net = init_model(setup, name)
                net.load_state_dict(state)
                out[name] = (net, check)
        bar.close()
    return out


def train_task_model(cases: Sequence[CaseRecord], setup: TrainingSetup, work_dir: str | Path, *,
                     cache: DatasetCache | None = None, progress: bool = True,
                     label: str = "") -> TaskModel:
    """Train every stage and fold of a task model on ``cases`` (pooled, one place) and save it.

    This is what the centralized arm does with the training sites' real cases, a local arm with one
    site's, and a synthetic-data arm (CATphishing) with the synthetic cases. Resumable: finished
    networks are kept in ``work_dir/checkpoints`` and a rerun continues where it stopped. After training, every
    network's learning check (:func:`synthlearn.training.learning_check.check_learning`) goes into ``model.json``
    (``info["learning_check"]`` and ``info["learning_summary"]``). With ``train.parallel_networks > 1`` the
    networks (folds, stages) train at the same time in that many worker processes of one torch thread each.

    Args:
        cases: training cases (unknown labels are masked per stage).
        setup: training setup.
        work_dir: folder for ``checkpoints/`` and the finished ``model/``.
        cache: dataset cache to share preprocessing between arms.
        progress: progress bars.
        label: prefix for progress bars (e.g. the site).

    Returns:
        The trained :class:`TaskModel` (also saved to ``work_dir/model``).
    """
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "checkpoints"
    cache = cache or DatasetCache(setup.preprocess)
    data = stage_data(cases, setup)
    networks: dict[str, torch.nn.Module] = {}
    info: dict[str, Any] = {"training_cases": {}, "learning_check": {}}
    todo: dict[str, tuple[Any, list[int]]] = {}
    for name in model_names(setup):
        stage, fold = split_name(name)
        sd = data[stage]
        idx = sd.training_indices(fold, setup.n_folds)
        if not idx:
            raise ValueError(f"{label or 'training'}: no labelled training cases for stage {stage!r} fold {fold} "
                             f"(stage classes {list(sd.stage.class_names)}); check labels.csv")
        targets = [sd.targets[i] for i in idx]
        if len(set(targets)) < 2 and not sd.stage.segmentation:
            log.warning("%s %s: training cases hold a single class (%s)", label, name,
                        sd.stage.class_names[targets[0]])
        dataset = cache.dataset([sd.cases[i] for i in idx])
        info["training_cases"][name] = len(idx)
        done_path = ckpt_dir / f"{name}.done.pt"
        check_path = ckpt_dir / f"{name}.done.json"
        if done_path.is_file():
            net = init_model(setup, name)
            net.load_state_dict(torch.load(done_path, map_location="cpu", weights_only=True))
            check = json.loads(check_path.read_text()) if check_path.is_file() else check_network(
                net, dataset, targets, None, setup, sd.stage)
            networks[name], info["learning_check"][name] = net, check
        else:
            todo[name] = (dataset, targets)
    if len(todo) > 1 and setup.train.parallel_networks > 1:
        trained = _train_in_parallel(setup, todo, ckpt_dir, progress=progress, label=label)
    else:
        trained = {name: _train_checked(setup, name, dataset, targets, setup.task_spec.stage(split_name(name)[0]),
                                        ckpt_dir, progress=progress, label=label)
                   for name, (dataset, targets) in todo.items()}
    for name, (net, check) in trained.items():
        done_path = ckpt_dir / f"{name}.done.pt"
        done_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = done_path.with_suffix(".tmp")
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
        tmp.replace(done_path)
        write_json(ckpt_dir / f"{name}.done.json", check)
        networks[name], info["learning_check"][name] = net, check
    networks = {name: networks[name].cpu().eval() for name in model_names(setup)}
    info["learning_check"] = {name: info["learning_check"][name] for name in model_names(setup)}
    info["learning_summary"] = summarise_checks(info["learning_check"])
    model = TaskModel(setup, networks, info)
    model.save(work_dir / "model")
    return model


__all__ = ["ArrayCases", "MODEL_FORMAT", "TaskModel", "check_network", "init_model", "train_task_model"]
