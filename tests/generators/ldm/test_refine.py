"""The generator's refiner stage: it learns a class-dependent tumour residual, ships in the artifact, and
``synthesize`` applies it (or not, on request)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from synthlearn.data.io import load_nifti
from synthlearn.generators.artifact import verify_artifact
from synthlearn.generators.ldm.memorising import train_memorising_generator
from synthlearn.generators.ldm.refine import refine_cases, train_refiner
from synthlearn.generators.ldm.sample import load_generator, synthesize
from synthlearn.models.refiner import RefinerConfig, TumourRefiner

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def _pairs(n: int = 16):
    """Decoded cases with a cube of tumour each; the real case's first sequence is 0.4 brighter inside the tumour
    for class 1 and 0.4 darker for class 0: a residual only the class explains."""
    g = torch.Generator().manual_seed(0)
    decoded = 0.5 + 0.05 * torch.randn(n, 5, 16, 16, 16, generator=g)
    decoded[:, 4] = 0
    classes = torch.arange(n) % 2
    for i in range(n):
        c = torch.randint(5, 11, (3,), generator=g).tolist()
        decoded[i, 4, c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = 1
    real = decoded.clone()
    real[:, 0] += 0.4 * (2 * classes - 1).float().view(-1, 1, 1, 1) * decoded[:, 4]
    return real, decoded, classes


def test_the_refiner_learns_a_residual_that_only_the_class_explains(tmp_path):
    real, decoded, classes = _pairs()
    cfg = RefinerConfig(epochs=30, crop=(8, 8, 8), channels=(8, 16), batch_size=8, steps=5, lr=3e-3, jitter=1)
    torch.manual_seed(0)
    model = TumourRefiner(cfg, 5, 2)
    history = train_refiner(model, real, decoded, classes, cfg, seed=0, ckpt=tmp_path / "r.pt",
                            device=torch.device("cpu"))
    assert len(history["mse"]) == 30 and history["mse"][-1] < 0.75 * history["mse"][0]
    residual = (real - decoded)[:, 0][decoded[:, 4] > 0.5]
    assert float(model.residual_scale) > 1.0  # the residual is small; the network sees it at unit spread

    def tumour_error(cls):
        out = refine_cases(model, cfg, decoded, cls, torch.Generator().manual_seed(1))
        inside = decoded[:, 4] > 0.5
        return float((out - real)[:, 0][inside].abs().mean()), out

    before = float(residual.abs().mean())
    right, out = tumour_error(classes)
    wrong, _ = tumour_error(1 - classes)
    assert right < 0.6 * before < wrong  # the class steers the residual
    assert torch.equal(out, tumour_error(classes)[1])  # same generator, same refinement
    outside = (out - decoded)[:, :4][(decoded[:, 4:5] <= 0.5).expand(-1, 4, -1, -1, -1)]
    assert float(outside.abs().mean()) < 0.02  # the brain away from the tumour is left nearly as decoded

    resumed = train_refiner(model, real, decoded, classes, cfg, seed=0, ckpt=tmp_path / "r.pt",
                            device=torch.device("cpu"))
    assert resumed == history  # a finished stage is not trained again


def test_pairs_that_are_already_equal_are_refused(tmp_path):
    _, decoded, classes = _pairs(4)
    cfg = RefinerConfig(epochs=1, crop=(8, 8, 8), channels=(8, 16))
    with pytest.raises(ValueError, match="nothing to refine"):
        train_refiner(TumourRefiner(cfg, 5, 2), decoded, decoded, classes, cfg, seed=0, ckpt=tmp_path / "r.pt",
                      device=torch.device("cpu"))


@pytest.fixture(scope="module")
def refined_artifact(tiny_study, tmp_path_factory):
    from synthlearn.cli import main

    config = tmp_path_factory.mktemp("cfg") / "generator.toml"
    config.write_text(f'base = "{CONFIGS / "generator_tiny.toml"}"\n[refiner]\nepochs = 2\ncrop = [16, 16, 16]\n'
                      f'channels = [8, 16]\nsteps = 3\n')
    out = tmp_path_factory.mktemp("refined") / "artifact"
    assert main(["train-generator", "--site", str(tiny_study / "tcga"), "--config", str(config), "--out", str(out),
                 "-q"]) == 0
    return tiny_study / "tcga", out


def test_the_artifact_ships_the_refiner_and_synthesize_applies_it_unless_told_not_to(refined_artifact, tmp_path):
    from synthlearn.cli import main

    _, artifact = refined_artifact
    manifest = verify_artifact(artifact)
    assert "refiner.safetensors" in manifest["files"]
    assert len(manifest["training"]["history"]["refiner"]["mse"]) == 2
    assert load_generator(artifact).refiner is not None
    assert main(["synthesize", "--artifact", str(artifact), "--per-class", "2", "--out", str(tmp_path / "with"),
                 "-q"]) == 0
    assert main(["synthesize", "--artifact", str(artifact), "--per-class", "2", "--out", str(tmp_path / "without"),
                 "--no-refiner", "-q"]) == 0
    with_, without = (json.loads((tmp_path / k / "synthesis.json").read_text())["refiner"] for k in ("with", "without"))
    assert with_ == {"applied": True, "steps": 3, "crop": [16, 16, 16], "sample_level": 0.0}
    assert without == {"applied": False}
    a = load_nifti(tmp_path / "with" / "syn-wildtype-00000" / "t2.nii.gz")[0]
    b = load_nifti(tmp_path / "without" / "syn-wildtype-00000" / "t2.nii.gz")[0]
    assert not np.allclose(a, b)  # the same latents, refined or not


def test_the_memorising_control_of_a_refined_generator_keeps_its_refiner(refined_artifact, tmp_path):
    site, artifact = refined_artifact
    from synthlearn.data.layouts import open_study

    ids = sorted(c.case_id for c in open_study(site).sites[0].cases)[:1]
    out = train_memorising_generator(artifact, site, ids, tmp_path / "control", steps=2, decoder_steps=0, seed=3)
    assert load_generator(out).refiner is not None
    synthesize(out, 1, tmp_path / "syn", seed=0, progress=False)
