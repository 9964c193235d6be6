"""Study runner smoke test: `synthlearn study run` with configs/study_tiny.toml on the tiny phantom runs
centralized, local and FedAvg (2 rounds on Flower) end to end, writes results.json with the documented
schema, and a re-run skips complete arms."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from synthlearn.cli import main
from synthlearn.study import load_study_config, read_predictions, resolve_arm, run_study

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "study_tiny.toml"


def _check_metrics(entry):
    assert set(entry) >= {"acc", "sen", "spe", "auc", "auc_ci"}
    for key in ("acc", "sen", "spe", "auc"):
        assert entry[key] is None or 0.0 <= entry[key] <= 1.0
    assert entry["auc_ci"] is None or (len(entry["auc_ci"]) == 2 and entry["auc_ci"][0] <= entry["auc_ci"][1])


def test_results_schema(tiny_run):
    out, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "idh"
    assert set(results["arms"]) == {"centralized", "local", "fedavg"}
    test_sites = results["test_sites"]
    assert test_sites == ["nyu", "ucsf"]
    for arm, block in results["arms"].items():
        assert set(block["test"]) == {*test_sites, "combined"}
        for entry in block["test"].values():
            _check_metrics(entry)
        p = block["mcnemar_p_vs_centralized"]
        assert p is None or 0.0 <= p <= 1.0
        assert isinstance(block["bytes_from_sites"], int)
        assert isinstance(block["rounds"], int)
        assert block["wall_s"] > 0
        for name in ("config.json", "run.json", "predictions.csv", "arm.json"):
            assert (out / arm / name).is_file(), (arm, name)
        run = json.loads((out / arm / "run.json").read_text())
        assert run["seed"] == 0 and run["data_fingerprint"]["sha256"] and run["version"]["synthlearn"]
    arms = results["arms"]
    assert arms["centralized"]["mcnemar_p_vs_centralized"] is None
    assert arms["fedavg"]["mcnemar_p_vs_centralized"] is not None
    assert arms["local"]["bytes_from_sites"] == 0 and arms["local"]["rounds"] == 0
    assert set(arms["local"]["site_models"]) == {"tcga", "utsw", "egd"}
    assert arms["fedavg"]["rounds"] == 2
    # FedAvg's bytes are measured on Flower messages: at least 3 sites x 2 rounds x the weights
    import torch

    weights = torch.load(out / "fedavg" / "model" / "idh" / "fold-0.pt", weights_only=True)
    payload = sum(v.numel() * v.element_size() for v in weights.values()) * 2  # 2 folds
    assert arms["fedavg"]["bytes_from_sites"] > 3 * 2 * payload
    assert arms["centralized"]["bytes_from_sites"] > 0
    assert (out / "figures" / "roc_combined.png").is_file()
    assert (out / "figures" / "confusion_combined.png").is_file()


def test_saved_model_reloads_and_reproduces_predictions(tiny_run, tiny_study):
    from synthlearn.data.layouts import open_study
    from synthlearn.tasks.model import TaskModel

    out, _ = tiny_run
    model = TaskModel.load(out / "centralized" / "model")
    test_cases = [c for s in open_study(tiny_study).sites_with_role("test") for c in s.cases]
    probs = model.predict_cases(test_cases)
    saved = read_predictions(out / "centralized" / "predictions.csv", model.task.class_names)["centralized"]
    np.testing.assert_allclose(probs, saved["probs"], atol=1e-5)
    meta = json.loads((out / "centralized" / "model" / "model.json").read_text())
    assert meta["class_names"] == ["wildtype", "mutant"] and meta["preprocess"]["shape"] == [32, 32, 32]


def test_rerun_skips_complete_arms(tiny_run, tiny_study):
    out, first = tiny_run
    stamps = {arm: (out / arm / "arm.json").stat().st_mtime_ns for arm in ("centralized", "local", "fedavg")}
    t0 = time.perf_counter()
    assert main(["study", "run", "--config", str(TINY), "--study", str(tiny_study), "--out", str(out), "-q"]) == 0
    assert time.perf_counter() - t0 < max(20.0, first / 3)
    assert {arm: (out / arm / "arm.json").stat().st_mtime_ns for arm in stamps} == stamps


def test_changed_settings_are_refused_on_rerun(tiny_run, tiny_study):
    out, _ = tiny_run
    cfg = load_study_config(TINY, {"study": str(tiny_study), "seed": 1, "arms": ["centralized"]})
    with pytest.raises(ValueError, match="other settings"):
        run_study(cfg, out, progress=False)


def test_unknown_arm_and_bad_config(tmp_path, tiny_study):
    with pytest.raises(ValueError, match="unknown arm"):
        resolve_arm("nosuch")
    cfg = load_study_config(TINY, {"study": str(tiny_study), "arms": ["centralized", "nosuch"]})
    with pytest.raises(ValueError, match="unknown arm"):
        run_study(cfg, tmp_path / "x", progress=False)
    bad = tmp_path / "bad.toml"
    bad.write_text(f'base = "{TINY}"\n[train]\nepoch = 3\n')
    with pytest.raises(ValueError, match="unknown config key"):
        load_study_config(bad)


@pytest.mark.parametrize("name", ["study_tiny.toml", "study_cpu.toml", "study_paper.toml", "demo.toml",
                                  "demo_long.toml", "demo_tiny.toml", "demo_paper.toml", "study_tumor_type.toml",
                                  "study_tiny_segmentation.toml", "study_segmentation.toml",
                                  "study_tiny_multitask.toml", "study_multitask.toml"])
def test_shipped_configs_load(name):
    cfg = load_study_config(ROOT / "configs" / name)
    assert cfg.arms[0] == "centralized"
    assert all(s % 2 ** (len(cfg.model.channels) - 1) == 0 for s in cfg.preprocess.shape)


def test_report_of_the_tiny_run(tiny_run, capsys):
    out, _ = tiny_run
    assert main(["study", "report", str(out)]) == 0
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for arm in ("centralized", "local", "fedavg"):
        assert f"| {arm}" in md
    assert "data:image/png;base64," in page  # ROC / confusion figures embedded


def test_a_model_that_cannot_learn_is_reported_in_results_and_can_be_retrained(copy_study, tmp_path):
    """Labels shuffled across the training sites (no signal to learn) and, at one site, a single class: the
    learning check reports every such network in results.json per seed, and ``train.retrain_collapsed`` retrains
    each with the next seed and records it."""
    import csv

    rng = np.random.default_rng(0)
    for site in ("tcga", "utsw", "egd"):
        path = copy_study / site / "labels.csv"
        rows = list(csv.DictReader(path.open()))
        values = [r["idh"] for r in rows]
        values = ["mutant"] * len(values) if site == "egd" else list(rng.permutation(values))
        for r, v in zip(rows, values):
            r["idh"], r["tumor_type"] = v, ""
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    config = tmp_path / "shuffled.toml"
    config.write_text(f'base = "{TINY}"\narms = ["centralized", "local"]\nseeds = [0, 1]\n'
                      f'[train]\nretrain_collapsed = 1\n')
    out = tmp_path / "run"
    assert main(["study", "run", "--config", str(config), "--study", str(copy_study), "--out", str(out), "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    local = results["arms"]["local"]
    assert local["learning"]["n_networks"] == 6
    egd = [n for n in local["learning"]["collapsed"] if n.startswith("egd:")]
    assert egd == ["egd:idh/fold-0", "egd:idh/fold-1"]  # one class: reported on every seed
    for arm in ("centralized", "local"):
        block = results["arms"][arm]
        assert block["seeds"] == [0, 1] and set(block["per_seed"]) == {"0", "1"}
        assert block["per_seed"]["1"]["learning"]["n_networks"] == block["learning"]["n_networks"]
        assert block["over_seeds"]["seeds_with_collapse"] and block["over_seeds"]["n_seeds"] == 2
    model = json.loads((out / "local" / "egd" / "model" / "model.json").read_text())
    check = model["info"]["learning_check"]["idh/fold-0"]
    assert check["retried_seeds"] == [0, 1] and not check["learned"] and check["seed"] == 1
    assert local["learning"]["retrained"]["egd:idh/fold-0"] == [0, 1]
    seed1 = json.loads((out / "local" / "seeds" / "1" / "egd" / "model" / "model.json").read_text())
    assert seed1["info"]["learning_check"]["idh/fold-0"]["retried_seeds"] == [1, 2]
    assert main(["study", "report", str(out)]) == 0
    assert "did not learn" in (out / "report.md").read_text()


def test_a_toy_arm_defined_in_the_test_runs_through_study_run(tiny_study, tmp_path, monkeypatch):
    """An arm needs no change to the package: declared here with its own config table and a need, it runs through
    `synthlearn study run`, gets its settings and the folder of the arm it needs, and its unknown keys are refused."""
    import dataclasses

    from synthlearn.config import ConfigError
    from synthlearn.strategies import registry
    from synthlearn.strategies.base import ArmOutput
    from synthlearn.tasks.model import train_task_model

    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        site: str = "tcga"
        note: str = ""

    def run(ctx):
        site = next(s for s in ctx.train_sites if s.name == ctx.arm_config.site)
        model = train_task_model(site.cases, ctx.setup, ctx.arm_dir, cache=ctx.cache, progress=False)
        return ArmOutput(models={ctx.name: model}, bytes_from_sites=0, rounds=0,
                         extra={"note": ctx.arm_config.note, "needed": sorted(ctx.needed),
                                "reads": str(ctx.needed["centralized"].name)})

    monkeypatch.setattr(registry, "_REGISTERED", {})
    registry.register_arm(registry.ArmSpec(name="toy", run=run, config=ToyConfig, needs=("centralized",)))
    config = tmp_path / "toy.toml"
    config.write_text(f'base = "{TINY}"\narms = ["centralized", "toy"]\n[toy]\nsite = "utsw"\nnote = "hello"\n')
    out = tmp_path / "run"
    assert main(["study", "run", "--config", str(config), "--study", str(tiny_study), "--out", str(out), "-q"]) == 0
    toy = json.loads((out / "results.json").read_text())["arms"]["toy"]
    assert toy["note"] == "hello" and toy["needed"] == ["centralized"] and toy["reads"] == "centralized"
    assert toy["mcnemar_p_vs_centralized"] is not None and set(toy["test"]) == {"nyu", "ucsf", "combined"}
    assert json.loads((out / "config.json").read_text())["toy"] == {"site": "utsw", "note": "hello"}
    model = json.loads((out / "toy" / "model" / "model.json").read_text())
    assert sum(model["info"]["training_cases"].values()) < 12  # one site's cases, two folds
    bad = tmp_path / "bad.toml"
    bad.write_text(f'base = "{TINY}"\narms = ["toy"]\n[toy]\nsiet = "utsw"\n')
    with pytest.raises(ConfigError, match="toy.siet"):
        load_study_config(bad)
    with pytest.raises(ConfigError, match="unknown config key"):
        load_study_config(bad, {"nosuch": {"a": 1}})


def test_a_site_named_for_training_is_not_also_tested_on(tiny_study, tmp_path):
    """train_sites alone names a site whose study.json role is test: it would be trained and tested on."""
    cfg = load_study_config(TINY, {"study": str(tiny_study), "arms": ["centralized"], "train_sites": ["tcga", "nyu"]})
    with pytest.raises(ValueError, match=r"\['nyu'\] would be trained and tested on"):
        run_study(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    cfg = load_study_config(TINY, {"study": str(tiny_study), "arms": ["centralized"], "test_sites": ["utsw"]})
    with pytest.raises(ValueError, match=r"\['utsw'\] would be trained and tested on"):
        run_study(cfg, tmp_path / "run", progress=False)


def test_study_help_describes_the_verbs_and_lists_the_arms(capsys):
    for argv in (["study", "run", "--help"], ["study", "show", "--help"], ["study", "report", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert len(text.split("options:")[0].strip().splitlines()) > 3, argv  # usage and a description
    with pytest.raises(SystemExit):
        main(["study", "run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for arm in ("centralized", "local", "fedavg", "catphishing"):
        assert arm in text.split("--arms")[-1], arm


def test_empty_arms_are_refused_and_show_prints_no_nan(tiny_run, tiny_study, tmp_path, capsys):
    out, _ = tiny_run
    assert main(["study", "run", "--config", str(TINY), "--study", str(tiny_study), "--out", str(tmp_path / "x"),
                 "--arms", "", "-q"]) == 2
    assert "--arms '': expected one or more arm names" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["study", "show", str(out)]) == 0
    assert "nan" not in capsys.readouterr().out


def test_the_federation_log_is_readable(tiny_study, tmp_path, capfd):
    """No database-plugin lines, no Ray warning, no raw colour codes; the engine's start-up is announced."""
    import logging

    logging.getLogger().handlers.clear()  # let the CLI set up its own handler on the captured stderr
    assert main(["study", "run", "--config", str(TINY), "--study", str(tiny_study), "--out", str(tmp_path / "run"),
                 "--arms", "fedavg", "-q"]) == 0
    err = capfd.readouterr().err
    assert "alembic" not in err and "FutureWarning" not in err and "\x1b[" not in err, err[-2000:]
    assert "starting Flower's simulation engine" in err


