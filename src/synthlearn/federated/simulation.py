"""Flower's simulation engine on one machine (``flwr.simulation.run_simulation``, Ray backend, loopback only)
running the app pair of :mod:`synthlearn.federated.apps` for any round protocol: what ``synthlearn study run``
hands a federated arm as ``ctx.federate``.

Each site is a simulated SuperNode partition that reads only its own cases; the messages between the server and
the sites are real Flower messages, and the bytes of ``results.json`` are counted on them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from synthlearn.data.contract import SiteRecord
from synthlearn.federated.apps import SiteApp, make_client_app, make_server_app
from synthlearn.federated.messages import (
    message_nbytes,
    record_to_states,
    states_to_record,
)
from synthlearn.protocol import FederationError, FederationState, RoundProtocol

log = logging.getLogger(__name__)


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
        # keeps Ray's behaviour for CPU-only sites and silences its FutureWarning about it at every start
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONPATH": os.pathsep.join([src] + [p for p in paths if p != src]),
    }
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return env


def run_protocol_simulation(protocol: RoundProtocol, sites: Sequence[SiteRecord], work_dir: str | Path, *,
                            progress: bool = True) -> FederationState:
    """Run (or resume) ``protocol`` over ``sites`` on Flower's simulation engine.

    Args:
        protocol: the federated arm's round protocol.
        sites: the training sites; site ``i`` is simulated SuperNode partition ``i``.
        work_dir: the arm folder: ``server/global.pt`` (the server's state after each round, for resuming),
            ``sites/<site>/`` (each site's private state), ``flwr_home/``.
        progress: a progress bar over rounds.

    Returns:
        The server's final :class:`synthlearn.protocol.FederationState` (its arrays, bytes, history).

    Raises:
        FederationError: sites did not connect or reply in time, or a site failed.
    """
    work_dir = Path(work_dir)
    checkpoint = work_dir / "server" / "global.pt"
    state = FederationState.load_or_start(checkpoint, protocol.initial_state)
    if state.round:
        log.info("federation: resuming after round %d from %s", state.round, checkpoint)
    remaining = protocol.rounds - state.round
    if remaining <= 0:
        return state
    flower_environment(work_dir / "flwr_home")
    from flwr.simulation import run_simulation

    handler = SiteApp(protocol, sites, work_dir / "sites")
    cpus = os.cpu_count() or 1
    parallel = protocol.parallel_sites or max(1, min(len(sites), cpus // protocol.threads_per_site))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=protocol.rounds, initial=state.round, desc="federation", unit="round", leave=False)
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
    log.info("federation: starting Flower's simulation engine (Ray, %d site processes); its start-up, about 10-20 s, "
             "counts in round %d's time", len(sites), state.round + 1)
    quiet = {name: logging.getLogger(name) for name in ("flwr", "alembic", "ray")}
    old_levels = {name: lg.level for name, lg in quiet.items()}
    if not log.isEnabledFor(logging.DEBUG):
        for lg in quiet.values():  # Flower logs every round at INFO, its database layer (alembic) its plugins
            lg.setLevel(logging.ERROR)
    try:
        run_simulation(server_app=make_server_app(protocol, state, [s.name for s in sites], checkpoint, bar),
                       client_app=make_client_app(handler), num_supernodes=len(sites), backend_config=backend_config)
    except FederationError:
        raise
    except Exception as exc:
        raise FederationError(f"the Flower simulation failed after {time.perf_counter() - t0:.0f} s "
                              f"({type(exc).__name__}: {exc})") from exc
    finally:
        for name, lg in quiet.items():
            lg.setLevel(old_levels[name])
        if bar is not None:
            bar.close()
    if state.round < protocol.rounds:
        raise FederationError(f"the federation stopped after round {state.round} of {protocol.rounds}; "
                              "see the log above for the site's error")
    return state


__all__ = ["FederationError", "flower_environment", "message_nbytes", "record_to_states", "run_protocol_simulation",
           "states_to_record"]
