"""ROC and confusion-matrix PNGs."""

import numpy as np
import pytest

from synthlearn.report.plots import plot_confusion_matrices, plot_roc_curves


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 30)
    p1 = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.3, 30), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    roc = plot_roc_curves({"a": (y, probs), "b": (y, probs[::-1])}, tmp_path / "roc.png",
                          aucs={"a": (0.9, [0.8, 1.0])})
    cm = plot_confusion_matrices({"a": np.array([[3, 1], [0, 4]])}, ["wildtype", "mutant"], tmp_path / "cm.png")
    for path in (roc, cm):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    y3 = rng.integers(0, 3, 30)
    assert plot_roc_curves({"a": (y3, rng.dirichlet([1, 1, 1], 30))}, tmp_path / "roc3.png", positive=None).is_file()
    with pytest.raises(ValueError, match="confusion matrix"):
        plot_confusion_matrices({"a": np.eye(3)}, ["x", "y"], tmp_path / "bad.png")
