"""The arm interface ``run(ctx: ArmContext) -> ArmOutput``: what an arm gets from the study runner and what it
returns. The task model it trains lives in :mod:`synthlearn.tasks`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from synthlearn.data.contract import CaseRecord, SiteRecord
from synthlearn.protocol import Federate
from synthlearn.tasks.cache import DatasetCache
from synthlearn.tasks.model import TaskModel
from synthlearn.tasks.setup import TrainingSetup


@dataclasses.dataclass
class ArmContext:
    """What an arm gets from the study runner.

    Attributes:
        name: the arm's name (``centralized``, ``local``, ``fedavg``, ...).
        setup: the shared training setup (``setup.seed`` is this run's seed).
        train_sites: the training sites (role ``train`` in study.json, or the config's ``train_sites``).
        arm_dir: the arm's own folder in the run (for this seed).
        arm_config: the arm's own settings (its :class:`synthlearn.strategies.registry.ArmSpec` ``config``, read
            from the study config's table of the arm), or None for an arm without settings.
        cache: preprocessed-case cache shared by the arms of a run.
        progress: show progress bars.
        primary_dir: None when this is the run's primary seed; for a further seed of a multi-seed run
            (``StudyConfig.seeds``), the arm's primary-seed folder, whose seed-independent work the arm may reuse
            (CATphishing's generators, trained once) rather than redo.
        needed: the primary-seed folders of the arms this arm declares it ``needs`` that completed before it in this
            run (an absent one is left out).
        federate: how this run carries a federated arm's round protocol across its sites
            (``federate(protocol, sites, work_dir, progress=...) -> FederationState``; :mod:`synthlearn.protocol`):
            the study runner hands over Flower's (:mod:`synthlearn.federated`), so no arm imports a federation
            runtime; None outside a study run.
    """

    name: str
    setup: TrainingSetup
    train_sites: tuple[SiteRecord, ...]
    arm_dir: Path
    arm_config: Any
    cache: DatasetCache
    progress: bool = True
    primary_dir: Path | None = None
    needed: dict[str, Path] = dataclasses.field(default_factory=dict)
    federate: Federate | None = None

    @property
    def train_cases(self) -> tuple[CaseRecord, ...]:
        return tuple(c for s in self.train_sites for c in s.cases)


#: an audit's entry for a site whose cases are not at the server (a deployed study: ``synthlearn server start``)
REMOTE_SITE_SKIP = ("the site's cases are not at this server (a deployed study): a membership audit reads them, "
                    "so it runs where they are")


@dataclasses.dataclass
class ArmOutput:
    """What an arm returns.

    Attributes:
        models: model label -> trained :class:`TaskModel`. One entry (label = the arm name) for most arms;
            ``local`` returns one per training site (label = site name).
        bytes_from_sites: bytes that crossed the site boundary towards the server, measured on the real
            files/messages.
        rounds: communication rounds (0 = none).
        extra: further keys for the arm's block of results.json (e.g. fidelity, privacy).
    """

    models: dict[str, TaskModel]
    bytes_from_sites: int
    rounds: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


__all__ = ["REMOTE_SITE_SKIP", "ArmContext", "ArmOutput"]
