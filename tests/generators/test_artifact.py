"""The artifact folder: SHA-256 manifest, and refusal of tampered or incomplete artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from synthlearn.generators.artifact import (
    MANIFEST,
    WEIGHT_FILES,
    ArtifactError,
    artifact_bytes,
    load_weights,
    read_manifest,
    verify_artifact,
    write_artifact,
)


@pytest.fixture
def artifact(tmp_path):
    figure = tmp_path / "curves.png"
    figure.write_bytes(b"\x89PNG\r\n\x1a\n fake figure")
    weights = {name: {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) + i}
               for i, name in enumerate(WEIGHT_FILES)}
    return write_artifact(tmp_path / "artifact", weights=weights, manifest={"label": "idh"},
                          files={"loss_curves.png": figure})


def test_written_artifact_verifies(artifact):
    manifest = verify_artifact(artifact)
    assert manifest["label"] == "idh"
    assert set(manifest["files"]) == {*WEIGHT_FILES, "loss_curves.png"}
    for name, info in manifest["files"].items():
        assert len(info["sha256"]) == 64 and info["bytes"] == (artifact / name).stat().st_size
    assert torch.equal(load_weights(artifact, WEIGHT_FILES[1])["w"], torch.arange(6.0).reshape(2, 3) + 1)
    assert artifact_bytes(artifact) == sum(p.stat().st_size for p in artifact.iterdir())
    assert not list(artifact.parent.glob(".artifact*"))  # no temporary folder left behind


def test_changed_byte_is_refused_naming_the_file(artifact):
    path = artifact / "diffusion.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"diffusion\.safetensors: SHA-256 differs"):
        verify_artifact(artifact)


def test_truncated_file_is_refused(artifact):
    path = artifact / "autoencoder.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"autoencoder\.safetensors: expected \d+ bytes"):
        verify_artifact(artifact)


def test_missing_file_is_refused(artifact):
    (artifact / "superres.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"superres\.safetensors: missing"):
        verify_artifact(artifact)


def test_extra_unlisted_weight_file_is_refused(artifact):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(artifact / "backdoor.safetensors"))
    with pytest.raises(ArtifactError, match=r"backdoor\.safetensors: not listed"):
        verify_artifact(artifact)


def test_pickle_weight_file_is_refused_even_when_listed(tmp_path):
    # a weight file that is a pickle, re-listed with a matching hash and digest: verify refuses its content, and
    # safetensors loading would refuse it too (nothing is ever unpickled)
    art = write_artifact(tmp_path / "a", weights={n: {"w": torch.zeros(1)} for n in WEIGHT_FILES}, manifest={})
    torch.save({"w": torch.zeros(1)}, art / "diffusion.safetensors")
    _relist(art)
    with pytest.raises(ArtifactError, match=r"diffusion\.safetensors: expected a safetensors file .*found a zip"):
        verify_artifact(art)
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_weights(art, "diffusion.safetensors")


class _Payload:
    """A pickle that, once unpickled, makes the folder ``marker``: proof that something deserialised it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def _relist(folder, extra=None):
    """Rewrite the manifest's file table (and its digest) to match the folder, as an attacker who can rewrite the
    whole folder would; ``extra`` adds listed entries by hand (name -> path)."""
    from synthlearn.generators.artifact import DIGEST_KEY, manifest_digest
    from synthlearn.runinfo import file_sha256

    manifest = json.loads((folder / MANIFEST).read_text())
    entries = {p.name: p for p in folder.iterdir() if p.name != MANIFEST and p.is_file()}
    entries.update(extra or {})
    manifest["files"] = {name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for name, p in entries.items()}
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _pickle(path, marker):
    import pickle

    path.write_bytes(pickle.dumps({"w": _Payload(marker)}))


def _torch_save(path, marker):
    torch.save({"w": _Payload(marker)}, path)


def _outside(art, name):
    """A path beside the artifact folder (what a symlink or a ``../`` name points at)."""
    return art.parent / name


def _extra_symlink(art, marker):
    _pickle(_outside(art, "w.safetensors"), marker)
    (art / "link.safetensors").symlink_to(_outside(art, "w.safetensors"))


