"""CATphishing's artifact as one message: packed at the site, written and verified on arrival at the server, and a
tampered, pickled or oddly named one refused with nothing kept."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from synthlearn.generators.artifact import WEIGHT_FILES, write_artifact
from synthlearn.protocol import FederationError, SiteReply
from synthlearn.strategies.catphishing_site import GROUP, ArtifactUploadProtocol, pack_artifact, unpack_artifact


@pytest.fixture
def artifact(tmp_path):
    weights = {name: {"w": torch.arange(6, dtype=torch.float32) + i} for i, name in enumerate(WEIGHT_FILES)}
    return write_artifact(tmp_path / "artifact", weights=weights, manifest={"label": "idh", "class_counts": {"0": 2}})


def test_an_artifact_travels_as_bytes_and_arrives_identical(artifact, tmp_path):
    files = pack_artifact(artifact)
    assert set(files) == {*WEIGHT_FILES, "manifest.json"} and all(t.dtype == torch.uint8 for t in files.values())
    manifest = unpack_artifact(files, tmp_path / "server" / "tcga", "tcga")
    assert manifest["label"] == "idh"
    for name in files:
        assert (tmp_path / "server" / "tcga" / name).read_bytes() == (artifact / name).read_bytes()


def test_a_changed_pickled_or_misnamed_artifact_is_refused_and_nothing_kept(artifact, tmp_path):
    good = pack_artifact(artifact)
    target = tmp_path / "server" / "tcga"
    flipped = dict(good)
    data = flipped["diffusion.safetensors"].clone()
    data[-1] ^= 1
    flipped["diffusion.safetensors"] = data
    with pytest.raises(FederationError, match="site tcga: its artifact was refused on arrival.*SHA-256"):
        unpack_artifact(flipped, target, "tcga")
    partial = {**good, "diffusion.safetensors": good["diffusion.safetensors"][:-7].clone()}  # an upload cut short
    with pytest.raises(FederationError, match="refused on arrival.*bytes"):
        unpack_artifact(partial, target, "tcga")
    missing = {k: v for k, v in good.items() if k != "superres.safetensors"}
    with pytest.raises(FederationError, match="refused on arrival"):
        unpack_artifact(missing, target, "tcga")
    pickled = {**good, "model.pkl": torch.frombuffer(bytearray(pickle.dumps({"a": 1})), dtype=torch.uint8)}
    with pytest.raises(FederationError, match="not listed"):
        unpack_artifact(pickled, target, "tcga")
    renamed = {**good, "diffusion.safetensors": torch.frombuffer(bytearray(pickle.dumps(1)), dtype=torch.uint8)}
    with pytest.raises(FederationError, match="refused on arrival"):  # a pickle where the weights should be
        unpack_artifact(renamed, target, "tcga")
    for bad in ({"../manifest.json": good["manifest.json"]}, {"a b": good["manifest.json"]},
                {"manifest.json": torch.zeros(3)}, {}):
        with pytest.raises(FederationError, match="plain file names with byte tensors"):
            unpack_artifact(bad, target, "tcga")
    assert not target.exists() and not list(target.parent.glob(".*"))  # nothing kept, no half-written folder


def test_the_server_round_accepts_only_the_artifact_group(artifact, tmp_path):
    from synthlearn.strategies.catphishing import CatphishingConfig
    from synthlearn.study import load_study_config

    protocol = ArtifactUploadProtocol(load_study_config("configs/study_tiny.toml").setup,
                                      CatphishingConfig(transport="flower", release_gate=False),
                                      received_dir=tmp_path / "artifacts")
    files = pack_artifact(artifact)
    state, entry = protocol.aggregate(1, {}, [SiteReply("tcga", {GROUP: files}, {"training-cases": 5,
                                                                                 "holdout-cases": 1})])
    assert state == {} and entry["artifacts"]["tcga"]["training_cases"] == 5
    assert json.loads((tmp_path / "artifacts" / "tcga" / "manifest.json").read_text())["label"] == "idh"
    with pytest.raises(FederationError, match="expected one 'artifact' group"):
        protocol.aggregate(1, {}, [SiteReply("utsw", {GROUP: files, "weights": {"w": torch.zeros(2)}}, {})])
    assert protocol.spec()["arm"] == "catphishing"


def test_with_the_gate_on_the_server_refuses_an_ungated_artifact(artifact, tmp_path):
    from synthlearn.generators.artifact import amend_manifest
    from synthlearn.strategies.catphishing import CatphishingConfig
    from synthlearn.study import load_study_config

    cfg = CatphishingConfig(transport="flower")
    assert cfg.gate_on and not CatphishingConfig().gate_on  # on by default over Flower, off for the folder copy
    protocol = ArtifactUploadProtocol(load_study_config("configs/study_tiny.toml").setup, cfg,
                                      received_dir=tmp_path / "artifacts")
    with pytest.raises(FederationError, match="carries no release-gate decision"):
        protocol.aggregate(1, {}, [SiteReply("tcga", {GROUP: pack_artifact(artifact)}, {})])
    assert not (tmp_path / "artifacts" / "tcga").exists()
    amend_manifest(artifact, "release_gate", {"passed": True, "released": True, "failed": [], "checks": {}})
    _, entry = protocol.aggregate(1, {}, [SiteReply("tcga", {GROUP: pack_artifact(artifact)}, {})])
    assert entry["artifacts"]["tcga"]["release_gate"]["passed"]
    with pytest.raises(ValueError, match="holdout_fraction > 0"):
        CatphishingConfig(transport="flower", holdout_fraction=0.0)


def test_a_deployed_site_takes_the_release_override_from_itself_never_from_the_server(tiny_study, tmp_path):
    """A gate set to refuse (every member below the held-out mean loss counts as exposed): the server's override in
    the arm settings is ignored at a deployed site; the site's own releases the artifact with its reason."""
    from synthlearn.data.layouts import open_site
    from synthlearn.generators.ldm.release_gate import ReleaseGateConfig, ReleaseRefused
    from synthlearn.strategies.catphishing import CatphishingConfig
    from synthlearn.strategies.catphishing_site import SITE_POLICY
    from synthlearn.study import load_study_config

    gate = ReleaseGateConfig(n_per_class=2, steps=2, loss_timesteps=2, loss_noises=1, n_bootstrap=50,
                             outlier_z=1e-9)
    cfg = CatphishingConfig(generator="configs/generator_tiny.toml", transport="flower", holdout_fraction=0.5,
                            gate=gate, release_gate_override="the server says so")
    protocol = ArtifactUploadProtocol(load_study_config("configs/study_tiny.toml").setup, cfg)
    site = open_site(tiny_study / "tcga")
    with pytest.raises(ReleaseRefused, match="exposed_members"):
        protocol.site_round(site, 1, {}, {}, state_dir=tmp_path / "state",
                            memory={SITE_POLICY: {"release_override": ""}})
    assert "release_gate" not in json.loads((tmp_path / "state" / "artifact" / "manifest.json").read_text())
    decision = json.loads((tmp_path / "state" / "release_gate.json").read_text())  # kept at the site, in full
    assert not decision["passed"] and decision["failed"] == ["exposed_members"]
    out, _ = protocol.site_round(site, 1, {}, {}, state_dir=tmp_path / "state",
                                 memory={SITE_POLICY: {"release_override": "our board approved it"}})
    manifest = json.loads(bytes(out[GROUP]["manifest.json"].tolist()).decode())
    assert manifest["release_gate"]["overridden"]
    assert manifest["release_gate"]["override_reason"] == "our board approved it"
