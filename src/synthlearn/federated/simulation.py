"""Flower glue for the FedAvg arm: a ``ServerApp`` and a ``ClientApp`` (flwr 1.41 Message API) run on
Flower's simulation engine on one machine (``flwr.simulation.run_simulation``, Ray backend, loopback only).

Nothing scientific lives here: a site's round is :func:`synthlearn.strategies.fedavg.site_update` and the
aggregation is :func:`synthlearn.strategies.fedavg.aggregate`; this module only moves their inputs and
outputs through Flower ``Message`` s (one ``ArrayRecord`` holding every network of the k-fold ensemble,
keys ``<stage>/fold-<k>::<parameter>``) and counts the bytes of the real replies (the serialized object
tree of every message a site sends, as the Flower object store holds it).

A federation never hangs: the server waits at most ``start_timeout_s`` for every site to connect and
``round_timeout_s`` for the replies of a round, then fails with :class:`FederationError` naming the
sites that did not answer and what to check.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from synthlearn.data.contract import CaseRecord, SiteRecord
from synthlearn.strategies.base import TrainingSetup
from synthlearn.strategies.fedavg import FedAvgConfig, ServerProgress, SiteUpdate, StateDict, aggregate

log = logging.getLogger(__name__)

#: separates the network name from the parameter name in ArrayRecord keys
KEY_SEP = "::"
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"


class FederationError(RuntimeError):
    """A federation could not complete (sites unreachable, timed out, or failed)."""


def flower_environment(flwr_home: str | Path) -> dict[str, str]:
    """Set the environment Flower and Ray need to stay offline and on loopback (ENVIRONMENT.md):
    no telemetry, no update check, a local FLWR_HOME (``flwr_home`` unless FLWR_HOME is already set, e.g.
    by the Makefile), Ray bound to 127.0.0.1 and its workers at normal priority. Also puts
    synthlearn's source folder on PYTHONPATH so Ray workers import the same package.

    Returns:
        The variables set.
    """
    import synthlearn

    src = str(Path(synthlearn.__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_HOME": os.environ.get("FLWR_HOME") or str(Path(flwr_home).resolve()),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        # Ray nices its workers (15) by default: on a busy machine the sites then starve behind any other
        # process and rounds time out; a site's training is the main work here, so run it at normal priority
        "RAY_worker_niceness": "0",
        "PYTHONPATH": os.pathsep.join([src] + [p for p in paths if p != src]),
    }
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return env


def states_to_record(states: dict[str, StateDict]):
    """Networks' state dicts -> one ``ArrayRecord`` (keys ``<name>::<param>``)."""
    from flwr.app import ArrayRecord

    flat = {f"{name}{KEY_SEP}{k}": v.detach().cpu().contiguous() for name, sd in states.items()
            for k, v in sd.items()}
    return ArrayRecord(flat)


def record_to_states(record) -> dict[str, StateDict]:
    """Inverse of :func:`states_to_record`."""
    out: dict[str, StateDict] = {}
    for key, tensor in record.to_torch_state_dict().items():
        name, _, param = key.partition(KEY_SEP)
        if not param:
            raise FederationError(f"unexpected array key {key!r} in a message (expected '<model>::<param>')")
        out.setdefault(name, {})[param] = tensor
    return out


