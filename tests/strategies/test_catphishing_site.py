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
                                      CatphishingConfig(transport="flower"), received_dir=tmp_path / "artifacts")
    files = pack_artifact(artifact)
    state, entry = protocol.aggregate(1, {}, [SiteReply("tcga", {GROUP: files}, {"training-cases": 5,
                                                                                 "holdout-cases": 1})])
    assert state == {} and entry["artifacts"]["tcga"]["training_cases"] == 5
    assert json.loads((tmp_path / "artifacts" / "tcga" / "manifest.json").read_text())["label"] == "idh"
    with pytest.raises(FederationError, match="expected one 'artifact' group"):
        protocol.aggregate(1, {}, [SiteReply("utsw", {GROUP: files, "weights": {"w": torch.zeros(2)}}, {})])
    assert protocol.spec()["arm"] == "catphishing"
