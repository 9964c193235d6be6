import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from synthlearn.report.html import write_report


def _results():
    block = {"acc": 0.8, "sen": 0.75, "spe": 0.85, "auc": 0.9, "auc_ci": [0.82, 0.96]}
    return {
        "task": "idh",
        "arms": {
            "local:tcga": {"test": {"nyu": block, "combined": {**block, "auc": 0.7}},
                           "mcnemar_p_vs_centralized": 0.01, "bytes_from_sites": 0, "rounds": 0, "wall_s": 3.0},
            "centralized": {"test": {"nyu": block, "combined": block}, "mcnemar_p_vs_centralized": None,
                            "bytes_from_sites": 123456789, "rounds": 0, "wall_s": 10.0},
            "catphishing": {"test": {"nyu": block, "combined": block}, "mcnemar_p_vs_centralized": 1.0,
                            "bytes_from_sites": 5_000_000, "rounds": 1, "wall_s": 200.0,
                            "privacy": {"tcga": {"auc": 0.51, "negative_control_auc": 0.49,
                                                 "positive_control_auc": 0.98}}},
        },
    }


def test_report_has_tables_and_embedded_figures(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    (tmp_path / "figures").mkdir()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "figures" / "roc_combined.png")
    plt.close(fig)
    html_path, md_path = write_report(tmp_path)
    md = md_path.read_text()
    page = html_path.read_text()
    assert "| centralized | 0.800 | 0.750 | 0.850 | 0.900 [0.820, 0.960] | – | 117.7 MB |" in md
    # arms in a fixed order: centralized before catphishing before local
    assert md.index("| centralized") < md.index("| catphishing") < md.index("| local:tcga")
    assert "data:image/png;base64," in page and "figures / roc combined" in page
    assert "Privacy audit (catphishing)" in md and "0.980" in md
    assert "src=\"figures" not in page  # self-contained


def test_report_refuses_missing_or_bad_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="study run"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object"):
        write_report(tmp_path)