def _listed_file_is_a_symlink(art, marker):
    # same bytes, so size and SHA-256 still match the manifest: only the link itself gives it away
    target = _outside(art, "same.safetensors")
    target.write_bytes((art / "diffusion.safetensors").read_bytes())
    (art / "diffusion.safetensors").unlink()
    (art / "diffusion.safetensors").symlink_to(target)


def _sub_folder(art, marker):
    (art / "extra").mkdir()
    (art / "extra" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")


def _listed(write, name):
    def mutate(art, marker):
        write(art / name, marker)
        _relist(art)
    return mutate


def _listed_outside(art, marker):
    _pickle(_outside(art, "x.safetensors"), marker)
    _relist(art, {"../x.safetensors": _outside(art, "x.safetensors")})


HOSTILE = {
    # unlisted content
    "extra evil.pkl": (lambda art, m: _pickle(art / "evil.pkl", m), r"evil\.pkl: not listed in manifest\.json"),
    "extra model.pt": (lambda art, m: _torch_save(art / "model.pt", m), r"model\.pt: not listed in manifest\.json"),
    "extra notes.txt": (lambda art, m: (art / "notes.txt").write_text("hello"), r"notes\.txt: not listed"),
    "extra symlink": (_extra_symlink, r"link\.safetensors: expected a regular file, found a symlink"),
    "listed file is a symlink": (_listed_file_is_a_symlink,
                                 r"diffusion\.safetensors: expected a regular file, found a symlink"),
    "sub-folder": (_sub_folder, r"extra: expected only the listed files .*found a folder"),
    # listed, with sizes, hashes and the manifest's digest recomputed: the content or the name gives it away
    "pickle renamed .safetensors": (_listed(_pickle, "diffusion.safetensors"),
                                    r"diffusion\.safetensors: expected a safetensors file .*found a pickle"),
    "torch.save renamed .safetensors": (_listed(_torch_save, "autoencoder.safetensors"),
                                        r"autoencoder\.safetensors: expected a safetensors file .*found a zip archive"),
    "pickle renamed .png": (_listed(_pickle, "loss_curves.png"),
                            r"loss_curves\.png: expected a PNG image, found a pickle"),
    "manifest lists model.pt": (_listed(_torch_save, "model.pt"),
                                r"'model\.pt': expected only \.safetensors or \.png files .*found a \.pt file"),
    "manifest lists evil.pkl": (_listed(_pickle, "evil.pkl"),
                                r"'evil\.pkl': expected only \.safetensors or \.png files .*found a \.pkl file"),
    "manifest lists ../x": (_listed_outside, r"'\.\./x\.safetensors': expected a plain file name"),
    "manifest lists a sub-path": (lambda art, m: _relist(art, {"sub/x.png": art / "loss_curves.png"}),
                                  r"'sub/x\.png': expected a plain file name"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_artifact_is_refused_before_any_weights_are_read(artifact, tmp_path, monkeypatch, case):
    """Unlisted files, links, folders, pickles under a tensor's or a figure's name, pickle suffixes and paths in the
    manifest: refused by the artifact check that ``load_generator`` runs first, naming the file, what was expected and
    what was found; no loader is reached and no payload runs."""
    import pickle

    import safetensors.torch

    from synthlearn.generators.ldm import sample

    def never(*args, **kwargs):
        raise AssertionError("weights were read before the artifact was refused")

    marker = tmp_path / "payload-ran"
    mutate, match = HOSTILE[case]
    mutate(artifact, marker)
    for target, name in ((sample, "load_weights"), (safetensors.torch, "load_file"), (torch, "load"),
                         (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, never)
    with pytest.raises(ArtifactError, match=match) as info:
        sample.load_generator(artifact)
    assert "expected" in str(info.value) and "found" in str(info.value)
    assert not marker.exists()


def test_manifest_problems(artifact, tmp_path):
    (artifact / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        verify_artifact(artifact)
    (artifact / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="expected format"):
        read_manifest(artifact)
    (artifact / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing"):
        verify_artifact(artifact)
    with pytest.raises(FileNotFoundError):
        verify_artifact(tmp_path / "nowhere")


def test_manifest_must_list_every_weight_file(tmp_path):
    art = write_artifact(tmp_path / "a", weights={"autoencoder.safetensors": {"w": torch.zeros(1)}}, manifest={})
    with pytest.raises(ArtifactError, match=r"expected superres\.safetensors among the listed files"):
        verify_artifact(art)


def test_write_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_artifact(out, weights={"autoencoder.safetensors": {"w": torch.zeros(1)}}, manifest={})
    assert (out / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_artifact_written_before_class_in_timestep_still_loads(tmp_path):
    """Manifests of artifacts made before ``diffusion.class_in_timestep`` existed load as cross-attention only."""
    import dataclasses

    from synthlearn.config import to_dict
    from synthlearn.generators.ldm.config import load_generator_config
    from synthlearn.generators.ldm.sample import load_generator
    from synthlearn.models.autoencoder import GeneratorAutoencoder
    from synthlearn.models.diffusion import ClassConditionedUNet
    from synthlearn.models.superres import SuperResolution

    cfg = load_generator_config("configs/generator_tiny.toml")
    old = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, class_in_timestep=False))
    config = to_dict(old)
    del config["diffusion"]["class_in_timestep"]
    weights = {
        "autoencoder.safetensors": GeneratorAutoencoder(old.autoencoder, old.shape, old.latent_shape).ae.state_dict(),
        "superres.safetensors": SuperResolution(old.superres, old.shape).state_dict(),
        "diffusion.safetensors": ClassConditionedUNet(old.diffusion, old.autoencoder.latent_channels, 2).state_dict(),
    }
    manifest = {"config": config, "label": "idh", "class_names": ["wildtype", "mutant"],
                "class_counts": {"wildtype": 1, "mutant": 1}, "shape": list(old.shape),
                "latent_shape": list(old.latent_shape), "latent_channels": old.autoencoder.latent_channels,
                "voxel_size_mm": [6.0, 6.0, 6.0], "latent_scale_factor": 1.0, "seed": 0}
    out = write_artifact(tmp_path / "old", weights=weights, manifest=manifest)
    gen = load_generator(out)
    assert gen.diffusion.class_in_timestep is False and gen.diffusion.unet.num_class_embeds is None


def _edit_manifest(folder, change, redigest):
    from synthlearn.generators.artifact import DIGEST_KEY, manifest_digest

    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    if redigest:
        manifest[DIGEST_KEY] = manifest_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize("redigest", [False, True])
def test_edited_manifest_fields_are_refused(tiny_artifact, tmp_path, redigest, capsys):
    """Reversed class names would swap the classes of every synthetic case, a latent scale of 50 would sample far off
    the latents' scale: refused by the manifest's own digest, and (when the digest was recomputed too) by the
    fields' own checks; nothing is written."""
    import shutil

    from synthlearn.cli import main

    _, artifact = tiny_artifact
    cases = {"class_names": lambda m: m["class_names"].reverse(), "latent_scale_factor": lambda m: m.update(
        latent_scale_factor=50.0), "voxel_size_mm": lambda m: m.update(voxel_size_mm=[1.0, -1.0, 1.0])}
    for field, change in cases.items():
        copy = tmp_path / f"artifact_{field}"
        shutil.copytree(artifact, copy)
        _edit_manifest(copy, change, redigest)
        out = tmp_path / f"syn_{field}"
        assert main(["synthesize", "--artifact", str(copy), "--per-class", "1", "--out", str(out), "-q"]) == 2
        err = capsys.readouterr().err
        assert (field in err) if redigest else ("changed after training" in err), err
        assert not out.exists()


def test_a_version_1_manifest_without_its_digest_still_verifies(artifact):
    from synthlearn.generators.artifact import DIGEST_KEY

    manifest = json.loads((artifact / MANIFEST).read_text())
    del manifest[DIGEST_KEY]
    manifest["format_version"] = 1
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    assert verify_artifact(artifact)["format_version"] == 1
    manifest["format_version"] = 2  # a version 2 manifest must carry it
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="changed after training"):
        verify_artifact(artifact)
