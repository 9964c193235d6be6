"""One Flower ``ServerApp`` / ``ClientApp`` pair (flwr 1.41 Message API) that runs any round protocol.

Nothing scientific lives here: what the server sends, what a site computes and how replies fold in are the
protocol's (:class:`synthlearn.protocol.RoundProtocol`, e.g. :class:`synthlearn.strategies.fedavg.FedAvgProtocol`).
This module moves them through Flower ``Message`` s (:mod:`synthlearn.federated.messages`), counts the bytes of the
real messages, checkpoints the server's state after every round and never hangs: the server waits at most the
protocol's ``start_timeout_s`` for every site to connect and ``round_timeout_s`` for a round's replies, then fails
with :class:`synthlearn.protocol.FederationError` naming the sites that did not answer. The same pair runs on the
simulation engine (:mod:`synthlearn.federated.simulation`) and on a SuperLink with SuperNodes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from synthlearn.data.contract import SiteRecord
from synthlearn.federated.messages import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    message_nbytes,
    record_to_states,
    split_scalars,
    states_to_record,
)
from synthlearn.protocol import (
    FederationError,
    FederationState,
    RoundProtocol,
    SiteReply,
)

log = logging.getLogger(__name__)

#: the round number in the server's config record
ROUND_KEY = "round"
#: the site's name in its reply's config record
SITE_KEY = "site"
#: round 0 of a federation whose server sends each site its own message: every site only names itself
HELLO_ROUND = 0

_SITE_MEMORY: dict[tuple[str, str], dict[str, Any]] = {}  # per site process: what a site keeps between rounds


class SiteApp:
    """The ``ClientApp``'s handler (pickled into each site's process): which site each partition plays, the
    protocol, and where the sites' private folders are. A site reads only its own cases."""

    def __init__(self, protocol: RoundProtocol, sites: Sequence[SiteRecord], state_root: str | Path):
        import uuid

        self.protocol = protocol
        self.sites = list(sites)
        self.state_root = str(state_root)
        self.token = uuid.uuid4().hex  # survives pickling: a site's memory is found again in every round

    def __call__(self, msg, context):
        from synthlearn.runtime import configure_threads

        configure_threads(self.protocol.threads_per_site)
        site = self.sites[int(context.node_config["partition-id"])]
        memory = _SITE_MEMORY.setdefault((self.token, site.name), {})
        return site_reply(self.protocol, site, msg, Path(self.state_root) / site.name, memory)


def hello_reply(site_name: str, msg):
    """A site's answer to round :data:`HELLO_ROUND`: its name, so that the server can address it."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    content = RecordDict({ARRAYS_KEY: states_to_record({}), METRICS_KEY: MetricRecord({}),
                          CONFIG_KEY: ConfigRecord({SITE_KEY: site_name})})
    return Message(content=content, reply_to=msg)


def site_reply(protocol: RoundProtocol, site: SiteRecord, msg, state_dir: Path, memory: dict[str, Any]):
    """What site ``site`` answers to the server's message ``msg``: its name in round :data:`HELLO_ROUND`, else the
    protocol's :meth:`~synthlearn.protocol.RoundProtocol.site_round` on its own cases (its arrays, its numbers as
    metrics, its text and name as config, and the seconds it took)."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    config = dict(msg.content[CONFIG_KEY])
    rnd = int(config.pop(ROUND_KEY))
    if rnd == HELLO_ROUND:
        return hello_reply(site.name, msg)
    arrays = record_to_states(msg.content[ARRAYS_KEY])
    t0 = time.perf_counter()
    out, metrics = protocol.site_round(site, rnd, arrays, config, state_dir=state_dir, memory=memory)
    numbers, text = split_scalars(metrics)
    numbers["train-seconds"] = float(time.perf_counter() - t0)
    content = RecordDict({ARRAYS_KEY: states_to_record(out), METRICS_KEY: MetricRecord(numbers),
                          CONFIG_KEY: ConfigRecord({SITE_KEY: site.name, **text})})
    return Message(content=content, reply_to=msg)


def make_client_app(handler: SiteApp):
    """A Flower ``ClientApp`` whose ``train`` handler runs ``handler``."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        return handler(msg, context)

    return app


def wait_for_sites(grid, num_sites: int, timeout_s: float) -> list[int]:
    """The node ids of ``num_sites`` connected sites, waiting at most ``timeout_s``.

    Raises:
        FederationError: fewer sites connected in time.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= num_sites:
            return sorted(nodes)[:num_sites]
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of {num_sites} sites connected within the start timeout ({timeout_s:g} s); check "
                "that every site's SuperNode is running and can reach the server (loopback 127.0.0.1 in simulation), "
                "or raise the timeout")
        time.sleep(0.2)


def check_replies(replies: Sequence[Any], num_sites: int, rnd: int, timeout_s: float, *,
                  tolerate_missing: bool = False) -> list[Any]:
    """The good replies of a round. Missing or failed ones stop the study (it must not silently lose a site), unless
    ``tolerate_missing`` (a protocol that goes on with the sites that answered; at least one must).

    Raises:
        FederationError: naming the failures and the timeout.
    """
    failed = [m for m in replies if m.has_error()]
    good = [m for m in replies if not m.has_error()]
    if tolerate_missing and good:
        return good
    if failed or len(replies) < num_sites:
        reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed)
        raise FederationError(
            f"round {rnd}: {len(replies) - len(failed)} of {num_sites} sites replied (round timeout {timeout_s:g} s)"
            + (f"; failures: {reasons}" if reasons else "")
            + ". A site that stalls or crashes stops the study rather than biasing it.")
    return good


