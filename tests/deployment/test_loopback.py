"""A study across machines on one machine: a SuperLink (TLS, SuperNode authentication) and three SuperNodes as real
processes on loopback, started by the commands a server and the hospitals type, run a tiny FedAvg study and
CATphishing's artifact upload, the server holding no training site's folder; a SuperNode with an unregistered key
and one that trusts another CA are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "synthlearn.cli"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "SYNTHLEARN_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen(CLI + args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    from synthlearn.deployment.runner import stop_process

    stop_process(proc, timeout_s=10)


def test_fedavg_across_a_superlink_and_three_supernodes(tiny_study, tmp_path):
    import shutil

    from synthlearn.deployment.credentials import make_credentials
    from synthlearn.deployment.runner import free_local_ports

    train = ["tcga", "utsw", "egd"]
    server_study = tmp_path / "server_study"  # what the server holds: study.json and the test sites, no training site
    server_study.mkdir()
    shutil.copy(tiny_study / "study.json", server_study)
    for site in ("nyu", "ucsf"):
        shutil.copytree(tiny_study / site, server_study / site)
    creds = tmp_path / "creds"
    make_credentials(creds, train)
    other = tmp_path / "other"  # another consortium: its CA and a key the server never registered
    make_credentials(other, ["tcga"])
    config = tmp_path / "study.toml"  # FedAvg, and CATphishing's artifacts uploaded over the same channel
    config.write_text(f'base = "{Path("configs/study_tiny.toml").resolve()}"\narms = ["fedavg", "catphishing"]\n'
                      '[catphishing]\ntransport = "flower"\naudit = false\nper_class = 2\n'
                      '[catphishing.gate]\nn_per_class = 2\nsteps = 2\nloss_timesteps = 2\nloss_noises = 1\n'
                      'n_bootstrap = 50\n')  # the release gate runs at every site (on by default over Flower)
    link, *ports = free_local_ports(6)
    address = f"127.0.0.1:{link}"
    procs: list[subprocess.Popen] = []
    try:
        server = _start(["server", "start", "--config", str(config), "--study", str(server_study),
                         "--out", str(tmp_path / "run"), "--credentials", str(creds),
                         "--address", address, "-q"], tmp_path / "server.log")
        procs.append(server)
        deadline = time.monotonic() + 120
        while "Waiting for them to join" not in (tmp_path / "server.log").read_text():
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the SuperLink did not start"
            time.sleep(0.5)
        joins = {}
        for i, site in enumerate(train):
            joins[site] = _start(["site", "join", "--site", str(tiny_study / site), "--superlink", address,
                                  "--ca", str(creds / "ca.crt"), "--key", str(creds / "sites" / f"{site}.key"),
                                  "--port", str(ports[i]), "--state", str(tmp_path / "state" / site),
                                  "--max-wait", "240", "--release-override", f"loopback test at {site}"],
                                 tmp_path / f"{site}.log")  # tiny generators on 3 cases fit them: the gate refuses
        unregistered = _start(["site", "join", "--site", str(tiny_study / "tcga"), "--superlink", address,
                               "--ca", str(creds / "ca.crt"), "--key", str(other / "sites" / "tcga.key"),
                               "--port", str(ports[3]), "--state", str(tmp_path / "state" / "intruder"),
                               "--max-wait", "15"], tmp_path / "unregistered.log")
        wrong_ca = _start(["site", "join", "--site", str(tiny_study / "utsw"), "--superlink", address,
                           "--ca", str(other / "ca.crt"), "--key", str(creds / "sites" / "utsw.key"),
                           "--port", str(ports[4]), "--state", str(tmp_path / "state" / "wrong-ca"),
                           "--max-wait", "15"], tmp_path / "wrong_ca.log")
        procs += [*joins.values(), unregistered, wrong_ca]
        try:
            code = server.wait(timeout=480)
        except subprocess.TimeoutExpired:
            pytest.fail("the deployed study did not finish in 8 min:\n" + (tmp_path / "server.log").read_text()[-3000:])
        assert code == 0, (tmp_path / "server.log").read_text()[-3000:] + "\n" + \
            (tmp_path / "run" / "fedavg" / "server" / "flower-run.log").read_text()[-3000:]
        for intruder in (unregistered, wrong_ca):
            intruder.wait(timeout=60)
    finally:
        for proc in procs:
            _stop(proc)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    block = results["arms"]["fedavg"]
    assert "test" in block and block["test"]["combined"]["auc"] is not None
    assert block["rounds"] == 2 and block["bytes_from_sites"] > 0 and block["bytes_to_sites"] > 0
    cat = results["arms"]["catphishing"]
    assert cat["test"]["combined"]["auc"] is not None and cat["bytes_from_sites"] > 0
    arm = json.loads((tmp_path / "run" / "catphishing" / "arm.json").read_text())["extra"]
    assert arm["transport"] == "flower" and arm["upload_message_bytes"] > 0
    for site in train:  # each site ran the rounds itself and recorded what it agreed to run
        agreed = sorted(json.loads(p.read_text())["arm"]
                        for p in (tmp_path / "state" / site).glob("protocol-*/protocol.json"))
        assert agreed == ["catphishing", "fedavg"]
        # FedAvg: hello + 2 rounds; CATphishing: hello + the upload
        assert (tmp_path / f"{site}.log").read_text().count("Receiving: train message") == 5
        manifest = json.loads((tmp_path / "run" / "catphishing" / "artifacts" / site / "manifest.json").read_text())
        gate = manifest["release_gate"]  # gated at the site before it left; the decision travelled with it
        assert gate["released"] and gate["override_reason"] == (None if gate["passed"] else f"loopback test at {site}")
        assert list((tmp_path / "state" / site).glob("protocol-*/*/release_gate.json"))
        assert json.loads((tmp_path / "state" / site / "site_policy.json").read_text()) == {
            "release_override": f"loopback test at {site}"}
        assert list((tmp_path / "state" / site).glob("protocol-*/*/holdout.json"))  # the holdout stayed at the site
    for name in ("unregistered", "wrong_ca"):  # never admitted, never sent a message
        text = (tmp_path / f"{name}.log").read_text()
        assert "Receiving: train message" not in text and "SuperNode ID" not in text, text[-2000:]
    assert not list((tmp_path / "state" / "intruder").glob("protocol-*"))
    # refused for the right reasons (flwr 1.41's words): the SuperLink knows no such key; TLS fails the server's
    # certificate against a CA that did not sign it
    assert "Failed to activate SuperNode" in (tmp_path / "unregistered.log").read_text()
    assert "No SuperNode found with the given public key" in (tmp_path / "run" / "flower" / "superlink.log").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "wrong_ca.log").read_text()
