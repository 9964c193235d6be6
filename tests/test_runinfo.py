import json
import shutil

from synthlearn.data.layouts import open_study
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.runinfo import data_fingerprint, write_run_info


def test_fingerprint_follows_content_not_location(tiny_study, tmp_path):
    cases = open_study(tiny_study).sites[0].cases
    fp = data_fingerprint(cases)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_study, copy)
    assert data_fingerprint(open_study(copy).sites[0].cases)["sha256"] == fp["sha256"]
    f = open_study(copy).sites[0].cases[0].images["t1"]
    f.write_bytes(f.read_bytes() + b"\0")
    assert data_fingerprint(open_study(copy).sites[0].cases)["sha256"] != fp["sha256"]
    anon = data_fingerprint(cases, include_ids=False)
    assert "case_ids" not in anon and cases[0].case_id not in json.dumps(anon)
    assert anon["n_cases"] == len(cases)


def test_write_run_info(tiny_study, tmp_path):
    cases = open_study(tiny_study).sites[0].cases
    info = write_run_info(tmp_path / "run", config=PreprocessConfig(), seed=7, cases=cases)
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["seed"] == 7 and saved["data_fingerprint"]["sha256"] == info["data_fingerprint"]["sha256"]
    assert saved["version"]["synthlearn"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["shape"] == [64, 64, 64]
