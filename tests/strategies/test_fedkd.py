"""FedKD (Ren et al.): synthetic label maps, compression by matching, what a site sends, the server step, and the
privacy audit of the compressed samples (held-out cases, what the server keeps, the controls)."""

import json

import numpy as np
import pytest
import torch

from synthlearn.data.layouts import open_study
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.models.classifier import ClassifierConfig
from synthlearn.protocol import SiteReply, run_protocol_inprocess
from synthlearn.strategies.base import ArmContext
from synthlearn.strategies.fedkd import (
    CompressedSet,
    FedKDConfig,
    FedKDProtocol,
    _embed,
    audit_compressed,
    audit_split,
    compress_site,
    compression_loss,
    keep_received,
    load_received,
    run,
    server_update,
    synthetic_label_maps,
)
from synthlearn.tasks.cache import DatasetCache
from synthlearn.tasks.folds import stage_data
from synthlearn.tasks.model import init_model
from synthlearn.tasks.setup import TrainingSetup
from synthlearn.training.trainer import TrainConfig, load_batch

SETUP = TrainingSetup(task="multitask", n_folds=1, seed=0, preprocess=PreprocessConfig(shape=(32, 32, 32)),
                      model=ClassifierConfig(channels=(8, 8, 16), norm_num_groups=4, mamba=False),
                      train=TrainConfig(epochs=1, batch_size=2, optimizer="adamw", lr=1e-3))


def _site(tiny_study):
    site = open_study(tiny_study).sites[0]
    sd = stage_data(site.cases, SETUP)["multitask"]
    return site, sd, DatasetCache(SETUP.preprocess).dataset(list(sd.cases))


@pytest.mark.parametrize("shape", [(32, 32, 32), (24, 16)])
def test_synthetic_label_maps_nest_necrosis_rim_and_oedema_and_depend_on_the_generator_alone(shape):
    a = synthetic_label_maps(3, shape, torch.Generator().manual_seed(1))
    b = synthetic_label_maps(3, shape, torch.Generator().manual_seed(1))
    assert a.shape == (3, *shape) and torch.equal(a, b)
    for m in a:
        assert set(m.unique().tolist()) == {0, 1, 2, 3}
        assert (m == 2).sum() > (m == 3).sum() > (m == 1).sum() > 0


def test_a_site_sends_compressed_noise_not_its_images_and_the_compression_loss_falls(tiny_study):
    _, sd, ds = _site(tiny_study)
    net = init_model(SETUP, "multitask/fold-0")
    head_sizes = sd.stage.head_sizes
    args = {"seed": 0, "name": "multitask/fold-0"}
    start = compress_site(net, ds, list(sd.targets), head_sizes, FedKDConfig(per_class=2, compress_steps=0), **args)
    done = compress_site(net, ds, list(sd.targets), head_sizes, FedKDConfig(per_class=2, compress_steps=10), **args)
    classes = {t[0] for t in sd.targets}
    assert done.images.shape == (2 * len(classes), 4, 32, 32, 32) and torch.equal(done.seg, start.seg)
    # the message: only the compressed set's keys, one row per compressed sample (nothing per real case)
    arrays = done.to_arrays()
    assert set(arrays) == {"images", "seg", *(f"target{h}" for h in range(4)), *(f"soft{h}" for h in range(4))}
    assert all(v.shape[0] == 2 * len(classes) for v in arrays.values())
    real, _ = load_batch(ds, list(range(len(ds))))
    flat_real = real.flatten(1).numpy()
    for x in done.images.flatten(1).numpy():
        corr = [abs(np.corrcoef(x, r)[0, 1]) for r in flat_real]
        assert max(corr) < 0.3  # no compressed sample is (close to) a real case
    # the compression loss (embedding and prediction matching under the global model), before and after optimising
    y = torch.as_tensor(np.asarray(sd.targets))
    c = int(y[0, 0])
    members = (y[:, 0] == c).nonzero().flatten().tolist()
    with torch.no_grad():
        emb, _, log_cases = _embed(net, real[members], load_batch(ds, members)[1])

    def distance(s):
        rows = (s.targets[0][:, c] == 1).nonzero().flatten()
        with torch.no_grad():
            return float(compression_loss(net, s.images[rows], s.seg[rows], emb.mean(0),
                                          [lp.exp().mean(0) for lp in log_cases]))

    assert distance(done) < distance(start)