def message_nbytes(message) -> int:
    """Bytes of a Flower message as serialized for transport: every object of its tree (message,
    records, arrays, array chunks) deflated, as the Flower object store holds and ships them."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return int(sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values()))


# ----------------------------------------------------------------------------------------------- client
_SITE_CACHES: dict[tuple, Any] = {}  # per Ray worker: a site's preprocessed cases survive between rounds


class SiteTrainer:
    """The ``ClientApp``'s train handler state (pickled into each Ray worker): which site each partition
    is, and the shared training setup. A worker reads only the cases of the site it plays."""

    def __init__(self, sites: Sequence[tuple[str, Sequence[CaseRecord]]], setup: TrainingSetup, cfg: FedAvgConfig,
                 state_root: str | Path):
        self.sites = [(name, list(cases)) for name, cases in sites]
        self.setup = setup
        self.cfg = cfg
        self.state_root = str(state_root)

    def __call__(self, msg, context):
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

        from synthlearn.strategies.base import DatasetCache
        from synthlearn.strategies.fedavg import site_update

        from synthlearn.runtime import configure_threads

        configure_threads(self.cfg.threads_per_site)
        partition = int(context.node_config["partition-id"])
        name, cases = self.sites[partition]
        server_round = int(msg.content[CONFIG_KEY]["server-round"])
        key = (name, repr(self.setup.preprocess))
        cache = _SITE_CACHES.setdefault(key, DatasetCache(self.setup.preprocess))
        states = record_to_states(msg.content[ARRAYS_KEY])
        t0 = time.perf_counter()
        upd = site_update(states, cases, self.setup, self.cfg, server_round,
                          state_dir=Path(self.state_root) / name, cache=cache, progress=False)
        metrics = {"num-examples": int(sum(upd.num_examples.values()))}
        for model_name, n in upd.num_examples.items():
            metrics[f"n{KEY_SEP}{model_name}"] = int(n)
            loss = upd.losses[model_name]
            metrics[f"loss{KEY_SEP}{model_name}"] = float(loss) if loss == loss else -1.0
        metrics["train-seconds"] = float(time.perf_counter() - t0)
        content = RecordDict({ARRAYS_KEY: states_to_record(upd.states), METRICS_KEY: MetricRecord(metrics),
                              CONFIG_KEY: ConfigRecord({"site": name})})
        return Message(content=content, reply_to=msg)


def make_client_app(trainer: SiteTrainer):
    """A Flower ``ClientApp`` whose ``train`` handler runs ``trainer``."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        return trainer(msg, context)

    return app


# ----------------------------------------------------------------------------------------------- server
def _make_strategy_class():
    from flwr.app import Message, MessageType, RecordDict
    from flwr.serverapp.strategy import FedAvg

    class SynthlearnFedAvg(FedAvg):
        """Flower's FedAvg with synthlearn's aggregation core, timeouts, byte counts and checkpoints.

        ``configure_train`` waits for every site at most ``start_timeout_s``; ``aggregate_train`` refuses
        a round with missing or failed replies (a study must not silently lose a site), averages each
        network with its own case counts (:func:`synthlearn.strategies.fedavg.aggregate`), adds the
        replies' bytes and saves the server's progress.
        """

        def __init__(self, *, num_sites: int, site_names: list[str], cfg: FedAvgConfig, progress: ServerProgress,
                     checkpoint: Path, bar=None):
            super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_sites,
                             min_available_nodes=num_sites)
            self.num_sites = num_sites
            self.site_names = site_names
            self.cfg = cfg
            self.state = progress
            self.offset = progress.round
            self.checkpoint = checkpoint
            self.bar = bar
            self._t_round = time.perf_counter()

        def _wait_for_sites(self, grid) -> list[int]:
            deadline = time.monotonic() + self.cfg.start_timeout_s
            while True:
                nodes = list(grid.get_node_ids())
                if len(nodes) >= self.num_sites:
                    return sorted(nodes)[: self.num_sites]
                if time.monotonic() > deadline:
                    raise FederationError(
                        f"only {len(nodes)} of {self.num_sites} sites connected within "
                        f"fedavg.start_timeout_s={self.cfg.start_timeout_s:g} s; check that every site's "
                        "SuperNode is running and can reach the server (loopback 127.0.0.1 in simulation), "
                        "or raise the timeout")
                time.sleep(0.2)

        def configure_train(self, server_round, arrays, config, grid):
            nodes = self._wait_for_sites(grid)
            config["server-round"] = self.offset + server_round
            self._t_round = time.perf_counter()
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            messages = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node)
                        for node in nodes]
            self.state.bytes_to_sites += sum(message_nbytes(m) for m in messages[:1]) * len(messages)
            return messages

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            rnd = self.offset + server_round
            failed = [m for m in replies if m.has_error()]
            if failed or len(replies) < self.num_sites:
                reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed)
                raise FederationError(
                    f"round {rnd}: {len(replies) - len(failed)} of {self.num_sites} sites replied "
                    f"(timeout fedavg.round_timeout_s={self.cfg.round_timeout_s:g} s)"
                    + (f"; failures: {reasons}" if reasons else "")
                    + ". A site that stalls or crashes stops the study rather than biasing it.")
            updates, names = [], []
            for m in replies:
                self.state.bytes_from_sites += message_nbytes(m)
                metrics = m.content[METRICS_KEY]
                states = record_to_states(m.content[ARRAYS_KEY])
                counts = {n: int(metrics[f"n{KEY_SEP}{n}"]) for n in states}
                losses = {n: float(metrics[f"loss{KEY_SEP}{n}"]) for n in states}
                updates.append(SiteUpdate(states, counts, losses))
                names.append(str(m.content[CONFIG_KEY]["site"]))
            order = sorted(range(len(updates)), key=lambda i: self.site_names.index(names[i]))
            updates = [updates[i] for i in order]
            self.state.states = aggregate(updates)
            self.state.round = rnd
            self.state.history.append({"round": rnd, "wall_s": time.perf_counter() - self._t_round,
                                       "loss": {names[i]: updates[j].losses for j, i in enumerate(order)}})
            self.state.save(self.checkpoint)
            if self.bar is not None:
                self.bar.update(1)
            log.info("fedavg round %d/%d aggregated (%.1f s)", rnd, self.cfg.rounds,
                     time.perf_counter() - self._t_round)
            return states_to_record(self.state.states), None

        def configure_evaluate(self, server_round, arrays, config, grid):
            return []  # held-out test sites are evaluated by the study runner with the final model

        def aggregate_evaluate(self, server_round, replies):
            return None

    return SynthlearnFedAvg


