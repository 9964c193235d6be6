import random

import numpy as np
import pytest
import torch

from synthlearn.training.checkpoint import load_checkpoint, save_checkpoint
from synthlearn.training.seeding import derive_seed, numpy_generator, torch_generator


def test_checkpoint_roundtrip_restores_rng_and_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": 4})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    payload = load_checkpoint(tmp_path / "ckpt.pt")
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    assert payload["epoch"] == 4
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(payload["model"])
    assert torch.equal(fresh.weight, model.weight)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_bad_checkpoint_is_refused(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="x.pt: not a readable synthlearn checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "tcga", 1) == derive_seed(0, "tcga", 1)
    assert derive_seed(0, "tcga", 1) != derive_seed(0, "tcga", 2)
    first, again = torch.rand(3, generator=torch_generator(5, "a")), torch.rand(3, generator=torch_generator(5, "a"))
    assert torch.equal(first, again)
    assert numpy_generator(5, "a").random() == numpy_generator(5, "a").random()
