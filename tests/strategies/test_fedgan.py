"""FedGAN (paper 002): both networks leave a site each round and nothing else, the server's weighted average of
them, pretraining on a pool, and the arm end to end over Flower on the tiny fundus and slice studies."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from synthlearn.data.layouts import open_study
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.models.classifier import ClassifierConfig
from synthlearn.protocol import SiteReply, run_protocol_inprocess
from synthlearn.strategies.fedgan import FedGANConfig, FedGANProtocol, dcgan_config, load_images, pretrain
from synthlearn.tasks.cache import DatasetCache
from synthlearn.tasks.setup import TrainingSetup
from synthlearn.training.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SETUP = TrainingSetup(task="grade", n_folds=1, seed=0, preprocess=PreprocessConfig(shape=(32, 32)),
                      model=ClassifierConfig(channels=(8, 8, 16), norm_num_groups=4, mamba=False),
                      train=TrainConfig(epochs=1, batch_size=2), sequences=("r", "g", "b"),
                      label_values={"grade": ("0", "1", "2", "3", "4")})
CFG = FedGANConfig(rounds=2, local_epochs=1, latent_dim=8, generator_width=8, discriminator_width=8, batch_size=4,
                   per_class=2, backend="inprocess")


def test_config_and_grid_are_checked():
    with pytest.raises(ValueError, match="fedgan.rounds must be >= 1"):
        FedGANConfig(rounds=0)
    with pytest.raises(ValueError, match="needs fedgan.pretrain_study"):
        FedGANConfig(pretrain_epochs=2)
    with pytest.raises(ValueError, match=r"power-of-two side >= 32; the study's preprocessed grid is \(48, 48\)"):
        dcgan_config(dataclasses.replace(SETUP, preprocess=PreprocessConfig(shape=(48, 48))), CFG)
    dcfg = dcgan_config(SETUP, CFG)
    assert (dcfg.image_size, dcfg.channels, dcfg.num_classes) == (32, 3 + 1, 5)  # r, g, b and the mask


def test_a_site_returns_its_two_networks_only_and_the_server_averages_them_by_image_count(tiny_fundus, tmp_path):
    study, _ = tiny_fundus
    sites = open_study(study).sites_with_role("train")
    protocol = FedGANProtocol(SETUP, CFG, cache=DatasetCache(SETUP.preprocess))
    state = protocol.initial_state()
    replies = []
    for site in sites:
        arrays, metrics = protocol.site_round(site, 1, state, {}, state_dir=tmp_path / site.name, memory={})
        assert set(arrays) == {"generator", "discriminator"}  # no image, no label, no count beyond the metric
        for name in arrays:
            assert {k: v.shape for k, v in arrays[name].items()} == {k: v.shape for k, v in state[name].items()}
        assert any(not torch.equal(arrays["generator"][k], state["generator"][k]) for k in state["generator"])
        assert "running_mean" in " ".join(arrays["discriminator"])  # BatchNorm statistics travel and are averaged
        assert metrics["n"] == len(site.cases) and {"d", "g"} <= set(metrics)
        replies.append(SiteReply(site.name, arrays, metrics))
    replies[0].metrics["n"] = 3 * replies[1].metrics["n"]  # unequal counts: the average must weigh them
    new, entry = protocol.aggregate(1, state, replies)
    w = np.array([r.metrics["n"] for r in replies], np.float64)
    key = next(k for k, v in new["generator"].items() if v.dtype.is_floating_point)
    expected = sum(wi * r.arrays["generator"][key].double() for wi, r in zip(w, replies)) / w.sum()
    torch.testing.assert_close(new["generator"][key].double(), expected, rtol=1e-6, atol=1e-7)
    assert set(entry["images"]) == {s.name for s in sites}
    bad = SiteReply("x", {"generator": {}, "discriminator": replies[1].arrays["discriminator"]}, {"n": 1})
    with pytest.raises(Exception, match="other keys or shapes"):
        protocol.aggregate(1, state, [replies[1], bad])


def test_pretraining_on_the_pool_moves_the_networks_and_refuses_another_studys_sequences(tiny_fundus, tiny_study_2d):
    study, pool = tiny_fundus
    cache = DatasetCache(SETUP.preprocess)
    fresh = FedGANProtocol(SETUP, CFG).initial_state()
    cfg = dataclasses.replace(CFG, pretrain_study=str(pool), pretrain_epochs=1)
    states, info = pretrain(SETUP, cfg, cache, dcgan_config(SETUP, cfg))
    assert info["pretrain_images"] == len(open_study(pool).sites_with_role("train")[0].cases)
    assert any(not torch.equal(states["generator"][k], fresh["generator"][k]) for k in fresh["generator"])
    images, labels = load_images(open_study(study).sites[0].cases, SETUP, CFG, cache)
    assert images.shape[1:] == (4, 32, 32) and images.abs().max() <= 1 and labels.min() >= 0
    fov = images[:, 3] > 0  # the mask channel: the field of view, where the image is not background
    assert torch.equal(fov, (images[:, :3] != 0).any(1))
    with pytest.raises(ValueError, match=r"sequences \['t1', 't1c', 't2', 'flair'\] differ"):
        pretrain(SETUP, dataclasses.replace(cfg, pretrain_study=str(tiny_study_2d)), cache, dcgan_config(SETUP, cfg))
    with pytest.raises(FileNotFoundError, match="no such study folder"):
        pretrain(SETUP, dataclasses.replace(cfg, pretrain_study="/nonexistent"), cache, dcgan_config(SETUP, cfg))


def test_inprocess_rounds_resume_to_the_same_state(tiny_fundus, tmp_path):
    study, _ = tiny_fundus
    sites = open_study(study).sites_with_role("train")
    once = run_protocol_inprocess(FedGANProtocol(SETUP, CFG), sites, tmp_path / "a")
    first = run_protocol_inprocess(FedGANProtocol(SETUP, dataclasses.replace(CFG, rounds=1)), sites, tmp_path / "b")
    assert first.round == 1
    resumed = run_protocol_inprocess(FedGANProtocol(SETUP, CFG), sites, tmp_path / "b")
    assert resumed.round == 2
    for k, v in once.states["generator"].items():
        torch.testing.assert_close(resumed.states["generator"][k], v)


def test_the_arm_runs_over_flower_on_the_tiny_fundus_study_and_on_2d_slices(tiny_fundus, tiny_study_2d, tmp_path):
    """``study run`` with fedgan over Flower beside centralized training: a synthetic study of every grade that
    verify-data accepts, a grade model with accuracy and quadratic kappa, and bytes that are the two networks per
    site and round; then the same arm on the 2D glioma slices (IDH, four channels, no pretraining)."""
    from synthlearn.cli import main
    from synthlearn.study import load_study_config, run_study

    study, pool = tiny_fundus
    cfg = load_study_config(ROOT / "configs" / "study_tiny_fundus.toml",
                            {"study": str(study), "arms": ["centralized", "fedgan"],
                             "fedgan": {"pretrain_study": str(pool)}})
    results = run_study(cfg, tmp_path / "run", progress=False)
    block = results["arms"]["fedgan"]
    comb = block["test"]["combined"]
    assert 0.0 <= comb["acc"] <= 1.0 and "quadratic_kappa" in comb
    synthetic = tmp_path / "run" / "fedgan" / "synthetic"
    assert main(["verify-data", str(synthetic), "-q"]) == 0
    grades = [c.labels.get("grade") for c in open_study(synthetic).sites[0].cases]
    assert sorted(set(grades)) == ["0", "1", "2", "3", "4"] and len(grades) == 5 * 3
    assert block["pretrain_images"] == 24 and block["rounds"] == 2 and block["backend"] == "flower"
    from synthlearn.protocol import arrays_nbytes

    state = FedGANProtocol(SETUP, cfg.arm_configs["fedgan"]).initial_state()
    payload = arrays_nbytes(state)  # G + D per message
    framing = 1024 * sum(len(group) for group in state.values())  # Flower's record framing: well under 1 KB a tensor
    assert 2 * 3 * payload <= block["bytes_from_sites"] <= 2 * 3 * (payload + framing)  # 2 networks, 3 sites, 2 rounds
    assert (tmp_path / "run" / "fedgan" / "figures" / "fedgan_samples.png").is_file()
    slices = run_study(load_study_config(ROOT / "configs" / "study_tiny.toml",
                                         {"study": str(tiny_study_2d), "preprocess": {"shape": [32, 32]},
                                          "arms": ["fedgan"], "fedgan": {"rounds": 1, "per_class": 2,
                                                                         "generator_width": 8,
                                                                         "discriminator_width": 8,
                                                                         "latent_dim": 8, "batch_size": 4}}),
                       tmp_path / "slices", progress=False)
    assert 0.0 <= slices["arms"]["fedgan"]["test"]["combined"]["auc"] <= 1.0


def test_the_papers_preprocessing_is_an_option_whose_images_go_back_to_zero_one(tiny_fundus, tmp_path):
    """``preprocessing = "paper"``: the GAN learns from paper 002's CLAHE'd images in [-1, 1] (not the task model's
    z-scores), and its images are written back in [0, 1] with an exact zero background."""
    from synthlearn.models.dcgan import DCGANGenerator
    from synthlearn.strategies.fedgan import sample_images

    study, _ = tiny_fundus
    cases = open_study(study).sites[0].cases[:3]
    cache = DatasetCache(SETUP.preprocess)
    paper = dataclasses.replace(CFG, preprocessing="paper")
    x_paper, _ = load_images(cases, SETUP, paper, cache)
    x_study, _ = load_images(cases, SETUP, CFG, cache)
    assert x_paper.shape == x_study.shape == (3, 4, 32, 32) and x_paper[:, :3].min() >= -1 and x_paper.max() <= 1
    assert not torch.allclose(x_paper[:, :3], x_study[:, :3], atol=0.05)
    assert torch.equal(x_paper[:, 3] > 0, x_study[:, 3] > 0)  # the same field of view
    gen = DCGANGenerator(dcgan_config(SETUP, paper))
    samples = sample_images(gen, dcgan_config(SETUP, paper), paper, ("0", "1", "2", "3", "4"), seed=0)
    assert len(samples) == 5 * paper.per_class
    for images, seg, codes in samples:
        assert images.min() >= 0 and images.max() <= 1 and images.any()
    with pytest.raises(ValueError, match="preprocessing must be study or paper"):
        FedGANConfig(preprocessing="clahe")


def test_a_pretrained_pair_that_is_missing_or_of_another_dcgan_is_refused(tmp_path):
    from synthlearn.strategies.fedgan import load_pretrained
    from synthlearn.training.checkpoint import save_checkpoint

    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained(tmp_path / "pretrained.pt", dcgan_config(SETUP, CFG))
    wider = dataclasses.replace(CFG, generator_width=16, discriminator_width=16)
    save_checkpoint(tmp_path / "pretrained.pt", {"states": FedGANProtocol(SETUP, wider).initial_state(), "info": {}})
    with pytest.raises(ValueError, match="do not fit this study's DCGAN"):
        load_pretrained(tmp_path / "pretrained.pt", dcgan_config(SETUP, CFG))
    states, _ = load_pretrained(tmp_path / "pretrained.pt", dcgan_config(SETUP, wider))
    assert set(states) == {"generator", "discriminator"}
    with pytest.raises(ValueError, match="exclude each other"):
        FedGANConfig(pretrained="x.pt", pretrain_epochs=2, pretrain_study="pool")