def test_a_malformed_reply_is_refused_and_the_server_step_lowers_its_loss(tiny_study):
    site, sd, ds = _site(tiny_study)
    net = init_model(SETUP, "multitask/fold-0")
    comp = compress_site(net, ds, list(sd.targets), sd.stage.head_sizes, FedKDConfig(per_class=1, compress_steps=1),
                         seed=0, name="multitask/fold-0")
    arrays = comp.to_arrays()
    with pytest.raises(ValueError, match="a compressed set holds"):
        CompressedSet.from_arrays({**arrays, "real_images": arrays["images"]}, 4)
    with pytest.raises(ValueError, match="disagree"):
        CompressedSet.from_arrays({**arrays, "seg": arrays["seg"][:, :8]}, 4)
    losses = server_update(net, [comp, comp], SETUP, FedKDConfig(server_epochs=6), rnd=1, name="multitask/fold-0")
    assert losses[-1] < losses[0]
    protocol = FedKDProtocol(SETUP, FedKDConfig(rounds=1, per_class=1, compress_steps=1, server_epochs=1))
    state = protocol.initial_state()
    with pytest.raises(ValueError, match="a compressed set holds"):
        protocol.aggregate(1, state, [SiteReply(site.name, {"multitask/fold-0": {"images": arrays["images"]}}, {})])


def test_fedkd_rounds_in_process_count_the_compressed_bytes(tiny_study, tmp_path):
    sites = open_study(tiny_study).sites_with_role("train")[:2]
    cfg = FedKDConfig(rounds=1, per_class=1, compress_steps=1, server_epochs=1, backend="inprocess")
    state = run_protocol_inprocess(FedKDProtocol(SETUP, cfg, DatasetCache(SETUP.preprocess)), sites, tmp_path)
    per_site = {s.name: len({t[0] for t in stage_data(s.cases, SETUP)["multitask"].targets}) for s in sites}
    # per compressed sample: 4 x 32^3 float32 image, 32^3 int8 map, (2 + 2 + 2 + 3) x 2 float32 targets and soft labels
    one = 4 * 32 ** 3 * 4 + 32 ** 3 + 9 * 2 * 4
    assert state.bytes_from_sites == one * sum(per_site.values())
    assert state.history[0]["compressed"] == {s: {"multitask/fold-0": n} for s, n in per_site.items()}


def test_fedkd_config_checks():
    for bad in ({"rounds": 0}, {"per_class": 0}, {"compress_lr": 0.0}, {"temperature": 0.0}, {"backend": "x"},
                {"audit_holdout": 1.0}, {"audit_holdout": -0.1}, {"keep_compressed": "first"}):
        with pytest.raises(ValueError, match="fedkd"):
            FedKDConfig(**bad)


# ------------------------------------------------------------------------------------------------- privacy audit
def test_a_site_never_compresses_its_audit_holdout(tiny_study, tmp_path):
    site = open_study(tiny_study).sites[0]
    members, holdout = audit_split(site, 0.5, SETUP)
    assert holdout and set(members).isdisjoint(holdout) and sorted(members + holdout) == sorted(c.case_id for c in site.cases)
    assert audit_split(site, 0.5, SETUP) == (members, holdout)  # the site and the arm draw the same split
    idh = {c.case_id: c.labels.get("idh") for c in site.cases}
    for cls in set(idh.values()):  # stratified: each class gives floor(fraction * n) cases
        n = sum(v == cls for v in idh.values())
        assert sum(idh[i] == cls for i in holdout) == n // 2
    protocol = FedKDProtocol(SETUP, FedKDConfig(per_class=1, compress_steps=0, audit_holdout=0.5),
                             DatasetCache(SETUP.preprocess))
    out, metrics = protocol.site_round(site, 1, protocol.initial_state(), {}, state_dir=tmp_path, memory={})
    assert metrics == {"n::multitask/fold-0": len(members)}
    # the server keeps what arrived, round by round (or the last round only)
    keep_received(tmp_path / "received", site.name, 1, out)
    keep_received(tmp_path / "received", site.name, 2, out)
    kept = load_received(tmp_path / "received", site.name)
    assert set(kept) == {1, 2} and torch.equal(kept[2]["multitask/fold-0"]["images"], out["multitask/fold-0"]["images"])
    keep_received(tmp_path / "received", site.name, 3, out, keep="last")
    assert set(load_received(tmp_path / "received", site.name)) == {3}


