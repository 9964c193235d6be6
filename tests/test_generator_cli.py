"""End to end: `train-generator` on one tiny phantom site, `synthesize`, verify; resume; refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from synthlearn.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "generator_tiny.toml"


@pytest.fixture(scope="module")
def trained(tiny_artifact):
    """(site folder, artifact folder) of the tiny generator trained once on site tcga, seed 0 (conftest)."""
    return tiny_artifact


def _arrays(site_dir: Path) -> dict[str, np.ndarray]:
    from synthlearn.data.io import load_nifti

    return {str(p.relative_to(site_dir)): load_nifti(p)[0] for p in sorted(site_dir.rglob("*.nii.gz"))}


def test_train_then_synthesize_cases_that_pass_verify(trained, tmp_path, capsys):
    from synthlearn.data.layouts import open_study
    from synthlearn.data.verify import verify_study

    site, artifact = trained
    assert sorted(p.name for p in artifact.iterdir()) == [
        "autoencoder.safetensors", "diffusion.safetensors", "loss_curves.png", "manifest.json",
        "superres.safetensors"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["class_names"] == ["wildtype", "mutant"]
    assert sum(manifest["class_counts"].values()) == len([d for d in site.iterdir() if d.is_dir()])
    assert manifest["perceptual_loss"]["used"] is False
    assert "case_ids" not in manifest["data_fingerprint"]
    text = (artifact / "manifest.json").read_text()
    for case_dir in site.iterdir():  # no case id and no local path leaves the site
        if case_dir.is_dir():
            assert case_dir.name not in text
    assert str(site) not in text

    out = tmp_path / "synthetic"
    assert main(["synthesize", "--artifact", str(artifact), "--per-class", "2", "--out", str(out), "--seed", "0",
                 "-q"]) == 0
    assert main(["verify-data", str(out), "-q"]) == 0
    report = verify_study(out, progress=False)
    assert report.ok, report.format()
    study = open_study(out)
    assert study.layout == "site" and len(study.sites) == 1
    cases = study.sites[0].cases
    assert len(cases) == 4
    assert sorted(c.labels.idh for c in cases) == ["mutant", "mutant", "wildtype", "wildtype"]
    assert all(c.labels.tumor_type is None and c.labels.mgmt is None for c in cases)
    info = json.loads((out / "synthesis.json").read_text())
    assert info["steps"] == 5 and info["classes"]["mutant"]["cases"] == 2


def test_same_seed_same_cases(trained, tmp_path):
    from synthlearn.generators.ldm.sample import synthesize

    _, artifact = trained
    a = synthesize(artifact, 1, tmp_path / "a", seed=7, steps=3, progress=False)
    b = synthesize(artifact, 1, tmp_path / "b", seed=7, steps=3, progress=False)
    c = synthesize(artifact, 1, tmp_path / "c", seed=8, steps=3, progress=False)
    arr_a, arr_b, arr_c = _arrays(a), _arrays(b), _arrays(c)
    assert arr_a.keys() == arr_b.keys()
    assert all(np.array_equal(arr_a[k], arr_b[k]) for k in arr_a)
    assert any(not np.array_equal(arr_a[k], arr_c[k]) for k in arr_a if k.endswith("t1.nii.gz"))


def test_tampered_artifact_is_refused_and_nothing_written(trained, tmp_path, capsys):
    _, artifact = trained
    bad = tmp_path / "artifact"
    shutil.copytree(artifact, bad)
    path = bad / "autoencoder.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    out = tmp_path / "synthetic"
    assert main(["synthesize", "--artifact", str(bad), "--per-class", "1", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "autoencoder.safetensors" in err and "SHA-256" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]

    shutil.rmtree(bad)
    shutil.copytree(artifact, bad)
    (bad / "superres.safetensors").unlink()  # incomplete upload
    assert main(["synthesize", "--artifact", str(bad), "--per-class", "1", "--out", str(out), "-q"]) == 2
    assert "superres.safetensors: missing" in capsys.readouterr().err
    assert not out.exists()


def test_interrupted_training_resumes_to_the_same_artifact(trained, tmp_path, monkeypatch, caplog):
    import synthlearn.generators.ldm.stages as tg
    from synthlearn.generators.ldm.config import load_generator_config
    from synthlearn.generators.ldm.train import train_generator

    site, reference = trained
    real_save = tg.save_checkpoint
    calls = {"n": 0}

    def save_then_die(path, payload):
        real_save(path, payload)
        calls["n"] += 1
        if calls["n"] == 4:  # autoencoder (2) and superres (1) done, diffusion 1 of 3 epochs done
            raise KeyboardInterrupt("simulated kill")

    out = tmp_path / "artifact"
    cfg = load_generator_config(TINY_CONFIG)
    monkeypatch.setattr(tg, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_generator(site, cfg, out, seed=0, progress=False)
    assert (out / "checkpoints" / "diffusion.pt").is_file() and not (out / "manifest.json").exists()
    monkeypatch.setattr(tg, "save_checkpoint", real_save)
    with caplog.at_level("INFO"):
        train_generator(site, cfg, out, seed=0, progress=False)
    assert "diffusion: resuming from epoch 1/3" in caplog.text
    assert not (out / "checkpoints").exists()
    for name in ("autoencoder.safetensors", "superres.safetensors", "diffusion.safetensors"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    # a resumed run refuses another seed or config in the same folder
    other = tmp_path / "other"
    monkeypatch.setattr(tg, "save_checkpoint", save_then_die)
    calls["n"] = 3
    with pytest.raises(KeyboardInterrupt):
        train_generator(site, cfg, other, seed=0, progress=False)
    monkeypatch.setattr(tg, "save_checkpoint", real_save)
    with pytest.raises(ValueError, match="different seed"):
        train_generator(site, cfg, other, seed=1, progress=False)


def test_bad_inputs_are_refused_and_nothing_written(tiny_study, tmp_path, capsys):
    out = tmp_path / "artifact"
    args = ["train-generator", "--config", str(TINY_CONFIG), "--out", str(out), "-q"]
    assert main([*args, "--site", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err

    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text(f'base = "{TINY_CONFIG}"\n[diffusion]\nepochz = 3\n')
    assert main(["train-generator", "--site", str(tiny_study / "tcga"), "--config", str(bad_cfg), "--out",
                 str(out), "-q"]) == 2
    assert "diffusion.epochz" in capsys.readouterr().err

    site = tmp_path / "site"
    shutil.copytree(tiny_study / "tcga", site)
    victim = sorted(site.glob("*/flair.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated upload
    assert main([*args, "--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert "flair.nii.gz" in err and "unreadable" in err

    assert main([*args, "--site", str(tiny_study)]) == 2  # a whole study, not one site
    assert "expected one site folder" in capsys.readouterr().err
    assert not out.exists()

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--site", str(tiny_study / "tcga")]) == 2
    assert "expected a new or empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_synthesize_argument_errors(trained, tmp_path, capsys):
    _, artifact = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    assert main(["synthesize", "--artifact", str(artifact), "--per-class", "1", "--out", str(out), "-q"]) == 2
    assert "expected a new or empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["synthesize", "--artifact", str(artifact), "--per-class", "0", "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit):
        main(["synthesize", "--artifact", str(artifact), "--per-class", "1", "--out", str(tmp_path / "y"),
              "--guidance-interval", "0.2", "1.5"])
    assert "[0, 1], found 1.5" in capsys.readouterr().err


def test_guidance_interval_reaches_the_sampler_and_the_record(trained, tmp_path):
    _, artifact = trained
    out = tmp_path / "syn"
    assert main(["synthesize", "--artifact", str(artifact), "--per-class", "1", "--out", str(out), "--steps", "3",
                 "--guidance", "3", "--guidance-interval", "0.04", "0.64", "-q"]) == 0
    info = json.loads((out / "synthesis.json").read_text())
    assert info["guidance_scale"] == 3.0 and info["guidance_interval"] == [0.04, 0.64]
    full = tmp_path / "full"
    assert main(["synthesize", "--artifact", str(artifact), "--per-class", "1", "--out", str(full), "--steps", "3",
                 "--guidance", "3", "-q"]) == 0
    assert json.loads((full / "synthesis.json").read_text())["guidance_interval"] == [0.0, 1.0]  # the tiny default
    a, b = _arrays(out), _arrays(full)
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.endswith("t1.nii.gz"))


@pytest.mark.slow
def test_killed_train_generator_process_resumes(tiny_study, tmp_path):
    """A real SIGKILL of the CLI process mid-training, then the same command again."""
    out = tmp_path / "artifact"
    cmd = [sys.executable, "-m", "synthlearn.cli", "train-generator", "--site", str(tiny_study / "utsw"),
           "--config", str(TINY_CONFIG), "--out", str(out), "-q"]
    env = {"PYTHONPATH": str(ROOT / "src"), "SYNTHLEARN_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "autoencoder.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stdout + done.stderr
    from synthlearn.generators.artifact import verify_artifact

    verify_artifact(out)


@pytest.mark.slow
def test_tumour_type_generator(tiny_study, tmp_path):
    from synthlearn.config import load_toml
    from synthlearn.data.verify import verify_study
    from synthlearn.generators.ldm.sample import synthesize
    from synthlearn.generators.ldm.config import GeneratorConfig
    from synthlearn.generators.ldm.train import train_generator

    cfg = load_toml(GeneratorConfig, TINY_CONFIG, overrides={"label": "tumor_type"})
    art = train_generator(tiny_study / "tcga", cfg, tmp_path / "artifact", seed=0, progress=False)
    out = synthesize(art, 1, tmp_path / "syn", seed=0, progress=False)
    assert verify_study(out, progress=False).ok
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["class_names"] == ["glioblastoma", "astrocytoma", "oligodendroglioma"]


@pytest.mark.slow
def test_ddp_under_torchrun_on_cpu(tiny_study, tmp_path):
    """The DDP code path: two CPU processes (gloo) train one artifact."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    out = tmp_path / "artifact"
    env = {"PYTHONPATH": str(ROOT / "src"), "SYNTHLEARN_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "synthlearn.cli",
                           "train-generator", "--site", str(tiny_study / "tcga"), "--config", str(TINY_CONFIG),
                           "--out", str(out), "-q"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from synthlearn.generators.artifact import verify_artifact

    manifest = verify_artifact(out)
    assert manifest["training"]["world_size"] == 2


def test_class_conditional_decoder_trains_ships_its_class_vectors_and_synthesizes(tiny_study, tmp_path):
    """The option end to end on the tiny site: the vectors are trained (no longer zero), travel in the artifact,
    and every sample is decoded with its conditioned class."""
    from safetensors.torch import load_file

    from synthlearn.generators.ldm.sample import load_generator

    config = tmp_path / "cond.toml"
    config.write_text(f'base = "{TINY_CONFIG}"\n[autoencoder]\nclass_conditional_decoder = true\n')
    artifact = tmp_path / "artifact"
    assert main(["train-generator", "--site", str(tiny_study / "tcga"), "--config", str(config), "--out",
                 str(artifact), "--seed", "0", "-q"]) == 0
    vectors = load_file(str(artifact / "autoencoder.safetensors"))["class_vectors"]
    assert vectors.shape == (2, 4) and vectors.abs().sum() > 0
    assert json.loads((artifact / "manifest.json").read_text())["config"]["autoencoder"]["class_conditional_decoder"]
    gen = load_generator(artifact)
    assert gen.autoencoder.ae.class_vectors.shape == (2, 4)
    out = tmp_path / "synthetic"
    assert main(["synthesize", "--artifact", str(artifact), "--per-class", "2", "--out", str(out), "--seed", "0",
                 "-q"]) == 0
    assert main(["verify-data", str(out), "-q"]) == 0


def test_filled_background_generator_trains_synthesizes_and_verifies(tiny_study, tmp_path):
    """A six-channel generator (background = "filled") end to end: its artifact loads with six channels and its
    synthetic cases pass verify-data with a zero background."""
    import numpy as np

    from synthlearn.data.io import read_case
    from synthlearn.data.layouts import open_study
    from synthlearn.generators.ldm.sample import load_generator

    config = tmp_path / "filled.toml"
    config.write_text(f'base = "{TINY_CONFIG}"\nbackground = "filled"\n')
    artifact = tmp_path / "artifact"
    assert main(["train-generator", "--site", str(tiny_study / "tcga"), "--config", str(config), "--out",
                 str(artifact), "--seed", "0", "-q"]) == 0
    gen = load_generator(artifact)
    assert gen.autoencoder.in_channels == 6 and gen.cfg.background == "filled"
    out = tmp_path / "synthetic"
    assert main(["synthesize", "--artifact", str(artifact), "--per-class", "2", "--out", str(out), "--seed", "0",
                 "-q"]) == 0
    assert main(["verify-data", str(out), "-q"]) == 0
    assert json.loads((out / "synthesis.json").read_text())["brain_from"] == "brain mask channel > 0.5"
    case = read_case(open_study(out).sites[0].cases[0])
    assert case.images.shape[0] == 4 and np.isfinite(case.images).all()


def test_space_to_depth_generator_trains_only_its_diffusion_model_and_synthesizes(tiny_study, tmp_path):
    """Design (b) of the fidelity issue end to end: no stage 1 is trained, the artifact's autoencoder file is
    empty, the diffusion model works on 40 x 16^3, the synthetic cases pass verify-data, and the memorising
    control (the privacy audit's positive control) still builds from such an artifact."""
    from synthlearn.generators.artifact import load_weights
    from synthlearn.generators.ldm.config import load_generator_config
    from synthlearn.generators.ldm.memorising import train_memorising_generator

    config = tmp_path / "s2d.toml"
    config.write_text(f'base = "{TINY_CONFIG}"\nlatent_shape = [16, 16, 16]\n[autoencoder]\nkind = "space_to_depth"\n'
                      'latent_channels = 40\n[superres]\nepochs = 0\n[diffusion]\nchannels = [40, 40]\n')
    with pytest.raises(ValueError, match="latent_channels = 40"):
        bad = tmp_path / "bad.toml"
        bad.write_text(config.read_text().replace("latent_channels = 40", "latent_channels = 8"))
        load_generator_config(bad)
    artifact = tmp_path / "artifact"
    assert main(["train-generator", "--site", str(tiny_study / "tcga"), "--config", str(config), "--out",
                 str(artifact), "--seed", "0", "-q"]) == 0
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["latent_channels"] == 40 and manifest["training"]["epochs"]["autoencoder"] == 0
    assert manifest["training"]["epochs"]["diffusion"] == 3
    assert load_weights(artifact, "autoencoder.safetensors") == {}
    out = tmp_path / "synthetic"
    assert main(["synthesize", "--artifact", str(artifact), "--per-class", "2", "--out", str(out), "--seed", "0",
                 "-q"]) == 0
    assert main(["verify-data", str(out), "-q"]) == 0
    from synthlearn.data.layouts import open_study

    ids = sorted(c.case_id for c in open_study(tiny_study / "tcga").sites[0].cases)[:2]
    control = train_memorising_generator(artifact, tiny_study / "tcga", ids, tmp_path / "control", steps=2,
                                         decoder_steps=2, seed=1)
    assert json.loads((control / "manifest.json").read_text())["positive_control"]["decoder_steps"] == 0