def test_bad_voxels_or_a_truncated_file_are_refused_before_anything_trains(copy_study, tmp_path, capsys):
    """One NaN voxel in a test case gave exit 0 and a null AUC; a truncated training file failed only when loaded.
    Now every array of the run's sites is read first and the study is refused, naming the file."""
    import nibabel as nib

    case = sorted(p for p in (copy_study / "ucsf").iterdir() if p.is_dir())[0]
    img = nib.load(str(case / "t2.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(case / "t2.nii.gz"))
    train_case = sorted(p for p in (copy_study / "egd").iterdir() if p.is_dir())[1]
    raw = (train_case / "flair.nii.gz").read_bytes()
    (train_case / "flair.nii.gz").write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "run"
    assert main(["study", "run", "--config", str(TINY), "--study", str(copy_study), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert str(case / "t2.nii.gz") in err and "NaN" in err
    assert str(train_case / "flair.nii.gz") in err
    assert not out.exists()


def test_segmentation_runs_the_reference_arms_and_reports_dice_and_hd95(tiny_study, tmp_path, capsys):
    """``task = "segmentation"``: centralized, local and FedAvg (on Flower) train the task network on the voxel labels;
    results.json holds Dice and HD95 per region, test site and arm (each the mean of the per-case rows of its
    predictions.csv); the report and ``study show`` print them; an arm that cannot segment is refused first."""
    config = ROOT / "configs" / "study_tiny_segmentation.toml"
    with pytest.raises(ValueError, match="arm catphishing does not run segmentation tasks"):
        run_study(load_study_config(config, {"study": str(tiny_study), "arms": ["centralized", "catphishing"]}),
                  tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "seg"
    assert main(["study", "run", "--config", str(config), "--study", str(tiny_study), "--out", str(out), "-q"]) == 0
    shown = capsys.readouterr().out
    assert "Dice WT" in shown and "HD95 WT" in shown and "nan" not in shown
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "segmentation" and results["task_kind"] == "segmentation"
    assert results["regions"] == {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    sites = results["test_sites"]
    assert set(results["arms"]) == {"centralized", "local", "fedavg"} and len(sites) == 2
    metrics = ("dice_wt", "dice_tc", "dice_et", "dice_mean", "hd95_wt", "hd95_tc", "hd95_et")
    for arm, block in results["arms"].items():
        for site in (*sites, "combined"):
            entry = block["test"][site]
            assert all(0.0 <= entry[m] <= 1.0 for m in metrics if m.startswith("dice")), (arm, site, entry)
            assert all(entry[m] >= 0.0 for m in metrics if m.startswith("hd95")), (arm, site, entry)
        assert block["over_seeds"]["dice_mean"]["n"] == 1
    assert set(results["arms"]["local"]["site_models"]) == {"tcga", "utsw", "egd"}
    assert results["arms"]["fedavg"]["bytes_from_sites"] > 0 and results["arms"]["fedavg"]["rounds"] == 2
    assert "dice_mean_difference_mean" in results["arms"]["fedavg"]["vs_reference_over_seeds"]
    rows = list(__import__("csv").DictReader((out / "centralized" / "predictions.csv").open()))
    nyu = [float(r["dice_wt"]) for r in rows if r["site"] == sites[0]]
    assert len(nyu) == results["arms"]["centralized"]["test"][sites[0]]["n"] == 6
    assert results["arms"]["centralized"]["test"][sites[0]]["dice_wt"] == pytest.approx(np.mean(nyu), abs=1e-6)
    learning = json.loads((out / "centralized" / "model" / "model.json").read_text())["info"]["learning_check"]
    assert set(learning) == {"seg/fold-0", "seg/fold-1"} and "train_dice" in learning["seg/fold-0"]
    assert (out / "figures" / "dice_per_site.png").is_file()
    assert (out / "centralized" / "figures" / "segmentation_overlay.png").is_file()
    assert main(["study", "report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Dice WT" in md and "HD95 WT (mm)" in md and "dice per site" in md
    with pytest.raises(ValueError, match="segmentation run"):
        from synthlearn.evaluate.external import load_run_models

        load_run_models(out)


def test_a_2d_study_runs_segmentation_and_idh_on_its_slices(tiny_study, tiny_study_2d, tmp_path):
    """The tiny phantom's slices2d study (32x32 images): segmentation with centralized, local and FedAvg, and IDH with
    centralized, on 2D networks; a 2D study with a 3D shape, or a 2D study given to catphishing, is refused first."""
    config = ROOT / "configs" / "study_tiny_segmentation.toml"
    two_d = {"study": str(tiny_study_2d), "preprocess": {"shape": [32, 32]}}
    with pytest.raises(ValueError, match=r"takes 3D cases; found 2D cases"):
        run_study(load_study_config(config, {"study": str(tiny_study_2d)}), tmp_path / "3d-shape", progress=False)
    with pytest.raises(ValueError, match="arm catphishing does not run on 2D studies"):
        run_study(load_study_config(TINY, {**two_d, "arms": ["centralized", "catphishing"]}), tmp_path / "cat",
                  progress=False)
    assert not (tmp_path / "3d-shape").exists() and not (tmp_path / "cat").exists()
    results = run_study(load_study_config(config, two_d), tmp_path / "seg2d", progress=False)
    assert set(results["arms"]) == {"centralized", "local", "fedavg"}
    for block in results["arms"].values():
        comb = block["test"]["combined"]
        assert 0.0 <= comb["dice_wt"] <= 1.0 and comb["hd95_wt"] >= 0.0
        assert comb["n"] == sum(block["test"][s]["n"] for s in results["test_sites"])
    model = json.loads((tmp_path / "seg2d" / "centralized" / "model" / "model.json").read_text())
    assert model["setup"]["preprocess"]["shape"] == [32, 32]
    from synthlearn.tasks.model import TaskModel

    net = TaskModel.load(tmp_path / "seg2d" / "centralized" / "model").networks["seg/fold-0"]
    assert net.spatial_dims == 2
    idh = run_study(load_study_config(TINY, {**two_d, "arms": ["centralized"]}), tmp_path / "idh2d", progress=False)
    assert 0.0 <= idh["arms"]["centralized"]["test"]["combined"]["auc"] <= 1.0
    # the 2D model applied to the study again (external validation) and to one case (predict: map and overlay)
    assert main(["evaluate", "--run", str(tmp_path / "idh2d"), "--study", str(tiny_study_2d), "--out",
                 str(tmp_path / "ext"), "-q"]) == 0
    assert json.loads((tmp_path / "ext" / "results.json").read_text())["arms"]["centralized"]["test"]["combined"]["n"]
    case = sorted(p for p in (tiny_study_2d / "nyu").iterdir() if p.is_dir())[0]
    assert main(["predict", "--run", str(tmp_path / "idh2d"), "--arm", "centralized", "--case", str(case), "--out",
                 str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred").glob("*_overlay.png"))) == 1


def test_a_study_of_its_own_sequences_and_label_columns_runs_evaluates_and_predicts(tiny_study, tmp_path):
    """study.json names two sequences (flair, t1) and the label columns response and risk: the task is a column of
    the study, the networks read two channels, evaluate and predict apply them to the study's cases; a built-in task
    whose columns the study lacks and the glioma-only CATphishing arm are refused before anything trains."""
    from tests.data.custom import write_custom_copy

    study = write_custom_copy(tiny_study, tmp_path / "custom")
    with pytest.raises(ValueError, match=r"task 'idh' needs label column idh or tumor_type.*'response', 'risk'"):
        run_study(load_study_config(TINY, {"study": str(study)}), tmp_path / "idh", progress=False)
    with pytest.raises(ValueError, match=r"arm catphishing draws the glioma study's four sequences.*\['flair', 't1'\]"):
        run_study(load_study_config(TINY, {"study": str(study), "task": "response",
                                           "arms": ["centralized", "catphishing"]}), tmp_path / "cat", progress=False)
    with pytest.raises(ValueError, match=r"sequences \['t2'\] of the config; the study has \['flair', 't1'\]"):
        run_study(load_study_config(TINY, {"study": str(study), "task": "response", "sequences": ["t2"]}),
                  tmp_path / "t2", progress=False)
    assert not (tmp_path / "idh").exists() and not (tmp_path / "cat").exists() and not (tmp_path / "t2").exists()
    # a modality ablation: the config's sequences, a subset of the study's
    one = run_study(load_study_config(TINY, {"study": str(study), "task": "risk", "sequences": ["t1"],
                                             "arms": ["centralized"]}), tmp_path / "t1", progress=False)
    assert one["class_names"] == ["low", "high"]
    t1 = json.loads((tmp_path / "t1" / "centralized" / "model" / "model.json").read_text())["setup"]["sequences"]
    assert t1 == ["t1"]
    out = tmp_path / "run"
    results = run_study(load_study_config(TINY, {"study": str(study), "task": "response",
                                                 "arms": ["centralized", "fedavg"]}), out, progress=False)
    assert results["task"] == "response" and results["class_names"] == ["no", "yes"]
    for block in results["arms"].values():
        assert 0.0 <= block["test"]["combined"]["auc"] <= 1.0
    assert json.loads((out / "splits.json").read_text())["sequences"] == ["flair", "t1"]
    model = json.loads((out / "centralized" / "model" / "model.json").read_text())
    assert model["setup"]["sequences"] == ["flair", "t1"] and model["setup"]["label_values"]["risk"] == ["low", "high"]
    from synthlearn.tasks.model import TaskModel

    net = TaskModel.load(out / "centralized" / "model").networks["response/fold-0"]
    assert next(net.parameters()).shape[1] == 2  # the first convolution reads two channels
    assert main(["study", "report", str(out)]) == 0
    # applied to the study again (external validation) and to one case; the original four-sequence study has both
    # channels (read by name, in the model's order)
    assert main(["evaluate", "--run", str(out), "--study", str(study), "--out", str(tmp_path / "ext"), "-q"]) == 0
    from synthlearn.data.layouts import open_study

    ext = json.loads((tmp_path / "ext" / "results.json").read_text())["arms"]["centralized"]["test"]["combined"]
    assert ext["n"] == len(open_study(study).cases)  # every case read and labelled
    case = min(p for p in (tiny_study / "nyu").iterdir() if p.is_dir())
    assert main(["predict", "--run", str(out), "--arm", "centralized", "--case", str(case), "--out",
                 str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred").glob("*_overlay.png"))) == 1


def test_multitask_segments_and_classifies_every_marker_with_unknown_labels_masked(copy_study, tmp_path):
    """Ren et al.'s multi-task model under centralized and FedAvg (local trains as centralized does): results.json holds Dice / HD95 per region
    and, per head (IDH, 1p/19q, MGMT, grade), the classification metrics per test site with seed summaries; MGMT
    unknown for half the training cases trains the other heads on every case; the Mamba option is refused."""
    import csv

    for site in ("tcga", "utsw", "egd"):
        path = copy_study / site / "labels.csv"
        rows = list(csv.DictReader(path.open()))
        for i, r in enumerate(rows):
            if i % 2:
                r["mgmt"] = ""
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    config = ROOT / "configs" / "study_tiny_multitask.toml"
    with pytest.raises(ValueError, match="mamba = false"):
        run_study(load_study_config(config, {"study": str(copy_study), "model": {"mamba": True}}), tmp_path / "m",
                  progress=False)
    out = tmp_path / "run"
    results = run_study(load_study_config(config, {"study": str(copy_study), "seeds": [0, 1],
                                                   "arms": ["centralized", "fedavg"]}), out, progress=False)
    assert results["task_kind"] == "multitask"
    assert results["heads"] == {"idh": ["wildtype", "mutant"], "codeletion_1p19q": ["intact", "codeleted"],
                                "mgmt": ["unmethylated", "methylated"], "grade": ["2", "3", "4"]}
    for arm, block in results["arms"].items():
        assert 0.0 <= block["test"]["combined"]["dice_wt"] <= 1.0, arm
        assert set(block["heads"]) == set(results["heads"])
        for head, hb in block["heads"].items():
            comb = hb["test"]["combined"]
            assert comb["n"] == block["test"]["combined"]["n"] and 0.0 <= comb["acc"] <= 1.0, (arm, head)
            assert hb["over_seeds"]["n_seeds"] == 2 and set(hb["per_seed"]) == {"0", "1"}
        assert (out / arm / "predictions-grade.csv").is_file() and (out / arm / "figures" / "gradcam.png").is_file()
    assert "mcnemar_p_vs_centralized" in results["arms"]["fedavg"]["heads"]["idh"]  # paired with centralized's head
    from synthlearn.models.multitask import MultiTaskUNet
    from synthlearn.tasks.model import TaskModel

    model = TaskModel.load(out / "centralized" / "model")
    assert isinstance(model.networks["multitask/fold-0"], MultiTaskUNet)
    check = model.info["learning_check"]["multitask/fold-0"]
    assert check["heads"]["mgmt"]["n_known"] < check["heads"]["idh"]["n_known"]  # unknown MGMT left out, not guessed
    assert main(["study", "report", str(out)]) == 0
    assert "mgmt" in (out / "report.md").read_text()


def test_fedkd_sends_compressed_samples_and_soft_labels_never_an_image_or_weights(tiny_study, tmp_path):
    """The fedkd arm over Flower on the tiny phantom with the paper's network widths: its results sit beside FedAvg's
    in the multi-task table, the bytes from sites are the compressed sets' (below FedAvg's weights of the same model),
    and the server's history names the compressed samples of every site."""
    config = ROOT / "configs" / "study_tiny_multitask.toml"
    out = tmp_path / "run"
    paper_widths = {"channels": [16, 32, 64, 128], "norm_num_groups": 8}  # Ren et al.'s network, 1.4 M weights
    results = run_study(load_study_config(config, {"study": str(tiny_study), "arms": ["fedavg", "fedkd"],
                                                   "model": paper_widths, "fedavg": {"backend": "inprocess"},
                                                   "n_folds": 1}),
                        out, progress=False)
    kd, avg = results["arms"]["fedkd"], results["arms"]["fedavg"]
    assert kd["rounds"] == 2 and 0.0 <= kd["test"]["combined"]["dice_wt"] <= 1.0
    assert set(kd["heads"]) == {"idh", "codeletion_1p19q", "mgmt", "grade"}
    assert 0 < kd["bytes_from_sites"] < avg["bytes_from_sites"]
    model = json.loads((out / "fedkd" / "model" / "model.json").read_text())
    compressed = model["info"]["history"][0]["compressed"]
    assert set(compressed) == {"tcga", "utsw", "egd"}
    assert all(n == 2 for site in compressed.values() for n in site.values())  # 1 per IDH class (one network)


def test_asyndgan_and_its_pooled_baseline_run_on_2d_slices_and_on_3d_idh(tiny_study, tiny_study_2d, tmp_path):
    """AsynDGAN over Flower on the tiny 2D slices (segmentation) beside its pooled Syn-All baseline, and in process on
    the 3D volumes for IDH (the generator conditioned on the label values it labels its cases with): results, bytes,
    the mask disclosure, figures, synthetic sets that pass verify-data, and the audits of them (2D privacy audit per
    site, the pooled baseline's one audit, fidelity) in the report."""
    config = ROOT / "configs" / "study_tiny_segmentation.toml"
    small = {"iterations": 3, "generator_features": 8, "generator_blocks": 1, "generator_edge_kernel": 3,
             "discriminator_features": 8, "checkpoint_every": 2, "audit_holdout": 0.5, "fidelity_n": 4}
    out = tmp_path / "seg2d"
    results = run_study(load_study_config(config, {
        "study": str(tiny_study_2d), "preprocess": {"shape": [32, 32]}, "n_folds": 1,
        "arms": ["asyndgan_pooled", "asyndgan"], "asyndgan": small}), out, progress=False)
    gan, pooled = results["arms"]["asyndgan"], results["arms"]["asyndgan_pooled"]
    assert gan["rounds"] == 4 and gan["backend"] == "flower" and gan["discriminators"] == ["tcga", "utsw", "egd"]
    assert pooled["bytes_from_sites"] == 0 and pooled["discriminators"] == ["pooled"]
    masks = sum(gan["disclosure"]["mask_payload_bytes"].values())
    assert gan["bytes_from_sites"] > masks + 3 * 3 * 2 * 4 * 32 * 32 * 4  # the masks, then 3 steps x 3 gradients
    assert gan["synthetic_cases"] == 9 and "masks" in gan["disclosure"]["what"]  # 3 of 6 cases per site held out
    assert pooled["synthetic_cases"] == 9 and pooled["holdout_cases"] == {"pooled": 9}  # the same cases held out
    for site in ("tcga", "utsw", "egd"):
        audit = gan["privacy"][site]
        assert audit["n_train"] == audit["n_holdout"] == audit["n_synthetic"] == 3 and "2D SSIM" in audit["method"]
        assert audit["shape"] == [4, 32, 32, 1] and set(audit["reference_control"]["by_generator"]) == {
            "tcga", "utsw", "egd"} - {site}
    assert set(pooled["privacy"]) == {"pooled"} and "reference_control" not in pooled["privacy"]["pooled"]
    assert pooled["privacy"]["pooled"]["n_train"] == pooled["privacy"]["pooled"]["n_holdout"] == 9
    assert gan["fidelity"]["sequences"] == ["t1", "t1c", "t2", "flair"]
    assert gan["fidelity"]["real_sites"] == ["tcga", "utsw", "egd"]
    from synthlearn.report.html import write_report

    md = write_report(out)[1].read_text()
    assert "Privacy audit (asyndgan)" in md and "Privacy audit (asyndgan_pooled)" in md and "Fidelity (asyndgan)" in md
    assert 0.0 <= gan["test"]["combined"]["dice_wt"] <= 1.0 and 0.0 <= gan["test"]["combined"]["spe_wt"] <= 1.0
    for name in ("asyndgan_losses.png", "asyndgan_samples.png"):
        assert (out / "asyndgan" / "figures" / name).is_file()
    assert main(["verify-data", str(out / "asyndgan" / "synthetic"), "-q"]) == 0
    idh = run_study(load_study_config(TINY, {"study": str(tiny_study), "arms": ["asyndgan"], "n_folds": 1,
                                             "model": {"mamba": False},
                                             "asyndgan": {**small, "backend": "inprocess"}}),
                    tmp_path / "idh3d", progress=False)
    assert 0.0 <= idh["arms"]["asyndgan"]["test"]["combined"]["auc"] <= 1.0
    labels = (tmp_path / "idh3d" / "asyndgan" / "synthetic" / "synthetic" / "labels.csv").read_text()
    assert "wildtype" in labels and "mutant" in labels
