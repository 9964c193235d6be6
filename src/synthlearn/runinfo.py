"""What every run folder holds besides its results: resolved config, seed, data fingerprint, version.

``write_run_info(run_dir, config=..., seed=..., cases=...)`` writes ``run_dir/run.json`` and
``run_dir/config.json``. The data fingerprint hashes file contents (not paths), so a copy of a study has
the same fingerprint and any changed byte changes it; with ``include_ids=False`` it carries no case ids
(what an artifact that leaves a site may hold).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import platform
import subprocess
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from synthlearn import __version__
from synthlearn.config import to_dict
from synthlearn.data.contract import LABEL_COLUMNS, CaseRecord
from synthlearn.data.io import write_json


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def case_image_digest(case: CaseRecord) -> str:
    """SHA-256 of a case's image files' contents (sequences only: no segmentation, labels, names or paths), so the
    same scans are recognised in a copy of a study, under other case ids or in another folder layout."""
    h = hashlib.sha256()
    for key, path in sorted(case.images.items()):
        h.update(key.encode())
        h.update(file_sha256(path).encode() if Path(path).is_file() else b"missing")
    return h.hexdigest()


def data_fingerprint(cases: Iterable[CaseRecord], include_ids: bool = True) -> dict[str, Any]:
    """Content fingerprint of a set of cases.

    Returns:
        ``{"sha256", "n_cases", "sites": {site: n}, "label_counts": {column: {value: n}}}`` and, with
        ``include_ids``, ``"case_ids"`` per site and ``"image_digests"`` (sorted :func:`case_image_digest` of every
        case: ``evaluate`` finds a run's own training cases in another study with them). Without ``include_ids``
        (what leaves a site in a generator's manifest) nothing identifies a single case.
    """
    cases = list(cases)
    # the glioma columns always (so a default study's fingerprint reads as before), then any other column of the cases
    columns = LABEL_COLUMNS + tuple(sorted({k for c in cases for k, _ in c.labels.items()} - set(LABEL_COLUMNS)))
    per_case = []
    for case in cases:
        h = hashlib.sha256()
        for key, path in sorted(case.files().items()):
            h.update(key.encode())
            h.update(file_sha256(path).encode() if Path(path).is_file() else b"missing")
        for col in columns:
            h.update(f"{col}={case.labels.get(col)}".encode())
        if include_ids:
            h.update(f"{case.site}/{case.case_id}".encode())
        per_case.append(h.hexdigest())
    total = hashlib.sha256("".join(sorted(per_case)).encode()).hexdigest()
    out: dict[str, Any] = {
        "sha256": total,
        "n_cases": len(cases),
        "sites": dict(Counter(c.site for c in cases)),
        "label_counts": {col: dict(Counter(str(c.labels.get(col)) for c in cases)) for col in columns},
    }
    if include_ids:
        ids: dict[str, list[str]] = {}
        for c in cases:
            ids.setdefault(c.site, []).append(c.case_id)
        out["case_ids"] = ids
        out["image_digests"] = sorted(case_image_digest(c) for c in cases)
    return out


def git_sha() -> str | None:
    """The git commit of the source tree, when synthlearn runs from a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def version_info() -> dict[str, Any]:
    import torch

    return {"synthlearn": __version__, "git_sha": git_sha(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def write_run_info(run_dir: str | Path, *, config: Any, seed: int, cases: Iterable[CaseRecord] | None = None,
                   fingerprint: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict:
    """Write ``run.json`` (seed, fingerprint, version, time) and ``config.json`` (resolved config)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = to_dict(config) if dataclasses.is_dataclass(config) else config
    if fingerprint is None and cases is not None:
        fingerprint = data_fingerprint(cases)
    info = {"seed": seed, "data_fingerprint": fingerprint, "version": version_info(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(extra or {})}
    write_json(run_dir / "config.json", cfg)
    write_json(run_dir / "run.json", info)
    return info
