"""Flower glue: exact record round trip, byte counting, timeouts without hanging."""

import time

import pytest
import torch

from synthlearn.federated.simulation import (
    FederationError,
    _make_strategy_class,
    message_nbytes,
    record_to_states,
    states_to_record,
)
from synthlearn.strategies.fedavg import FedAvgConfig, ServerProgress


def test_record_round_trip_is_exact_and_bytes_cover_the_payload():
    states = {"idh/fold-0": {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3)},
              "idh/fold-1": {"a.weight": torch.randn(3, 4), "n": torch.tensor(2)}}
    back = record_to_states(states_to_record(states))
    assert set(back) == set(states)
    for name in states:
        for k, v in states[name].items():
            assert torch.equal(back[name][k], v)
    from flwr.app import RecordDict

    msg = RecordDict({"arrays": states_to_record(states)})  # a Message needs a running federation
    payload = sum(v.numel() * v.element_size() for s in states.values() for v in s.values())
    assert message_nbytes(msg) > payload


class _EmptyGrid:
    def get_node_ids(self):
        return []


def test_federation_without_sites_fails_fast_with_a_clear_error(tmp_path):
    cls = _make_strategy_class()
    cfg = FedAvgConfig(rounds=1, start_timeout_s=0.5)
    strategy = cls(num_sites=2, site_names=["a", "b"], cfg=cfg, progress=ServerProgress(0, {}),
                   checkpoint=tmp_path / "g.pt")
    from flwr.app import ArrayRecord, ConfigRecord

    t0 = time.monotonic()
    with pytest.raises(FederationError, match="0 of 2 sites connected"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _EmptyGrid())
    assert time.monotonic() - t0 < 5


def test_missing_replies_stop_the_round(tmp_path):
    cls = _make_strategy_class()
    strategy = cls(num_sites=3, site_names=["a", "b", "c"], cfg=FedAvgConfig(rounds=1, round_timeout_s=1),
                   progress=ServerProgress(0, {}), checkpoint=tmp_path / "g.pt")
    with pytest.raises(FederationError, match="0 of 3 sites replied"):
        strategy.aggregate_train(1, [])