def make_server_app(strategy, initial_states: dict[str, StateDict], num_rounds: int, round_timeout_s: float):
    """A Flower ``ServerApp`` whose main runs ``strategy`` for ``num_rounds``."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        strategy.start(grid=grid, initial_arrays=states_to_record(initial_states), num_rounds=num_rounds,
                       timeout=round_timeout_s)

    return app


def run_fedavg_simulation(sites: Sequence[SiteRecord], setup: TrainingSetup, cfg: FedAvgConfig,
                          work_dir: str | Path, *, progress: bool = True) -> ServerProgress:
    """Run (or resume) the FedAvg federation over ``sites`` on Flower's simulation engine.

    Args:
        sites: the training sites; site ``i`` is simulated SuperNode partition ``i``.
        setup: the shared task-model training setup.
        cfg: rounds, local epochs, timeouts, threads.
        work_dir: the arm folder: ``server/global.pt`` (progress after each round, for resuming),
            ``sites/<site>/`` (each site's private optimizer state), ``flwr_home/``.

    Returns:
        The server's final :class:`ServerProgress` (global models, bytes, history).

    Raises:
        FederationError: sites did not connect or reply in time, or a site failed.
    """
    work_dir = Path(work_dir)
    checkpoint = work_dir / "server" / "global.pt"
    state = ServerProgress.load_or_start(checkpoint, setup)
    remaining = cfg.rounds - state.round
    if remaining <= 0:
        return state
    flower_environment(work_dir / "flwr_home")
    from flwr.simulation import run_simulation

    trainer = SiteTrainer([(s.name, s.cases) for s in sites], setup, cfg, work_dir / "sites")
    cpus = os.cpu_count() or 1
    parallel = cfg.parallel_sites or max(1, min(len(sites), cpus // cfg.threads_per_site))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.rounds, initial=state.round, desc="fedavg", unit="round", leave=False)
    strategy = _make_strategy_class()(num_sites=len(sites), site_names=[s.name for s in sites], cfg=cfg,
                                      progress=state, checkpoint=checkpoint, bar=bar)
    per_site = max(1, cpus // parallel)
    backend_config = {
        # Ray runs as many sites at once as its CPU count allows: declare enough logical CPUs for `parallel`
        # sites (more sites than cores time-share them, which single-thread sites do without spinning)
        "client_resources": {"num_cpus": per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(cpus, parallel * per_site), "include_dashboard": False,
                      "_node_ip_address": "127.0.0.1",
                      "log_to_driver": False, "logging_level": logging.ERROR},
    }
    t0 = time.perf_counter()
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    if not log.isEnabledFor(logging.DEBUG):
        flwr_logger.setLevel(logging.ERROR)  # Flower logs every round at INFO; synthlearn logs its own
    try:
        run_simulation(server_app=make_server_app(strategy, state.states, remaining, cfg.round_timeout_s),
                       client_app=make_client_app(trainer), num_supernodes=len(sites),
                       backend_config=backend_config)
    except FederationError:
        raise
    except Exception as exc:
        raise FederationError(f"the Flower simulation failed after {time.perf_counter() - t0:.0f} s "
                              f"({type(exc).__name__}: {exc})") from exc
    finally:
        flwr_logger.setLevel(old_level)
        if bar is not None:
            bar.close()
    if strategy.state.round < cfg.rounds:
        raise FederationError(f"the federation stopped after round {strategy.state.round} of {cfg.rounds}; "
                              "see the log above for the site's error")
    return strategy.state
