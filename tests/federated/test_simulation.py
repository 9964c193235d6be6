"""Flower glue: exact record round trip, byte counting, timeouts without hanging, and a toy protocol carried by
the generic app pair on the simulation engine exactly as the in-process runner carries it."""

import time

import pytest
import torch

from synthlearn.federated.apps import check_replies, check_reply_sites, wait_for_sites
from synthlearn.federated.messages import (
    message_nbytes,
    record_to_states,
    split_scalars,
    states_to_record,
)
from synthlearn.protocol import FederationError, RoundProtocol, run_protocol_inprocess


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
    assert split_scalars({"n": 3, "loss": 0.5, "site": "a", "flag": True}) == ({"n": 3, "loss": 0.5},
                                                                             {"site": "a", "flag": "True"})


class _EmptyGrid:
    def get_node_ids(self):
        return []


def test_federation_without_sites_fails_fast_with_a_clear_error():
    t0 = time.monotonic()
    with pytest.raises(FederationError, match="0 of 2 sites connected"):
        wait_for_sites(_EmptyGrid(), 2, 0.5)
    assert time.monotonic() - t0 < 5


def test_missing_replies_stop_the_round():
    with pytest.raises(FederationError, match="0 of 3 sites replied"):
        check_replies([], 3, 1, 1.0)


class _MeanOfSites(RoundProtocol):
    """A toy protocol: each site returns the server's vector plus its own number of cases; the server averages."""

    rounds = 2
    start_timeout_s = 120.0
    round_timeout_s = 300.0

    def initial_state(self):
        return {"v": {"x": torch.zeros(3)}}

    def server_message(self, rnd, state):
        return state, {"scale": 2.0}

    def site_round(self, site, rnd, arrays, config, *, state_dir, memory):
        memory["calls"] = memory.get("calls", 0) + 1
        out = arrays["v"]["x"] + float(config["scale"]) * len(site.cases)
        return {"v": {"x": out}}, {"n": len(site.cases), "calls": memory["calls"], "name": site.name}

    def aggregate(self, rnd, state, replies):
        x = torch.stack([r.arrays["v"]["x"] for r in replies]).mean(0)
        return {"v": {"x": x}}, {"sites": [r.site for r in replies], "calls": [r.metrics["calls"] for r in replies],
                                 "names": [r.metrics["name"] for r in replies]}


def test_any_protocol_runs_on_flower_as_in_process(tiny_study, tmp_path):
    from synthlearn.data.layouts import open_study
    from synthlearn.federated.simulation import run_protocol_simulation

    sites = list(open_study(tiny_study).sites_with_role("train"))
    plain = run_protocol_inprocess(_MeanOfSites(), sites, tmp_path / "plain")
    flower = run_protocol_simulation(_MeanOfSites(), sites, tmp_path / "flower", progress=False)
    assert flower.round == plain.round == 2
    assert torch.equal(flower.states["v"]["x"], plain.states["v"]["x"])
    names = [s.name for s in sites]
    assert [h["sites"] for h in flower.history] == [names, names]  # replies folded in the federation's site order
    assert flower.history[-1]["names"] == names and all(c >= 1 for c in flower.history[-1]["calls"])
    assert flower.bytes_from_sites > plain.bytes_from_sites > 0  # real messages: framing on top of the payload
    again = run_protocol_simulation(_MeanOfSites(), sites, tmp_path / "flower", progress=False)  # resumes: done
    assert again.round == 2 and torch.equal(again.states["v"]["x"], flower.states["v"]["x"])


def test_a_reply_that_claims_another_sites_name_is_refused():
    """The server takes a reply's site from the reply: a name outside the federation, one site claimed twice, or a
    node replying as another site than it identified itself as is refused, naming the node."""
    from synthlearn.protocol import FederationError

    sites = ["tcga", "utsw", "egd"]
    check_reply_sites([(1, "tcga"), (2, "utsw")], sites, {}, 2)  # a missing site is the timeout's business
    check_reply_sites([(1, "tcga"), (2, "utsw")], sites, {1: "tcga", 2: "utsw"}, 2)
    with pytest.raises(FederationError, match="node 7 replied as site 'nyu', which is not one of"):
        check_reply_sites([(7, "nyu")], sites, {}, 3)
    with pytest.raises(FederationError, match="nodes 1 and 2 both replied as site 'tcga'"):
        check_reply_sites([(1, "tcga"), (2, "tcga")], sites, {}, 3)
    with pytest.raises(FederationError, match="node 2 replied as site 'tcga' but identified itself as 'utsw'"):
        check_reply_sites([(2, "tcga")], sites, {1: "tcga", 2: "utsw"}, 3)


def test_a_further_seed_reuses_only_a_finished_federation(tmp_path):
    from synthlearn.protocol import FederationState

    path = tmp_path / "global.pt"
    FederationState(3, {"g": {"w": torch.ones(2)}}).save(path)
    assert FederationState.load_finished(path, 3, "fedgan").round == 3
    with pytest.raises(ValueError, match=r"fedgan: the primary seed's federation at .* stopped at round 3 of 5"):
        FederationState.load_finished(path, 5, "fedgan")
    with pytest.raises(ValueError, match="stopped at round 0 of 5"):
        FederationState.load_finished(tmp_path / "none.pt", 5, "asyndgan")
