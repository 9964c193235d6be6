"""Seeding: one integer seed drives every random choice of a run."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global RNGs (code should still prefer explicit Generators)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, *names: object) -> int:
    """A stable 63-bit seed derived from ``seed`` and names (site, fold, round...), independent of
    Python's hash randomisation: ``derive_seed(0, "tcga", 3)`` is the same in every process."""
    text = "/".join([str(seed), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_generator(seed: int, *names: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`derive_seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *names))
    return g


def numpy_generator(seed: int, *names: object) -> np.random.Generator:
    """A ``numpy.random.Generator`` seeded with :func:`derive_seed`."""
    return np.random.default_rng(derive_seed(seed, *names))
