"""The ``asyndgan_pooled`` arm: AsynDGAN's "Syn-All" baseline (paper 003, Table 2): the same generator and
discriminator trained on the training sites' cases pooled in one place (one discriminator, no federation), then
the task model on its generated images. It bounds what the federated ``asyndgan`` arm can reach; like
``centralized`` it needs the raw data in one place. Settings: the ``[asyndgan]`` table (the two arms differ only
in the discriminators).

Audit holdout: the pooled cases leave out the union of the training sites' audit holdouts
(:func:`synthlearn.strategies.asyndgan.audit_split`, the same split as ``asyndgan``'s for the same seed), so the
baseline learns from exactly the cases the federated arm learns from, and its synthetic images are audited once
against all of them (members: the pooled cases; non-members: the union), without a reference control."""

from __future__ import annotations

from synthlearn.data.contract import SiteRecord
from synthlearn.strategies.asyndgan import AsynDGANConfig, audit_split, run_on_sites
from synthlearn.strategies.base import ArmContext, ArmOutput
from synthlearn.strategies.registry import ArmSpec

#: the one "site" holding every training case
POOLED = "pooled"


def run(ctx: ArmContext) -> ArmOutput:
    """AsynDGAN with one discriminator on the pooled training cases (in process: nothing crosses a boundary). Each
    generator step sees as many images as AsynDGAN's (``batch_size`` x the number of training sites)."""
    import dataclasses

    pooled = SiteRecord(name=POOLED, role="train", cases=ctx.train_cases)
    cfg = dataclasses.replace(ctx.arm_config, masks_from="sites")  # the pooled baseline holds the real masks
    held = sorted(k for site in ctx.train_sites for k in audit_split(site, cfg.audit_holdout, ctx.setup)[1])
    ctx = dataclasses.replace(ctx, arm_config=dataclasses.replace(cfg, batch_size=cfg.batch_size * len(ctx.train_sites)))
    out = run_on_sites(ctx, [pooled], "inprocess", holdout={POOLED: held})
    out.extra["note"] = "a centralized baseline: the raw cases were pooled, so no bytes crossed a site boundary"
    return ArmOutput(models=out.models, bytes_from_sites=0, rounds=0, extra=out.extra)


ARM = ArmSpec(name="asyndgan_pooled", run=run, config=AsynDGANConfig, table="asyndgan",
              task_kinds=("classification", "segmentation", "multitask"), spatial_dims=(2, 3),
              description="AsynDGAN's Syn-All: the same GAN with one discriminator on the pooled cases (centralized "
              "baseline, paper 003)")

__all__ = ["ARM", "POOLED", "run"]
