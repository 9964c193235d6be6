"""Run a study: every requested arm on the same splits, the same task model and the same evaluation.

``run_study(cfg, out)`` reads the study (training sites vs held-out test sites from the roles in
``study.json``), runs each arm in ``cfg.arms`` in its own folder, applies every trained model to every
test case, and writes ``out/results.json``::

    {"task": str, "class_names": [...], "test_sites": [...],
     "arms": {ARM: {"test": {SITE | "combined": {"acc", "sen", "spe", "auc", "auc_ci": [lo, hi], "n",
                                                 "confusion_matrix", "per_class_acc", ...}},
                    "mcnemar_p_vs_centralized": float | null, "bytes_from_sites": int, "rounds": int,
                    "wall_s": float, ...}}}

The ``local`` arm trains one model per training site: its block holds the mean over those models
(``"summary": "mean over site models"``) and each model's own block under ``"site_models"``.

A segmentation task (``task = "segmentation"``) adds ``"task_kind": "segmentation"``, ``"regions"`` and
``"metrics_grid"``; its site entries hold ``dice_wt``, ``dice_tc``, ``dice_et``, ``dice_mean``, ``hd95_wt``,
``hd95_tc``, ``hd95_et`` (mm), ``sen_wt``, ``spe_wt`` and ``n`` (:mod:`synthlearn.evaluate.segmentation`), its arms
``wilcoxon_p_vs_centralized`` instead of McNemar's p, and ``predictions.csv`` holds one row of those per model and
test case.

Resumable: an arm whose folder holds ``arm.json`` is complete and is skipped on a re-run (after checking
that it was run with the same training settings and data); an interrupted arm resumes from its
checkpoints. ``results.json`` is rebuilt from the arms' saved predictions on every run.

Arms plug in through :mod:`synthlearn.strategies.registry`: each declares its name, ``run(ctx) -> ArmOutput``,
its config dataclass (read from its own table of the study config) and the arms it needs; this module has no
branch on any arm's name, so a new strategy needs no change here.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synthlearn.config import ConfigError, from_dict, merge_tables, read_toml, to_dict
from synthlearn.data.contract import GLIOMA_LABELS, SEQUENCES, CaseRecord, LabelSchema, Study
from synthlearn.data.io import atomic_write_text, json_safe, write_json
from synthlearn.data.preprocess import PreprocessConfig
from synthlearn.evaluate.external import mean_block, metrics_block
from synthlearn.federated.simulation import run_protocol_simulation
from synthlearn.models.classifier import ClassifierConfig
from synthlearn.protocol import Federate
from synthlearn.strategies.base import ArmContext, ArmOutput
from synthlearn.strategies.registry import all_arms, get_arm, register_arm
from synthlearn.tasks import TASKS, Task, get_task
from synthlearn.tasks.cache import DatasetCache
from synthlearn.tasks.model import TaskModel
from synthlearn.tasks.setup import TrainingSetup
from synthlearn.training.trainer import TrainConfig

log = logging.getLogger(__name__)

REFERENCE_ARM = "centralized"
_COLUMN_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Evaluation settings (``[evaluate]``).

    Attributes:
        n_bootstrap: bootstrap resamples for the AUC confidence interval.
        ci: confidence level.
        figures: write ROC and confusion-matrix PNGs into ``<out>/figures``.
    """

    n_bootstrap: int = 1000
    ci: float = 0.95
    figures: bool = True


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A study run (one TOML file; ``base = "other.toml"`` to inherit).

    Attributes:
        study: the study folder (relative paths are relative to the working directory); the CLI's
            ``--study`` overrides it.
        task: ``idh``, ``tumor_type``, ``segmentation``, ``multitask`` (segmentation + one head per label column,
            Ren et al.) or any label column of the study (``study.json``'s ``labels``;
            :func:`synthlearn.tasks.get_task`), checked against the study when the run opens it.
        arms: arms to run, in order (``centralized`` first: the others are tested against it).
        seed: run seed (every arm uses it the same way), when ``seeds`` is empty.
        seeds: task-model seeds: every arm's task model is trained once per seed, with the same splits, data and
            settings (the CATphishing arm trains its generators once, with the first seed, and draws a synthetic
            set per seed from them). The first seed is the run's primary seed: its models are the ones in
            ``<arm>/model`` that ``evaluate`` and ``predict`` apply, and its metrics fill the arm's usual keys of
            ``results.json``; every seed's metrics and their mean and SD come beside them. Empty = ``(seed,)``.
            A task model's seed alone moved an arm's AUC by up to 0.18 on fixed cases (docs/benchmarks.md), so a
            comparison between arms should be read on seed means.
        n_folds: k-fold ensemble size (paper: 5).
        train_sites, test_sites: site names that override the roles of ``study.json`` (empty = its roles),
            e.g. the paper's tumour-type experiment trains on tcga, utsw, nyu and tests on egd, uwm, ucsf,
            utswp2.
        sequences: the input channels, a subset of the study's sequences in the order given (e.g. ``["t1",
            "t2"]`` for a modality ablation); empty = all of the study's.
        threads: torch threads of the training process (0 = leave torch's default or SYNTHLEARN_THREADS).
            On a CPU shared with other work, 1 is much faster than 2: two OpenMP threads on two busy cores
            wait for each other (measured 10x slower steps at 32^3).
        description: free text saved with the run (e.g. measured size and run time).
        preprocess: preprocessing (``[preprocess]``).
        model: task network (``[model]``).
        train: task-model training (``[train]``).
        evaluate: evaluation (``[evaluate]``).
        arm_options: free tables for arms registered elsewhere (``[arm_options.<arm>]``), parsed by the arm.
        arm_configs: each arm's own settings, by arm name (:meth:`arm_config`), read by :func:`load_study_config`
            from the arm's table (``[fedavg]``, ``[catphishing]``, ...; :mod:`synthlearn.strategies.registry`).
    """

    study: str = "data/phantom"
    task: str = "idh"
    arms: tuple[str, ...] = ("centralized", "local", "fedavg")
    seed: int = 0
    seeds: tuple[int, ...] = ()
    n_folds: int = 5
    train_sites: tuple[str, ...] = ()
    test_sites: tuple[str, ...] = ()
    sequences: tuple[str, ...] = ()
    threads: int = 0
    description: str = ""
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ClassifierConfig = ClassifierConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluationConfig = EvaluationConfig()
    arm_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    arm_configs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS and not _COLUMN_NAME.fullmatch(self.task):
            raise ValueError(f"unknown task {self.task!r}; expected one of {sorted(TASKS)} or a label column of the "
                             f"study (a lower-case name)")
        if not self.arms:
            raise ValueError("arms must name at least one arm")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must not repeat, found {list(self.arms)}")
        if self.n_folds < 1:
            raise ValueError(f"n_folds must be >= 1, found {self.n_folds}")
        if set(self.train_sites) & set(self.test_sites):
            raise ValueError(f"train_sites and test_sites overlap: {sorted(set(self.train_sites) & set(self.test_sites))}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, found {self.threads}")
        if self.seed < 0 or any(k < 0 for k in self.seeds):
            raise ValueError(f"seed and seeds must be >= 0, found seed = {self.seed}, seeds = {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must not repeat, found {list(self.seeds)}")
        if len(set(self.sequences)) != len(self.sequences):
            raise ValueError(f"sequences must not repeat, found {list(self.sequences)}")

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The task-model seeds of the run, primary first: ``seeds``, or ``(seed,)`` when it is empty."""
        return tuple(self.seeds) or (self.seed,)

    @property
    def setup(self) -> TrainingSetup:
        """The training setup of the primary seed (``run_seeds[0]``) for a study of the default sequences and
        label columns (:meth:`setup_for` gives a study's own)."""
        return TrainingSetup(task=self.task, n_folds=self.n_folds, seed=self.run_seeds[0], preprocess=self.preprocess,
                             model=self.model, train=self.train)

    def setup_for(self, study: Study) -> TrainingSetup:
        """The training setup of the primary seed for ``study``: its sequences are the input channels, its label
        columns the task's classes.

        Raises:
            ValueError: the task is neither built in nor a label column of the study (lists what it can run).
        """
        return TrainingSetup(task=self.task, n_folds=self.n_folds, seed=self.run_seeds[0], preprocess=self.preprocess,
                             model=self.model, train=self.train, sequences=study.sequences,
                             label_values={} if study.labels == GLIOMA_LABELS else dict(study.labels.columns))

    def arm_config(self, name: str) -> Any:
        """The settings of arm ``name``: those read from its table, else its defaults (None without settings)."""
        if name in self.arm_configs:
            return self.arm_configs[name]
        return get_arm(name).default_config()

    def as_dict(self) -> dict[str, Any]:
        """The resolved config as the TOML it reads from: every arm's settings under its own table."""
        d = to_dict(dataclasses.replace(self, arm_configs={}))
        d.pop("arm_configs")
        for name in self.arms:
            spec = get_arm(name)
            if spec.config is not None:
                d[spec.config_table] = to_dict(self.arm_config(name))
        return d


def load_study_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read a study config TOML (with ``base`` inheritance and optional overrides).

    The tables of the known arms (:func:`synthlearn.strategies.registry.all_arms`: ``[fedavg]``,
    ``[catphishing]``, and any registered arm's) are read with each arm's own config dataclass; every other key
    is :class:`StudyConfig`'s. Unknown keys are refused everywhere, naming the file and the dotted key.
    """
    data = read_toml(path)
    if overrides:
        data = merge_tables(data, overrides)
    try:
        if "arm_configs" in data:
            raise ConfigError("arm_configs is not a config key; give each arm's settings in its own table, e.g. "
                              "[fedavg]")
        tables = {}
        arms = {name: spec for name, spec in all_arms().items() if spec.config is not None}
        for name, spec in arms.items():  # several arms may read one table (asyndgan and asyndgan_pooled)
            if spec.config_table in data:
                tables[name] = data[spec.config_table]
        for table in {spec.config_table for spec in arms.values()}:
            data.pop(table, None)
        cfg = from_dict(StudyConfig, data)
        configs = {}
        for name, table in tables.items():
            spec = get_arm(name)
            if not isinstance(table, dict):
                raise ConfigError(f"{spec.config_table}: expected a table of the {name} arm's settings, found "
                                  f"{type(table).__name__} {table!r}")
            configs[name] = from_dict(spec.config, table, _prefix=spec.config_table + ".")
        return dataclasses.replace(cfg, arm_configs=configs)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve_arm(name: str) -> Callable[[ArmContext], ArmOutput]:
    """The ``run`` function of arm ``name`` (:func:`synthlearn.strategies.registry.get_arm`).

    Raises:
        ValueError: no such arm (lists the known ones).
    """
    return get_arm(name).run


# --------------------------------------------------------------------------------------------- helpers
def _with_sequences(study: Study, sequences: Sequence[str], where: str) -> Study:
    """``study`` reading only ``sequences`` of every case, in that order (a study config's ``sequences``).

    Raises:
        ValueError: a sequence the study does not have (lists its sequences).
    """
    missing = [s for s in sequences if s not in study.sequences]
    if missing:
        raise ValueError(f"study {where}: sequences {list(sequences)} of the config; the study has "
                         f"{list(study.sequences)} (not {missing})")
    sites = tuple(dataclasses.replace(site, cases=tuple(c.with_sequences(sequences) for c in site.cases))
                  for site in study.sites)
    return dataclasses.replace(study, sites=sites, sequences=tuple(sequences))


def _run_task(cfg: StudyConfig, out: Path) -> Task:
    """The task of the run in ``out``, over the label columns of its study (recorded in ``splits.json``; the glioma
    columns for a run recorded before studies had their own)."""
    splits = out / "splits.json"
    labels = json.loads(splits.read_text()).get("labels") if splits.is_file() else None
    return get_task(cfg.task, LabelSchema.from_json(labels) if labels else None)


def _training_signature(cfg: StudyConfig, arm: str, fingerprint_sha: str,
                        setup: TrainingSetup | None = None) -> dict[str, Any]:
    """What must match for a complete arm to be reused: the training setup (of its seed; default the primary
    seed's), the arm's own settings (and what its spec adds, e.g. the content of a file they name) and the data
    (by content)."""
    d = to_dict(setup or cfg.setup)
    if tuple(d.get("sequences", SEQUENCES)) == SEQUENCES and not d.get("label_values"):
        # a study of the default channels and labels keeps the signature it had before studies could have their own
        d.pop("sequences", None)
        d.pop("label_values", None)
    if d.get("model", {}).get("multitask_pool") == "voxel" and d.get("task") != "multitask":
        d["model"].pop("multitask_pool")  # a setting only the multi-task network reads: older runs stay reusable
    spec = get_arm(arm)
    if spec.config is not None:
        d[spec.config_table] = to_dict(cfg.arm_config(arm))
    if spec.signature is not None:
        d.update(spec.signature(cfg.arm_config(arm), cfg.task))
    d["arm_options"] = json_safe(cfg.arm_options.get(arm, {}))
    d["data_sha256"] = fingerprint_sha
    return d


def _predictions_csv(rows: list[dict[str, Any]], class_names: Sequence[str]) -> str:
    fields = ["model", "site", "case_id", "true"] + [f"p_{c}" for c in class_names] + ["pred"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return buf.getvalue()


def read_predictions(path: str | Path, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``predictions.csv`` of an arm -> model label -> ``{"site", "case_id", "true" (-1 = unknown),
    "probs" (N, K)}`` arrays in file order."""
    out: dict[str, dict[str, list]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            d = out.setdefault(row["model"], {"site": [], "case_id": [], "true": [], "probs": []})
            d["site"].append(row["site"])
            d["case_id"].append(row["case_id"])
            d["true"].append(class_names.index(row["true"]) if row["true"] else -1)
            d["probs"].append([float(row[f"p_{c}"]) for c in class_names])
    return {m: {"site": np.array(d["site"]), "case_id": np.array(d["case_id"]),
                "true": np.array(d["true"], dtype=np.int64), "probs": np.array(d["probs"], dtype=np.float64)}
            for m, d in out.items()}


def predict_test_cases(models: dict[str, TaskModel], test_cases: Sequence[CaseRecord], cache: DatasetCache,
                       *, progress: bool = False) -> list[dict[str, Any]]:
    """Rows of ``predictions.csv``: every model on every test case."""
    rows = []
    dataset = cache.dataset(test_cases)
    for label, model in models.items():
        task = model.task
        probs = model.predict(dataset, progress=progress)
        for case, p in zip(test_cases, probs):
            y = task.label(case.labels)
            row = {"model": label, "site": case.site, "case_id": case.case_id,
                   "true": task.class_names[y] if y is not None else "", "pred": task.class_names[int(np.argmax(p))]}
            row.update({f"p_{c}": f"{float(v):.6f}" for c, v in zip(task.class_names, p)})
            rows.append(row)
    return rows


def classify_test_cases_by_head(models: dict[str, TaskModel], test_cases: Sequence[CaseRecord], cache: DatasetCache,
                                ) -> dict[str, list[dict[str, Any]]]:
    """A multi-task model's classification heads on every test case: head name -> the rows of its
    ``predictions-<head>.csv`` (the columns of ``predictions.csv`` of a classification task)."""
    out: dict[str, list[dict[str, Any]]] = {}
    dataset = cache.dataset(test_cases)
    for label, model in models.items():
        probs = model.predict_heads(dataset)
        for head in model.task.heads:
            for case, p in zip(test_cases, probs[head.name]):
                y = head.label(case.labels)
                row = {"model": label, "site": case.site, "case_id": case.case_id,
                       "true": head.class_names[y] if y is not None else "",
                       "pred": head.class_names[int(np.argmax(p))]}
                row.update({f"p_{c}": f"{float(v):.6f}" for c, v in zip(head.class_names, p)})
                out.setdefault(head.name, []).append(row)
    return out


def segment_test_cases(models: dict[str, TaskModel], test_cases: Sequence[CaseRecord], cache: DatasetCache,
                       ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Segmentation models on every test case: the rows of ``predictions.csv`` (per model and case, Dice and HD95 per
    region on the task model's preprocessed grid, :func:`synthlearn.evaluate.segmentation.case_scores`) and each
    model's ``(N, *S)`` label maps."""
    from synthlearn.data.io import voxel_spacing
    from synthlearn.evaluate.segmentation import case_scores

    rows, maps = [], {}
    dataset = cache.dataset(test_cases)
    truths = [dataset.arrays(i)[1] for i in range(len(dataset))]
    spacings = [voxel_spacing(dataset.grid_affine(i)) for i in range(len(dataset))]
    for label, model in models.items():
        maps[label] = model.predict_label_maps(dataset)
        for case, pred, truth, spacing in zip(test_cases, maps[label], truths, spacings):
            scores = case_scores(pred, truth, spacing[:pred.ndim])  # a 2D image: its two in-plane sizes
            rows.append({"model": label, "site": case.site, "case_id": case.case_id,
                         **{k: f"{v:.6f}" for k, v in scores.items()}})
    return rows, maps


def _segmentation_csv(rows: list[dict[str, Any]]) -> str:
    from synthlearn.evaluate.segmentation import CASE_METRICS

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["model", "site", "case_id", *CASE_METRICS], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return buf.getvalue()


def read_segmentation_rows(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """A segmentation arm's ``predictions.csv`` -> model label -> per-case rows (metrics as floats)."""
    from synthlearn.evaluate.segmentation import CASE_METRICS

    out: dict[str, list[dict[str, Any]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["model"], []).append(
                {"site": row["site"], "case_id": row["case_id"],
                 **{m: float(row[m]) for m in CASE_METRICS if row.get(m) not in (None, "")}})  # older: no sen/spe
    return out


def _write_overlay(test_cases: Sequence[CaseRecord], dataset, label_maps: np.ndarray, path: Path, title: str,
                   max_cases: int = 6) -> None:
    """A grid of test cases (rows): t1c with the true and the predicted tumour labels."""
    from synthlearn.report.grid import plot_segmentation_overlay

    n = min(max_cases, len(test_cases))
    items = [(f"{test_cases[i].site}/{test_cases[i].case_id}", dataset.arrays(i)[0], dataset.arrays(i)[1],
              label_maps[i]) for i in range(n)]
    plot_segmentation_overlay(items, path, title=title, sequences=test_cases[0].sequences)


def _write_gradcam(test_cases: Sequence[CaseRecord], dataset, model: TaskModel, path: Path, title: str,
                   max_cases: int = 4) -> None:
    """A grid of test cases (rows): t1c, then the Grad-CAM map of every head of the model's first fold."""
    from synthlearn.evaluate.gradcam import head_gradcam
    from synthlearn.report.grid import plot_gradcam

    n = min(max_cases, len(test_cases))
    images = np.stack([dataset.arrays(i)[0] for i in range(n)])
    stage = model.task.stages[0]
    net = model.networks[f"{stage.name}/fold-0"]
    maps = {head.name: head_gradcam(net, images, h) for h, head in enumerate(stage.heads)}
    items = [(f"{test_cases[i].site}/{test_cases[i].case_id}", images[i], dataset.arrays(i)[1],
              {h: m[i] for h, m in maps.items()}) for i in range(n)]
    plot_gradcam(items, path, title=title, sequences=test_cases[0].sequences)


# ------------------------------------------------------------------------------------------ evaluation
def seed_dir(out: str | Path, arm: str, seed_index: int, seed: int) -> Path:
    """The folder of ``arm`` trained with the run's ``seed_index``-th seed: ``out/<arm>`` for the primary seed,
    ``out/<arm>/seeds/<seed>`` for the others."""
    return Path(out) / arm if seed_index == 0 else Path(out) / arm / "seeds" / str(seed)


def _arm_block(models: dict[str, dict], arm: str, test_sites: list[str], task, cfg: StudyConfig,
               reference: dict | None, n_bootstrap: int) -> dict[str, Any]:
    """The metrics block of one arm's models (one seed): one model's, or the mean over a local arm's site models
    with each model's own block under ``site_models``."""
    blocks = {label: metrics_block(p, test_sites, task, reference=reference, reference_name=REFERENCE_ARM,
                                   n_bootstrap=n_bootstrap, ci=cfg.evaluate.ci, seed=cfg.seed)
              for label, p in models.items()}
    if list(blocks) == [arm]:
        return blocks[arm]
    block = mean_block(blocks, REFERENCE_ARM, models, task, n_bootstrap=n_bootstrap, ci=cfg.evaluate.ci, seed=cfg.seed)
    block["site_models"] = blocks
    return block


SEED_METRICS = ("acc", "sen", "spe", "auc", "quadratic_kappa")
#: what a multi-task head keeps per seed (Ren et al. report F1 beside them)
HEAD_METRICS = (*SEED_METRICS, "f1")


def _seed_metrics(task) -> tuple[str, ...]:
    from synthlearn.evaluate.segmentation import BLOCK_METRICS

    return BLOCK_METRICS if task.segments else SEED_METRICS


def _headline(task) -> str:
    """The metric an arm is compared with the reference arm on over seeds: AUC, or the mean Dice over regions."""
    return "dice_mean" if task.segments else "auc"


def _seg_arm_block(models: dict[str, list[dict]], arm: str, test_sites: list[str],
                   reference: list[dict] | None) -> dict[str, Any]:
    """:func:`_arm_block` of a segmentation arm (:func:`synthlearn.evaluate.segmentation.segmentation_block`)."""
    from synthlearn.evaluate.segmentation import mean_segmentation_block, segmentation_block

    blocks = {label: segmentation_block(rows, test_sites, reference=reference, reference_name=REFERENCE_ARM)
              for label, rows in models.items()}
    if list(blocks) == [arm]:
        return blocks[arm]
    block = mean_segmentation_block(blocks, REFERENCE_ARM)
    block["site_models"] = blocks
    return block


def _seed_entry(block: dict[str, Any], info: dict[str, Any], metrics: Sequence[str] = SEED_METRICS) -> dict[str, Any]:
    """What ``per_seed`` keeps of one seed's block: per-site and combined metrics (no confusion matrices), the
    site models' combined metrics, and the learning check's summary."""
    keep = (*metrics, "auc_ci", "n") if "auc" in metrics else (*metrics, "n")
    entry: dict[str, Any] = {"test": {site: {k: m.get(k) for k in keep} for site, m in block["test"].items()}}
    if "site_models" in block:
        entry["site_models"] = {label: {"test": {"combined": {k: b["test"]["combined"].get(k) for k in keep}}}
                                for label, b in block["site_models"].items()}
    entry["learning"] = info.get("extra", {}).get("learning")
    return entry


def _over_seeds(per_seed: dict[str, dict[str, Any]], metrics: Sequence[str] = SEED_METRICS) -> dict[str, Any]:
    """Mean, SD (n - 1), min and max over seeds of each combined metric (seeds where it is defined)."""
    out: dict[str, Any] = {}
    for metric in metrics:
        vals = [e["test"]["combined"][metric] for e in per_seed.values() if e["test"]["combined"].get(metric) is not None]
        out[metric] = ({"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                        "min": float(min(vals)), "max": float(max(vals)), "n": len(vals)} if vals else None)
    collapsed = [k for k, e in per_seed.items() if (e.get("learning") or {}).get("n_collapsed")]
    out["seeds_with_collapse"] = collapsed
    out["n_seeds"] = len(per_seed)
    return out


def paired_seed_comparison(arm_aucs: dict[str, float], reference_aucs: dict[str, float], metric: str = "auc"
                           ) -> dict[str, Any] | None:
    """An arm's combined ``metric`` (AUC; a segmentation task's mean Dice) against the reference arm's over the seeds
    both ran: the mean and SD of the per-seed difference (arm - reference) and a paired t-test over seeds (scipy
    ``ttest_rel``; None with fewer than two seeds or no spread). Keys: ``<metric>_difference_mean``,
    ``<metric>_difference_sd``, ``paired_t_p``, ``arm_<metric>_mean``, ``reference_<metric>_mean``, ``seeds``,
    ``reference``. Returns None without a common seed."""
    from scipy import stats

    common = sorted(set(arm_aucs) & set(reference_aucs), key=int)
    pairs = [(arm_aucs[k], reference_aucs[k]) for k in common if arm_aucs[k] is not None and reference_aucs[k] is not None]
    if not pairs:
        return None
    diff = np.array([a - r for a, r in pairs])
    p = None
    if len(diff) > 1 and np.std(diff) > 0:
        p = float(stats.ttest_rel([a for a, _ in pairs], [r for _, r in pairs]).pvalue)
    return {"reference": REFERENCE_ARM, "seeds": [int(k) for k in common], f"{metric}_difference_mean": float(diff.mean()),
            f"{metric}_difference_sd": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0, "paired_t_p": p,
            f"arm_{metric}_mean": float(np.mean([a for a, _ in pairs])),
            f"reference_{metric}_mean": float(np.mean([r for _, r in pairs]))}


def build_results(cfg: StudyConfig, out: str | Path) -> dict:
    """Assemble ``results.json`` (and the figures) from the complete arms' folders.

    Every arm's usual keys hold its primary seed's results; ``seeds``, ``per_seed`` (combined and per-site metrics
    and the learning check of every complete seed), ``over_seeds`` (mean, SD, min, max of each combined metric,
    and the seeds with a network that did not learn) and, for every arm but the reference,
    ``vs_reference_over_seeds`` (:func:`paired_seed_comparison`) are added."""
    out = Path(out)
    task = _run_task(cfg, out)
    seg = task.segments
    metrics, headline = _seed_metrics(task), _headline(task)

    def read(path: Path) -> dict:
        return read_segmentation_rows(path) if seg else read_predictions(path, task.class_names)

    def arm_block(models: dict, arm: str, reference: Any) -> dict[str, Any]:
        if seg:
            return _seg_arm_block(models, arm, test_sites, reference)
        return _arm_block(models, arm, test_sites, task, cfg, reference, cfg.evaluate.n_bootstrap)

    seeds = cfg.run_seeds
    arm_infos, preds = {}, {}
    seed_preds: dict[str, dict[int, tuple[dict, dict]]] = {}
    for arm in cfg.arms:
        info_path = out / arm / "arm.json"
        if info_path.is_file():
            arm_infos[arm] = json.loads(info_path.read_text())
            preds[arm] = read(out / arm / "predictions.csv")
            seed_preds[arm] = {seeds[0]: (arm_infos[arm], preds[arm])}
            for i, k in enumerate(seeds[1:], start=1):
                d = seed_dir(out, arm, i, k)
                if (d / "arm.json").is_file():
                    seed_preds[arm][k] = (json.loads((d / "arm.json").read_text()), read(d / "predictions.csv"))
    test_sites = json.loads((out / "splits.json").read_text())["test"] if (out / "splits.json").is_file() else []
    reference = None
    if REFERENCE_ARM in preds:
        reference = next(iter(preds[REFERENCE_ARM].values()))
    results: dict[str, Any] = {"task": cfg.task, "class_names": list(task.class_names), "test_sites": test_sites,
                               "reference_arm": REFERENCE_ARM, "seeds": list(seeds), "arms": {}}
    if seg:
        from synthlearn.training.segmentation import REGIONS

        results["task_kind"] = task.kind
        if task.is_multitask:
            results["heads"] = {h.name: list(h.class_names) for h in task.heads}
        results["regions"] = {name: list(values) for name, values in REGIONS.items()}
        results["metrics_grid"] = "the task model's preprocessed grid (HD95 in mm from its voxel size)"
    for arm, info in arm_infos.items():
        ref = reference if arm != REFERENCE_ARM else None
        block = arm_block(preds[arm], arm, ref)
        block.update({"bytes_from_sites": int(info["bytes_from_sites"]), "rounds": int(info["rounds"]),
                      "wall_s": float(info["wall_s"]), "models": info["models"]})
        for k, v in info.get("extra", {}).items():
            block.setdefault(k, v)
        per_seed = {str(seeds[0]): _seed_entry(block, info, metrics)}
        for k, (k_info, k_preds) in seed_preds[arm].items():
            if k != seeds[0]:
                per_seed[str(k)] = _seed_entry(arm_block(k_preds, arm, None), k_info, metrics)
        block["seeds"] = [int(k) for k in per_seed]
        block["per_seed"] = per_seed
        block["over_seeds"] = _over_seeds(per_seed, metrics)
        if task.is_multitask:
            block["heads"] = _head_blocks(cfg, out, arm, task, test_sites, seed_preds[arm])
        results["arms"][arm] = block
    ref_block = results["arms"].get(REFERENCE_ARM)
    if ref_block is not None:
        ref_values = {k: e["test"]["combined"][headline] for k, e in ref_block["per_seed"].items()}
        for arm, block in results["arms"].items():
            if arm != REFERENCE_ARM:
                block["vs_reference_over_seeds"] = paired_seed_comparison(
                    {k: e["test"]["combined"][headline] for k, e in block["per_seed"].items()}, ref_values, headline)
    results = json_safe(results)
    write_json(out / "results.json", results)
    if cfg.evaluate.figures and preds:
        try:
            write_figures(results, preds, out / "figures", cfg, task=task)
        except Exception as exc:  # noqa: BLE001 - a figure must never lose the results
            log.warning("figures not written: %s: %s", type(exc).__name__, exc)
    return results


def _head_blocks(cfg: StudyConfig, out: Path, arm: str, task: Task, test_sites: list[str],
                 seeds_done: dict[int, Any]) -> dict[str, Any]:
    """A multi-task arm's classification heads: per head the metrics block of a classification arm (its primary
    seed's, tested against the reference arm's same head) with ``per_seed`` and ``over_seeds`` of its combined
    metrics."""
    from synthlearn.tasks import column_task

    seeds = cfg.run_seeds
    out_heads: dict[str, Any] = {}
    for head in task.heads:
        head_task = column_task(head.name, head.class_names)
        name = f"predictions-{head.name}.csv"
        ref_path = out / REFERENCE_ARM / name
        reference = (next(iter(read_predictions(ref_path, head.class_names).values()))
                     if arm != REFERENCE_ARM and ref_path.is_file() else None)
        per_seed: dict[str, dict[str, Any]] = {}
        block: dict[str, Any] = {}
        for i, k in enumerate(seeds):
            if k not in seeds_done:
                continue
            path = (out / arm if i == 0 else seed_dir(out, arm, i, k)) / name
            b = _arm_block(read_predictions(path, head.class_names), arm, test_sites, head_task, cfg,
                           reference if i == 0 else None, cfg.evaluate.n_bootstrap)
            if i == 0:
                block = b
            per_seed[str(k)] = _seed_entry(b, {}, HEAD_METRICS)
            per_seed[str(k)].pop("learning", None)
        block["per_seed"] = per_seed
        over = _over_seeds(per_seed, HEAD_METRICS)
        block["over_seeds"] = {m: over[m] for m in HEAD_METRICS} | {"n_seeds": over["n_seeds"]}
        out_heads[head.name] = block
    return out_heads


def write_figures(results: dict, preds: dict[str, dict[str, dict]], folder: Path, cfg: StudyConfig, *,
                  task: Task | None = None) -> list[Path]:
    """ROC curves and confusion matrices of every model on the combined test sites; for a segmentation task, the
    per-case Dice of every arm per test site and region (box plots). ``task``: the run's task (default: ``cfg.task``
    over the glioma label columns)."""
    from synthlearn.report.plots import plot_confusion_matrices, plot_roc_curves, plot_segmentation_boxes

    task = task or get_task(cfg.task)
    if task.segments:
        rows = {}
        for arm, models in preds.items():
            for label, r in models.items():
                rows[arm if label == arm else f"{arm}:{label}"] = r
        return [plot_segmentation_boxes(rows, results.get("test_sites", []), folder / "dice_per_site.png")]
    curves, aucs, matrices = {}, {}, {}
    for arm, models in preds.items():
        block = results["arms"][arm]
        for label, p in models.items():
            name = arm if label == arm else f"{arm}:{label}"
            b = block if label == arm else block["site_models"][label]
            known = p["true"] >= 0
            curves[name] = (p["true"][known], p["probs"][known])
            comb = b["test"]["combined"]
            aucs[name] = (comb["auc"], comb["auc_ci"])
            matrices[name] = np.array(comb["confusion_matrix"])
    return [plot_roc_curves(curves, folder / "roc_combined.png", positive=task.positive_class, aucs=aucs),
            plot_confusion_matrices(matrices, task.class_names, folder / "confusion_combined.png")]


def _split_sites(study, cfg: StudyConfig):
    """Training and test sites: the config's ``train_sites``/``test_sites`` when given, else study.json roles.

    Raises:
        ValueError: a named site is not in the study (lists the sites there), or a site is both trained and tested
            on once the two lists are resolved (e.g. ``train_sites`` names a site whose role in study.json is
            ``test``, and ``test_sites`` is left to the roles).
    """
    names = [s.name for s in study.sites]
    unknown = [n for n in (*cfg.train_sites, *cfg.test_sites) if n not in names]
    if unknown:
        raise ValueError(f"study {cfg.study}: train_sites/test_sites name {unknown}, which are not in the study; "
                         f"its sites are {names}")
    train = tuple(study.site(n) for n in cfg.train_sites) if cfg.train_sites else study.sites_with_role("train")
    test = tuple(study.site(n) for n in cfg.test_sites) if cfg.test_sites else study.sites_with_role("test")
    both = sorted({s.name for s in train} & {s.name for s in test})
    if both:
        how = (f"train_sites = {list(cfg.train_sites)}" if cfg.train_sites else "study.json's train roles") + " and " + \
              (f"test_sites = {list(cfg.test_sites)}" if cfg.test_sites else "study.json's test roles")
        raise ValueError(f"study {cfg.study}: site(s) {both} would be trained and tested on ({how}); a model must "
                         f"never be tested on its own training cases: name the other list too, or change the roles")
    return train, test


def learning_of(models: dict[str, TaskModel]) -> dict[str, Any]:
    """One arm's learning checks (``model.json`` ``info["learning_summary"]`` of each of its models) together:
    ``{"n_networks", "n_collapsed", "collapsed": ["<model>:<network>" | "<network>"], "retrained": {...},
    "checked": bool}`` (``checked`` False when a model carries no check)."""
    summaries = {label: m.info.get("learning_summary") for label, m in models.items()}
    several = len(models) > 1
    out: dict[str, Any] = {"n_networks": 0, "n_collapsed": 0, "collapsed": [], "retrained": {},
                           "checked": all(v is not None for v in summaries.values())}
    for label, summary in summaries.items():
        if summary is None:
            continue
        prefix = f"{label}:" if several else ""
        out["n_networks"] += summary["n_networks"]
        out["n_collapsed"] += summary["n_collapsed"]
        out["collapsed"] += [prefix + n for n in summary["collapsed"]]
        out["retrained"].update({prefix + n: v for n, v in summary.get("retrained", {}).items()})
    return out


def _run_arm_seed(cfg: StudyConfig, arm: str, index: int, seed: int, out: Path, train_sites, train_cases, test_cases,
                  fingerprint: dict[str, Any], cache: DatasetCache, *, progress: bool, force: bool,
                  base_setup: TrainingSetup | None = None, federate: Federate | None = None) -> None:
    """Train and apply ``arm`` with the run's ``index``-th seed in :func:`seed_dir` (skipped when complete)."""
    import shutil

    from synthlearn.runinfo import data_fingerprint, write_run_info

    arm_dir = seed_dir(out, arm, index, seed)
    done = arm_dir / "arm.json"
    setup = dataclasses.replace(base_setup or cfg.setup, seed=seed)
    signature = _training_signature(cfg, arm, fingerprint["sha256"], setup)
    what = arm if index == 0 else f"{arm} (seed {seed})"
    if done.is_file() and not force:
        saved = json.loads(done.read_text()).get("signature")
        if saved != signature:
            raise ValueError(f"arm {what} in {out} was run with other settings or data; use a new --out, "
                             f"--force, or remove {arm_dir}")
        log.info("arm %s: complete in %s, skipped", what, arm_dir)
        return
    if done.is_file() and force:
        shutil.rmtree(arm_dir)
    log.info("arm %s: training on %d cases of %d sites", what, len(train_cases), len(train_sites))
    t0 = time.perf_counter()
    write_run_info(arm_dir, config=cfg.as_dict(), seed=seed, fingerprint=data_fingerprint(train_cases),
                   extra={"arm": arm, "seed_index": index})
    needed = {name: out / name for name in get_arm(arm).needs
              if name in cfg.arms and (out / name / "arm.json").is_file()}
    ctx = ArmContext(name=arm, setup=setup, train_sites=train_sites, arm_dir=arm_dir, arm_config=cfg.arm_config(arm),
                     cache=cache, progress=progress, primary_dir=None if index == 0 else out / arm, needed=needed,
                     federate=federate or run_protocol_simulation)
    output = resolve_arm(arm)(ctx)
    if not output.models:
        raise ValueError(f"arm {what} returned no model")
    model_dirs = {}
    for label, model in output.models.items():
        mdir = arm_dir / "model" if label == arm else arm_dir / label / "model"
        if not (mdir / "model.json").is_file():
            model.save(mdir)
        model_dirs[label] = str(mdir.relative_to(out))
    learning = learning_of(output.models)
    if learning["n_collapsed"]:
        log.warning("arm %s: %d of %d networks did not learn (%s); see model.json's learning_check", what,
                    learning["n_collapsed"], learning["n_networks"], ", ".join(learning["collapsed"]))
    task = setup.task_spec
    if task.segments:
        rows, maps = segment_test_cases(output.models, test_cases, cache)
        atomic_write_text(arm_dir / "predictions.csv", _segmentation_csv(rows))
        if task.is_multitask:
            heads = {h.name: h for h in task.heads}
            for head, head_rows in classify_test_cases_by_head(output.models, test_cases, cache).items():
                atomic_write_text(arm_dir / f"predictions-{head}.csv",
                                  _predictions_csv(head_rows, heads[head].class_names))
        if index == 0 and cfg.evaluate.figures:
            label = next(iter(maps))
            try:
                _write_overlay(test_cases, cache.dataset(test_cases), maps[label],
                               arm_dir / "figures" / "segmentation_overlay.png",
                               f"{arm}{'' if label == arm else ':' + label}: truth | prediction")
            except Exception as exc:  # noqa: BLE001 - a figure must never lose the results
                log.warning("segmentation overlay not written: %s: %s", type(exc).__name__, exc)
            if task.is_multitask:
                try:
                    _write_gradcam(test_cases, cache.dataset(test_cases), output.models[label],
                                   arm_dir / "figures" / "gradcam.png",
                                   f"{arm}{'' if label == arm else ':' + label}: Grad-CAM of every head (fold 0)")
                except Exception as exc:  # noqa: BLE001 - a figure must never lose the results
                    log.warning("Grad-CAM figure not written: %s: %s", type(exc).__name__, exc)
    else:
        rows = predict_test_cases(output.models, test_cases, cache, progress=progress)
        atomic_write_text(arm_dir / "predictions.csv", _predictions_csv(rows, task.class_names))
    wall = time.perf_counter() - t0
    write_json(done, json_safe({"arm": arm, "seed": seed, "models": model_dirs,
                                "bytes_from_sites": output.bytes_from_sites, "rounds": output.rounds, "wall_s": wall,
                                "extra": {"learning": learning, **output.extra}, "signature": signature}))
    log.info("arm %s: done in %.0f s", what, wall)


# ------------------------------------------------------------------------------------------------ runner
def run_study(cfg: StudyConfig, out: str | Path, *, progress: bool = True, force: bool = False,
              federate: Federate | None = None, remote_sites: bool = False) -> dict:
    """Run every arm of ``cfg`` into ``out`` and return the results (also ``out/results.json``).

    Args:
        cfg: the study config.
        out: the run folder (created; re-running into it skips complete arms).
        progress: progress bars.
        force: re-run arms even when complete (their folders are replaced).
        federate: how federated arms reach their sites (default: Flower's simulation engine on this machine;
            ``synthlearn server start`` hands over :func:`synthlearn.deployment.runner.deployed_federate`).
        remote_sites: the training sites' cases live on their own machines (a deployed study): this process reads
            only the test sites' files; the training sites are names from ``study.json`` (their folders may be
            absent here), their cases are neither checked nor fingerprinted here, and the arms see them empty.

    Raises:
        ValueError: no training or test sites, structural problems in the study, an arm already complete
            with different settings, an unknown arm.
    """
    from synthlearn.data.layouts import open_study
    from synthlearn.data.verify import check_sites
    from synthlearn.runinfo import data_fingerprint, write_run_info

    out = Path(out)
    from synthlearn.runtime import configure_threads

    configure_threads(cfg.threads)
    study = open_study(cfg.study)
    if remote_sites:  # a training site's folder is on its own machine: its absence here is no problem
        remote = {s.name for s in _split_sites(study, cfg)[0]}
        study = dataclasses.replace(study, problems=tuple(p for p in study.problems if p.site not in remote))
    if study.problems:
        listing = "\n".join(f"  {p}" for p in study.problems[:20])
        raise ValueError(f"study {cfg.study} has {len(study.problems)} problem(s):\n{listing}\n"
                         f"run `synthlearn verify-data {cfg.study}` for the full report")
    if cfg.sequences:
        study = _with_sequences(study, cfg.sequences, cfg.study)
    try:
        base_setup = cfg.setup_for(study)
    except ValueError as exc:
        raise ValueError(f"study {cfg.study}: {exc}") from exc
    kind, dims = base_setup.task_spec.kind, cfg.preprocess.spatial_dims
    for arm in cfg.arms:  # unknown arms and bad arm settings fail before any training
        spec = get_arm(arm)
        if kind not in spec.task_kinds:
            able = [name for name, other in all_arms().items() if kind in other.task_kinds]
            raise ValueError(f"arm {arm} does not run {kind} tasks (task = {cfg.task!r}); arms that do: "
                             f"{', '.join(able)}")
        if dims not in spec.spatial_dims:
            able = [name for name, other in all_arms().items() if dims in other.spatial_dims]
            raise ValueError(f"arm {arm} does not run on {dims}D studies (preprocess.shape = {list(cfg.preprocess.shape)}); "
                             f"arms that do: {', '.join(able)}")
        if spec.generic_data is False and (study.sequences != SEQUENCES or study.labels != GLIOMA_LABELS):
            raise ValueError(f"arm {arm} draws the glioma study's four sequences {list(SEQUENCES)} and labels; study "
                             f"{cfg.study} has sequences {list(study.sequences)} and label columns "
                             f"{list(study.labels.names)}")
        if spec.check is not None:
            spec.check(cfg.arm_config(arm), cfg.task)
    train_sites, test_sites = _split_sites(study, cfg)
    if remote_sites:
        train_sites = tuple(dataclasses.replace(s, cases=()) for s in train_sites)
    if not train_sites or not test_sites:
        raise ValueError(f"study {cfg.study}: need sites with role 'train' and 'test' in study.json, found "
                         f"{[(s.name, s.role) for s in study.sites]}")
    # every array of the run's sites read once in full before anything trains: a NaN voxel, a truncated file or a
    # shape mismatch found after an hour of training (or turned into a null AUC) is a study that should not have run
    checked = test_sites if remote_sites else (*train_sites, *test_sites)
    log.info("checking every file of the %s%d test sites", "" if remote_sites else f"{len(train_sites)} training and ",
             len(test_sites))
    problems, summaries = check_sites(checked, progress=progress, label_columns=study.labels.names)
    found = {f"{len(shape.split('x'))}D": site.name for site in summaries for shape in site.shapes}
    if not problems and set(found) != {f"{dims}D"}:
        raise ValueError(f"study {cfg.study}: preprocess.shape = {list(cfg.preprocess.shape)} takes {dims}D cases; found "
                         + ", ".join(f"{d} cases (e.g. at {site})" for d, site in sorted(found.items()))
                         + (": give preprocess.shape two sizes for a 2D study, three for volumes" if len(found) == 1
                            else ": a study is all 2D or all 3D"))
    if problems:
        listing = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"study {cfg.study} has {len(problems)} problem(s) in the sites this run uses; nothing was "
                         f"trained:\n{listing}{more}\nrun `synthlearn verify-data {cfg.study}` for the full report")
    train_cases = [c for s in train_sites for c in s.cases]
    test_cases = [c for s in test_sites for c in s.cases]
    fingerprint = data_fingerprint(train_cases + test_cases)
    out.mkdir(parents=True, exist_ok=True)
    write_run_info(out, config=cfg.as_dict(), seed=cfg.run_seeds[0], fingerprint=fingerprint,
                   extra={"study": str(Path(cfg.study).resolve()), "seeds": list(cfg.run_seeds),
                          **({"remote_training_sites": [s.name for s in train_sites]} if remote_sites else {})})
    write_json(out / "splits.json", {"train": [s.name for s in train_sites], "test": [s.name for s in test_sites],
                                     "n_folds": cfg.n_folds, "sequences": list(study.sequences),
                                     "labels": study.labels.to_json()})
    cache = DatasetCache(cfg.preprocess)
    seeds = cfg.run_seeds
    for arm in cfg.arms:
        for index, seed in enumerate(seeds):
            _run_arm_seed(cfg, arm, index, seed, out, train_sites, train_cases, test_cases, fingerprint, cache,
                          progress=progress, force=force, base_setup=base_setup, federate=federate)
    return build_results(cfg, out)


__all__ = ["EvaluationConfig", "StudyConfig", "build_results", "learning_of", "load_study_config",
           "paired_seed_comparison", "read_predictions", "register_arm", "resolve_arm", "run_study", "seed_dir",
           "ConfigError"]
