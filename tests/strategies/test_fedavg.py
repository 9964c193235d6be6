"""FedAvg core: aggregation against an independent numpy reference; FedAvg over one site == training on
that site."""

import dataclasses

import numpy as np
import pytest
import torch

from synthlearn.data.layouts import open_study
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.models.classifier import ClassifierConfig
from synthlearn.protocol import FederationError, SiteReply
from synthlearn.strategies.fedavg import (
    KEY_SEP,
    FedAvgConfig,
    FedAvgProtocol,
    SiteUpdate,
    aggregate,
    run_rounds_inprocess,
    site_update,
    weighted_average,
)
from synthlearn.tasks.model import train_task_model
from synthlearn.tasks.setup import TrainingSetup
from synthlearn.training.trainer import TrainConfig


def _numpy_reference(states, weights):
    """Independent reference: numpy's weighted average per key."""
    return {k: np.average(np.stack([np.asarray(s[k], dtype=np.float64) for s in states]), axis=0,
                          weights=np.asarray(weights, dtype=np.float64)) for k in states[0]}


def test_weighted_average_matches_numpy():
    rng = np.random.default_rng(0)
    states = [{"w": torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32)),
               "b": torch.from_numpy(rng.normal(size=5).astype(np.float32))} for _ in range(3)]
    weights = [10, 3, 7]
    out = weighted_average(states, weights)
    ref = _numpy_reference(states, weights)
    for k in ref:
        assert out[k].dtype == torch.float32
        np.testing.assert_allclose(out[k].numpy(), ref[k], rtol=1e-6, atol=1e-7)


def test_weighted_average_of_one_state_is_exact_and_zero_weight_is_ignored():
    s = {"w": torch.randn(4, 4), "n": torch.tensor(7)}
    out = weighted_average([s], [13])
    assert torch.equal(out["w"], s["w"]) and torch.equal(out["n"], s["n"])
    other = {"w": torch.randn(4, 4), "n": torch.tensor(1)}
    assert torch.equal(weighted_average([s, other], [5, 0])["w"], s["w"])


