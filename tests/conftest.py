"""Shared fixtures: a tiny phantom study written once per session as real NIfTI."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch

torch.set_num_threads(1)
torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """Path of the `tiny` phantom study (3 train + 2 test sites, 32^3), seed 0. Treat as read-only:
    tests that corrupt files copy it first (see :func:`copy_study`)."""
    from synthlearn.data.phantom import make_phantom_study

    out = tmp_path_factory.mktemp("tiny") / "study"
    make_phantom_study(out, preset="tiny", seed=0, progress=False)
    return out


@pytest.fixture
def copy_study(tiny_study, tmp_path):
    """A private copy of the tiny study that a test may modify."""
    import shutil

    dst = tmp_path / "study"
    shutil.copytree(tiny_study, dst)
    return dst
