"""CATphishing at a site: the generator's settings for the study's task (:func:`load_generator_for_task`), the site's
privacy holdout (:func:`privacy_holdout`), and its step as a one-round protocol (``[catphishing] transport =
"flower"``): each site trains its generator on its own cases minus its privacy holdout and sends the artifact to
the server in one message over the federation's channel (in simulation, or across machines through an
authenticated SuperLink); the server writes each artifact into the arm folder and verifies it on arrival
(:func:`synthlearn.generators.artifact.verify_artifact`: manifest digest, every file's size and SHA-256, no pickle
or unlisted file), refusing the round otherwise.

What travels: the artifact's files as byte tensors (group ``artifact``, one tensor per file name) and the site's
counts of training and held-out cases. The holdout's case ids stay at the site (its state folder).

The release gate (:func:`gate_artifact`, :mod:`synthlearn.generators.ldm.release_gate`) runs at the site between
training and sending when the arm's ``release_gate`` is on (by default with ``transport = "flower"``): a refused
artifact is not sent unless a reason to override is given, and the decision travels in the manifest. A deployed
site takes the override only from its own operator (``synthlearn site join --release-override``), never from the
server's settings; the server refuses an artifact whose manifest lacks the decision.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from synthlearn.audits.privacy import stratified_holdout
from synthlearn.data.contract import SiteRecord
from synthlearn.protocol import Arrays, FederationError, RoundProtocol, SiteReply
from synthlearn.tasks.setup import TrainingSetup

log = logging.getLogger(__name__)

#: the repository (relative generator-config paths are looked up in the working directory, then here)
REPO_ROOT = Path(__file__).resolve().parents[3]

#: the task -> the label the generators are conditioned on
GENERATOR_LABEL = {"idh": "idh", "tumor_type": "tumor_type"}

#: the reply's tensor group holding the artifact's files
GROUP = "artifact"
#: the key of a deployed site's own settings (its release override) in its protocol memory
SITE_POLICY = "site-policy"
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def load_generator_for_task(path: str | Path, task: str):
    """The generator config at ``path`` with its ``label`` set from the study task.

    Raises:
        FileNotFoundError: no such file (names the fix).
    """
    from synthlearn.generators.ldm.config import load_generator_config

    given = Path(path)
    candidates = [given] if given.is_absolute() else [given, REPO_ROOT / given]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        looked = ", ".join(str(p.parent.resolve()) for p in candidates)
        raise FileNotFoundError(f"catphishing.generator = {str(given)!r}: no such generator config (looked in "
                                f"{looked}; see configs/generator_*.toml)")
    gcfg = load_generator_config(found)
    label = GENERATOR_LABEL[task]
    return gcfg if gcfg.label == label else dataclasses.replace(gcfg, label=label)


def privacy_holdout(site: SiteRecord, fraction: float, label: str, seed: int) -> tuple[list[str], list[str]]:
    """Split a site's cases into generator-training members and held-out non-members, stratified by the class
    of ``label`` (:func:`synthlearn.audits.privacy.stratified_holdout`: within each class, unknown labels forming
    their own group, cases sorted by id are shuffled with ``numpy_generator(seed, "privacy-holdout", site,
    class)`` and the first ``floor(fraction * n)`` held out).

    Returns:
        ``(member_ids, holdout_ids)``, both sorted.
    """
    return stratified_holdout(site, fraction, lambda case: case.labels.get(label), seed)


def gate_artifact(artifact: str | Path, site_dir: str | Path, members: Sequence[str], holdout: Sequence[str],
                  cfg: Any, seed: int, override_reason: str, state_dir: str | Path | None = None) -> dict[str, Any]:
    """The release gate at the site (:func:`synthlearn.generators.ldm.release_gate.release_gate` with the arm's
    ``gate`` settings), its decision written into the artifact's manifest (:func:`record_release`) and, in full, to
    ``state_dir/release_gate.json`` (stays at the site). An artifact whose manifest already holds a released
    decision is not gated again (a repeated round).

    Returns:
        The manifest's ``release_gate`` entry.

    Raises:
        synthlearn.generators.ldm.release_gate.ReleaseRefused: refused and no ``override_reason``.
    """
    from synthlearn.generators.artifact import read_manifest
    from synthlearn.generators.ldm.release_gate import record_release, release_gate

    done = read_manifest(artifact).get("release_gate")
    if isinstance(done, dict) and done.get("released"):
        return done
    decision = release_gate(artifact, site_dir, members, holdout, cfg.gate, seed=seed)
    if state_dir is not None:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        (Path(state_dir) / "release_gate.json").write_text(json.dumps(decision, indent=1))
    return record_release(artifact, decision, override_reason)["release_gate"]


def gate_summary(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """What results.json keeps of a manifest's ``release_gate`` entry (None: the artifact was not gated)."""
    if not isinstance(entry, dict):
        return None
    return {"passed": bool(entry.get("passed")), "overridden": bool(entry.get("overridden")),
            "override_reason": entry.get("override_reason"), "failed": list(entry.get("failed", [])),
            "figures": {k: v.get("value") for k, v in entry.get("checks", {}).items() if k != "controls"}}


def pack_artifact(folder: str | Path) -> dict[str, torch.Tensor]:
    """An artifact folder's files as ``{file name: uint8 tensor of its bytes}`` (after verifying it here)."""
    from synthlearn.generators.artifact import verify_artifact

    folder = Path(folder)
    verify_artifact(folder)
    return {p.name: torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8).clone()
            for p in sorted(folder.iterdir()) if p.is_file()}


