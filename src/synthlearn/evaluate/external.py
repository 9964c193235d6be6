"""External validation: apply the task models of a finished study run to a new study or to one case.

A study run folder (``synthlearn study run``) holds, per arm, ``<arm>/arm.json`` whose ``"models"`` maps a
model label to a model folder (:meth:`synthlearn.tasks.model.TaskModel.load`). Each model folder
carries its own preprocessing config; that config, and nothing re-derived from the new data, is applied
to every case (reorientation to RAS+, optional resampling to the training spacing, crop, z-score, fit).

:func:`evaluate_run` writes into its output folder::

    results.json      {"task", "class_names", "sites", "reference_arm", "reference_model",
                       "arms": {ARM: {"test": {SITE | "combined": classification_metrics},
                                      "mcnemar_p_vs_<ref>": float | null, "models": {label: folder}}},
                       "skipped": [{"site", "case", "file", "reason"}], "cases_without_tumour_mask": [...], ...}
    predictions.csv   site, case_id, arm, model, p_<class>..., pred, true (blank = unknown), region
    run.json, config.json   (synthlearn.runinfo.write_run_info)

The ``local`` arm (one model per training site) gets the mean over its site models and each model's own
block under ``"site_models"``, as in the study's results.json. Metrics exist only for labelled cases: a
study without labels gives predictions only (no ``"test"`` blocks). Per-site blocks are written for the
sites that have labelled, predicted cases.

A case's probability is the ensemble mean of each fold network's softmax averaged over the case's tumour
voxels (seg > 0 after preprocessing, :func:`synthlearn.training.trainer.predict_probabilities`). A case
without a segmentation (or whose tumour vanishes in preprocessing) is averaged over its brain (non-zero
voxels) instead, and is listed under ``"cases_without_tumour_mask"`` and marked ``region=brain`` in
predictions.csv: the networks were trained on tumour voxels only, so such probabilities are a weaker
signal.

Cases are never allowed to stop a run: a missing sequence, an unreadable file, or an array the
preprocessing cannot take (not 3D, shapes or affines differing between sequences, NaN/inf, an all-zero
sequence) skips the case, logged and listed under ``"skipped"`` with the file and the reason (expected,
found). A case is skipped for every arm at once, so paired tests compare the same cases.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthlearn.config import to_dict
from synthlearn.data.contract import CaseRecord
from synthlearn.data.io import (
    AFFINE_ATOL,
    CaseArrays,
    CaseFileMissing,
    CaseRefused,
    atomic_write_text,
    json_safe,
    read_case,
    save_nifti,
    write_json,
)
from synthlearn.data.preprocess import PreprocessConfig, preprocess_case_on_grid
from synthlearn.tasks import Task
from synthlearn.tasks.model import TaskModel

log = logging.getLogger(__name__)

#: the arm every other arm is tested against (McNemar) when it is evaluated; else the first arm
REFERENCE_ARM = "centralized"


# ------------------------------------------------------------------------------------------- run models
@dataclasses.dataclass(frozen=True)
class RunModel:
    """One trained task model of a run.

    Attributes:
        arm: the arm (``centralized``, ``local``, ...).
        label: the model label in ``arm.json`` (the arm name, or the site for ``local``).
        folder: the model folder.
        model: the loaded model.
    """

    arm: str
    label: str
    folder: Path
    model: TaskModel


def _names_an_arm(run_json: Path) -> bool:
    """Whether ``run_json`` is an arm's run info (it has an ``"arm"`` key; an evaluate output has not)."""
    try:
        return run_json.is_file() and "arm" in json.loads(run_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def run_arms(run_dir: str | Path) -> tuple[list[str], list[str]]:
    """Complete and incomplete arms of a run folder, in the run's order.

    An arm is complete when ``<arm>/arm.json`` exists and every model folder it names holds
    ``model.json``; an arm of the run's config, or a folder whose ``run.json`` names an arm (what the study
    runner writes when an arm starts), without that is incomplete.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder (written by `synthlearn study run --out`)")
    order: list[str] = []
    config_path = run_dir / "config.json"
    if config_path.is_file():
        try:
            order = [str(a) for a in json.loads(config_path.read_text()).get("arms", [])]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            order = []
    folders = sorted(p.name for p in run_dir.iterdir()
                     if p.is_dir() and ((p / "arm.json").is_file() or _names_an_arm(p / "run.json")))
    names = order + [n for n in folders if n not in order]
    complete, incomplete = [], []
    for name in names:
        info_path = run_dir / name / "arm.json"
        ok = False
        if info_path.is_file():
            try:
                models = json.loads(info_path.read_text())["models"]
                ok = bool(models) and all((run_dir / rel / "model.json").is_file() for rel in models.values())
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                ok = False
        (complete if ok else incomplete).append(name)
    return complete, incomplete


def training_overlap(run_dir: Path, arms: Sequence[str], cases: Sequence[CaseRecord]) -> dict[str, Any]:
    """Which of ``cases`` are the run's own training cases: the same scans by content
    (:func:`synthlearn.runinfo.case_image_digest` against each arm's ``run.json`` fingerprint), whatever their names,
    folders or layout.

    Returns:
        ``{"checked": True, "n_cases": k, "cases": ["site/case_id", ...]}``, or ``{"checked": False, "reason"}`` for a
        run whose fingerprints hold no per-case digests (made before synthlearn recorded them).
    """
    from synthlearn.runinfo import case_image_digest

    digests: set[str] = set()
    for arm in arms:
        path = Path(run_dir) / arm / "run.json"
        fingerprint = json.loads(path.read_text()).get("data_fingerprint", {}) if path.is_file() else {}
        if "image_digests" not in fingerprint:
            return {"checked": False, "reason": f"{path}: its data fingerprint holds no per-case digests (a run made "
                                                f"before synthlearn recorded them)"}
        digests.update(fingerprint["image_digests"])
    hits = [f"{c.site}/{c.case_id}" for c in cases if case_image_digest(c) in digests]
    return {"checked": True, "n_cases": len(hits), "cases": hits}


def load_run_models(run_dir: str | Path, arms: Sequence[str] | None = None, *,
                    device: str | None = None) -> list[RunModel]:
    """Load the task models of the requested arms of a run (all complete arms by default).

    Args:
        run_dir: the study run folder.
        arms: arm names; None = every complete arm.
        device: torch device to run the networks on (None = the one stored with each model).

    Returns:
        One :class:`RunModel` per model, arms in the requested (or run) order.

    Raises:
        FileNotFoundError: no run folder.
        ValueError: an arm that is absent or incomplete (naming the run folder and the arms there), no
            complete arm at all, or models of different tasks.
    """
    run_dir = Path(run_dir)
    complete, incomplete = run_arms(run_dir)
    where = f"complete arms there: {complete or 'none'}" + (f"; incomplete: {incomplete}" if incomplete else "")
    if arms is None:
        if not complete:
            raise ValueError(f"{run_dir}: no complete arm ({where}); run `synthlearn study run` first")
        arms = complete
    arms = list(arms)
    if not arms:
        raise ValueError("arms must name at least one arm")
    if len(set(arms)) != len(arms):
        raise ValueError(f"arms must not repeat, found {arms}")
    missing = [a for a in arms if a not in complete]
    if missing:
        raise ValueError(f"arm(s) {missing} not found complete in run folder {run_dir}; {where}")
    out = []
    for arm in arms:
        info = json.loads((run_dir / arm / "arm.json").read_text())
        for label, rel in info["models"].items():
            folder = run_dir / rel
            out.append(RunModel(arm=arm, label=label, folder=folder, model=TaskModel.load(folder, device=device)))
    tasks = {m.model.task.name for m in out}
    if len(tasks) > 1:
        raise ValueError(f"{run_dir}: the requested arms hold models of different tasks {sorted(tasks)}; "
                         "evaluate them separately with --arms")
    seg = [m.label for m in out if m.model.task.segments]
    if seg:
        raise ValueError(f"{run_dir}: a {out[0].model.task.kind} run (models {seg}); its Dice and HD95 (and a "
                         "multi-task model's per-head metrics) per test site are in its results.json (`synthlearn study "
                         "show`); applying segmentation models to another study or case is not supported yet")
    return out


# -------------------------------------------------------------------------------------------- reading
def read_case_checked(case: CaseRecord) -> CaseArrays:
    """Load a case with the checked reader of ``verify-data`` and the trainers
    (:func:`synthlearn.data.io.read_case`); the segmentation is optional here: a case whose ``seg`` is None or
    names no existing file is returned with ``seg=None``.

    Returns:
        :class:`~synthlearn.data.io.CaseArrays`: ``(C, X, Y, Z)`` float32 images in the case's sequence
        order, ``(X, Y, Z)`` int64 seg in contract values (or None), the affine of the first sequence.

    Raises:
        CaseRefused: naming the file, what was expected and what was found.
    """
    return read_case(case, seg_optional=True)


@dataclasses.dataclass(frozen=True)
class PreparedCase:
    """A case preprocessed for one preprocessing config.

    Attributes:
        image: ``(4, X, Y, Z)`` float32 network input.
        region: ``(X, Y, Z)`` int64, 1 on the voxels a case probability averages over (0 elsewhere).
        region_kind: ``tumour`` (seg > 0) or ``brain`` (no segmentation, or its tumour vanished).
        grid_affine: ``(4, 4)`` voxel-to-world affine of the preprocessed grid.
    """

    image: np.ndarray
    region: np.ndarray
    region_kind: str
    grid_affine: np.ndarray


def _model_sequences(case: CaseRecord, sequences: Sequence[str]) -> CaseRecord:
    """The case with the model's input sequences in the model's order; a case without one is refused.

    Raises:
        CaseRefused: the case lacks one of the model's sequences (names the case folder and the missing file).
    """
    try:
        return case.with_sequences(sequences)
    except ValueError:
        missing = [s for s in sequences if s not in case.images]
        folder = case.path or Path(case.case_id)
        raise CaseFileMissing(Path(folder) / f"{missing[0]}.nii.gz", f"the model's sequences {list(sequences)}",
                              f"sequences {list(case.sequences)}") from None


def prepare_case(arrays: CaseArrays, preprocess: PreprocessConfig, *, file: str | Path = "") -> PreparedCase:
    """Apply a model's stored preprocessing to a read case and choose the voxels its probability averages.

    Args:
        arrays: the case as read by :func:`read_case_checked`.
        preprocess: the preprocessing stored with the model.
        file: the case folder, named in errors.

    Raises:
        CaseRefused: the preprocessing fails on this case.
    """
    try:
        image, seg, grid = preprocess_case_on_grid(arrays.images, arrays.seg, preprocess, affine=arrays.affine)
    except ValueError as exc:
        raise CaseRefused(file, "a case the stored preprocessing can take", str(exc)) from None
    if seg is not None and (seg > 0).any():
        return PreparedCase(image, (seg > 0).astype(np.int64), "tumour", grid)
    brain = np.any(image != 0, axis=0)
    if not brain.any():
        raise CaseRefused(file, "a non-empty brain after preprocessing", "all voxels zero")
    return PreparedCase(image, brain.astype(np.int64), "brain", grid)


class PreparedCases:
    """Prepared cases as the dataset view :meth:`TaskModel.predict` reads (``len``, ``arrays(i)`` ->
    ``(image (4, X, Y, Z), region (X, Y, Z))``)."""

    def __init__(self, cases: Sequence[PreparedCase]):
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.cases[index]
        return c.image, c.region


def _preprocess_key(cfg: PreprocessConfig) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


# ---------------------------------------------------------------------------------------------- metrics
def metrics_block(pred: dict[str, np.ndarray], sites: Sequence[str], task: Task, *,
                  reference: dict[str, np.ndarray] | None, reference_name: str, n_bootstrap: int = 1000,
                  ci: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Per-site and combined classification metrics of one model, and its paired tests against a reference.

    Args:
        pred: ``{"site" (N,), "case_id" (N,), "true" (N,) int (-1 = unknown), "probs" (N, K)}``.
        sites: the sites to report (each must have labelled cases); ``"combined"`` is added.
        task: the task (class names, positive class).
        reference: the reference model's predictions (same keys), or None (this is the reference).
        reference_name: used in the key ``mcnemar_p_vs_<reference_name>``.
        n_bootstrap, ci, seed: bootstrap of the AUC confidence interval.

    Returns:
        ``{"test": {SITE | "combined": classification_metrics}, "mcnemar_p_vs_<ref>": float | None}`` (and
        ``"stuart_maxwell_p_vs_<ref>"`` for more than two classes); the tests pair cases by (site, case_id).
    """
    from synthlearn.evaluate.classification import classification_metrics
    from synthlearn.evaluate.stats import mcnemar_p, stuart_maxwell_p

    known = pred["true"] >= 0
    test: dict[str, Any] = {}
    for name in [*sites, "combined"]:
        sel = known & ((pred["site"] == name) if name != "combined" else True)
        test[name] = classification_metrics(pred["true"][sel], pred["probs"][sel], positive=task.positive_class,
                                            class_names=task.class_names, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
    key = f"mcnemar_p_vs_{reference_name}"
    block: dict[str, Any] = {"test": test, key: None}
    if reference is not None:
        ref = {(s, c): i for i, (s, c) in enumerate(zip(reference["site"], reference["case_id"]))}
        pairs = [(i, ref[(s, c)]) for i, (s, c) in enumerate(zip(pred["site"], pred["case_id"]))
                 if known[i] and (s, c) in ref]
        if pairs:
            a, b = (np.array(x) for x in zip(*pairs))
            y = pred["true"][a]
            pa, pb = pred["probs"][a].argmax(1), reference["probs"][b].argmax(1)
            block[key] = mcnemar_p(pa == y, pb == y)
            if task.num_classes > 2:
                block[f"stuart_maxwell_p_vs_{reference_name}"] = stuart_maxwell_p(pa, pb, task.num_classes)
    return block


def mean_block(blocks: dict[str, dict[str, Any]], reference_name: str, preds: dict[str, dict[str, np.ndarray]],
               task: Task, *, n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Mean of several models' metrics (the ``local`` arm's summary): ACC/SEN/SPE/AUC averaged over the models where
    defined; ``auc_ci`` is a bootstrap CI of the mean AUC (the same case resamples scored by every model,
    :func:`synthlearn.evaluate.classification.bootstrap_mean_auc_ci`), not a mean of the models' intervals; ``n`` of
    the first model.

    Args:
        blocks: model label -> its :func:`metrics_block`.
        reference_name: name of the reference arm (for the McNemar key, None here).
        preds: model label -> its predictions (``site``, ``case_id``, ``true``, ``probs``), the same cases in the same
            order for every model.
        task: the task (positive class).
        n_bootstrap, ci, seed: the bootstrap.
    """
    from synthlearn.evaluate.classification import bootstrap_mean_auc_ci

    first = next(iter(blocks.values()))
    any_pred = next(iter(preds.values()))
    known = any_pred["true"] >= 0
    test = {}
    for site in first["test"]:
        entry: dict[str, Any] = {}
        for key in ("acc", "sen", "spe", "auc", "quadratic_kappa"):
            vals = [b["test"][site].get(key) for b in blocks.values() if b["test"][site].get(key) is not None]
            entry[key] = float(np.mean(vals)) if vals else None
        sel = known & ((any_pred["site"] == site) if site != "combined" else True)
        interval = bootstrap_mean_auc_ci(any_pred["true"][sel], [p["probs"][sel] for p in preds.values()],
                                         task.positive_class, n_bootstrap=n_bootstrap, ci=ci,
                                         rng=np.random.default_rng(seed)) if sel.any() else None
        entry["auc_ci"] = list(interval) if interval is not None else None
        entry["n"] = first["test"][site]["n"]
        test[site] = entry
    return {"test": test, f"mcnemar_p_vs_{reference_name}": None,
            "summary": "mean over site models; auc_ci: bootstrap CI of the mean AUC"}


# -------------------------------------------------------------------------------------------- evaluate
def _run_evaluate_settings(run_dir: Path) -> dict[str, Any]:
    """n_bootstrap, ci and seed of the run's own evaluation (config.json), with the study defaults."""
    out: dict[str, Any] = {"n_bootstrap": 1000, "ci": 0.95, "seed": 0}
    path = run_dir / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
            out["seed"] = int(cfg.get("seed", 0))
            ev = cfg.get("evaluate", {}) or {}
            out["n_bootstrap"] = int(ev.get("n_bootstrap", 1000))
            out["ci"] = float(ev.get("ci", 0.95))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError):
            log.warning("%s: unreadable; using n_bootstrap=1000, ci=0.95, seed=0", path)
    return out


def _predictions_csv(rows: list[dict[str, Any]], class_names: Sequence[str]) -> str:
    fields = ["site", "case_id", "arm", "model"] + [f"p_{c}" for c in class_names] + ["pred", "true", "region"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def evaluate_run(run_dir: str | Path, study: str | Path, out: str | Path, *, arms: Sequence[str] | None = None,
                 device: str | None = None, n_bootstrap: int | None = None, ci: float | None = None,
                 seed: int | None = None, chunk_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """Apply the trained arms of a study run to every case of another study and write the results.

    Each case is read once and preprocessed once per distinct preprocessing config among the models; every
    model sharing that config reuses the arrays. Cases are processed ``chunk_size`` at a time, so memory
    stays bounded whatever the study size.

    Args:
        run_dir: the study run folder.
        study: the new study, in any layout :func:`synthlearn.data.layouts.open_study` reads; every site
            is evaluated whatever its role.
        out: output folder (created); must not be ``run_dir`` itself (its results.json would be replaced).
        arms: arms to apply (default: every complete arm of the run).
        device: torch device (default: each model's stored one).
        n_bootstrap, ci, seed: AUC bootstrap settings (default: the run's ``[evaluate]`` and seed).
        chunk_size: cases read and predicted together.
        progress: a progress bar over cases.

    Returns:
        The results (also ``out/results.json``); see the module docstring.

    Raises:
        FileNotFoundError / ValueError: no run folder, an absent or incomplete arm, not a study, ``out`` is
            the run folder.
    """
    from synthlearn.data.layouts import open_study
    from synthlearn.runinfo import data_fingerprint, write_run_info

    run_dir, study_path, out = Path(run_dir), Path(study), Path(out)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, found {chunk_size}")
    if out.exists() and run_dir.exists() and out.resolve() == run_dir.resolve():
        raise ValueError(f"--out {out} is the run folder itself; its results.json would be replaced. "
                         f"Choose another folder, e.g. {run_dir / 'external' / study_path.name}")
    models = load_run_models(run_dir, arms, device=device)
    settings = _run_evaluate_settings(run_dir)
    settings.update({k: v for k, v in (("n_bootstrap", n_bootstrap), ("ci", ci), ("seed", seed)) if v is not None})
    task = models[0].model.task
    opened = open_study(study_path)
    bad_labels = [p for p in opened.problems if p.check == "label-value"]
    if bad_labels:  # an invalid value must never be read as unknown (and replaced by another column's)
        listing = "\n".join(f"  {p}" for p in bad_labels[:20])
        raise ValueError(f"{study_path}: {len(bad_labels)} invalid label value(s); fix them (or leave the cell blank "
                         f"for unknown):\n{listing}")
    cases = list(opened.cases)
    sequences = models[0].model.setup.sequences
    other = [f"{m.arm}:{m.label} {list(m.model.setup.sequences)}" for m in models if m.model.setup.sequences != sequences]
    if other:
        raise ValueError(f"{run_dir}: the models read different sequences ({list(sequences)} vs {', '.join(other)})")
    arm_names = list(dict.fromkeys(m.arm for m in models))
    overlap = training_overlap(run_dir, arm_names, cases)
    if overlap.get("n_cases"):
        log.warning("evaluate: %d of the %d cases are the run's own training cases (same scans, by content: %s%s); "
                    "their predictions are not an external validation", overlap["n_cases"], len(cases),
                    ", ".join(overlap["cases"][:5]), " ..." if overlap["n_cases"] > 5 else "")
    log.info("evaluate: %d model(s) of arm(s) %s on %d case(s) of %d site(s) of %s (%s layout)", len(models),
             arm_names, len(cases), len(opened.sites), study_path, opened.layout)
    for p in opened.problems:
        if p.check != "missing-file":  # missing files are found again, per case, by the reader
            log.warning("study: %s", p)

    groups: dict[str, tuple[PreprocessConfig, list[RunModel]]] = {}
    for m in models:
        groups.setdefault(_preprocess_key(m.model.preprocess), (m.model.preprocess, []))[1].append(m)
    if len(groups) > 1:
        log.info("evaluate: %d distinct preprocessing configs among the models; each case is preprocessed once "
                 "per config", len(groups))

    per_model: dict[tuple[str, str], list[tuple[CaseRecord, np.ndarray, str]]] = {(m.arm, m.label): [] for m in models}
    skipped: list[dict[str, str]] = []
    brain_region: set[tuple[str, str]] = set()
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(cases), desc="evaluate", unit="case", disable=not progress, leave=False)
    for start in range(0, len(cases), chunk_size):
        chunk = cases[start:start + chunk_size]
        kept: list[CaseRecord] = []
        prepared: dict[str, list[PreparedCase]] = {key: [] for key in groups}
        for case in chunk:
            try:
                arrays = read_case_checked(_model_sequences(case, sequences))
                per_group = {key: prepare_case(arrays, cfg, file=case.path or "") for key, (cfg, _) in groups.items()}
            except CaseRefused as exc:
                log.warning("skipped %s/%s: %s", case.site, case.case_id, exc)
                skipped.append({"site": case.site, "case": case.case_id, "file": exc.file, "reason": exc.reason})
                continue
            kept.append(case)
            for key, prep in per_group.items():
                prepared[key].append(prep)
                if prep.region_kind == "brain":
                    brain_region.add((case.site, case.case_id))
        if kept:
            for key, (_, members) in groups.items():
                view = PreparedCases(prepared[key])
                for m in members:
                    probs = m.model.predict(view)
                    per_model[(m.arm, m.label)].extend(
                        (case, p, prep.region_kind) for case, p, prep in zip(kept, probs, prepared[key]))
        bar.update(len(chunk))
    bar.close()
    wall = time.perf_counter() - t0
    if brain_region:
        log.warning("%d case(s) without a tumour segmentation: their probability is the mean over the brain "
                    "(region=brain in predictions.csv)", len(brain_region))

    # predictions.csv
    rows = []
    preds: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for m in models:
        entries = per_model[(m.arm, m.label)]
        true = []
        for case, p, region in entries:
            y = task.label(case.labels)
            true.append(-1 if y is None else y)
            row = {"site": case.site, "case_id": case.case_id, "arm": m.arm, "model": m.label,
                   "pred": task.class_names[int(np.argmax(p))],
                   "true": task.class_names[y] if y is not None else "", "region": region}
            row.update({f"p_{c}": f"{float(v):.6f}" for c, v in zip(task.class_names, p)})
            rows.append(row)
        preds[(m.arm, m.label)] = {
            "site": np.array([c.site for c, _, _ in entries]), "case_id": np.array([c.case_id for c, _, _ in entries]),
            "true": np.array(true, dtype=np.int64),
            "probs": np.array([p for _, p, _ in entries], dtype=np.float64).reshape(len(entries), task.num_classes)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.csv", _predictions_csv(rows, task.class_names))

    # results.json
    reference_arm = REFERENCE_ARM if REFERENCE_ARM in arm_names else arm_names[0]
    reference_model = next(m for m in models if m.arm == reference_arm)
    reference = preds[(reference_model.arm, reference_model.label)]
    any_pred = next(iter(preds.values()))
    labelled = any_pred["true"] >= 0
    label_sites = [s.name for s in opened.sites if np.any(labelled & (any_pred["site"] == s.name))]
    results: dict[str, Any] = {
        "task": task.name, "class_names": list(task.class_names), "run": str(run_dir.resolve()),
        "study": str(study_path.resolve()), "layout": opened.layout, "sites": [s.name for s in opened.sites],
        "n_cases": len(cases), "n_predicted": int(any_pred["true"].size), "n_labelled": int(labelled.sum()),
        "reference_arm": reference_arm, "reference_model": reference_model.label, "arms": {},
        "skipped": skipped, "cases_without_tumour_mask": [f"{s}/{c}" for s, c in sorted(brain_region)],
        "study_problems": [str(p) for p in opened.problems if p.check != "missing-file"],
        "training_overlap": overlap,
        "settings": {**settings, "device": device}, "wall_s": wall,
    }
    if not any_pred["true"].size:
        results["note"] = "no case could be read (see skipped): no predictions, no metrics"
    elif not labelled.any():
        results["note"] = "no labelled case: predictions only (predictions.csv), no metrics"
    for arm in arm_names:
        members = [m for m in models if m.arm == arm]
        folders = {m.label: str(m.folder.relative_to(run_dir)) for m in members}
        if not labelled.any():
            results["arms"][arm] = {"models": folders}
            continue
        blocks = {}
        for m in members:
            is_ref = m.arm == reference_model.arm and m.label == reference_model.label
            blocks[m.label] = metrics_block(preds[(m.arm, m.label)], label_sites, task,
                                            reference=None if is_ref else reference, reference_name=reference_arm,
                                            n_bootstrap=settings["n_bootstrap"], ci=settings["ci"],
                                            seed=settings["seed"])
        if list(blocks) == [arm]:
            block = blocks[arm]
        else:
            block = mean_block(blocks, reference_arm, {m.label: preds[(m.arm, m.label)] for m in members}, task,
                               n_bootstrap=settings["n_bootstrap"], ci=settings["ci"], seed=settings["seed"])
            block["site_models"] = blocks
        block["models"] = folders
        results["arms"][arm] = block
    results = json_safe(results)
    write_json(out / "results.json", results)
    write_run_info(out, config={"run": str(run_dir.resolve()), "study": str(study_path.resolve()), "arms": arm_names,
                                **settings, "device": device, "chunk_size": chunk_size},
                   seed=int(settings["seed"]), fingerprint=data_fingerprint(cases),
                   extra={"command": "evaluate", "models": {f"{m.arm}:{m.label}": str(m.folder.resolve())
                                                            for m in models}})
    log.info("evaluate: %d of %d case(s) predicted by %d model(s) in %.1f s; %d skipped", results["n_predicted"],
             len(cases), len(models), wall, len(skipped))
    return results


# --------------------------------------------------------------------------------------------- predict
@torch.no_grad()
def voxel_probability_map(networks: Sequence[torch.nn.Module], image: np.ndarray, *, device: str = "cpu",
                          bf16: bool = False) -> np.ndarray:
    """Voxel-wise class probabilities of a fold ensemble: the mean over networks of each one's softmax.

    Its mean over a case's tumour voxels equals the case probability of
    :func:`synthlearn.training.trainer.predict_probabilities` (both are linear means).

    Args:
        networks: :class:`~synthlearn.models.classifier.VoxelClassifierUNet` s with the same K.
        image: ``(4, X, Y, Z)`` preprocessed case (``(4, X, Y)`` in a 2D study).
        device: torch device.
        bf16: bfloat16 autocast.

    Returns:
        ``(K, X, Y, Z)`` (or ``(K, X, Y)``) float32 probabilities (summing to 1 over K at every voxel).
    """
    from synthlearn.training.trainer import resolve_device

    if not networks:
        raise ValueError("voxel_probability_map needs at least one network")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (C, X, Y, Z) or (C, X, Y), but it is {image.ndim}D")
    dev = resolve_device(device)
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(dev)
    total = None
    for net in networks:
        net.to(dev).eval()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        p = torch.softmax(logits.float(), dim=1)[0]
        total = p if total is None else total + p
    return (total / len(networks)).cpu().numpy().astype(np.float32)


def select_model(run_dir: str | Path, arm: str, label: str | None = None, *, device: str | None = None) -> RunModel:
    """The model ``label`` of ``arm`` (the arm's only model when ``label`` is None).

    Raises:
        ValueError: the arm is absent/incomplete, or has several models and none (or an unknown one) was named.
    """
    models = load_run_models(run_dir, [arm], device=device)
    labels = [m.label for m in models]
    if label is None:
        if len(models) > 1:
            raise ValueError(f"arm {arm} has {len(models)} models {labels}; choose one with --model")
        return models[0]
    for m in models:
        if m.label == label:
            return m
    raise ValueError(f"arm {arm} has no model {label!r}; its models: {labels}")


def _overlay_png(path: Path, t1c: np.ndarray, region: np.ndarray, region_kind: str, prob: np.ndarray,
                 title: str, prob_label: str) -> Path:
    """t1c at the slice of largest tumour (or of largest probability mass) with the probability map over the
    brain as a colour overlay; radiological view of the RAS+ grid (patient left on the right)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if t1c.ndim == 2:  # a 2D study: the image is its own slice
        t1c, region, prob = t1c[..., None], region[..., None], prob[..., None]
    brain = t1c != 0
    if region_kind == "tumour":
        z = int(np.argmax(region.sum(axis=(0, 1))))
    else:
        z = int(np.argmax((prob * brain).sum(axis=(0, 1))))

    def view(a):
        return np.rot90(a[:, :, z])[:, ::-1]

    img = t1c[:, :, z]
    vals = img[img != 0]
    lo, hi = (np.percentile(vals, [0.5, 99.5]) if vals.size else (0.0, 1.0))
    gray = plt.get_cmap("gray").with_extremes(bad="black")  # outside the brain (z-scored 0 would be mid-grey)
    fig, axes = plt.subplots(1, 2, figsize=(7.4, 3.8))
    for ax in axes:
        ax.imshow(np.ma.masked_where(~view(brain), view(t1c)), cmap=gray, vmin=lo, vmax=hi if hi > lo else lo + 1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    if region_kind == "tumour" and region[:, :, z].any():
        axes[0].contour(view(region.astype(float)), levels=[0.5], colors="yellow", linewidths=0.8)
    axes[0].set_title(f"t1c, axial slice {z}" + (" (tumour outlined)" if region_kind == "tumour" else ""), fontsize=8)
    overlay = np.ma.masked_where(~view(brain), view(prob))
    im = axes[1].imshow(overlay, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.6, interpolation="nearest")
    if region_kind == "tumour" and region[:, :, z].any():
        axes[1].contour(view(region.astype(float)), levels=[0.5], colors="cyan", linewidths=0.6)
    axes[1].set_title(prob_label, fontsize=8)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def predict_case(run_dir: str | Path, arm: str, case_dir: str | Path, out: str | Path, *,
                 model_label: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Apply one arm's model to one case folder; write its voxel-wise probability map and an overlay.

    The case folder holds contract names (``t1/t1c/t2/flair[/seg].nii.gz``) or BraTS-2021 names
    (:func:`synthlearn.data.layouts.open_case`). Without a segmentation (or with an empty one) the case
    probability is the mean over the brain instead of the tumour (``"region": "brain"``).

    Writes into ``out``:
        ``<case>_<arm>[-<model>]_probability.nii.gz``: ``(X, Y, Z, K)`` float32, the fold-ensemble mean
        softmax of the first stage (for the two-stage ``tumor_type`` task: the IDH stage), on the
        preprocessed grid (RAS+, cropped, fit to the model's shape) with that grid's world affine, so it
        overlays the original scan in a viewer; ``..._overlay.png``; ``..._prediction.json`` (case
        probabilities, map classes, grid description).

    Returns:
        The contents of the JSON file.

    Raises:
        FileNotFoundError / ValueError: no such run, arm, model or case folder; a case the reader or the
            stored preprocessing refuses (:class:`CaseRefused`, naming the file, expected and found).
    """
    from synthlearn.data.layouts import open_case

    rm = select_model(run_dir, arm, model_label, device=device)
    model = rm.model
    case = _model_sequences(open_case(case_dir, sequences=model.setup.sequences), model.setup.sequences)
    arrays = read_case_checked(case)
    prep = prepare_case(arrays, model.preprocess, file=case.path or case_dir)
    probs = model.predict(PreparedCases([prep]))[0]
    stage = model.task.stages[0]
    nets = [model.networks[f"{stage.name}/fold-{k}"] for k in range(model.setup.n_folds)]
    prob_map = voxel_probability_map(nets, prep.image, device=model.setup.train.device, bf16=model.setup.train.bf16)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{case.case_id}_{arm}" + (f"-{rm.label}" if rm.label != arm else "")
    map_path = out / f"{stem}_probability.nii.gz"
    note = f"synthlearn p({','.join(stage.class_names)}) stage {stage.name}; preprocessed grid"
    note = note.encode()[:80].decode(errors="ignore")  # the NIfTI descrip field holds 80 bytes
    save_nifti(map_path, np.moveaxis(prob_map, 0, -1), prep.grid_affine, description=note)

    pred_index = int(np.argmax(probs))
    # overlay: the stage-1 class the case is assigned to at stage 1 (for idh: the predicted class)
    stage_case = (prob_map * prep.region[None]).reshape(len(stage.class_names), -1).sum(1) / prep.region.sum()
    shown = int(np.argmax(stage_case))
    png_path = out / f"{stem}_overlay.png"
    title = (f"{case.case_id} | {arm}" + (f":{rm.label}" if rm.label != arm else "") + " | "
             + ", ".join(f"p({c})={v:.3f}" for c, v in zip(model.task.class_names, probs)))
    backdrop = model.setup.sequences.index("t1c") if "t1c" in model.setup.sequences else 0
    _overlay_png(png_path, prep.image[backdrop], prep.region, prep.region_kind, prob_map[shown], title,
                 f"voxel p({stage.class_names[shown]}), stage {stage.name}")
    shape = tuple(int(v) for v in model.preprocess.shape)
    info = {
        "case": case.case_id, "case_dir": str(Path(case_dir).resolve()), "run": str(Path(run_dir).resolve()),
        "arm": arm, "model": rm.label, "task": model.task.name, "class_names": list(model.task.class_names),
        "probabilities": {c: float(v) for c, v in zip(model.task.class_names, probs)},
        "pred": model.task.class_names[pred_index], "region": prep.region_kind,
        "region_voxels": int(prep.region.sum()),
        "map": {"file": map_path.name, "stage": stage.name, "classes": list(stage.class_names),
                "shape": [*shape, len(stage.class_names)],
                "grid": (f"preprocessed grid of the model (RAS+, cropped to the brain, fit to {list(shape)} with "
                         f"mode {model.preprocess.mode!r}); the NIfTI affine maps it to the scan's world mm"),
                "value": f"mean over {model.setup.n_folds} fold network(s) of the voxel softmax",
                "affine": prep.grid_affine.tolist()},
        "overlay": png_path.name,
    }
    if len(model.task.stages) > 1:
        info["map"]["note"] = (f"two-stage task {model.task.name}: the map is stage {stage.name} only; the case "
                               "probabilities combine every stage")
    write_json(out / f"{stem}_prediction.json", json_safe(info))
    return info


__all__ = ["AFFINE_ATOL", "CaseRefused", "PreparedCase", "PreparedCases", "REFERENCE_ARM", "RunModel",
           "evaluate_run", "load_run_models", "mean_block", "metrics_block", "predict_case", "prepare_case",
           "read_case_checked", "run_arms", "select_model", "voxel_probability_map"]
