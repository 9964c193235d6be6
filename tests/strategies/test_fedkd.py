"""FedKD (Ren et al.): synthetic label maps, compression by matching, what a site sends, the server step."""

import numpy as np
import pytest
import torch

from synthlearn.data.layouts import open_study
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.models.classifier import ClassifierConfig
from synthlearn.protocol import SiteReply, run_protocol_inprocess
from synthlearn.strategies.fedkd import (
    CompressedSet,
    FedKDConfig,
    FedKDProtocol,
    _embed,
    compress_site,
    compression_loss,
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
    for bad in ({"rounds": 0}, {"per_class": 0}, {"compress_lr": 0.0}, {"temperature": 0.0}, {"backend": "x"}):
        with pytest.raises(ValueError, match="fedkd"):
            FedKDConfig(**bad)
