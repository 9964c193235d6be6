"""DP-SGD for the generator (issue 28 item 4): config checks, Poisson batches, per-case clipping, the accountant,
the manifest's per-component epsilon and a resume that spends exactly what an uninterrupted run does."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthlearn.generators.artifact import verify_artifact
from synthlearn.generators.ldm.config import GeneratorConfig, load_generator_config
from synthlearn.generators.ldm.dp import DPTraining, PrivacyConfig, poisson_batches
from synthlearn.generators.ldm.train import train_generator

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def tiny_dp(epsilon: float = 3.0) -> GeneratorConfig:
    cfg = load_generator_config(CONFIGS / "generator_tiny.toml")
    return dataclasses.replace(cfg, privacy=PrivacyConfig(dp_sgd=True, target_epsilon=epsilon),
                               autoencoder=dataclasses.replace(cfg.autoencoder, adv_weight=0.0),
                               superres=dataclasses.replace(cfg.superres, epochs=0))


def test_the_shipped_dp_config_is_the_demo_generator_without_the_adversarial_term():
    dp, demo = (load_generator_config(CONFIGS / f"generator_{n}.toml") for n in ("demo_dp", "demo"))
    assert dp.privacy.dp_sgd and dp.privacy.target_epsilon == 10.0 and not demo.privacy.dp_sgd
    assert dp.autoencoder.adv_weight == 0 and dp.shape == demo.shape and dp.latent_shape == demo.latent_shape
    assert dp.diffusion.channels == demo.diffusion.channels


@pytest.mark.parametrize("change, match", [
    (dict(autoencoder=dict(adv_weight=0.01)), "discriminator reads the members' images"),
    (dict(superres=dict(epochs=1)), "stage 2 has no DP-SGD"),
    (dict(autoencoder=dict(patch_size=(16, 16, 16))), "one case's tumour"),
])
def test_dp_refuses_what_would_leak_around_the_noise(change, match):
    cfg = tiny_dp()
    kwargs = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in change.items()}
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(cfg, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_epsilon=-1.0), "target_epsilon"), (dict(target_epsilon=math.inf), "target_epsilon"),
    (dict(delta=1.0), "delta"), (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(autoencoder_share=1.0), "share"),
])
def test_privacy_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrivacyConfig(dp_sgd=True, **kwargs)


def test_poisson_batches_draw_each_case_at_the_sampling_rate():
    g = torch.Generator().manual_seed(0)
    batches = poisson_batches(40, 4, 2000, g)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float)
    assert abs(float(sizes.mean()) - 4.0) < 0.2
    assert (sizes == 0).any()  # Poisson sampling: a batch may be empty
    assert all(len(set(b.tolist())) == len(b) and (b < 40).all() for b in batches)


def test_each_case_is_clipped_and_an_empty_batch_still_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    cfg = PrivacyConfig(dp_sgd=True, target_epsilon=0.0, max_grad_norm=0.5)
    dpt = DPTraining(model, torch.optim.SGD(model.parameters(), lr=1.0), cfg, "diffusion", n=10, batch_size=2,
                     epochs=1)
    x = torch.tensor([[100.0, 0.0, 0.0], [0.0, 1e-3, 0.0]])
    loss = (dpt.model(x) - torch.tensor([[-1e4], [0.0]])).pow(2).mean()
    dpt.step(loss, torch.Generator().manual_seed(0))
    # the first case's gradient (norm ~2e6) is clipped to 0.5; the second's is ~0; the sum is divided by the batch
    assert float(model.weight.detach().norm()) == pytest.approx(0.5 / 2, rel=1e-4)
    before = model.weight.detach().clone()
    dpt.step(None, torch.Generator().manual_seed(0))  # no noise, no cases: nothing moves, the step is counted
    assert torch.equal(model.weight, before)
    assert dpt.report()["steps"] == 2 and dpt.epsilon() == math.inf
    dpt.close()


def test_the_accountant_spends_the_components_budget():
    model = torch.nn.Linear(3, 1)
    cfg = PrivacyConfig(dp_sgd=True, target_epsilon=4.0, autoencoder_share=0.25)
    dpt = DPTraining(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, "autoencoder", n=36, batch_size=4,
                     epochs=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(dpt.steps_per_epoch * 3):
        dpt.step(dpt.model(torch.randn(4, 3)).pow(2).mean(), g)
    assert dpt.noise_multiplier > 0
    assert 0.9 * 1.0 < dpt.epsilon() <= 1.0 + 1e-6  # a quarter of 4
    state = dpt.state_dict()
    other = DPTraining(torch.nn.Linear(3, 1), torch.optim.SGD(model.parameters(), lr=0.1), cfg, "autoencoder", n=36,
                       batch_size=4, epochs=3)
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.epsilon() == dpt.epsilon()
    changed = DPTraining(torch.nn.Linear(3, 1), torch.optim.SGD(model.parameters(), lr=0.1),
                         dataclasses.replace(cfg, target_epsilon=8.0), "autoencoder", n=36, batch_size=4, epochs=3)
    with pytest.raises(ValueError, match="same privacy settings"):
        changed.load_state_dict(state)
    for d in (dpt, other, changed):
        d.close()


def test_a_dp_generator_records_its_epsilon_and_a_resume_spends_the_same(tiny_study, tmp_path):
    site = tiny_study / "tcga"
    cfg = tiny_dp(3.0)
    whole = train_generator(site, cfg, tmp_path / "whole", seed=0, progress=False)
    manifest = verify_artifact(whole)
    privacy = manifest["privacy"]
    assert privacy["dp_sgd"] and privacy["unit"].startswith("patient")
    eps = {k: v["epsilon"] for k, v in privacy["components"].items()}
    assert set(eps) == {"autoencoder", "diffusion"}
    assert all(0 < e <= 1.5 + 1e-6 for e in eps.values())
    assert privacy["epsilon_total"] == pytest.approx(sum(eps.values())) and privacy["epsilon_total"] <= 3.0 + 1e-6
    assert privacy["components"]["diffusion"]["noise_multiplier"] > 0 and privacy["not_covered"]

    class Stop(Exception):
        pass

    def stop_after(stage, epoch):
        def hook(s, done, total):
            if s == stage and done == epoch:
                raise Stop
        return hook

    out = tmp_path / "resumed"
    for stage, epoch in (("autoencoder", 1), ("diffusion", 2)):
        with pytest.raises(Stop):
            train_generator(site, cfg, out, seed=0, progress=False, on_epoch=stop_after(stage, epoch))
    resumed = verify_artifact(train_generator(site, cfg, out, seed=0, progress=False))
    assert resumed["privacy"] == privacy  # the accountant came back from the checkpoints: the same epsilon
    for name in ("autoencoder.safetensors", "diffusion.safetensors"):
        a, b = load_file(whole / name), load_file(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_plain_generator_says_it_has_no_dp(tiny_study, tmp_path):
    cfg = load_generator_config(CONFIGS / "generator_tiny.toml")
    cfg = dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder, epochs=1),
                              superres=dataclasses.replace(cfg.superres, epochs=0),
                              diffusion=dataclasses.replace(cfg.diffusion, epochs=1))
    manifest = verify_artifact(train_generator(tiny_study / "tcga", cfg, tmp_path / "g", seed=0, progress=False))
    assert manifest["privacy"] == {"dp_sgd": False}
