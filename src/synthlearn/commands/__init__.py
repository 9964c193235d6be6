"""CLI verb groups. Each module has ``register(subparsers)``; imports of heavy libraries stay inside the
handlers so that ``synthlearn --help`` is instant."""

from __future__ import annotations

import argparse
from pathlib import Path


def seed_int(text: str) -> int:
    """argparse type: a non-negative integer seed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer, found {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer, found {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {value}")
    return value


class OutputPathError(ValueError):
    """``--out`` cannot be written: the CLI prints it as one line and exits with 2, before anything is written."""


def check_output(path: str | Path, kind: str, option: str = "--out") -> Path:
    """Check an output path before any work: a folder (``kind = "folder"``) must not be an existing file, a file
    (``kind = "file"``) must not be an existing folder, and the nearest existing folder must be writable.

    Raises:
        OutputPathError: naming the option, the path, what was expected and what was found.
    """
    import os

    path = Path(path)
    if kind not in ("folder", "file"):
        raise ValueError(f"kind must be folder or file, found {kind!r}")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path}: expected a folder to write into, found an existing file")
    if kind == "file" and path.is_dir():
        raise OutputPathError(f"{option} {path}: expected a file to write, found an existing folder (give a file "
                              f"name inside it, e.g. {path / 'picture.png'})")
    if kind == "file" and path.is_file():  # a file to overwrite: its folder must be writable
        existing = path.parent
    else:
        existing = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise OutputPathError(f"{option} {path}: {existing} is a file, so nothing can be written below it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: {existing} is not writable; choose a folder you can write to")
    return path
