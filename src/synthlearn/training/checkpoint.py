"""Atomic, resumable checkpoints that carry optimizer and RNG state.

A checkpoint is written to a temporary file in the same folder and renamed over the target, so a kill at
any moment leaves either the previous checkpoint or the new one, never a torn file. Loading uses
``torch.load(weights_only=True)``: a checkpoint is plain tensors, numbers and strings (RNG states are kept
as tensors), never an arbitrary pickle.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Global RNG states (python, numpy, torch CPU, CUDA when present) as weights_only-safe objects."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": int(py_version),
        "python_gauss": py_gauss if py_gauss is None else float(py_gauss),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_state(gen: torch.Generator) -> torch.Tensor:
    """State of a ``torch.Generator`` (ByteTensor) for a checkpoint."""
    return gen.get_state()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors, state dicts, numbers, strings) atomically to ``path``.

    The global RNG state is added under ``"rng"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload["rng"] = rng_state()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, restore_rng: bool = True, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable checkpoint (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable synthlearn checkpoint ({type(exc).__name__}: {exc})") from exc
    if restore_rng and "rng" in payload:
        set_rng_state(payload["rng"])
    return payload
