"""The release gate at the site (issue 28 item 3): the white-box loss attack, the gate's decision on a real tiny
generator, its record in the manifest (refused without a reason, released with one) and the `site gate` command."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from synthlearn.cli import main
from synthlearn.data.layouts import open_site
from synthlearn.generators.artifact import ArtifactError, amend_manifest, read_manifest, verify_artifact
from synthlearn.generators.ldm.release_gate import (
    ReleaseGateConfig,
    ReleaseRefused,
    describe_refusal,
    loss_attack,
    record_release,
    release_gate,
)
from synthlearn.strategies.catphishing_site import privacy_holdout

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
FAST = ReleaseGateConfig(n_per_class=2, steps=2, loss_timesteps=2, loss_noises=1, n_bootstrap=50)


@pytest.fixture(scope="module")
def gated(tiny_study, tmp_path_factory):
    """A tiny generator trained on half of the tiny study's tcga (the rest held out) and the gate's decision."""
    root = tmp_path_factory.mktemp("gate")
    site = tiny_study / "tcga"
    members, holdout = privacy_holdout(open_site(site), 0.5, "idh", 0)
    artifact = root / "artifact"
    from synthlearn.generators.ldm.config import load_generator_config
    from synthlearn.generators.ldm.train import train_generator

    train_generator(site, load_generator_config(CONFIGS / "generator_tiny.toml"), artifact, case_ids=members,
                    progress=False)
    decision = release_gate(artifact, site, members, holdout, FAST, seed=0)
    return site, artifact, members, holdout, decision


def test_loss_attack_counts_members_far_below_the_held_out_losses():
    rng = np.random.default_rng(0)
    holdout = np.exp(rng.normal(0, 0.1, 12))
    healthy = np.exp(rng.normal(0, 0.1, 30))
    memorised = np.concatenate([healthy, [np.exp(-2.0), np.exp(-3.0)]])
    clean = loss_attack(healthy, holdout, outlier_z=4.0, n_bootstrap=100, seed=0)
    leaky = loss_attack(memorised, holdout, outlier_z=4.0, n_bootstrap=100, seed=0)
    assert clean["exposed"] == 0 and 0.2 < clean["auc"] < 0.8
    assert leaky["exposed"] == 2 and leaky["member_min_z"] < -10
    everything = loss_attack(holdout * 0.1, holdout, outlier_z=4.0, n_bootstrap=100, seed=0)
    assert everything["auc"] == 1.0 and everything["ci_low"] == 1.0  # a model that fits every member better


def test_the_gate_decides_from_every_check_and_names_no_case(gated):
    site, artifact, members, holdout, decision = gated
    assert set(decision["checks"]) == {"copy_rate", "membership_ssim", "membership_loss", "exposed_members",
                                       "controls"}
    assert decision["passed"] == all(c["passed"] for c in decision["checks"].values())
    assert decision["failed"] == [k for k, c in decision["checks"].items() if not c["passed"]]
    assert (decision["n_members"], decision["n_holdout"]) == (len(members), len(holdout))
    assert decision["n_synthetic"] == 4  # two per class
    text = json.dumps(decision, allow_nan=False)  # plain JSON: it goes into the manifest
    assert not any(case in text for case in members + holdout) and str(site) not in text
    assert not (artifact.parent / ".artifact.gate").exists()  # the samples do not stay


def test_a_refused_artifact_is_released_only_with_a_recorded_reason(gated, tmp_path):
    _, artifact, _, _, decision = gated
    mine = tmp_path / "artifact"
    shutil.copytree(artifact, mine)
    refused = copy.deepcopy(decision)
    refused["checks"]["copy_rate"].update(value=0.5, passed=False)
    refused.update(passed=False, failed=["copy_rate"])
    before = (mine / "manifest.json").read_bytes()
    with pytest.raises(ReleaseRefused, match="copy_rate: 0.5 > 0.1") as info:
        record_release(mine, refused)
    assert info.value.decision["failed"] == ["copy_rate"]
    assert (mine / "manifest.json").read_bytes() == before  # nothing written
    entry = record_release(mine, refused, "  approved by the ethics board, ticket 12  ")["release_gate"]
    assert entry["overridden"] and entry["override_reason"] == "approved by the ethics board, ticket 12"
    manifest = verify_artifact(mine)  # re-digested: the amended manifest verifies
    assert manifest["release_gate"]["failed"] == ["copy_rate"]
    assert "copy_rate" in describe_refusal(refused)


def test_amending_a_manifest_keeps_it_verifiable_and_refuses_format_fields(gated, tmp_path):
    _, artifact, _, _, _ = gated
    mine = tmp_path / "artifact"
    shutil.copytree(artifact, mine)
    with pytest.raises(ArtifactError, match="belongs to the artifact format"):
        amend_manifest(mine, "files", {})
    with pytest.raises(ValueError):
        amend_manifest(mine, "release_gate", {"x": float("nan")})
    amend_manifest(mine, "release_gate", {"passed": True})
    assert verify_artifact(mine)["release_gate"] == {"passed": True}
    manifest = json.loads((mine / "manifest.json").read_text())
    manifest["release_gate"] = {"passed": False}  # an edit after the gate is caught
    (mine / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="changed after training"):
        read_manifest(mine)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_per_class=0), "n_per_class"), (dict(max_copy_rate=1.5), "max_copy_rate"),
    (dict(max_membership_auc=0.4), "max_membership_auc"), (dict(outlier_z=0.0), "outlier_z"),
    (dict(max_exposed=-1), "max_exposed"), (dict(steps=0), "steps"),
])
def test_gate_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReleaseGateConfig(**kwargs)


def test_the_gate_refuses_too_few_held_out_cases_and_unknown_ids(gated):
    site, artifact, members, holdout, _ = gated
    with pytest.raises(ValueError, match=">= 2 member and >= 2 held-out"):
        release_gate(artifact, site, members, holdout[:1], FAST)
    with pytest.raises(ValueError, match="not cases of this site"):
        release_gate(artifact, site, members, [*holdout, "nobody"], FAST)


def test_site_gate_command_writes_the_decision_into_the_manifest(gated, tmp_path, capsys):
    site, artifact, members, holdout, _ = gated
    mine = tmp_path / "artifact"
    shutil.copytree(artifact, mine)
    split = tmp_path / "holdout.json"
    split.write_text(json.dumps({"members": members, "holdout": holdout}))
    settings = tmp_path / "gate.toml"
    settings.write_text("n_per_class = 2\nsteps = 2\nloss_timesteps = 2\nloss_noises = 1\nn_bootstrap = 50\n")
    args = ["site", "gate", "--artifact", str(mine), "--site", str(site), "--holdout", str(split), "--config",
            str(settings), "--out", str(tmp_path / "decision.json"), "-q"]
    code = main(args)
    decision = json.loads((tmp_path / "decision.json").read_text())
    if decision["passed"]:
        assert code == 0 and verify_artifact(mine)["release_gate"]["passed"]
    else:  # refused: exit 4 and the artifact unchanged; an override releases it
        assert code == 4 and "release_gate" not in verify_artifact(mine)
        assert main([*args, "--override-reason", "test"]) == 0
        assert verify_artifact(mine)["release_gate"]["override_reason"] == "test"
    settings.write_text("n_per_class = 2\nsurprise = 1\n")
    assert main(args) == 2
    assert "surprise" in capsys.readouterr().err
