"""The ``local`` arm: each training site trains a task model on its own cases only; nothing leaves a
site (the lower bound; AsynDGAN's "Real-Subset-n"). Every site's model is evaluated on the test sites.
"""

from __future__ import annotations

import logging

from synthlearn.strategies.base import ArmContext, ArmOutput
from synthlearn.strategies.registry import ArmSpec
from synthlearn.tasks.model import train_task_model

log = logging.getLogger(__name__)


def run(ctx: ArmContext) -> ArmOutput:
    """One task model per training site, saved under ``<arm_dir>/<site>/model``."""
    models = {}
    for site in ctx.train_sites:
        log.info("local: site %s, %d cases", site.name, len(site.cases))
        models[site.name] = train_task_model(site.cases, ctx.setup, ctx.arm_dir / site.name, cache=ctx.cache,
                                             progress=ctx.progress, label=f"local {site.name}")
    return ArmOutput(models=models, bytes_from_sites=0, rounds=0)


ARM = ArmSpec(name="local", run=run, task_kinds=("classification", "segmentation", "multitask"),
              spatial_dims=(2, 3),
              description="each training site alone on its own cases: the lower bound")