def test_the_compression_control_starts_from_the_real_cases_it_is_given(tiny_study):
    _, sd, ds = _site(tiny_study)
    net = init_model(SETUP, "multitask/fold-0")
    real, seg = load_batch(ds, list(range(len(ds))))
    args = {"seed": 0, "name": "multitask/fold-0"}
    comp = compress_site(net, ds, list(sd.targets), sd.stage.head_sizes, FedKDConfig(compress_steps=0),
                         start_from=[1, 0], **args)
    order = sorted([1, 0], key=lambda i: sd.targets[i][0])  # grouped by the first head's class
    assert torch.equal(comp.images, real[order]) and torch.equal(comp.seg, seg[order])
    with pytest.raises(ValueError, match="start_from"):
        compress_site(net, ds, list(sd.targets), sd.stage.head_sizes, FedKDConfig(), start_from=[len(ds)], **args)


def test_a_copying_compressed_set_is_caught_and_a_random_one_is_not(tiny_study):
    """The audit on 4 members and 2 held-out cases of a tiny site: a "compressed set" that is the members' own
    images (what a compression that copied would send) reads membership AUC 1 and copy rate 1; one of noise reads
    neither; the noisy-copies positive control is caught and the negative control at chance in both."""
    _, _, ds = _site(tiny_study)
    real, seg = load_batch(ds, list(range(len(ds))))
    members, holdout = (real[:4], seg[:4]), (real[4:], seg[4:])
    ids = [f"m{i}" for i in range(4)]
    copying = audit_compressed(members, holdout, members, member_ids=ids, n_bootstrap=200,
                               control=(real[:2] + 0.05 * torch.randn_like(real[:2]), seg[:2], [0, 1]))
    noise = torch.randn((4, *real.shape[1:]), generator=torch.Generator().manual_seed(0))
    random = audit_compressed(members, holdout, (noise, synthetic_label_maps(4, real.shape[2:],
                                                                             torch.Generator().manual_seed(0))),
                              member_ids=ids, n_bootstrap=200)
    assert copying["membership"]["auc"] == 1.0 and copying["membership"]["above_chance"]
    assert copying["copy_rate"]["rate"] == 1.0 and copying["copy_rate"]["closest"][0]["train"] in ids
    assert copying["positive_control_generator_caught"]
    assert copying["positive_control_generator"]["memorised_case_ids"] == ["m0", "m1"]
    assert random["copy_rate"]["rate"] == 0.0 and not random["membership"]["above_chance"]
    for result in (copying, random):
        assert result["ssim_region"] == "grid" and result["n_train"] == 4 and result["n_holdout"] == 2
        assert result["positive_control_caught"] and result["negative_control_ok"]
        assert set(result["positive_control"]["memorised_case_ids"]) <= set(ids)


def test_the_fedkd_arm_audits_the_compressed_samples_the_server_kept(tiny_study, tmp_path):
    """The arm in process on the tiny phantom (half of each site held out): per site the audit of every round's
    compressed samples, with both positive controls caught, the reference control on the other sites' samples,
    and the split and the samples kept in the arm folder."""
    sites = tuple(open_study(tiny_study).sites_with_role("train"))
    cfg = FedKDConfig(rounds=2, per_class=1, compress_steps=2, server_epochs=1, backend="inprocess",
                      audit_holdout=0.5)
    arm_dir = tmp_path / "fedkd"
    out = run(ArmContext("fedkd", SETUP, sites, arm_dir, cfg, DatasetCache(SETUP.preprocess), progress=False))
    privacy = json.loads(json.dumps(out.extra["privacy"]))  # JSON-ready
    assert set(privacy) == {s.name for s in sites} and out.extra["audit_holdout"] == 0.5
    for site in sites:
        p = privacy[site.name]
        split = json.loads((arm_dir / "holdout" / f"{site.name}.json").read_text())
        assert p["n_holdout"] == len(split["holdout"]) >= 2 and p["n_train"] == len(split["members"])
        assert p["rounds"] == [1, 2] and sorted(f.name for f in (arm_dir / "received" / site.name).iterdir()) == [
            "round-001.safetensors", "round-002.safetensors"]
        assert p["n_synthetic"] == p["n_compressed"] == 2 * len({t[0] for t in stage_data(site.cases, SETUP)
                                                                 ["multitask"].targets})
        assert 0.0 <= p["membership"]["auc"] <= 1.0 and 0.0 <= p["copy_rate"]["rate"] <= 1.0
        assert isinstance(p["negative_control_ok"], bool)
        assert p["positive_control_caught"] and p["positive_control_generator_caught"]
        memorised = {i.split("/")[-1] for i in p["positive_control_generator"]["memorised_case_ids"]}
        assert memorised and memorised <= set(split["members"])
        assert set(p["reference_control"]["by_generator"]) == {s.name for s in sites} - {site.name}
        assert (tmp_path / p["montage"]).is_file()
