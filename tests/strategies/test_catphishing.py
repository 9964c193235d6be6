"""The catphishing arm on the tiny phantom, run through ``synthlearn demo``: every site trains its own
generator on its own cases (minus a privacy holdout), the server synthesizes, filters and trains the task
model; results.json carries the arm with its fidelity, image-quality and privacy blocks; the report shows them."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from synthlearn.cli import main
from synthlearn.data.layouts import open_study
from synthlearn.strategies.catphishing import (
    CatphishingConfig,
    control_cases,
    load_generator_for_task,
    pair_by_class,
    privacy_holdout,
    recognition_audit,
)
from synthlearn.study import load_study_config, run_study
from synthlearn.generators.artifact import verify_artifact
from synthlearn.tasks import get_task

ROOT = Path(__file__).resolve().parents[2]
DEMO_TINY = ROOT / "configs" / "demo_tiny.toml"


@pytest.fixture(scope="module")
def demo_run(tiny_run, tiny_study, tmp_path_factory):
    """The tiny study run (centralized, local, fedavg) copied, then ``synthlearn demo`` on it: the complete
    arms are kept and only catphishing trains."""
    out = tmp_path_factory.mktemp("demo") / "run"
    shutil.copytree(tiny_run[0], out)
    t0 = time.perf_counter()
    rc = main(["demo", "--config", str(DEMO_TINY), "--study", str(tiny_study), "--out", str(out), "-q"])
    assert rc == 0
    return out, time.perf_counter() - t0


def test_results_carry_the_arm_and_its_audits(demo_run):
    out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"centralized", "local", "fedavg", "catphishing"}
    arm = results["arms"]["catphishing"]
    assert set(arm["test"]) == {"nyu", "ucsf", "combined"}
    assert 0.0 <= arm["test"]["combined"]["auc"] <= 1.0
    assert arm["mcnemar_p_vs_centralized"] is not None and 0.0 <= arm["mcnemar_p_vs_centralized"] <= 1.0
    assert arm["rounds"] == 1
    sites = ["tcga", "utsw", "egd"]
    # fidelity: per-sequence cross-site matrix (synthetic rows x real columns) and the same-site diagonal
    fid = arm["fidelity"]
    assert fid["real_sites"] == sites and fid["synthetic_sites"] == sites
    for seq in ("t1", "t1c", "t2", "flair"):
        m = np.asarray(fid["matrix"][seq])
        assert m.shape == (3, 3) and np.isfinite(m).all() and (m >= 0).all()
        assert fid["same_site"]["egd"][seq] == pytest.approx(m[2, 2])
    for metric in ("brisque", "piqe"):
        assert set(arm["image_quality"][metric]) == set(sites)
    # privacy: every site audited, both controls reported
    for site in sites:
        p = arm["privacy"][site]
        assert p["n_train"] >= 2 and p["n_holdout"] >= 2, p
        assert 0.0 <= p["membership"]["auc"] <= 1.0
        assert isinstance(p["negative_control_ok"], bool) and isinstance(p["positive_control_caught"], bool)
        assert p["positive_control_caught"], "noisy copies of training cases must be caught"
        assert (out / p["montage"]).is_file()
        # the reference control: the same split attacked with the other sites' samples
        ref = p["reference_control"]
        assert set(ref["by_generator"]) == set(sites) - {site}
        assert ref["excess_auc"] == pytest.approx(p["membership"]["auc"] - ref["auc_mean"])
        # the generator positive control ran at the site: its artifact is a verified one, its memorised cases members
        gen = p["positive_control_generator"]
        assert isinstance(p["positive_control_generator_caught"], bool) and 0.0 <= gen["auc"] <= 1.0
        assert gen["n_samples"] >= 1 and gen["n_nonmembers"] == p["n_holdout"]
        holdout = json.loads((out / "catphishing" / "holdout" / f"{site}.json").read_text())
        assert len(gen["memorised_case_ids"]) == 2
        assert {i.split("/")[-1] for i in gen["memorised_case_ids"]} <= set(holdout["members"])
        control = verify_artifact(out / "catphishing" / "privacy_control" / site / "artifact")
        assert control["positive_control"]["memorised_cases"] == 2
    assert arm["stage_wall_s"]["privacy_controls"] > 0
    for name in ("fid_matrix.png", "synthetic_vs_real.png"):
        assert (out / "catphishing" / "figures" / name).is_file()
    # recognition: the centralized model (run before) classifies every kept synthetic case
    rec = arm["recognition"]
    assert rec["reference"] == "centralized" and rec["chance"] == 0.5
    assert rec["n"] == sum(arm["synthetic"][s]["kept"] for s in sites)
    assert set(rec["per_site"]) == set(sites) and sum(v["n"] for v in rec["per_site"].values()) == rec["n"]
    assert 0.0 <= rec["balanced"] <= 1.0 and set(rec["per_class"]) == {"wildtype", "mutant"}


def test_the_synthetic_task_model_trains_its_own_epochs(demo_run):
    out, _ = demo_run
    setup = json.loads((out / "catphishing" / "model" / "model.json").read_text())["setup"]
    reference = json.loads((out / "centralized" / "model" / "model.json").read_text())["setup"]
    assert setup["train"]["epochs"] == 2 and reference["train"]["epochs"] == 1  # catphishing.task_epochs
    # catphishing.task_augment_intensity
    assert setup["train"]["augment_intensity"] == 0.3 and reference["train"]["augment_intensity"] == 0.0
    own = ("epochs", "augment_intensity")
    assert {k: v for k, v in setup["train"].items() if k not in own} == {
        k: v for k, v in reference["train"].items() if k not in own}
    with pytest.raises(ValueError, match="task_epochs"):
        CatphishingConfig(task_epochs=0)


def test_bytes_are_the_artifacts_and_sites_train_on_their_own_members(demo_run, tiny_study):
    out, _ = demo_run
    arm = json.loads((out / "results.json").read_text())["arms"]["catphishing"]
    artifacts = out / "catphishing" / "artifacts"
    on_disk = sum(p.stat().st_size for p in artifacts.rglob("*") if p.is_file())
    assert arm["bytes_from_sites"] == on_disk > 0
    study = open_study(tiny_study)
    for site in study.sites_with_role("train"):
        split = json.loads((out / "catphishing" / "holdout" / f"{site.name}.json").read_text())
        members, holdout = set(split["members"]), set(split["holdout"])
        assert members.isdisjoint(holdout) and members | holdout == {c.case_id for c in site.cases}
        manifest = json.loads((artifacts / site.name / "manifest.json").read_text())
        assert manifest["data_fingerprint"]["n_cases"] == len(members)
        assert sum(manifest["class_counts"].values()) == len(members)
        assert not any(cid in json.dumps(manifest) for cid in members | holdout), "no case id leaves a site"
        assert arm["generators"][site.name]["training_cases"] == len(members)


def test_synthetic_sites_pass_verify_and_the_filter_keeps_a_subset(demo_run):
    out, _ = demo_run
    arm = json.loads((out / "results.json").read_text())["arms"]["catphishing"]
    for site, entry in arm["synthetic"].items():
        folder = out / "catphishing" / "synthetic" / site
        assert main(["verify-data", str(folder)]) == 0
        assert 0 < entry["kept"] <= entry["generated"] == 8  # per_class 4 x 2 classes
        kept = json.loads((folder / "diversity.json").read_text())["kept_case_ids"]
        assert len(kept) == entry["kept"]
    model = json.loads((out / "catphishing" / "model" / "model.json").read_text())
    assert model["info"]["synthetic_training_cases"] == sum(e["kept"] for e in arm["synthetic"].values())


def test_report_shows_the_arm(demo_run, capsys):
    out, _ = demo_run
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for text in ("| catphishing", "What each site shipped", "Privacy audit", "negative control", "BRISQUE",
                 "Cross-site Frechet distance", "Class recognition of the synthetic cases", "recognised (balanced)"):
        assert text in md, text
    assert page.count("data:image/png;base64,") >= 5  # ROC, confusion, FID matrix, grid, montages, loss curves


def test_rerun_resumes_without_training(demo_run, tiny_study):
    out, first = demo_run
    stamp = (out / "catphishing" / "arm.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert main(["demo", "--config", str(DEMO_TINY), "--study", str(tiny_study), "--out", str(out), "-q"]) == 0
    assert time.perf_counter() - t0 < max(30.0, first / 2)
    assert (out / "catphishing" / "arm.json").stat().st_mtime_ns == stamp


def test_privacy_holdout_is_stratified_disjoint_and_reproducible(tiny_study):
    site = open_study(tiny_study).site("tcga")
    members, holdout = privacy_holdout(site, 0.5, "idh", seed=0)
    assert set(members).isdisjoint(holdout) and len(members) + len(holdout) == len(site.cases)
    by_id = {c.case_id: c.labels.idh for c in site.cases}
    for cls in {"wildtype", "mutant"}:
        n = sum(v == cls for v in by_id.values())
        assert sum(by_id[i] == cls for i in holdout) == n // 2
    assert privacy_holdout(site, 0.5, "idh", seed=0) == (members, holdout)
    assert privacy_holdout(site, 0.0, "idh", seed=0) == (sorted(by_id), [])


def test_generator_control_memorises_members_of_every_class(tiny_study):
    site = open_study(tiny_study).site("tcga")
    members, _ = privacy_holdout(site, 0.5, "idh", seed=0)
    chosen = control_cases(members, site, "idh", 2, seed=0)
    assert len(chosen) == 2 and set(chosen) <= set(members)
    assert {c.labels.idh for c in site.cases if c.case_id in chosen} == {"wildtype", "mutant"}
    assert control_cases(members, site, "idh", 2, seed=0) == chosen
    assert control_cases(members, site, "idh", 100, seed=0) == sorted(members)  # capped at the members


def test_a_failing_generator_control_is_reported_not_fatal(tmp_path, tiny_study):
    from synthlearn.strategies.catphishing import _control_worker

    out = _control_worker(str(tmp_path / "no-artifact"), str(tiny_study / "tcga"), ["x"], str(tmp_path / "control"),
                          2, 0, 1, 0, None, None, 1)
    assert "no-artifact" in out["error"] and not (tmp_path / "control" / "synthetic").exists()


def test_config_checks_and_generator_label_follows_the_task(tmp_path, tiny_study):
    with pytest.raises(ValueError, match="per_class"):
        CatphishingConfig(per_class=0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        CatphishingConfig(holdout_fraction=1.0)
    with pytest.raises(ValueError, match="fidelity_weights"):
        CatphishingConfig(fidelity_extractor="torch")
    with pytest.raises(ValueError, match="task_augment_noise"):  # refused at load, not after the generators
        CatphishingConfig(task_augment_noise=-0.5)
    with pytest.raises(ValueError, match="task_augment_intensity"):
        CatphishingConfig(task_augment_intensity=2.0)
    with pytest.raises(ValueError, match="privacy_control_steps"):
        CatphishingConfig(privacy_control_steps=0)
    assert load_generator_for_task("configs/generator_tiny.toml", "tumor_type").label == "tumor_type"
    assert load_generator_for_task(ROOT / "configs" / "generator_tiny.toml", "idh").label == "idh"
    # a missing generator config fails before any arm trains, and nothing is written
    cfg = load_study_config(DEMO_TINY, {"study": str(tiny_study),
                                        "catphishing": {"generator": str(tmp_path / "nosuch.toml")}})
    with pytest.raises(FileNotFoundError, match="nosuch.toml"):
        run_study(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_tumour_type_with_site_overrides(tiny_study, tmp_path):
    """The two-stage tumour-type task: generators conditioned on the three types, the task model's IDH and
    subtype stages trained on synthetic cases; train/test sites chosen by the config, not study.json."""
    cfg = load_study_config(DEMO_TINY, {
        "study": str(tiny_study), "task": "tumor_type", "arms": ["catphishing"],
        "train_sites": ["tcga", "utsw", "nyu"], "test_sites": ["egd", "ucsf"],
        "catphishing": {"generator": "configs/generator_tiny.toml", "per_class": 3, "holdout_fraction": 0.0,
                        "audit": False, "parallel_sites": 2}})
    results = run_study(cfg, tmp_path / "run", progress=False)
    arm = results["arms"]["catphishing"]
    assert results["test_sites"] == ["egd", "ucsf"] and set(arm["generators"]) == {"tcga", "utsw", "nyu"}
    manifest = json.loads((tmp_path / "run" / "catphishing" / "artifacts" / "nyu" / "manifest.json").read_text())
    assert manifest["label"] == "tumor_type"
    assert manifest["class_names"] == ["glioblastoma", "astrocytoma", "oligodendroglioma"]
    assert 0.0 <= arm["test"]["combined"]["acc"] <= 1.0 and len(arm["test"]["combined"]["confusion_matrix"]) == 3
    model = json.loads((tmp_path / "run" / "catphishing" / "model" / "model.json").read_text())
    assert set(model["stages"]) == {"idh", "subtype"}
    with pytest.raises(ValueError, match="not in the study"):
        run_study(load_study_config(DEMO_TINY, {"study": str(tiny_study), "train_sites": ["nowhere"]}),
                  tmp_path / "x", progress=False)


class _FixedModel:
    """A task model stand-in that returns given probabilities (recognition_audit needs .task and .predict_cases)."""

    def __init__(self, probs):
        self.task = get_task("idh")
        self.probs = np.asarray(probs, dtype=float)

    def predict_cases(self, cases, progress=False):
        assert len(cases) == len(self.probs)
        return self.probs


def test_recognition_audit_counts_cases_predicted_as_their_conditioned_class(tiny_study):
    cases = list(open_study(tiny_study).site("tcga").cases)[:6]
    y = [get_task("idh").label(c.labels) for c in cases]
    assert 0 in y and 1 in y
    right = np.eye(2)[y] * 0.8 + 0.1  # the conditioned class gets 0.9
    rec = recognition_audit(_FixedModel(right), {"a": cases[:3], "b": cases[3:]})
    assert rec["balanced"] == 1.0 and rec["auc"] == 1.0 and rec["n"] == 6
    assert {s: v["n"] for s, v in rec["per_site"].items()} == {"a": 3, "b": 3}
    wrong = recognition_audit(_FixedModel(1.0 - right), {"a": cases})
    assert wrong["balanced"] == 0.0 and wrong["auc"] == 0.0
    # all predicted wildtype: wildtype cases recognised, mutant ones not: balanced 0.5, the chance level
    flat = recognition_audit(_FixedModel(np.tile([0.7, 0.3], (6, 1))), {"a": cases})
    assert flat["per_class"] == {"wildtype": 1.0, "mutant": 0.0} and flat["balanced"] == 0.5
    with pytest.raises(ValueError, match="no synthetic case"):
        recognition_audit(_FixedModel(right), {"a": []})


def test_synthetic_vs_real_pairs_show_each_class_with_its_own_class(tiny_study):
    cases = list(open_study(tiny_study).site("tcga").cases)
    wild = [c for c in cases if c.labels.get("idh") == "wildtype"]
    mut = [c for c in cases if c.labels.get("idh") == "mutant"]
    assert wild and mut
    # synthetic cases come class by class (all wildtype first), the grid must still show both classes
    pairs = pair_by_class(cases, wild + mut, "idh", 2)
    assert [(a.labels.get("idh"), b.labels.get("idh")) for a, b in pairs] == [("wildtype", "wildtype"),
                                                                           ("mutant", "mutant")]
    assert pair_by_class(cases, wild, "idh", 3) == list(zip(wild, wild))[:3]  # one class only: that class
    assert pair_by_class(mut, wild, "idh", 2) == []  # no class in common: no pair


def _fake_site_training(n_epochs, site="", epochs_done=None):
    """Stands in for _site_worker: reports each epoch of two stages, as train_generator's hook does."""
    for stage in ("autoencoder", "diffusion"):
        for k in range(n_epochs):
            epochs_done.put((site, stage, k + 1, n_epochs))
    return site


