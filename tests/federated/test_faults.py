"""Faults a federation survives: a site that drops out or stalls mid-FedAvg (the round goes on with the others and
the results say so; nothing waits past the round timeout), and a server killed while writing its checkpoint (the
federation resumes to exactly the result of an uninterrupted one)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from synthlearn.protocol import FederationState, RoundProtocol, run_protocol_inprocess

STALL_S = 25.0


class _FaultySites(RoundProtocol):
    """Each site returns the server's vector plus its case count; in round 2 site ``utsw`` fails and ``egd`` stalls
    far past the round timeout."""

    rounds = 3
    start_timeout_s = 120.0
    round_timeout_s = 8.0
    tolerate_missing = True

    def initial_state(self):
        return {"v": {"x": torch.zeros(2)}}

    def timeout_for(self, rnd):
        return 120.0 if rnd == 1 else self.round_timeout_s  # round 1 also waits for the engine's start-up

    def site_round(self, site, rnd, arrays, config, *, state_dir, memory):
        if rnd == 2 and site.name == "utsw":
            raise RuntimeError("disk full at utsw")
        if rnd == 2 and site.name == "egd":
            time.sleep(STALL_S)
        return {"v": {"x": arrays["v"]["x"] + len(site.cases)}}, {}

    def aggregate(self, rnd, state, replies):
        return {"v": {"x": torch.stack([r.arrays["v"]["x"] for r in replies]).mean(0)}}, \
            {"sites": [r.site for r in replies]}


def test_a_site_that_fails_and_one_that_stalls_are_left_out_of_their_round(tiny_study, tmp_path):
    from synthlearn.data.layouts import open_study
    from synthlearn.federated.simulation import run_protocol_simulation

    sites = list(open_study(tiny_study).sites_with_role("train"))
    state = run_protocol_simulation(_FaultySites(), sites, tmp_path / "run", progress=False)
    assert state.round == 3
    assert state.history[1]["sites"] == ["tcga"] and state.history[1]["missing_sites"] == ["utsw", "egd"]
    assert state.events() == [{"round": 2, "missing_sites": ["utsw", "egd"]}]
    assert "missing_sites" not in state.history[0]
    # the round waited for its timeout, not for the stalled site (Flower's simulation engine itself only shuts
    # down once the stalled call returns: its Ray pool joins its workers; a deployed site is its own process)
    assert state.history[1]["wall_s"] < STALL_S - 10, state.history


def test_fedavg_leaves_out_a_dropped_site_and_the_report_says_so(tmp_path):
    from synthlearn.report.html import write_report

    results = {"task": "idh", "arms": {"fedavg": {
        "test": {"combined": {"auc": 0.7, "acc": 0.6, "sen": 0.5, "spe": 0.7}}, "bytes_from_sites": 10, "rounds": 2,
        "wall_s": 1.0, "federation_events": [{"round": 2, "missing_sites": ["utsw"]}]}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    _, md = write_report(tmp_path)
    text = md.read_text()
    assert "Federation events" in text and "| fedavg | 2 | utsw |" in text


def test_a_server_killed_while_writing_its_checkpoint_resumes_to_the_same_result(tiny_study, tmp_path, monkeypatch):
    """Real FedAvg (with the sites' optimizer state kept between rounds): the server dies while writing round 2's
    checkpoint, after every site trained round 2 and saved its optimizer; the resumed federation repeats round 2
    and ends with exactly the weights of an uninterrupted run."""
    from synthlearn.data.layouts import open_study
    from synthlearn.strategies.fedavg import FedAvgConfig, FedAvgProtocol
    from synthlearn.study import load_study_config

    setup = load_study_config("configs/study_tiny.toml").setup
    cfg = FedAvgConfig(rounds=2, backend="inprocess")
    sites = list(open_study(tiny_study).sites_with_role("train"))
    whole = run_protocol_inprocess(FedAvgProtocol(setup, cfg), sites, tmp_path / "whole")

    real_save = FederationState.save

    def dies_in_round_2(self, path):
        if self.round == 2:
            tmp = path.parent / f".{path.name}.partial"
            tmp.write_bytes(b"\x80\x02 half a checkpoint")  # what a kill mid-write leaves beside it
            raise KeyboardInterrupt("killed while writing the checkpoint")
        real_save(self, path)

    monkeypatch.setattr(FederationState, "save", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_protocol_inprocess(FedAvgProtocol(setup, cfg), sites, tmp_path / "killed")
    monkeypatch.setattr(FederationState, "save", real_save)
    assert FederationState.load_or_start(tmp_path / "killed" / "server" / "global.pt", dict).round == 1
    resumed = run_protocol_inprocess(FedAvgProtocol(setup, cfg), sites, tmp_path / "killed")
    assert resumed.round == 2
    for name, sd in whole.states.items():
        for key, value in sd.items():
            assert torch.equal(resumed.states[name][key], value), f"{name}.{key} differs after the resume"
