"""The generator positive control of the privacy audit: a site's artifact over-fitted to a few of its cases."""

import pytest
import torch

from synthlearn.data.layouts import open_study
from synthlearn.generators.artifact import load_weights, verify_artifact
from synthlearn.generators.ldm.sample import synthesize
from synthlearn.generators.ldm.memorising import train_memorising_generator


@pytest.fixture
def shipped(tiny_artifact):
    """(site folder, artifact) of the tiny generator trained on site tcga (conftest; read-only)."""
    return tiny_artifact


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(a[k], b[k]) for k in keys)


def test_control_artifact_memorises_the_given_cases_and_samples_like_any_artifact(shipped, tmp_path):
    site, artifact = shipped
    ids = sorted(c.case_id for c in open_study(site).sites[0].cases)[:2]
    out = train_memorising_generator(artifact, site, ids, tmp_path / "control", steps=4, decoder_steps=2, seed=3)
    manifest = verify_artifact(out)
    control = manifest["positive_control"]
    assert control["memorised_cases"] == 2 and control["steps"] >= 4 and control["decoder_steps"] >= 2
    assert sum(manifest["class_counts"].values()) == 2
    assert sorted(p.name for p in out.iterdir()) == ["autoencoder.safetensors", "diffusion.safetensors",
                                                      "manifest.json", "superres.safetensors"]  # no checkpoints left
    before = {n: load_weights(artifact, n) for n in ("autoencoder.safetensors", "diffusion.safetensors")}
    after = {n: load_weights(out, n) for n in ("autoencoder.safetensors", "diffusion.safetensors")}
    assert _changed(before["diffusion.safetensors"], after["diffusion.safetensors"], "")
    assert _changed(before["autoencoder.safetensors"], after["autoencoder.safetensors"], "decoder.")
    assert not _changed(before["autoencoder.safetensors"], after["autoencoder.safetensors"], "encoder.")
    syn = synthesize(out, 2, tmp_path / "syn", seed=0, progress=False)
    labelled = {c.labels.get("idh") for c in open_study(syn).sites[0].cases}
    assert labelled == set(k for k, v in manifest["class_counts"].items() if v)  # only the memorised classes

    keep_decoder = train_memorising_generator(artifact, site, ids[:1], tmp_path / "control0", steps=2,
                                              decoder_steps=0, seed=3)
    kept = load_weights(keep_decoder, "autoencoder.safetensors")
    assert not _changed(before["autoencoder.safetensors"], kept, "")


@pytest.mark.parametrize("kwargs, match", [({"case_ids": []}, "at least one case"),
                                           ({"case_ids": ["no-such-case"]}, "not in the site"),
                                           ({"steps": 0}, "steps must be"),
                                           ({"decoder_steps": -1}, "decoder_steps must be"),
                                           ({"decoder_lr": 0.0}, "decoder_lr")])
def test_bad_arguments_are_refused_before_anything_is_written(shipped, tmp_path, kwargs, match):
    site, artifact = shipped
    first = sorted(c.case_id for c in open_study(site).sites[0].cases)[0]
    args = {"case_ids": [first], "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_memorising_generator(artifact, site, out=tmp_path / "control", **args)
    assert not (tmp_path / "control").exists()
