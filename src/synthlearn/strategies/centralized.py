"""The ``centralized`` arm: every training site ships its raw cases to one place, where one task model is
trained on the pooled data (the reference upper bound of every paper).

``bytes_from_sites`` is the size of what would be shipped: every file of every training case plus each
site's ``labels.csv``, measured on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from synthlearn.data.contract import CaseRecord, SiteRecord
from synthlearn.strategies.base import ArmContext, ArmOutput
from synthlearn.strategies.registry import ArmSpec
from synthlearn.tasks.model import train_task_model

log = logging.getLogger(__name__)


def raw_data_bytes(sites: Sequence[SiteRecord], cases: Sequence[CaseRecord] | None = None) -> int:
    """Bytes of the raw files of ``cases`` (default: all cases of ``sites``) plus each site's labels.csv."""
    cases = [c for s in sites for c in s.cases] if cases is None else list(cases)
    total = 0
    for case in cases:
        for path in case.files().values():
            p = Path(path)
            if p.is_file():
                total += p.stat().st_size
    for site in sites:
        if site.path is not None and (Path(site.path) / "labels.csv").is_file():
            total += (Path(site.path) / "labels.csv").stat().st_size
    return total


def run(ctx: ArmContext) -> ArmOutput:
    """Train the task model on the pooled real cases of all training sites."""
    cases = ctx.train_cases
    log.info("centralized: %d cases from %d sites", len(cases), len(ctx.train_sites))
    model = train_task_model(cases, ctx.setup, ctx.arm_dir, cache=ctx.cache, progress=ctx.progress,
                             label="centralized")
    return ArmOutput(models={ctx.name: model}, bytes_from_sites=raw_data_bytes(ctx.train_sites), rounds=1)


ARM = ArmSpec(name="centralized", run=run, task_kinds=("classification", "segmentation", "multitask"),
              spatial_dims=(2, 3),
              description="every training site's raw cases pooled in one place: the reference upper bound")