def test_privacy_table_flags_a_membership_attack_above_chance(tmp_path):
    def site(auc, lo, hi):
        return {"n_train": 37, "n_holdout": 11, "n_synthetic": 64,
                "membership": {"auc": auc, "ci_low": lo, "ci_high": hi, "tpr_at_1pct_fpr": 0.0,
                               "above_chance": lo > 0.5, "underpowered": True},
                "negative_control": {"auc": 0.5, "ci_low": 0.3, "ci_high": 0.7}, "negative_control_ok": True,
                "positive_control": {"auc": 1.0, "ci_low": 1.0, "ci_high": 1.0}, "positive_control_caught": True,
                "copy_rate": {"rate": 0.0}}

    results = _results()
    results["arms"]["catphishing"]["privacy"] = {"tcga": site(0.45, 0.30, 0.60), "egd": site(0.74, 0.58, 0.90)}
    results["arms"]["catphishing"]["privacy"]["egd"]["reference_control"] = {
        "by_generator": {"tcga": {"auc": 0.644}, "utsw": {"auc": 0.57}}, "auc_mean": 0.607, "excess_auc": 0.133,
        "excess_ci_low": -0.02, "excess_ci_high": 0.3, "excess_above_zero": False}
    results["arms"]["catphishing"]["generators"] = {"tcga": {"bytes": 5_000_000, "training_cases": 37},
                                                    "egd": {"bytes": 5_000_000, "training_cases": 37}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    md = write_report(tmp_path)[1].read_text()
    privacy = md[md.index("Privacy audit (catphishing)"):].splitlines()
    egd = next(line for line in privacy if line.startswith("| egd |"))
    tcga = next(line for line in privacy if line.startswith("| tcga |"))
    assert "0.740 [0.580, 0.900] (ABOVE chance" in egd
    assert "ABOVE" not in tcga and "0.450 [0.300, 0.600] |" in tcga
    assert "| 0.607 (tcga 0.644, utsw 0.570); excess 0.133 [-0.020, 0.300] |" in egd and "| not run |" in tcga


def test_an_arm_without_generators_shows_its_privacy_audit_as_a_table(tmp_path):
    """fedkd's audit of its compressed samples has catphishing's per-site shape: the same table, its own controls."""
    audited = {"n_train": 39, "n_holdout": 9, "n_synthetic": 32, "ssim_region": "grid",
               "membership": {"auc": 0.52, "ci_low": 0.31, "ci_high": 0.72, "tpr_at_1pct_fpr": 0.0,
                              "above_chance": False, "underpowered": True},
               "negative_control": {"auc": 0.5, "ci_low": 0.3, "ci_high": 0.7}, "negative_control_ok": True,
               "positive_control": {"auc": 1.0, "ci_low": 1.0, "ci_high": 1.0}, "positive_control_caught": True,
               "positive_control_generator": {"auc": 0.97, "ci_low": 0.9, "ci_high": 1.0,
                                              "memorised_case_ids": ["tcga/a", "tcga/b"]},
               "positive_control_generator_caught": True, "copy_rate": {"rate": 0.0}}
    results = _results()
    results["arms"]["fedkd"] = {"test": {"combined": results["arms"]["centralized"]["test"]["combined"]},
                                "bytes_from_sites": 1000, "rounds": 4, "wall_s": 5.0,
                                "privacy": {"tcga": audited, "egd": {"skipped": "needs >= 2 held-out cases"}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    md = write_report(tmp_path)[1].read_text()
    section = md[md.index("Privacy audit (fedkd)"):].splitlines()
    assert any("positive control (compression started from members)" in line for line in section)
    tcga = next(line for line in section if line.startswith("| tcga |"))
    assert "| 39 / 9 / 32 | 0.520 [0.310, 0.720] |" in tcga and "0.970 [0.900, 1.000] (caught; 2 cases)" in tcga
    assert any(line.startswith("| egd | skipped: needs >= 2 held-out cases") for line in section)
    assert "Privacy audit: " not in md  # not also flattened into the generic tables


def test_asyndgan_audits_get_their_own_privacy_labels_own_mask_table_and_fidelity_section(tmp_path):
    """asyndgan's audit of its generated images: the shared privacy table with its own reference control and note,
    the own-mask similarity beside it, and its fidelity block as the Frechet tables (not flattened)."""
    audited = {"n_train": 6, "n_holdout": 3, "n_synthetic": 6,
               "membership": {"auc": 0.9, "ci_low": 0.7, "ci_high": 1.0, "tpr_at_1pct_fpr": 0.5,
                              "above_chance": True, "underpowered": True},
               "negative_control": {"auc": 0.5, "ci_low": 0.2, "ci_high": 0.8}, "negative_control_ok": True,
               "positive_control": {"auc": 1.0, "ci_low": 1.0, "ci_high": 1.0}, "positive_control_caught": True,
               "copy_rate": {"rate": 0.5},
               "own_mask": {"n": 6, "ssim_median": 0.81, "ssim_min": 0.7, "ssim_max": 0.9,
                            "below_copy_threshold": 0.5}}
    fid = {"extractor": {"name": "radiomics"}, "sequences": ["t2"], "real_sites": ["tcga"],
           "synthetic_sites": ["tcga"], "n_real": {"tcga": 6}, "n_synthetic": {"tcga": 6}, "matrix": {"t2": [[12.5]]},
           "same_site": {"tcga": {"t2": 12.5}}}
    results = _results()
    results["arms"]["asyndgan"] = {"test": {"combined": results["arms"]["centralized"]["test"]["combined"]},
                                   "bytes_from_sites": 1000, "rounds": 4, "wall_s": 5.0, "synthetic_cases": 6,
                                   "privacy": {"tcga": audited}, "fidelity": fid}
    (tmp_path / "results.json").write_text(json.dumps(results))
    md = write_report(tmp_path)[1].read_text()
    section = md[md.index("Privacy audit (asyndgan)"):]
    assert "reference control: AUC against images drawn for other sites' masks" in section
    assert "own mask" in section and "| tcga | 6 | 0.810 [0.700, 0.900] | 0.500 |" in section
    assert "compression" not in section.split("Generated images vs")[0]
    assert md.count("Fidelity (asyndgan)") == 1 and "| tcga | 12.5 |" in md  # not also flattened
