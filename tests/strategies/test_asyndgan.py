"""AsynDGAN (paper 003): the networks, what a site returns (only the adversarial gradient), the generator step at
the server, a site that stalls past the timeout, the synthetic study it writes, the audit holdout (masks never
disclosed) and the audits of the synthetic set."""

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

from synthlearn.data.layouts import open_study
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.models.classifier import ClassifierConfig
from synthlearn.models.gan import PatchDiscriminator, ResnetGenerator, receptive_field, sampling_mode
from synthlearn.protocol import run_protocol_inprocess
from synthlearn.strategies.asyndgan import (
    AsynDGANConfig,
    AsynDGANProtocol,
    adversarial_feedback,
    audit_split,
    case_key,
    condition_channels,
    load_site_data,
    make_condition,
    own_mask_similarity,
    run,
    sample_synthetic,
    write_synthetic_study,
)
from synthlearn.strategies.base import ArmContext
from synthlearn.tasks.cache import DatasetCache
from synthlearn.tasks.setup import TrainingSetup
from synthlearn.training.trainer import TrainConfig

SETUP_2D = TrainingSetup(task="segmentation", n_folds=1, seed=0, preprocess=PreprocessConfig(shape=(32, 32)),
                         model=ClassifierConfig(channels=(8, 8, 16), norm_num_groups=4, mamba=False),
                         train=TrainConfig(epochs=1, batch_size=2))
CFG = AsynDGANConfig(iterations=3, batch_size=2, generator_features=8, generator_blocks=1, discriminator_features=8,
                     backend="inprocess", checkpoint_every=1)


@pytest.mark.parametrize("dims,shape", [(2, (32, 32)), (3, (16, 16, 16))])
def test_the_generator_maps_masks_to_images_and_its_dropout_is_the_noise(dims, shape):
    gen = ResnetGenerator(dims, 5, 4, features=8, n_blocks=2)
    cond = torch.rand(2, 5, *shape)
    out = gen(cond)
    assert out.shape == (2, 4, *shape) and out.abs().max() <= 1.0
    sampling_mode(gen)
    with torch.no_grad():
        assert not torch.equal(gen(cond), gen(cond))  # dropout on when sampling: two draws differ
    disc = PatchDiscriminator(dims, 9, features=8, n_layers=2)
    assert disc(torch.cat([cond, out], 1)).shape[:2] == (2, 1)
    assert receptive_field(3) == 70  # the paper's 70x70 PatchGAN
    with pytest.raises(ValueError, match="multiples of 4"):
        gen(torch.rand(1, 5, *(s + 2 for s in shape)))


