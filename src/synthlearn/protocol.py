"""One round protocol for every federated arm, in plain Python (no federation runtime).

A federated arm says, round by round, what the server sends, what a site computes from its own data and returns,
and how the server folds the replies in (:class:`RoundProtocol`). Two runners drive any protocol:

- :func:`run_protocol_inprocess` (here): the rounds as plain function calls, one site after another (tests,
  benchmarks);
- :func:`synthlearn.federated.simulation.run_protocol_simulation`: one Flower ``ServerApp`` / ``ClientApp`` pair
  (:mod:`synthlearn.federated.apps`) on Flower's simulation engine, whose messages are the real path across the
  site boundary and whose bytes are counted on them; the same pair runs on a SuperLink and SuperNodes.

This module sits below both ``strategies`` (which define protocols) and ``federated`` (the Flower glue that carries
them): no strategy imports ``federated``; the study runner hands an arm the runner to use
(:attr:`synthlearn.strategies.base.ArmContext.federate`).

What travels is a set of named tensor groups (:data:`Arrays`: e.g. one state dict per network) and a flat dict of
scalars (:data:`Scalars`: settings one way, metrics the other). The server's state between rounds and its history
are a :class:`FederationState`, checkpointed after every round so that a federation resumes where it stopped.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from synthlearn.data.contract import SiteRecord
from synthlearn.training.checkpoint import load_checkpoint, save_checkpoint

#: named tensor groups: group name (e.g. a network ``idh/fold-0``) -> tensor name -> tensor
Arrays = dict[str, dict[str, torch.Tensor]]
#: settings or metrics: name -> int, float or str
Scalars = dict[str, Any]
#: how a run carries a protocol across its sites: ``federate(protocol, sites, work_dir, progress=...)``
Federate = Callable[..., "FederationState"]


class FederationError(RuntimeError):
    """A federation could not complete (sites unreachable, timed out, or failed)."""


def arrays_nbytes(arrays: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    """Bytes of the tensors of :data:`Arrays` (the payload without any message framing)."""
    return int(sum(torch.as_tensor(t).numel() * torch.as_tensor(t).element_size()
                   for group in arrays.values() for t in group.values()))


class FederationState:
    """The server's resumable state after ``round`` rounds: its arrays, the bytes that crossed the site boundary
    each way, and one history entry per round.

    Args:
        round: rounds done.
        states: the server's arrays (FedAvg: the global networks).
        bytes_from_sites, bytes_to_sites: bytes of the messages so far.
        history: per round ``{"round", "wall_s", ...}`` (what the protocol's ``aggregate`` adds).
    """

    def __init__(self, round: int, states: Arrays, bytes_from_sites: int = 0, bytes_to_sites: int = 0,
                 history: list[dict[str, Any]] | None = None):
        self.round = int(round)
        self.states = states
        self.bytes_from_sites = int(bytes_from_sites)
        self.bytes_to_sites = int(bytes_to_sites)
        self.history = list(history or [])

    def save(self, path: str | Path) -> None:
        save_checkpoint(path, {"round": self.round, "states": self.states, "bytes_from_sites": self.bytes_from_sites,
                               "bytes_to_sites": self.bytes_to_sites, "history": json.dumps(self.history)})

    def events(self) -> list[dict[str, Any]]:
        """What went wrong and was survived: ``[{"round", "missing_sites"}]`` for every round that went on without
        some sites (a protocol that tolerates missing replies)."""
        return [{"round": int(h["round"]), "missing_sites": list(h["missing_sites"])}
                for h in self.history if h.get("missing_sites")]

    @classmethod
    def load_or_start(cls, path: str | Path, initial: Callable[[], Arrays]) -> FederationState:
        """The state saved at ``path``, or round 0 with ``initial()``."""
        path = Path(path)
        if path.is_file():
            p = load_checkpoint(path, restore_rng=False)
            return cls(int(p["round"]), p["states"], int(p["bytes_from_sites"]), int(p["bytes_to_sites"]),
                       json.loads(p["history"]))
        return cls(0, initial())

    @classmethod
    def load_finished(cls, path: str | Path, rounds: int, who: str) -> FederationState:
        """The federation saved at ``path``, which must have run all ``rounds`` (a further seed of a multi-seed
        study reuses its primary seed's finished federation).

        Raises:
            ValueError: it stopped earlier (or never started), naming ``who``, the file and the rounds.
        """
        state = cls.load_or_start(path, dict)
        if state.round != rounds:
            raise ValueError(f"{who}: the primary seed's federation at {path} stopped at round {state.round} of "
                             f"{rounds}; run the primary seed to the end first")
        return state


class SiteReply:
    """A site's answer in a round: its arrays and its scalars."""

    def __init__(self, site: str, arrays: Arrays, metrics: Scalars):
        self.site = site
        self.arrays = arrays
        self.metrics = metrics


class RoundProtocol(abc.ABC):
    """What a federated arm does each round, independent of how the messages travel.

    Subclasses give :meth:`initial_state`, :meth:`site_round` and :meth:`aggregate` (and may override
    :meth:`server_message`). Everything :meth:`site_round` reads comes from its arguments and the site's own cases:
    it runs where the site's data lives. A protocol object is pickled into every site process, so it should hold
    settings, not data.

    Attributes:
        rounds: rounds of the federation.
        start_timeout_s: seconds the server waits for every site to connect.
        round_timeout_s: seconds the server waits for a round's replies.
        threads_per_site: torch threads of each site's process.
        parallel_sites: sites computing at the same time (0 = as many as the CPU cores allow).
        per_site_messages: the server sends each site its own message (:meth:`site_message`; e.g. AsynDGAN's
            generated images for that site's masks) instead of one message to all (:meth:`server_message`).
        tolerate_missing: a round whose replies do not all arrive within ``round_timeout_s`` goes on with those
            that did (at least one; the history entry names the missing sites) instead of failing.
        checkpoint_every: the server saves its state every this many rounds (and after the last): protocols with
            many cheap rounds (AsynDGAN: one per generator step) save less often; a resume repeats at most this
            many rounds.
    """

    rounds: int = 1
    start_timeout_s: float = 120.0
    round_timeout_s: float = 3600.0
    threads_per_site: int = 1
    parallel_sites: int = 0
    per_site_messages: bool = False
    tolerate_missing: bool = False
    checkpoint_every: int = 1
    #: the arm whose ``ArmSpec.protocol`` rebuilds this protocol at a deployed site from :meth:`spec` (None: the
    #: protocol does not run deployed)
    arm_name: str | None = None

    def spec(self) -> dict[str, Any]:
        """What a deployed site needs to build this protocol on its own machine, as JSON: the arm's name, the
        task-model setup and the arm's settings (``{"arm", "setup", "config"}``), never code, weights or data. The
        site rebuilds it with ``synthlearn.strategies.registry.protocol_from_spec`` (unknown keys refused).

        Raises:
            NotImplementedError: the protocol does not run deployed (no :attr:`arm_name`, or server-side settings a
                site could not rebuild).
        """
        from synthlearn.config import to_dict

        if self.arm_name is None or not hasattr(self, "setup") or not hasattr(self, "cfg"):
            raise NotImplementedError(f"{type(self).__name__} does not run deployed (no arm_name, setup and cfg); "
                                      "run it in Flower's simulation engine (`synthlearn study run`)")
        return {"arm": self.arm_name, "setup": to_dict(self.setup), "config": to_dict(self.cfg)}

    @abc.abstractmethod
    def initial_state(self) -> Arrays:
        """The server's arrays before round 1."""

    def server_message(self, rnd: int, state: Arrays) -> tuple[Arrays, Scalars]:
        """What the server sends every site in round ``rnd`` (1-based): by default its whole state."""
        return state, {}

    def site_message(self, rnd: int, state: Arrays, site: str) -> tuple[Arrays, Scalars]:
        """What the server sends site ``site`` in round ``rnd`` when :attr:`per_site_messages` is set. The runners
        ask for every site's message of a round before sending any, so all are made from the same state."""
        raise NotImplementedError(f"{type(self).__name__} sets per_site_messages but defines no site_message")

    def messages(self, rnd: int, state: Arrays, sites: Sequence[str]) -> dict[str, tuple[Arrays, Scalars]]:
        """Every site's message of round ``rnd`` (the same object for all unless :attr:`per_site_messages`)."""
        if self.per_site_messages:
            return {site: self.site_message(rnd, state, site) for site in sites}
        message = self.server_message(rnd, state)
        return {site: message for site in sites}

    def timeout_for(self, rnd: int) -> float:
        """Seconds the server waits for round ``rnd``'s replies (``round_timeout_s``; a protocol whose first round
        is heavier, as AsynDGAN's where every site reads its cases, may say more)."""
        return float(self.round_timeout_s)

    def should_checkpoint(self, rnd: int) -> bool:
        """Whether the server saves its state after round ``rnd``."""
        return rnd == self.rounds or rnd % max(1, int(self.checkpoint_every)) == 0

    @abc.abstractmethod
    def site_round(self, site: SiteRecord, rnd: int, arrays: Arrays, config: Scalars, *, state_dir: Path,
                   memory: dict[str, Any]) -> tuple[Arrays, Scalars]:
        """What site ``site`` computes from the server's message and its own cases, and returns.

        Args:
            site: the site (its cases are the only data it may read).
            rnd: the round (1-based).
            arrays, config: the server's message.
            state_dir: the site's private folder (e.g. its optimizer state between rounds).
            memory: a cache that lives as long as the process playing the site (e.g. its preprocessed cases): the
                same dict again when the same process plays the site in a later round, an empty one otherwise; what
                a site returns must never depend on it.
        """

    @abc.abstractmethod
    def aggregate(self, rnd: int, state: Arrays, replies: Sequence[SiteReply]) -> tuple[Arrays, dict[str, Any]]:
        """Fold the sites' replies (in the federation's site order) into the server's new state; also return what
        the round's history entry should hold (e.g. the sites' losses)."""


def run_protocol_inprocess(protocol: RoundProtocol, sites: Sequence[SiteRecord], work_dir: str | Path, *,
                           on_round: Callable[[int, float], None] | None = None) -> FederationState:
    """Every round of ``protocol`` as plain function calls, one site after another, resumable from ``work_dir``
    (``server/global.pt``; each site's private folder is ``sites/<site>``). Bytes are the arrays' payload (no
    message framing). ``on_round(round, seconds)`` is called after each round."""
    work_dir = Path(work_dir)
    checkpoint = work_dir / "server" / "global.pt"
    state = FederationState.load_or_start(checkpoint, protocol.initial_state)
    memories: dict[str, dict[str, Any]] = {}
    for rnd in range(state.round + 1, protocol.rounds + 1):
        t0 = time.perf_counter()
        messages = protocol.messages(rnd, state.states, [s.name for s in sites])
        replies = []
        for site in sites:
            arrays, config = messages[site.name]
            state.bytes_to_sites += arrays_nbytes(arrays)
            out, metrics = protocol.site_round(site, rnd, arrays, dict(config), state_dir=work_dir / "sites" / site.name,
                                               memory=memories.setdefault(site.name, {}))
            state.bytes_from_sites += arrays_nbytes(out)
            replies.append(SiteReply(site.name, out, metrics))
        state.states, entry = protocol.aggregate(rnd, state.states, replies)
        state.round = rnd
        state.history.append({"round": rnd, "wall_s": time.perf_counter() - t0, **entry})
        if protocol.should_checkpoint(rnd):
            state.save(checkpoint)
        if on_round is not None:
            on_round(rnd, time.perf_counter() - t0)
    return state


__all__ = ["Arrays", "Federate", "FederationError", "FederationState", "RoundProtocol", "Scalars", "SiteReply", "arrays_nbytes",
           "run_protocol_inprocess"]
