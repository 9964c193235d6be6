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