def identify_sites(grid, nodes: Sequence[int], timeout_s: float, hello: dict[str, Any] | None = None
                   ) -> dict[int, str]:
    """Node id -> site name, asked of every node (round :data:`HELLO_ROUND`), for protocols that address sites and
    for every deployed federation (whose sites learn there what they will run: ``hello``, e.g. the protocol's spec).

    Raises:
        FederationError: a node did not answer within ``timeout_s``.
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    content = RecordDict({ARRAYS_KEY: states_to_record({}),
                          CONFIG_KEY: ConfigRecord({**(hello or {}), ROUND_KEY: HELLO_ROUND})})
    messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node) for node in nodes]
    replies = check_replies(list(grid.send_and_receive(messages, timeout=timeout_s)), len(nodes), HELLO_ROUND,
                            timeout_s)
    return {int(m.metadata.src_node_id): str(m.content[CONFIG_KEY][SITE_KEY]) for m in replies}


def check_reply_sites(replies: Sequence[tuple[int, str]], site_names: Sequence[str], node_site: dict[int, str],
                      rnd: int) -> None:
    """Refuse a round whose replies name a site outside the federation, name one site twice, or (when the server
    identified its nodes, :func:`identify_sites`) name another site than the node said it plays.

    Args:
        replies: ``(node id, site the reply names)`` per reply.

    Raises:
        FederationError: naming the node, the site it claims and what was expected.
    """
    seen: dict[str, int] = {}
    for node, site in replies:
        if site not in site_names:
            raise FederationError(f"round {rnd}: node {node} replied as site {site!r}, which is not one of the "
                                  f"federation's sites {list(site_names)}")
        if site in seen:
            raise FederationError(f"round {rnd}: nodes {seen[site]} and {node} both replied as site {site!r}")
        if node_site and node_site.get(node) != site:
            raise FederationError(f"round {rnd}: node {node} replied as site {site!r} but identified itself as "
                                  f"{node_site.get(node)!r}")
        seen[site] = node


def run_rounds(grid, protocol: RoundProtocol, state: FederationState, site_names: list[str], checkpoint: Path,
               bar=None, *, hello: dict[str, Any] | None = None) -> FederationState:
    """The server's loop: every remaining round of ``protocol`` over the connected sites, through ``grid``.

    ``hello`` (a deployed federation): sent to every node in round :data:`HELLO_ROUND` (what the site is to run);
    the nodes must then be exactly the federation's sites.
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    nodes = wait_for_sites(grid, len(site_names), protocol.start_timeout_s)
    identify = protocol.per_site_messages or hello is not None
    node_site = identify_sites(grid, nodes, protocol.start_timeout_s, hello) if identify else {}
    check_reply_sites(list(node_site.items()), site_names, {}, HELLO_ROUND)
    for rnd in range(state.round + 1, protocol.rounds + 1):
        t0 = time.perf_counter()
        if protocol.per_site_messages:
            by_site = protocol.messages(rnd, state.states, [node_site[node] for node in nodes])
            contents = {node: by_site[node_site[node]] for node in nodes}
        else:
            one = protocol.server_message(rnd, state.states)
            contents = {node: one for node in nodes}
        records: dict[int, tuple[Any, int]] = {}  # one record (and its size) for a message shared by every site
        messages = []
        for node, (arrays, config) in contents.items():
            key = id(arrays)
            if key not in records:
                content = RecordDict({ARRAYS_KEY: states_to_record(arrays),
                                      CONFIG_KEY: ConfigRecord({**config, ROUND_KEY: rnd})})
                message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                records[key] = (content, message_nbytes(message))
            else:
                message = Message(content=records[key][0], message_type=MessageType.TRAIN, dst_node_id=node)
            messages.append(message)
            state.bytes_to_sites += records[key][1]
        timeout = protocol.timeout_for(rnd)
        replies = check_replies(list(grid.send_and_receive(messages, timeout=timeout)), len(nodes), rnd, timeout,
                                tolerate_missing=protocol.tolerate_missing)
        parsed = []
        for m in replies:
            state.bytes_from_sites += message_nbytes(m)
            metrics = dict(m.content[METRICS_KEY])
            text = dict(m.content[CONFIG_KEY])
            site = str(text.pop(SITE_KEY))
            metrics.pop("train-seconds", None)
            parsed.append(SiteReply(site, record_to_states(m.content[ARRAYS_KEY]), {**metrics, **text}))
        check_reply_sites([(int(m.metadata.src_node_id), r.site) for m, r in zip(replies, parsed)], site_names,
                          node_site, rnd)
        parsed.sort(key=lambda r: site_names.index(r.site))
        state.states, entry = protocol.aggregate(rnd, state.states, parsed)
        missing = [s for s in site_names if s not in {r.site for r in parsed}]
        if missing:
            log.warning("round %d: no reply from %s (failed, or not within %g s); the round went on without",
                        rnd, ", ".join(missing), timeout)
            entry = {**entry, "missing_sites": missing}
        state.round = rnd
        state.history.append({"round": rnd, "wall_s": time.perf_counter() - t0, **entry})
        if protocol.should_checkpoint(rnd):
            state.save(checkpoint)
        if bar is not None:
            bar.update(1)
        log.info("round %d/%d aggregated (%.1f s)", rnd, protocol.rounds, time.perf_counter() - t0)
    return state


def make_server_app(protocol: RoundProtocol, state: FederationState, site_names: list[str], checkpoint: Path,
                    bar=None):
    """A Flower ``ServerApp`` whose main runs :func:`run_rounds`."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        run_rounds(grid, protocol, state, site_names, checkpoint, bar)

    return app


__all__ = ["HELLO_ROUND", "ROUND_KEY", "SITE_KEY", "SiteApp", "check_replies", "check_reply_sites", "hello_reply",
           "identify_sites", "make_client_app", "make_server_app", "run_rounds", "site_reply", "wait_for_sites"]
