"""The ``fedavg`` arm: Federated Averaging (McMahan et al. 2017) of the task model over the training sites.

This module is the science, free of any federation runtime:

- :func:`weighted_average`: the aggregation, ``w = sum_s n_s w_s / sum_s n_s`` per tensor (eq. in
  Algorithm 1 of McMahan et al.), computed in float64;
- :func:`site_update`: what a site does in a round: load the global weights, train ``local_epochs`` with
  the shared trainer on its own cases, return the new weights and its number of training cases;
- :class:`FedAvgProtocol`: a round as a :class:`synthlearn.protocol.RoundProtocol` (what the server sends,
  what a site computes and returns, how the replies fold in);
- :func:`run_rounds_inprocess`: the same rounds without a network layer (tests, benchmarks).

The arm itself (:func:`run`) runs the protocol on Flower (the study runner's ``ctx.federate``: one Flower app pair
on the simulation engine) by default. Every fold and stage of the k-fold ensemble is trained in the same federation: a round carries
one state dict per network (``<stage>/fold-<k>``) and each is averaged with its own weights.

Learning-rate schedule and data order follow the global epoch index ``(round - 1) * local_epochs + e``
and a site keeps its own optimizer state (momentum) between rounds on its own disk, so FedAvg over a
single site reproduces plain training on that site exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from synthlearn.data.contract import CaseRecord, SiteRecord
from synthlearn.protocol import (
    FederationError,
    FederationState,
    RoundProtocol,
    SiteReply,
    arrays_nbytes,
    run_protocol_inprocess,
)
from synthlearn.strategies.base import ArmContext, ArmOutput
from synthlearn.strategies.registry import ArmSpec
from synthlearn.tasks.cache import DatasetCache
from synthlearn.tasks.folds import stage_data
from synthlearn.tasks.model import TaskModel, check_network, init_model
from synthlearn.tasks.setup import TrainingSetup, model_names, split_name
from synthlearn.training.checkpoint import load_checkpoint, save_checkpoint
from synthlearn.training.learning_check import summarise_checks
from synthlearn.training.trainer import train_model

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class FedAvgConfig:
    """FedAvg settings (the ``[fedavg]`` table of a study config).

    Attributes:
        rounds: communication rounds (paper: 100).
        local_epochs: epochs each site trains per round (paper: 1000 epochs / 100 rounds = 10).
        backend: ``flower`` (Flower simulation engine, the real message path) or ``inprocess`` (the
            same rounds as plain function calls; for tests and benchmarks).
        start_timeout_s: seconds to wait for every site to connect before failing.
        round_timeout_s: seconds to wait for the sites' replies in a round before failing.
        threads_per_site: torch threads in each site's worker.
        parallel_sites: sites training at the same time (0 = as many as CPU cores allow).
        keep_site_optimizer_state: a site keeps its SGD momentum between rounds (on its own disk; the state of
            the round before is kept too, so that a round repeated after a server crash starts from the same state).
        tolerate_missing: a site that fails or does not answer within ``round_timeout_s`` is left out of that
            round (the others' average goes on; at least one must answer) instead of stopping the study; the
            results name every round and site left out (``federation_events``).
    """

    rounds: int = 2
    local_epochs: int = 1
    backend: Literal["flower", "inprocess"] = "flower"
    start_timeout_s: float = 120.0
    round_timeout_s: float = 3600.0
    threads_per_site: int = 1
    parallel_sites: int = 0
    keep_site_optimizer_state: bool = True
    tolerate_missing: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"fedavg.rounds must be >= 1, found {self.rounds}")
        if self.local_epochs < 1:
            raise ValueError(f"fedavg.local_epochs must be >= 1, found {self.local_epochs}")
        if self.backend not in ("flower", "inprocess"):
            raise ValueError(f"fedavg.backend must be flower or inprocess, found {self.backend!r}")
        if self.start_timeout_s <= 0 or self.round_timeout_s <= 0:
            raise ValueError("fedavg.start_timeout_s and round_timeout_s must be > 0")
        if self.threads_per_site < 1:
            raise ValueError(f"fedavg.threads_per_site must be >= 1, found {self.threads_per_site}")

    @property
    def total_epochs(self) -> int:
        return self.rounds * self.local_epochs


def weighted_average(states: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> StateDict:
    """Weighted average of state dicts: ``sum_s weights[s] * states[s][k] / sum(weights)`` for every key.

    Args:
        states: state dicts with the same keys and shapes (torch tensors or numpy arrays).
        weights: one non-negative weight per state (e.g. the site's number of training cases).

    Returns:
        The averaged state dict (torch tensors with each key's original dtype; integer entries are
        rounded).

    Raises:
        ValueError: no states, mismatched keys/shapes, negative weights, or all weights zero.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state dict")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} state dicts but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError(f"weights must be finite and >= 0, found {list(weights)}")
    if w.sum() <= 0:
        raise ValueError(f"weights sum to {w.sum()}: no site trained this model (all weights zero)")
    keys = list(states[0].keys())
    for i, s in enumerate(states[1:], start=1):
        if list(s.keys()) != keys:
            raise ValueError(f"state dict {i} has keys {sorted(set(s) ^ set(keys))} not shared with state dict 0")
    out: StateDict = {}
    for key in keys:
        arrays = [torch.as_tensor(s[key]) for s in states]
        shape = arrays[0].shape
        if any(a.shape != shape for a in arrays):
            raise ValueError(f"{key}: shapes differ between sites: {[tuple(a.shape) for a in arrays]}")
        acc = torch.zeros(shape, dtype=torch.float64)
        for a, wi in zip(arrays, w):
            if wi > 0:
                acc += a.detach().cpu().to(torch.float64) * float(wi)
        acc /= float(w.sum())
        dtype = arrays[0].dtype
        out[key] = (acc.round() if not dtype.is_floating_point else acc).to(dtype)
    return out


@dataclasses.dataclass
class SiteUpdate:
    """A site's reply in a round: new weights, weights for averaging, training losses.

    Attributes:
        states: model name -> state dict after local training.
        num_examples: model name -> number of training cases (0 = the site could not train it).
        losses: model name -> mean training loss of the round's last epoch.
    """

    states: dict[str, StateDict]
    num_examples: dict[str, int]
    losses: dict[str, float]


def aggregate(updates: Sequence[SiteUpdate]) -> dict[str, StateDict]:
    """FedAvg of every model over the sites' updates, each weighted by its own ``num_examples``."""
    if not updates:
        raise ValueError("no site updates to aggregate")
    names = list(updates[0].states)
    return {name: weighted_average([u.states[name] for u in updates],
                                   [u.num_examples[name] for u in updates]) for name in names}


def initial_states(setup: TrainingSetup) -> dict[str, StateDict]:
    """The global models before round 1 (same initialisation as every other arm)."""
    return {name: {k: v.detach().clone() for k, v in init_model(setup, name).state_dict().items()}
            for name in model_names(setup)}


def _optimizer_file(state_dir: str | Path | None, name: str, rnd: int) -> Path | None:
    """A site's optimizer state of network ``name`` after round ``rnd``: one file per round, so that a round
    repeated after a server crash starts again from the state of the round before it."""
    return None if state_dir is None else Path(state_dir) / f"optimizer-{name.replace('/', '-')}-r{rnd}.pt"


def site_update(global_states: Mapping[str, Mapping[str, torch.Tensor]], site_cases: Sequence[CaseRecord],
                setup: TrainingSetup, cfg: FedAvgConfig, server_round: int, *, state_dir: str | Path | None = None,
                cache: DatasetCache | None = None, progress: bool = False) -> SiteUpdate:
    """One site's local training in round ``server_round`` (1-based), on its own cases only.

    For every model (``<stage>/fold-<k>``) the site trains global epochs
    ``[(round-1)*local_epochs, round*local_epochs)`` of a ``rounds*local_epochs`` schedule on its cases
    of that fold's training split. With ``cfg.keep_site_optimizer_state`` the optimizer state of the
    previous round is read from (and written to) ``state_dir``, the site's private folder.

    Returns:
        :class:`SiteUpdate`; a model the site has no labelled cases for comes back unchanged with
        ``num_examples = 0``.
    """
    if not 1 <= server_round <= cfg.rounds:
        raise ValueError(f"server_round must be in [1, {cfg.rounds}], found {server_round}")
    cache = cache or DatasetCache(setup.preprocess)
    data = stage_data(site_cases, setup)
    start, stop = (server_round - 1) * cfg.local_epochs, server_round * cfg.local_epochs
    states, counts, losses = {}, {}, {}
    for name in model_names(setup):
        stage, fold = split_name(name)
        sd = data[stage]
        idx = sd.training_indices(fold, setup.n_folds)
        if name not in global_states:
            raise ValueError(f"round {server_round}: global model {name!r} missing from the server's message")
        if not idx:
            states[name] = {k: torch.as_tensor(v) for k, v in global_states[name].items()}
            counts[name], losses[name] = 0, float("nan")
            continue
        net = init_model(setup, name)
        net.load_state_dict({k: torch.as_tensor(v) for k, v in global_states[name].items()})
        opt_state = None
        before = _optimizer_file(state_dir, name, server_round - 1)
        if cfg.keep_site_optimizer_state and before is not None and server_round > 1:
            if before.is_file():
                opt_state = load_checkpoint(before, restore_rng=False)["optimizer"]
            else:
                log.warning("%s: no optimizer state of round %d; round %d starts a fresh optimizer", state_dir,
                            server_round - 1, server_round)
        outcome = train_model(net, cache.dataset([sd.cases[i] for i in idx]), [sd.targets[i] for i in idx],
                              setup.train, seed=setup.seed, name=name, total_epochs=cfg.total_epochs,
                              start_epoch=start, stop_epoch=stop, optimizer_state=opt_state, progress=progress,
                              num_classes=sd.stage.num_classes, segmentation=sd.stage.segmentation,
                              heads=sd.stage.head_sizes)
        if cfg.keep_site_optimizer_state and state_dir is not None:
            save_checkpoint(_optimizer_file(state_dir, name, server_round),
                            {"round": server_round, "optimizer": outcome.optimizer_state})
            keep = {_optimizer_file(state_dir, name, server_round), before}  # this round's and the one before
            for old in Path(state_dir).glob(f"optimizer-{name.replace('/', '-')}-r*.pt"):
                if old not in keep:
                    old.unlink(missing_ok=True)
        states[name] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        counts[name] = len(idx)
        losses[name] = outcome.losses[-1] if outcome.losses else float("nan")
    return SiteUpdate(states, counts, losses)


def state_nbytes(states: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    """Bytes of the tensors of a set of state dicts (payload size without any message framing)."""
    return arrays_nbytes(states)


#: the server's resumable state (global networks, bytes, history); :class:`synthlearn.strategies.protocol.FederationState`
ServerProgress = FederationState


class TaskModelProtocol(RoundProtocol):
    """A round protocol whose server state is the task model's networks (one state dict per ``<stage>/fold-<k>``),
    initialised as every arm initialises them; FedAvg and FedKD are such protocols.

    Args:
        setup: the shared task-model training setup.
        cfg: the arm's settings (``rounds``, ``start_timeout_s``, ``round_timeout_s``, ``threads_per_site``,
            ``parallel_sites`` and the arm's own).
        cache: preprocessed cases to share with the caller when the sites run in this process (never pickled into a
            site's process: there each site keeps its own between rounds).
    """

    def __init__(self, setup: TrainingSetup, cfg: Any, cache: DatasetCache | None = None):
        self.setup = setup
        self.cfg = cfg
        self.cache = cache
        self.rounds = cfg.rounds
        self.start_timeout_s = cfg.start_timeout_s
        self.round_timeout_s = cfg.round_timeout_s
        self.threads_per_site = cfg.threads_per_site
        self.parallel_sites = cfg.parallel_sites
        self.tolerate_missing = bool(getattr(cfg, "tolerate_missing", False))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "cache": None}

    def initial_state(self) -> dict[str, StateDict]:
        return initial_states(self.setup)

    def site_cache(self, memory: dict[str, Any]) -> DatasetCache:
        """The preprocessed cases of the site this process plays (the caller's cache when in process)."""
        return self.cache or memory.setdefault("cache", DatasetCache(self.setup.preprocess))


class FedAvgProtocol(TaskModelProtocol):
    """FedAvg as a round protocol: the server sends every network's global weights; a site trains them
    ``local_epochs`` on its own cases (:func:`site_update`) and returns its weights, its training cases per network
    and its losses; the server averages each network with its own case counts (:func:`aggregate`)."""

    arm_name = "fedavg"

    def site_round(self, site: SiteRecord, rnd: int, arrays, config, *, state_dir: Path,
                   memory: dict[str, Any]) -> tuple[dict[str, StateDict], dict[str, Any]]:
        upd = site_update(arrays, site.cases, self.setup, self.cfg, rnd, state_dir=state_dir,
                          cache=self.site_cache(memory))
        metrics: dict[str, Any] = {"num-examples": int(sum(upd.num_examples.values()))}
        for name, n in upd.num_examples.items():
            metrics[f"n{KEY_SEP}{name}"] = int(n)
            loss = upd.losses[name]
            metrics[f"loss{KEY_SEP}{name}"] = float(loss) if not np.isnan(loss) else -1.0  # NaN: the site had no case
        return upd.states, metrics

    def aggregate(self, rnd: int, state, replies: Sequence[SiteReply]) -> tuple[dict[str, StateDict], dict[str, Any]]:
        """FedAvg of the sites' replies (:func:`aggregate`) once :func:`check_replies` has accepted every one.

        Raises:
            FederationError: a reply that does not match the server's networks (listing every problem).
        """
        check_replies(rnd, state, replies)
        updates = [SiteUpdate(r.arrays, {n: int(r.metrics[f"n{KEY_SEP}{n}"]) for n in r.arrays},
                              {n: float(r.metrics[f"loss{KEY_SEP}{n}"]) for n in r.arrays}) for r in replies]
        return aggregate(updates), {"loss": {r.site: u.losses for r, u in zip(replies, updates)}}


#: separates a metric's kind from the network it is about (``n::idh/fold-0``)
KEY_SEP = "::"


def check_replies(rnd: int, state: Mapping[str, Mapping[str, torch.Tensor]], replies: Sequence[SiteReply]) -> None:
    """Refuse site replies that do not match the server's networks, before anything is averaged.

    A reply must hold exactly the server's networks, each with exactly the server's tensor names, shapes and
    dtypes, finite floating-point values, and the metrics ``n::<network>`` (an integer >= 0: its training cases)
    and ``loss::<network>`` (a number) for every network. A site whose weights carried an extra tensor, lost one or
    changed its shape would otherwise be averaged (or silently cast) into the global model; a NaN would spread
    to every site in the next round.

    Args:
        rnd: the round (for messages).
        state: the server's networks: network name -> tensor name -> tensor.
        replies: the sites' replies.

    Raises:
        FederationError: no reply, or a list of every problem (site, network, tensor, expected, found).
    """
    if not replies:
        raise FederationError(f"fedavg round {rnd}: no site replied")
    problems: list[str] = []
    for reply in replies:
        where = f"site {reply.site}"
        got = reply.arrays if isinstance(reply.arrays, Mapping) else {}
        if not isinstance(reply.arrays, Mapping):
            problems.append(f"{where}: expected named state dicts, found {type(reply.arrays).__name__}")
        for name in sorted(set(got) - set(state)):
            problems.append(f"{where}: unexpected network {name!r}; expected only {sorted(state)}")
        for name in sorted(set(state) - set(got)):
            problems.append(f"{where}: network {name!r} missing from the reply; expected {sorted(state)}")
        for name in sorted(set(state) & set(got)):
            problems += _state_problems(f"{where}: {name}", state[name], got[name])
            for kind in ("n", "loss"):
                key = f"{kind}{KEY_SEP}{name}"
                value = reply.metrics.get(key)
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                      and (kind == "loss" or (float(value).is_integer() and value >= 0)))
                if not ok:
                    expected = "an integer >= 0 (its training cases)" if kind == "n" else "a number"
                    problems.append(f"{where}: metric {key!r}: expected {expected}, found {value!r}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise FederationError(f"fedavg round {rnd}: refusing the sites' replies ({len(problems)} problem"
                              f"{'s' if len(problems) != 1 else ''}; nothing was averaged):\n  {shown}")


def _state_problems(where: str, expected: Mapping[str, torch.Tensor], found: Any) -> list[str]:
    """What differs between a site's state dict and the server's: keys, shapes, dtypes, non-finite values."""
    if not isinstance(found, Mapping):
        return [f"{where}: expected a state dict, found {type(found).__name__}"]
    problems = [f"{where}: unexpected tensor {k!r}; expected only the {len(expected)} tensors of the server's network"
                for k in sorted(set(found) - set(expected))]
    problems += [f"{where}: tensor {k!r} missing; expected every tensor of the server's network"
                 for k in sorted(set(expected) - set(found))]
    for key in sorted(set(expected) & set(found)):
        ref, value = torch.as_tensor(expected[key]), found[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{where}: tensor {key!r}: expected a tensor, found {type(value).__name__}")
        elif tuple(value.shape) != tuple(ref.shape):
            problems.append(f"{where}: tensor {key!r}: expected shape {tuple(ref.shape)}, found {tuple(value.shape)}")
        elif value.dtype != ref.dtype:
            problems.append(f"{where}: tensor {key!r}: expected dtype {ref.dtype}, found {value.dtype}")
        elif value.dtype.is_floating_point or value.dtype.is_complex:
            bad = int((~torch.isfinite(value.detach())).sum())
            if bad:
                problems.append(f"{where}: tensor {key!r}: expected finite values, found {bad} NaN or inf of "
                                f"{value.numel()}")
    return problems


def run_rounds_inprocess(sites: Sequence[SiteRecord], setup: TrainingSetup, cfg: FedAvgConfig,
                         work_dir: str | Path, *, cache: DatasetCache | None = None, progress: bool = False,
                         on_round: Callable[[int, float], None] | None = None) -> FederationState:
    """FedAvg rounds as plain function calls (no network layer), resumable from ``work_dir``
    (:func:`synthlearn.strategies.protocol.run_protocol_inprocess` of :class:`FedAvgProtocol`). Bytes are the
    tensor payload of each site's update (no framing). ``on_round(round, seconds)`` is called after each round."""
    return run_protocol_inprocess(FedAvgProtocol(setup, cfg, cache or DatasetCache(setup.preprocess)), sites, work_dir,
                                  on_round=on_round)


def task_model_from_states(states: Mapping[str, Mapping[str, torch.Tensor]], setup: TrainingSetup,
                           info: dict | None = None) -> TaskModel:
    """A :class:`TaskModel` from global state dicts."""
    networks = {}
    for name in model_names(setup):
        net = init_model(setup, name)
        net.load_state_dict({k: torch.as_tensor(v) for k, v in states[name].items()})
        networks[name] = net.eval()
    return TaskModel(setup, networks, info)


def federated_learning_check(model: TaskModel, sites: Sequence[SiteRecord], setup: TrainingSetup,
                             history: Sequence[Mapping[str, Any]], cache: DatasetCache | None = None
                             ) -> dict[str, dict[str, Any]]:
    """Did the final global model learn? :func:`synthlearn.tasks.model.check_network` of every network
    on the training cases of its fold (every site's), with the final training loss taken as the sites' last-round
    losses weighted by their training cases (what the sites reported; ``history[-1]["loss"]``).

    In this simulation the study process reads the cases; in a deployment each site would compute its share (its
    predicted-class counts and class masses) and send only those numbers.
    """
    cache = cache or DatasetCache(setup.preprocess)
    pooled = [c for s in sites for c in s.cases]
    data = stage_data(pooled, setup)
    last = history[-1]["loss"] if history else {}
    site_sizes = {s.name: stage_data(s.cases, setup) for s in sites}
    checks = {}
    for name in model_names(setup):
        stage, fold = split_name(name)
        sd = data[stage]
        idx = sd.training_indices(fold, setup.n_folds)
        if not idx:
            continue
        losses, weights = [], []
        for site in sites:
            value = (last.get(site.name) or {}).get(name)
            n = len(site_sizes[site.name][stage].training_indices(fold, setup.n_folds))
            if value is not None and np.isfinite(value) and n:
                losses.append(float(value))
                weights.append(n)
        final = [float(np.average(losses, weights=weights))] if losses else None
        checks[name] = check_network(model.networks[name], cache.dataset([sd.cases[i] for i in idx]),
                                     [sd.targets[i] for i in idx], final, setup, sd.stage)
        checks[name]["seed"] = setup.seed
        if not checks[name]["learned"]:
            log.warning("fedavg %s (seed %d) did not learn: %s", name, setup.seed, "; ".join(checks[name]["reasons"]))
    return checks


def run(ctx: ArmContext) -> ArmOutput:
    """The FedAvg arm: rounds on Flower (or in process), then the final global model as a task model."""
    cfg: FedAvgConfig = ctx.arm_config
    if cfg.backend == "flower":
        if ctx.federate is None:
            raise ValueError("fedavg.backend = 'flower' needs the study runner's Flower runner (ctx.federate); run the "
                             "arm through `synthlearn study run`, or set fedavg.backend = 'inprocess'")
        final = ctx.federate(FedAvgProtocol(ctx.setup, cfg), ctx.train_sites, ctx.arm_dir, progress=ctx.progress)
    else:
        final = run_rounds_inprocess(ctx.train_sites, ctx.setup, cfg, ctx.arm_dir, cache=ctx.cache,
                                     progress=ctx.progress)
    info = {"rounds": final.round, "history": final.history, "backend": cfg.backend,
            "bytes_to_sites": final.bytes_to_sites}
    model = task_model_from_states(final.states, ctx.setup, info)
    checks = federated_learning_check(model, ctx.train_sites, ctx.setup, final.history, ctx.cache)
    model.info.update(learning_check=checks, learning_summary=summarise_checks(checks))
    model.save(ctx.arm_dir / "model")
    extra = {"bytes_to_sites": final.bytes_to_sites, "backend": cfg.backend}
    events = final.events()
    if events:
        extra["federation_events"] = events
    return ArmOutput(models={ctx.name: model}, bytes_from_sites=final.bytes_from_sites, rounds=final.round,
                     extra=extra)


ARM = ArmSpec(name="fedavg", run=run, config=FedAvgConfig,
              task_kinds=("classification", "segmentation", "multitask"),
              spatial_dims=(2, 3), protocol=FedAvgProtocol,
              description="Federated Averaging of the task model on Flower: weights leave each site every round")
