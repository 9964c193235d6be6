"""`--out` that cannot be written is refused with one line and exit code 2, before anything is written
(study run, demo, evaluate, predict, synthesize, train-generator, make-phantoms, show); `show` names the file it
really writes."""

import os
from pathlib import Path

import pytest

from synthlearn.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "study_tiny.toml"
GENERATOR = ROOT / "configs" / "generator_tiny.toml"


def _commands(tiny_study, out):
    case = next(p for p in (tiny_study / "nyu").iterdir() if p.is_dir())
    return {
        "study run": ["study", "run", "--config", str(TINY), "--study", str(tiny_study), "--out", str(out), "-q"],
        "demo": ["demo", "--config", str(TINY), "--study", str(tiny_study), "--out", str(out), "-q"],
        "evaluate": ["evaluate", "--run", str(tiny_study), "--study", str(tiny_study), "--out", str(out), "-q"],
        "predict": ["predict", "--run", str(tiny_study), "--arm", "centralized", "--case", str(case), "--out", str(out)],
        "synthesize": ["synthesize", "--artifact", str(tiny_study), "--per-class", "1", "--out", str(out), "-q"],
        "train-generator": ["train-generator", "--site", str(tiny_study / "tcga"), "--config", str(GENERATOR),
                            "--out", str(out), "-q"],
        "make-phantoms": ["make-phantoms", "--out", str(out), "--preset", "tiny", "-q"],
    }


@pytest.mark.parametrize("verb", ["study run", "demo", "evaluate", "predict", "synthesize", "train-generator",
                                  "make-phantoms"])
def test_an_existing_file_as_out_is_refused_in_one_line(verb, tiny_study, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("mine")
    assert main(_commands(tiny_study, out)[verb]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected a folder" in err[0] and "Traceback" not in err[0], err
    assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_folder_that_cannot_be_written_is_refused(tiny_study, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert main(_commands(tiny_study, locked / "run")["study run"]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert not any(locked.iterdir())


def test_show_names_the_file_it_writes_and_refuses_a_folder(tiny_study, tmp_path, capsys):
    assert main(["show", str(tiny_study), "--out", str(tmp_path / "pic"), "--max-cases", "2"]) == 0
    assert f"picture written to {tmp_path / 'pic.png'}" in capsys.readouterr().out
    assert (tmp_path / "pic.png").is_file() and not (tmp_path / "pic").exists()
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert main(["show", str(tiny_study), "--out", str(folder), "--max-cases", "2"]) == 2
    assert "expected a file to write, found an existing folder" in capsys.readouterr().err
    assert not any(folder.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["pic.png", "pictures"]