def test_site_generators_report_per_site_epoch_progress(capsys):
    """The bar of the site generators moves with every epoch of every site (it showed 0/3 sites for 20 minutes)."""
    from synthlearn.strategies.catphishing import CatphishingConfig, _run_jobs

    out = _run_jobs({"tcga": (3,), "utsw": (3,)}, _fake_site_training, CatphishingConfig(parallel_sites=2),
                    "site generators", progress=True, epochs_per_job=6)
    assert out == {"tcga": "tcga", "utsw": "utsw"}
    err = capsys.readouterr().err
    assert "12/12" in err and "epoch" in err, err[-500:]
    assert "diffusion 3/3" in err or "done" in err


def test_the_release_gate_stops_the_arm_until_a_reason_is_recorded(tiny_study, tmp_path):
    """The folder transport with the gate on and set to refuse (every member below the held-out mean loss counts
    as exposed): the study stops with the site and the failed check named, no artifact carries a decision; with
    ``release_gate_override`` the arm runs and every manifest and results.json record the override."""
    from synthlearn.generators.ldm.release_gate import ReleaseRefused

    gate = {"n_per_class": 2, "steps": 2, "loss_timesteps": 2, "loss_noises": 1, "n_bootstrap": 50,
            "outlier_z": 1e-9}
    over = {"study": str(tiny_study), "arms": ["catphishing"], "train_sites": ["tcga", "utsw"],
            "test_sites": ["nyu"], "catphishing": {"per_class": 2, "audit": False, "release_gate": True,
                                                   "gate": gate, "task_epochs": 1}}
    with pytest.raises(ReleaseRefused, match=r"catphishing: site \w+: .*exposed_members"):
        run_study(load_study_config(DEMO_TINY, over), tmp_path / "refused", progress=False)
    for manifest in (tmp_path / "refused" / "catphishing" / "artifacts").glob("*/manifest.json"):
        assert "release_gate" not in json.loads(manifest.read_text())
    over["catphishing"]["release_gate_override"] = "tiny phantom, no patient"
    # the same run folder: the unfinished arm resumes with its generators and gates them again
    results = run_study(load_study_config(DEMO_TINY, over), tmp_path / "refused", progress=False)
    for site, entry in results["arms"]["catphishing"]["generators"].items():
        assert entry["release_gate"]["overridden"] and "exposed_members" in entry["release_gate"]["failed"]
        assert entry["release_gate"]["override_reason"] == "tiny phantom, no patient"
        assert entry["privacy"] == {"dp_sgd": False}
        manifest = verify_artifact(tmp_path / "refused" / "catphishing" / "artifacts" / site)
        assert manifest["release_gate"]["override_reason"] == "tiny phantom, no patient"
        assert (tmp_path / "refused" / "catphishing" / "release_gate" / site / "release_gate.json").is_file()
    assert main(["study", "report", str(tmp_path / "refused")]) == 0
    html = (tmp_path / "refused" / "report.html").read_text()
    assert "Release gate at each site" in html and "tiny phantom, no patient" in html