@pytest.mark.parametrize("dims,shape", [(2, (32, 32)), (3, (16, 16, 16))])
def test_a_resize_convolution_generator_keeps_the_shape_and_has_no_transposed_convolution(dims, shape):
    gen = ResnetGenerator(dims, 5, 2, features=8, n_blocks=1, upsampling="resize")
    assert gen(torch.rand(2, 5, *shape)).shape == (2, 2, *shape)
    transposed = (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    assert not any(isinstance(m, transposed) for m in gen.modules())
    assert any(isinstance(m, transposed) for m in ResnetGenerator(dims, 5, 2, features=8, n_blocks=1).modules())
    with pytest.raises(ValueError, match="upsampling"):
        ResnetGenerator(dims, 5, 2, upsampling="bilinear")


def test_conditioning_has_the_brain_each_tumour_region_and_each_label_value():
    seg = torch.tensor([[[0, 1], [2, 3]]])
    brain = torch.ones(1, 2, 2)
    cond = make_condition(seg, brain, torch.tensor([[1, -1]]), (2, 3))
    assert cond.shape == (1, condition_channels((2, 3)), 2, 2) == (1, 9, 2, 2)
    assert cond[0, 1, 0, 1] == 1 and cond[0, 2, 1, 0] == 1 and cond[0, 3, 1, 1] == 1
    assert cond[0, 4].sum() == 0 and cond[0, 5].sum() == 4 and cond[0, 6:].sum() == 0  # value 1 of column 0; unknown


def _site(study, name=None):
    sites = open_study(study).sites_with_role("train")
    return next(s for s in sites if name is None or s.name == name)


def _reply(protocol, site, rnd, fake, index, state_dir, data=None):
    arrays = {"fake": {"images": fake}, "batch": {"index": index}}
    memory = {} if data is None else {"data": data}
    return protocol.site_round(site, rnd, arrays, {"phase": "step"}, state_dir=state_dir, memory=memory)


def test_a_site_returns_only_the_gradient_on_the_generated_batch_never_its_images(tiny_study_2d, tmp_path):
    """The reply is one tensor of the generated batch's shape. With the discriminator frozen (a vanishing learning
    rate) it is the same whatever the site's real images are (same masks, other images): nothing of them reaches the
    reply except through the discriminator's weights; with a real learning rate the discriminator's update does."""
    from synthlearn.strategies.asyndgan import load_site_data
    from synthlearn.tasks.cache import DatasetCache

    site = _site(tiny_study_2d)
    real = load_site_data(site.cases, SETUP_2D, CFG, DatasetCache(SETUP_2D.preprocess))
    other = dataclasses.replace(real, images=torch.rand_like(real.images) * 2 - 1)  # the same masks, other images
    fake = torch.rand(2, 4, 32, 32) * 2 - 1
    index = torch.tensor([0, 1], dtype=torch.int32)
    frozen = dataclasses.replace(CFG, lr=1e-12)
    a, metrics = _reply(AsynDGANProtocol(SETUP_2D, frozen), site, 2, fake, index, tmp_path / "a", real)
    b, _ = _reply(AsynDGANProtocol(SETUP_2D, frozen), site, 2, fake, index, tmp_path / "b", other)
    assert set(a) == {"feedback"} and set(a["feedback"]) == {"grad"}
    assert a["feedback"]["grad"].shape == fake.shape and torch.isfinite(a["feedback"]["grad"]).all()
    assert all(isinstance(v, float) for v in metrics.values())
    assert torch.allclose(a["feedback"]["grad"], b["feedback"]["grad"], rtol=1e-4, atol=1e-9)
    c, _ = _reply(AsynDGANProtocol(SETUP_2D, CFG), site, 2, fake, index, tmp_path / "c", real)
    d, _ = _reply(AsynDGANProtocol(SETUP_2D, CFG), site, 2, fake, index, tmp_path / "d", other)
    assert not torch.allclose(c["feedback"]["grad"], d["feedback"]["grad"], rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="fake images of shape"):
        _reply(AsynDGANProtocol(SETUP_2D, CFG), site, 2, fake[:, :2], index, tmp_path / "e")


def test_clipped_noised_feedback_is_bounded_per_sample():
    disc = PatchDiscriminator(2, 4, features=8, n_layers=1)
    fake = torch.randn(3, 4, 16, 16) * 10
    grad, _ = adversarial_feedback(disc, None, fake, clip=1e-4)
    assert grad.flatten(1).norm(dim=1).max() <= 1e-4 * (1 + 1e-5)
    noisy, _ = adversarial_feedback(disc, None, fake, clip=1e-4, noise=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(grad, noisy)


def test_the_generator_learns_from_the_sites_feedback_and_the_synthetic_study_is_valid(tiny_study_2d, tmp_path):
    sites = list(open_study(tiny_study_2d).sites_with_role("train"))
    protocol = AsynDGANProtocol(SETUP_2D, CFG)
    initial = protocol.initial_state()
    state = run_protocol_inprocess(protocol, sites, tmp_path / "fed")
    assert state.round == CFG.iterations + 1
    assert {f"masks/{s.name}" for s in sites} <= set(state.states)
    moved = [not torch.equal(initial["generator"][k], state.states["generator"][k]) for k in initial["generator"]]
    assert any(moved)  # the generator stepped on the sites' gradients
    steps = state.history[1:]
    assert all(set(h["loss_d"]) == {s.name for s in sites} for h in steps)
    fake_bytes = CFG.batch_size * 4 * 32 * 32 * 4
    masks = sum(t.numel() * t.element_size() for s in sites for t in state.states[f"masks/{s.name}"].values())
    assert state.bytes_from_sites == masks + CFG.iterations * len(sites) * fake_bytes  # gradients + round 1's masks
    gen = protocol.generator(state.states)[0]
    samples = sample_synthetic(gen, state.states[f"masks/{sites[0].name}"], protocol.sizes, CFG.intensity_scale, 2)
    members = protocol.training_cases(sites[0])
    n = len(members)
    assert len(samples) == 2 * n and n < len(sites[0].cases)  # the audit holdout's masks stayed at the site
    images, seg, _codes = samples[0]
    assert images.shape == (4, 32, 32) and (images[:, seg == 0] != 0).any()
    brain = state.states[f"masks/{sites[0].name}"]["brain"][0].numpy().astype(bool)
    assert (images[:, ~brain] == 0).all()  # background exactly 0, as the contract's skull-stripped cases
    cases = write_synthetic_study(samples, SETUP_2D, tmp_path / "syn")
    assert len(cases) == 2 * n and all(c.site == "synthetic" and sites[0].name not in c.case_id for c in cases)
    from synthlearn.data.verify import verify_study

    report = verify_study(tmp_path / "syn")
    assert report.ok, report
    first = next(c for c in cases if c.case_id == "case-00000")
    assert first.labels.get("idh") == members[0].labels.get("idh")  # the label the mask came with


class _Stalling(AsynDGANProtocol):
    """One site answers its first generator step only after the round's timeout."""

    def site_round(self, site, rnd, arrays, config, *, state_dir, memory):
        if site.name == self.slow and rnd == 2:
            time.sleep(self.round_timeout_s + 2)
        return super().site_round(site, rnd, arrays, config, state_dir=state_dir, memory=memory)


def test_the_same_seed_trains_the_same_generator_whatever_the_order_of_the_sites(tiny_study_2d, tmp_path):
    """Flower lists its nodes in an order that varies from run to run: each site's batch draws its own dropout and
    the feedback is summed in a fixed order, so the order of the sites changes nothing (batch norm included)."""
    sites = list(open_study(tiny_study_2d).sites_with_role("train"))
    cfg = dataclasses.replace(CFG, generator_norm="batch")
    finals = []
    for name, order in (("forward", sites), ("reversed", sites[::-1])):
        state = run_protocol_inprocess(AsynDGANProtocol(SETUP_2D, cfg), order, tmp_path / name)
        finals.append(state.states["generator"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_a_site_whose_round_runs_in_another_process_goes_on_from_its_last_step(tiny_study_2d, tmp_path):
    """Flower's simulation may hand a site's round to another worker process: its discriminator must come from the
    site's last step (its private folder), neither a fresh one nor a stale copy another process still holds."""
    site = _site(tiny_study_2d)
    protocol = AsynDGANProtocol(SETUP_2D, dataclasses.replace(CFG, checkpoint_every=50))
    index = torch.tensor([0, 1], dtype=torch.int32)
    a, b = {}, {}  # two worker processes' memories

    def step(rnd, memory):
        fake = torch.rand(2, 4, 32, 32, generator=torch.Generator().manual_seed(rnd)) * 2 - 1
        protocol.site_round(site, rnd, {"fake": {"images": fake}, "batch": {"index": index}}, {"phase": "step"},
                            state_dir=tmp_path / site.name, memory=memory)
        return {k: v.clone() for k, v in memory["disc"][0].state_dict().items()}

    after2 = step(2, a)
    b["data"] = a["data"]
    protocol._discriminator(site.name, 3, tmp_path / site.name, b)  # process b, round 3: from the folder
    assert all(torch.equal(after2[k], v) for k, v in b["disc"][0].state_dict().items())
    after3 = step(3, b)
    protocol._discriminator(site.name, 4, tmp_path / site.name, a)  # process a again: its copy is of round 2
    assert all(torch.equal(after3[k], v) for k, v in a["disc"][0].state_dict().items())


def test_a_site_that_stalls_is_left_out_of_the_step_at_the_timeout(tiny_study_2d, tmp_path):
    from synthlearn.federated.simulation import run_protocol_simulation

    sites = list(open_study(tiny_study_2d).sites_with_role("train"))
    protocol = _Stalling(SETUP_2D, dataclasses.replace(CFG, iterations=2, round_timeout_s=4.0, backend="flower"))
    protocol.slow = sites[1].name
    t0 = time.monotonic()
    state = run_protocol_simulation(protocol, sites, tmp_path / "fed", progress=False)
    assert state.round == 3
    assert state.history[1]["missing_sites"] == [sites[1].name]  # step 1 went on without it
    assert set(state.history[1]["loss_d"]) == {sites[0].name, sites[2].name}
    assert time.monotonic() - t0 < 120


def test_feature_matching_reads_the_real_batch_only_through_its_channel_means():
    torch.manual_seed(0)
    disc = PatchDiscriminator(2, 5, features=8, n_layers=2, norm="instance")
    cond = (torch.rand(3, 4, 32, 32) > 0.5).float()
    real, fake = torch.rand(3, 1, 32, 32) * 2 - 1, torch.rand(3, 1, 32, 32) * 0.2
    plain, loss = adversarial_feedback(disc, cond, fake)
    fm, fm_loss = adversarial_feedback(disc, cond, fake, feature_matching=10.0, real=real)
    assert fm.shape == fake.shape and fm_loss == loss  # the reported loss stays the adversarial one
    assert not torch.allclose(fm, plain)  # the term moves the feedback
    # the real pairs in another order: the same per-channel means, so the same gradient (nothing per image)
    order = torch.tensor([2, 0, 1])
    shuffled, _ = adversarial_feedback(disc, cond, fake, feature_matching=10.0, real=real[order],
                                       real_condition=cond[order])
    assert torch.allclose(fm, shuffled, rtol=1e-4, atol=1e-8)
    # generated pairs whose feature means equal the real ones': the term's gradient vanishes
    same, _ = adversarial_feedback(disc, cond, real, feature_matching=10.0, real=real)
    assert torch.allclose(same, adversarial_feedback(disc, cond, real)[0], atol=1e-7)
    with pytest.raises(ValueError, match="real batch"):
        adversarial_feedback(disc, cond, fake, feature_matching=1.0)


def test_a_site_with_feature_matching_and_its_own_discriminator_rate_still_returns_one_gradient(tiny_study_2d,
                                                                                                 tmp_path):
    site = _site(tiny_study_2d)
    fake = torch.rand(2, 4, 32, 32) * 2 - 1
    index = torch.tensor([0, 1], dtype=torch.int32)
    plain, _ = _reply(AsynDGANProtocol(SETUP_2D, CFG), site, 2, fake, index, tmp_path / "a")
    matched, _ = _reply(AsynDGANProtocol(SETUP_2D, dataclasses.replace(CFG, feature_matching=10.0)), site, 2, fake,
                        index, tmp_path / "b")
    assert set(matched) == {"feedback"} and set(matched["feedback"]) == {"grad"}
    assert matched["feedback"]["grad"].shape == fake.shape
    assert not torch.allclose(matched["feedback"]["grad"], plain["feedback"]["grad"])  # the term reached the site
    protocol = AsynDGANProtocol(SETUP_2D, dataclasses.replace(CFG, discriminator_lr=8e-4))
    memory: dict = {}
    protocol.site_round(site, 2, {"fake": {"images": fake}, "batch": {"index": index}}, {"phase": "step"},
                        state_dir=tmp_path / "c", memory=memory)
    assert memory["disc"][1].param_groups[0]["lr"] == 8e-4  # the sites' discriminators step at their own rate


def test_config_checks():
    for bad in ({"iterations": 0}, {"feedback_noise": 1.0}, {"gan_loss": "wgan"}, {"dropout": 1.0},
                {"round_timeout_s": 0}, {"audit_holdout": 1.0}, {"audit_holdout": -0.1}, {"fidelity_n": 1},
                {"discriminator_lr": 0.0}, {"feature_matching": -1.0}, {"generator_upsampling": "bilinear"}):
        with pytest.raises(ValueError, match="asyndgan"):
            AsynDGANConfig(**bad)
    assert np.isclose(AsynDGANConfig().lr, 2e-4)  # the paper's Adam
    assert AsynDGANConfig().audit_holdout == 0.2 and AsynDGANConfig().audit


# ---------------------------------------------------------------------------------------------------- audits
SETUP_3D = TrainingSetup(task="idh", n_folds=1, seed=0, preprocess=PreprocessConfig(shape=(16, 16, 16)),
                         model=ClassifierConfig(channels=(4, 8), norm_num_groups=4, mamba=False),
                         train=TrainConfig(epochs=1, batch_size=2))


def test_a_site_never_discloses_its_held_out_cases_masks(tiny_study_2d, tmp_path):
    """The split is stratified, seeded and the same wherever it is drawn; round 1 brings the server the masks of the
    members only, exactly theirs; audit_holdout 0 holds nothing out; the pooled baseline's mapping is obeyed."""
    sites = list(open_study(tiny_study_2d).sites_with_role("train"))
    cfg = dataclasses.replace(CFG, iterations=1, audit_holdout=0.5)
    members, holdout = audit_split(sites[0], 0.5, SETUP_2D)
    assert audit_split(sites[0], 0.5, SETUP_2D) == (members, holdout) and len(holdout) >= 2
    assert sorted(members + holdout) == sorted(case_key(c) for c in sites[0].cases)
    protocol = AsynDGANProtocol(SETUP_2D, cfg)
    state = run_protocol_inprocess(protocol, sites, tmp_path / "fed")
    for site in sites:
        held = set(audit_split(site, 0.5, SETUP_2D)[1])
        kept = [c for c in site.cases if case_key(c) not in held]
        assert [case_key(c) for c in protocol.training_cases(site)] == [case_key(c) for c in kept]
        masks = state.states[f"masks/{site.name}"]
        assert masks["seg"].shape[0] == len(site.cases) - len(held) == state.history[0]["masks"][site.name]
        own = load_site_data(kept, SETUP_2D, cfg, DatasetCache(SETUP_2D.preprocess))
        assert torch.equal(masks["seg"], own.seg) and torch.equal(masks["brain"], own.brain)
    everything = AsynDGANProtocol(SETUP_2D, dataclasses.replace(cfg, audit_holdout=0.0))
    assert everything.training_cases(sites[0]) == list(sites[0].cases)
    pooled = AsynDGANProtocol(SETUP_2D, cfg, holdout={sites[0].name: [case_key(sites[0].cases[0])]})
    assert pooled.training_cases(sites[0]) == list(sites[0].cases[1:])


def test_the_arm_audits_its_synthetic_set_per_site_with_the_controls(tiny_study, tmp_path):
    """A tiny 3D in-process run: per site the shared audit (members vs held-out, negative, positive and reference
    controls, copy rate, own-mask similarity), the fidelity matrix, and the split recorded beside them."""
    sites = tuple(open_study(tiny_study).sites_with_role("train"))
    cfg = dataclasses.replace(CFG, iterations=2, audit_holdout=0.5, fidelity_n=4)
    arm_dir = tmp_path / "asyndgan"
    out = run(ArmContext("asyndgan", SETUP_3D, sites, arm_dir, cfg, DatasetCache(SETUP_3D.preprocess),
                         progress=False))
    extra = json.loads(json.dumps(out.extra))  # JSON-ready
    privacy = extra["privacy"]
    assert set(privacy) == {s.name for s in sites} and extra["audit_holdout"] == 0.5
    for site in sites:
        p = privacy[site.name]
        split = json.loads((arm_dir / "holdout" / f"{site.name}.json").read_text())
        assert p["n_holdout"] == len(split["holdout"]) == extra["holdout_cases"][site.name] >= 2
        assert p["n_train"] == len(split["members"]) == p["n_synthetic"]  # one image per member's mask
        assert set(split["members"]).isdisjoint(split["holdout"])
        assert p["shape"] == [4, 16, 16, 16] and p["ssim_region"] == "brain" and "3D SSIM" in p["method"]
        for key in ("membership", "negative_control", "positive_control", "copy_rate", "reference_control"):
            assert key in p
        assert 0.0 <= p["membership"]["auc"] <= 1.0 and p["membership"]["underpowered"]
        assert set(p["reference_control"]["by_generator"]) == {s.name for s in sites} - {site.name}
        assert p["positive_control_caught"]  # noisy copies of members are caught
        assert all(i in split["members"] for i in p["positive_control"]["memorised_case_ids"])
        assert all(pair["train"] in split["members"] for pair in p["copy_rate"]["closest"])
        own = p["own_mask"]
        assert own["n"] == p["n_synthetic"] and -1.0 <= own["ssim_min"] <= own["ssim_max"] <= 1.0
        assert own["below_copy_threshold"] <= p["copy_rate"]["rate"] + 1e-9  # copies of their own source are copies
        assert (arm_dir / "figures" / f"privacy_closest_{site.name}.png").is_file()
    fid = extra["fidelity"]
    assert fid["real_sites"] == fid["synthetic_sites"] == [s.name for s in sites]
    assert fid["sequences"] == list(SETUP_3D.sequences) and len(fid["matrix"]["t1"]) == len(sites)
    assert (arm_dir / "figures" / "fid_matrix.png").is_file()
    off = run(ArmContext("asyndgan", SETUP_3D, sites, tmp_path / "off", dataclasses.replace(cfg, audit=False),
                         DatasetCache(SETUP_3D.preprocess), progress=False))
    assert "privacy" not in off.extra and "fidelity" not in off.extra


def test_own_mask_similarity_pairs_each_image_with_the_case_of_its_mask():
    rng = np.random.default_rng(0)
    members = [_blob_case(rng) for _ in range(3)]
    copies = members * 2  # samples_per_mask 2: image j was drawn for member j mod 3
    same = own_mask_similarity(members, copies, threshold=1e-3)
    assert same["n"] == 6 and same["ssim_min"] == pytest.approx(1.0) and same["below_copy_threshold"] == 1.0
    shifted = own_mask_similarity(members, members[1:] + members[:1], threshold=1e-3)
    assert shifted["ssim_max"] < 1.0 and shifted["below_copy_threshold"] == 0.0
    with pytest.raises(ValueError, match="one per member"):
        own_mask_similarity(members, copies[:4], threshold=0.1)


def _blob_case(rng, size=16):
    from synthlearn.data.io import CaseArrays

    images = np.zeros((2, size, size, 1), np.float32)
    images[:, 2:-2, 2:-2, 0] = rng.normal(3.0, 1.0, (2, size - 4, size - 4))
    return CaseArrays(images=images, seg=None, affine=np.eye(4))


def test_masks_from_catphishing_no_site_discloses_a_mask_and_the_masks_travel_with_the_images(tiny_study_2d,
                                                                                               tmp_path):
    """``masks_from = "catphishing"``: the server holds the masks of another arm's synthetic cases (here a copied
    site standing in for CATphishing's folder); round 1 sends nothing from the sites, each step sends the images
    with their masks and gets only the gradient back; the generator learns; a missing folder is refused."""
    import shutil

    from synthlearn.strategies.asyndgan import catphishing_masks

    sites = list(open_study(tiny_study_2d).sites_with_role("train"))
    cat = tmp_path / "catphishing"
    for site in sites:
        shutil.copytree(site.path, cat / "synthetic" / site.name)
    cfg = dataclasses.replace(CFG, masks_from="catphishing")
    masks = catphishing_masks(cat, [s.name for s in sites], SETUP_2D, cfg, DatasetCache(SETUP_2D.preprocess))
    assert {s: int(m["seg"].shape[0]) for s, m in masks.items()} == {s.name: len(s.cases) for s in sites}
    protocol = AsynDGANProtocol(SETUP_2D, cfg, server_masks=masks)
    initial = protocol.initial_state()
    state = run_protocol_inprocess(protocol, sites, tmp_path / "fed")
    assert state.history[0]["masks_from"] == "catphishing"
    fake_bytes = CFG.batch_size * 4 * 32 * 32 * 4
    assert state.bytes_from_sites == CFG.iterations * len(sites) * fake_bytes  # gradients only: no mask came back
    assert any(not torch.equal(initial["generator"][k], state.states["generator"][k]) for k in initial["generator"])
    message, config = protocol.site_message(2, state.states, sites[0].name)
    assert config["phase"] == "step" and set(message) == {"fake", "masks"} and "batch" not in message
    with pytest.raises(FileNotFoundError, match="run the catphishing arm before asyndgan"):
        catphishing_masks(tmp_path / "nowhere", [sites[0].name], SETUP_2D, cfg, DatasetCache(SETUP_2D.preprocess))
    with pytest.raises(ValueError, match="masks_from must be sites or catphishing"):
        AsynDGANConfig(masks_from="atlas")
