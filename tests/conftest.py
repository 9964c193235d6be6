"""Shared fixtures: a tiny phantom study written once per session as real NIfTI."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest

from synthlearn.runtime import configure_threads  # noqa: E402

configure_threads(1)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """Path of the `tiny` phantom study (3 train + 2 test sites, 32^3), seed 0. Treat as read-only:
    tests that corrupt files copy it first (see :func:`copy_study`)."""
    from synthlearn.data.phantom import make_phantom_study

    out = tmp_path_factory.mktemp("tiny") / "study"
    make_phantom_study(out, preset="tiny", seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_study_2d(tmp_path_factory):
    """Path of the `tiny-slices2d` phantom study (the tiny study's cases as 32x32 axial slices through their largest
    tumour), seed 0. Read-only."""
    from synthlearn.data.phantom import make_phantom_study

    out = tmp_path_factory.mktemp("tiny2d") / "study"
    make_phantom_study(out, preset="tiny-slices2d", seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_fundus(tmp_path_factory):
    """``(study, pool)``: the `tiny-fundus` phantom (3 non-IID sites x 8 images, a test site of 10, 32x32 RGB, label
    column grade 0-4) and its disjoint pretraining pool, seed 0. Read-only."""
    from synthlearn.data.phantom.fundus import make_fundus_study

    root = tmp_path_factory.mktemp("fundus")
    study = make_fundus_study(root / "study", "tiny-fundus", split="non-iid", seed=0, progress=False)
    pool = make_fundus_study(root / "pool", "tiny-fundus", split="pool", seed=0, progress=False)
    return study, pool


@pytest.fixture(scope="session")
def tiny_run(tiny_study, tmp_path_factory):
    """``synthlearn study run`` with configs/study_tiny.toml (centralized, local, fedavg) on the tiny study:
    ``(run folder, seconds it took)``. Tests that add arms copy it first."""
    import time
    from pathlib import Path

    from synthlearn.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "study_tiny.toml"
    out = tmp_path_factory.mktemp("run") / "tiny"
    t0 = time.perf_counter()
    rc = main(["study", "run", "--config", str(config), "--study", str(tiny_study), "--out", str(out), "-q"])
    assert rc == 0
    return out, time.perf_counter() - t0


@pytest.fixture(scope="session")
def tiny_artifact(tiny_study, tmp_path_factory):
    """``(site folder, artifact folder)`` of the tiny generator (configs/generator_tiny.toml) trained once by
    ``synthlearn train-generator`` on the tiny study's site tcga, seed 0. Read-only: copy it before changing it."""
    from pathlib import Path

    from synthlearn.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "generator_tiny.toml"
    out = tmp_path_factory.mktemp("generator") / "artifact"
    site = tiny_study / "tcga"
    assert main(["train-generator", "--site", str(site), "--config", str(config), "--out", str(out), "--seed", "0",
                 "-q"]) == 0
    return site, out


@pytest.fixture
def copy_study(tiny_study, tmp_path):
    """A private copy of the tiny study that a test may modify."""
    import shutil

    dst = tmp_path / "study"
    shutil.copytree(tiny_study, dst)
    return dst