@pytest.mark.parametrize("states, weights, match", [
    ([], [], "at least one"),
    ([{"a": torch.zeros(1)}], [1, 2], "weights"),
    ([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1], "keys"),
    ([{"a": torch.zeros(1)}, {"a": torch.zeros(2)}], [1, 1], "shapes"),
    ([{"a": torch.zeros(1)}], [-1], ">= 0"),
    ([{"a": torch.zeros(1)}], [0], "all weights zero"),
])
def test_weighted_average_checks(states, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_average(states, weights)


def test_aggregate_weights_each_model_by_its_own_counts():
    a = SiteUpdate({"m1": {"w": torch.ones(2)}, "m2": {"w": torch.ones(2)}}, {"m1": 1, "m2": 0}, {})
    b = SiteUpdate({"m1": {"w": torch.zeros(2)}, "m2": {"w": torch.full((2,), 4.0)}}, {"m1": 3, "m2": 2}, {})
    out = aggregate([a, b])
    assert torch.allclose(out["m1"]["w"], torch.full((2,), 0.25))
    assert torch.allclose(out["m2"]["w"], torch.full((2,), 4.0))


def _setup(n_folds=2, momentum=0.9):
    return TrainingSetup(task="idh", n_folds=n_folds, seed=5, preprocess=PreprocessConfig(shape=(16, 16, 16)),
                         model=ClassifierConfig(channels=(4, 8), norm_num_groups=2, mamba=False),
                         train=TrainConfig(epochs=2, batch_size=2, momentum=momentum, device="cpu"))


def test_fedavg_over_one_site_equals_training_on_that_site(tiny_study, tmp_path):
    site = open_study(tiny_study).sites_with_role("train")[0]
    setup = _setup()
    plain = train_task_model(site.cases, setup, tmp_path / "plain", progress=False)
    fed = run_rounds_inprocess([site], setup, FedAvgConfig(rounds=2, local_epochs=1, backend="inprocess"),
                               tmp_path / "fed")
    assert fed.round == 2 and fed.bytes_from_sites > 0
    for name, net in plain.networks.items():
        for k, v in net.state_dict().items():
            assert torch.equal(v, fed.states[name][k]), (name, k)


def test_site_update_leaves_untrainable_models_unchanged(tiny_study, tmp_path):
    site = open_study(tiny_study).sites_with_role("train")[0]
    setup = dataclasses.replace(_setup(n_folds=1), task="tumor_type")
    wildtype_only = [c for c in site.cases if c.labels.idh == "wildtype"]
    from synthlearn.strategies.fedavg import initial_states

    start = initial_states(setup)
    upd = site_update(start, wildtype_only, setup, FedAvgConfig(rounds=1, backend="inprocess"), 1,
                      state_dir=tmp_path)
    assert upd.num_examples["subtype/fold-0"] == 0
    assert upd.num_examples["idh/fold-0"] == len(wildtype_only)
    for k, v in start["subtype/fold-0"].items():
        assert torch.equal(upd.states["subtype/fold-0"][k], v)
    with pytest.raises(ValueError, match="server_round"):
        site_update(start, wildtype_only, setup, FedAvgConfig(rounds=1, backend="inprocess"), 2)


def test_fedavg_config_checks():
    for kwargs in ({"rounds": 0}, {"local_epochs": 0}, {"backend": "grpc"}, {"round_timeout_s": 0},
                   {"threads_per_site": 0}):
        with pytest.raises(ValueError):
            FedAvgConfig(**kwargs)


# ------------------------------------------------------------------------------------------- hostile site replies
NET = "idh/fold-0"


def _server_state():
    return {NET: {"w": torch.zeros(2, 3), "steps": torch.tensor(4)}}


def _reply(site, w, n=2, **extra):
    return SiteReply(site, {NET: {"w": w, "steps": torch.tensor(4), **extra}},
                     {f"n{KEY_SEP}{NET}": n, f"loss{KEY_SEP}{NET}": 0.5})


def _protocol():
    return FedAvgProtocol(_setup(), FedAvgConfig(rounds=1, backend="inprocess"))


def test_fedavg_aggregate_of_well_formed_replies_matches_numpy():
    replies = [_reply("site-a", torch.ones(2, 3), n=1), _reply("site-b", torch.full((2, 3), 5.0), n=3)]
    new, entry = _protocol().aggregate(1, _server_state(), replies)
    ref = _numpy_reference([r.arrays[NET] for r in replies], [1, 3])
    np.testing.assert_allclose(new[NET]["w"].numpy(), ref["w"], rtol=1e-6)
    assert new[NET]["steps"].dtype == torch.int64 and int(new[NET]["steps"]) == 4
    assert entry["loss"] == {"site-a": {NET: 0.5}, "site-b": {NET: 0.5}}


def _with(change):
    def make():
        good, bad = _reply("site-a", torch.ones(2, 3)), _reply("site-b", torch.ones(2, 3))
        change(bad)
        return [good, bad]
    return make


MALFORMED = {
    "unexpected key": (_with(lambda r: r.arrays[NET].update(backdoor=torch.zeros(1))),
                       r"site site-b: idh/fold-0: unexpected tensor 'backdoor'; expected only the 2 tensors"),
    "missing key": (_with(lambda r: r.arrays[NET].pop("steps")),
                    r"site site-b: idh/fold-0: tensor 'steps' missing; expected every tensor"),
    "wrong shape": (_with(lambda r: r.arrays[NET].update(w=torch.ones(3, 2))),
                    r"site site-b: idh/fold-0: tensor 'w': expected shape \(2, 3\), found \(3, 2\)"),
    "wrong dtype": (_with(lambda r: r.arrays[NET].update(w=torch.ones(2, 3, dtype=torch.float64))),
                    r"site site-b: idh/fold-0: tensor 'w': expected dtype torch.float32, found torch.float64"),
    "NaN": (_with(lambda r: r.arrays[NET]["w"].__setitem__((0, 0), float("nan"))),
            r"site site-b: idh/fold-0: tensor 'w': expected finite values, found 1 NaN or inf of 6"),
    "inf": (_with(lambda r: r.arrays[NET]["w"].fill_(float("inf"))),
            r"site site-b: idh/fold-0: tensor 'w': expected finite values, found 6 NaN or inf of 6"),
    "not a tensor": (_with(lambda r: r.arrays[NET].update(w=[[1.0] * 3] * 2)),
                     r"site site-b: idh/fold-0: tensor 'w': expected a tensor, found list"),
    "unexpected network": (_with(lambda r: r.arrays.update({"idh/fold-9": {"w": torch.ones(1)}})),
                           r"site site-b: unexpected network 'idh/fold-9'; expected only \['idh/fold-0'\]"),
    "missing network": (_with(lambda r: r.arrays.pop(NET)),
                        r"site site-b: network 'idh/fold-0' missing from the reply; expected \['idh/fold-0'\]"),
    "negative case count": (_with(lambda r: r.metrics.update({f"n{KEY_SEP}{NET}": -3})),
                            r"site site-b: metric 'n::idh/fold-0': expected an integer >= 0 .*found -3"),
    "missing loss": (_with(lambda r: r.metrics.pop(f"loss{KEY_SEP}{NET}")),
                     r"site site-b: metric 'loss::idh/fold-0': expected a number, found None"),
    # the same extra tensor at every site: weighted_average alone would average it into the global network
    "extra key at every site": (lambda: [_reply(s, torch.ones(2, 3), extra=torch.ones(1))
                                         for s in ("site-a", "site-b")],
                                r"site site-a: idh/fold-0: unexpected tensor 'extra'.*\n.*site site-b"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_fedavg_aggregate_refuses_a_malformed_site_reply(case):
    """A reply whose state dict has other keys, shapes, dtypes or non-finite values than the server's networks (or
    lacks its case counts) is refused before anything is averaged, naming the site, the network, the tensor, what was
    expected and what was found."""
    make, match = MALFORMED[case]
    state = _server_state()
    with pytest.raises(FederationError, match=match):
        _protocol().aggregate(1, state, make())
    assert torch.equal(state[NET]["w"], torch.zeros(2, 3))  # the server's networks are untouched


def test_fedavg_aggregate_lists_every_problem_of_every_site():
    bad_a = _reply("site-a", torch.ones(3, 3))
    bad_b = _reply("site-b", torch.full((2, 3), float("nan")), backdoor=torch.zeros(1))
    with pytest.raises(FederationError, match=r"3 problems") as info:
        _protocol().aggregate(2, _server_state(), [bad_a, bad_b])
    message = str(info.value)
    assert "fedavg round 2" in message and "site site-a" in message and "'backdoor'" in message and "NaN" in message
    with pytest.raises(FederationError, match="no site replied"):
        _protocol().aggregate(1, _server_state(), [])