def unpack_artifact(files: dict[str, torch.Tensor], folder: str | Path, site: str) -> dict[str, Any]:
    """Write a received artifact into ``folder`` (replacing what a failed earlier try left) and verify it.

    Returns:
        Its manifest.

    Raises:
        FederationError: a file name that is not a plain name, a tensor that is not bytes, or an artifact that
            fails verification (naming the site and the reason); nothing is kept then.
    """
    from synthlearn.generators.artifact import ArtifactError, verify_artifact

    folder = Path(folder)
    bad = [n for n, t in files.items() if not _PLAIN.match(n) or n in (".", "..")
           or not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1)]
    if bad or not files:
        raise FederationError(f"site {site}: the artifact message holds {sorted(files)[:10]}; expected plain file "
                              f"names with byte tensors (refused: {bad[:5]})")
    tmp = folder.parent / f".{folder.name}.incoming"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensor in files.items():
        (tmp / name).write_bytes(tensor.numpy().tobytes())
    try:
        manifest = verify_artifact(tmp)
    except (ArtifactError, ValueError, FileNotFoundError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FederationError(f"site {site}: its artifact was refused on arrival: {exc}") from exc
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return manifest


class ArtifactUploadProtocol(RoundProtocol):
    """One round: every site trains its CATphishing generator and returns the artifact (module docstring).

    Args:
        setup: the study's training setup (its seed and task pick the holdout and the generator's label).
        cfg: the arm's settings (:class:`synthlearn.strategies.catphishing.CatphishingConfig`).
        received_dir: the server's folder of received artifacts (``<site>/`` each); None at a site.
    """

    arm_name = "catphishing"
    rounds = 1

    def __init__(self, setup: TrainingSetup, cfg: Any, received_dir: str | Path | None = None):
        self.setup = setup
        self.cfg = cfg
        self.received_dir = None if received_dir is None else Path(received_dir).resolve()
        self.round_timeout_s = cfg.upload_timeout_s
        self.start_timeout_s = cfg.start_timeout_s
        self.threads_per_site = cfg.threads_per_site
        self.parallel_sites = cfg.parallel_sites

    def initial_state(self) -> Arrays:
        return {}

    def site_round(self, site: SiteRecord, rnd: int, arrays, config, *, state_dir: Path,
                   memory: dict[str, Any]) -> tuple[Arrays, dict[str, Any]]:
        """Holdout, generator, artifact: at the site, on its cases only; a finished artifact in the site's state
        folder is sent again rather than retrained (a repeated round after a lost reply)."""
        from synthlearn.generators.ldm.train import train_generator

        if site.path is None:
            raise ValueError(f"catphishing: site {site.name} has no folder to train its generator on")
        label = GENERATOR_LABEL[self.setup.task]
        gcfg = load_generator_for_task(self.cfg.generator, self.setup.task)
        members, holdout = privacy_holdout(site, self.cfg.holdout_fraction, label, self.setup.seed)
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "holdout.json").write_text(json.dumps({"members": members, "holdout": holdout,
                                                            "note": "stays at the site"}, indent=1))
        artifact = state_dir / "artifact"
        t0 = time.perf_counter()
        if not (artifact / "manifest.json").is_file():
            train_generator(Path(site.path), gcfg, artifact, seed=self.setup.seed, case_ids=members, progress=False)
        if self.cfg.gate_on:
            policy = memory.get(SITE_POLICY)  # a deployed site's own settings: the server's override is ignored
            reason = policy.get("release_override", "") if policy is not None else self.cfg.release_gate_override
            gate_artifact(artifact, site.path, members, holdout, self.cfg, self.setup.seed, reason, state_dir)
        return {GROUP: pack_artifact(artifact)}, {"training-cases": len(members), "holdout-cases": len(holdout),
                                                  "generator-seconds": time.perf_counter() - t0}

    def aggregate(self, rnd: int, state: Arrays, replies: Sequence[SiteReply]) -> tuple[Arrays, dict[str, Any]]:
        """Write and verify every site's artifact (all of them before any is accepted)."""
        if self.received_dir is None:
            raise FederationError("catphishing upload: the server has no folder for the received artifacts")
        entry: dict[str, Any] = {}
        for reply in replies:
            unexpected = sorted(set(reply.arrays) - {GROUP})
            if unexpected or GROUP not in reply.arrays:
                raise FederationError(f"site {reply.site}: expected one {GROUP!r} group in its reply, found "
                                      f"{sorted(reply.arrays)}")
            manifest = unpack_artifact(reply.arrays[GROUP], self.received_dir / reply.site, reply.site)
            gate = manifest.get("release_gate")
            if self.cfg.gate_on and not (isinstance(gate, dict) and gate.get("released")):
                shutil.rmtree(self.received_dir / reply.site, ignore_errors=True)
                raise FederationError(f"site {reply.site}: its artifact carries no release-gate decision, and this "
                                      f"study requires one (catphishing.release_gate); refused")
            entry[reply.site] = {"release_gate": gate_summary(gate),
                                 "bytes": int(sum(t.numel() for t in reply.arrays[GROUP].values())),
                                 "training_cases": int(reply.metrics.get("training-cases", -1)),
                                 "holdout_cases": int(reply.metrics.get("holdout-cases", -1)),
                                 "wall_s": float(reply.metrics.get("generator-seconds", 0.0)),
                                 "class_counts": manifest.get("class_counts")}
        return {}, {"artifacts": entry}


__all__ = ["GENERATOR_LABEL", "GROUP", "REPO_ROOT", "SITE_POLICY", "ArtifactUploadProtocol", "gate_artifact",
           "gate_summary", "load_generator_for_task", "pack_artifact", "privacy_holdout", "unpack_artifact"]
