"""What a deployed site runs: the protocol rebuilt from settings the server names, only for arms it agreed to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synthlearn.config import ConfigError
from synthlearn.strategies.registry import deployable_arms, protocol_from_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup():
    from synthlearn.study import load_study_config

    return load_study_config("configs/study_tiny.toml").setup


def test_every_federated_arm_rebuilds_its_protocol_from_json(setup):
    from synthlearn.strategies.asyndgan import AsynDGANConfig, AsynDGANProtocol
    from synthlearn.strategies.fedavg import FedAvgConfig, FedAvgProtocol
    from synthlearn.strategies.fedkd import FedKDConfig, FedKDProtocol

    assert set(deployable_arms()) == {"fedavg", "catphishing", "fedkd", "asyndgan", "fedgan"}
    for cls, cfg in ((FedAvgProtocol, FedAvgConfig(rounds=3)), (FedKDProtocol, FedKDConfig()),
                     (AsynDGANProtocol, AsynDGANConfig(iterations=4))):
        spec = json.loads(json.dumps(cls(setup, cfg).spec()))  # what travels: JSON text
        rebuilt = protocol_from_spec(spec)
        assert type(rebuilt) is cls and rebuilt.cfg == cfg and rebuilt.setup == setup
        assert rebuilt.rounds == cls(setup, cfg).rounds


def test_a_spec_is_checked_like_a_config(setup):
    from synthlearn.strategies.asyndgan import AsynDGANConfig, AsynDGANProtocol
    from synthlearn.strategies.fedavg import FedAvgConfig, FedAvgProtocol

    spec = FedAvgProtocol(setup, FedAvgConfig()).spec()
    with pytest.raises(ConfigError, match="unknown config key"):
        protocol_from_spec({**spec, "config": {**spec["config"], "exec": "import os"}})
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        protocol_from_spec({**spec, "config": {**spec["config"], "rounds": 0}})
    with pytest.raises(ValueError, match="keys arm, setup and config"):
        protocol_from_spec({**spec, "pickle": "..."})
    with pytest.raises(ValueError, match="does not run deployed"):
        protocol_from_spec({**spec, "arm": "centralized"})
    with pytest.raises(NotImplementedError, match="server-fixed holdout"):  # the pooled bound is not a federation
        AsynDGANProtocol(setup, AsynDGANConfig(), holdout={"tcga": []}).spec()


def test_a_site_refuses_an_arm_it_did_not_agree_to(setup, tmp_path):
    from synthlearn.deployment import apps
    from synthlearn.strategies.fedavg import FedAvgConfig, FedAvgProtocol

    text = json.dumps(FedAvgProtocol(setup, FedAvgConfig()).spec())
    with pytest.raises(PermissionError, match=r"agreed to run only \['fedkd'\]"):
        apps._site_protocol(1, "tcga", tmp_path / "state", text, ["fedkd"])
    assert not (tmp_path / "state").exists()  # nothing recorded for a refused run
    protocol, folder = apps._site_protocol(2, "tcga", tmp_path / "state", text, ["fedavg"])
    assert json.loads((folder / "protocol.json").read_text())["arm"] == "fedavg"  # what it agreed to
    apps._PROTOCOLS.clear()  # a fresh ClientApp process rebuilds it from the site's own record
    again, same = apps._site_protocol(2, "tcga", tmp_path / "state", None, ["fedavg"])
    assert again.cfg == protocol.cfg and same == folder
    # a resumed federation is a new Flower run of the same spec: the same state folder (e.g. its optimizer state)
    assert apps._site_protocol(7, "tcga", tmp_path / "state", text, ["fedavg"])[1] == folder
    other = json.dumps(FedAvgProtocol(setup, FedAvgConfig(rounds=3)).spec())
    assert apps._site_protocol(8, "tcga", tmp_path / "state", other, [])[1] != folder
    with pytest.raises(RuntimeError, match="before its hello"):
        apps._site_protocol(3, "tcga", tmp_path / "state", None, [])


def test_open_site_reads_one_folder_and_names_its_problems(tiny_study, tmp_path):
    import shutil

    from synthlearn.data.layouts import StudyLayoutError, open_site

    site = open_site(tiny_study / "tcga")
    assert site.name == "tcga" and len(site.cases) == 6 and all(c.labels.get("idh") for c in site.cases)
    broken = tmp_path / "tcga"
    shutil.copytree(tiny_study / "tcga", broken)
    victim = min(p for p in broken.iterdir() if p.is_dir())
    (victim / "t2.nii.gz").unlink()
    with pytest.raises(StudyLayoutError, match=r"t2\.nii\.gz.*no such file"):
        open_site(broken)
    with pytest.raises(FileNotFoundError):
        open_site(tmp_path / "nowhere")


def test_server_start_refuses_what_would_need_the_sites_cases_before_starting(tmp_path, capsys):
    from synthlearn.cli import main

    out = tmp_path / "run"
    assert main(["server", "start", "--config", "configs/study_tiny.toml", "--arms", "centralized,fedavg",
                 "--out", str(out), "--credentials", str(tmp_path / "creds")]) == 2
    assert "arms ['centralized'] train on the sites' data in one process" in capsys.readouterr().err
    assert main(["server", "start", "--config", "configs/study_tiny.toml", "--arms", "catphishing",
                 "--out", str(out), "--credentials", str(tmp_path / "creds")]) == 2
    assert "transport = 'flower' and audit = false" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_federation_is_one_line_and_exit_code_3(tiny_study, tmp_path, capsys):
    """A SuperLink that cannot start (its port taken) ends `server start` with one line naming it, not a traceback."""
    import socket

    from synthlearn.cli import main
    from synthlearn.deployment.credentials import make_credentials

    make_credentials(tmp_path / "creds", ["tcga"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["server", "start", "--config", "configs/study_tiny.toml", "--study", str(tiny_study),
                     "--arms", "fedavg", "--out",
                     str(tmp_path / "run"), "--credentials", str(tmp_path / "creds"), "--address",
                     f"127.0.0.1:{port}", "-q"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "the federation failed: the SuperLink cannot listen on 127.0.0.1" in err and "another process" in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_site_join_and_server_start_refuse_bad_input_and_write_nothing(tiny_study, tmp_path, capsys, monkeypatch):
    from synthlearn.cli import main
    from synthlearn.deployment.credentials import make_credentials

    creds = tmp_path / "creds"
    make_credentials(creds, ["tcga"])
    monkeypatch.chdir(tmp_path)  # where a site's default state folder would go
    join = ["site", "join", "--superlink", "127.0.0.1:9300", "--ca", str(creds / "ca.crt"), "--key",
            str(creds / "sites" / "tcga.key")]
    for args, words in (([*join, "--site", str(tiny_study / "tcga"), "--superlink", "server-without-port"],
                         "expected an address host:port"),
                        ([*join, "--site", str(creds / "ca.crt")], "found a file"),
                        ([*join, "--site", str(creds / "sites")], "found no case folder"),
                        ([*join, "--site", str(tiny_study / "tcga"), "--allow", "fedavg,centralized"],
                         "['centralized'] are not arms that run deployed")):
        assert main(args) == 2, args
        assert words in capsys.readouterr().err
    assert main([*join, "--site", str(tiny_study / "tcga"), "--dry-run"]) == 0
    assert "flower-supernode" in capsys.readouterr().out
    assert not (tmp_path / "synthlearn-site-state").exists()  # a dry run writes nothing
    assert main(["server", "start", "--config", str(ROOT / "configs" / "study_tiny.toml"), "--arms", "fedavg",
                 "--study", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"),
                 "--credentials", str(creds)]) == 2
    assert "no such study folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the SuperLink started
