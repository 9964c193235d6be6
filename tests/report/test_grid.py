import numpy as np

from synthlearn.cli import main
from synthlearn.data.io import read_case
from synthlearn.data.layouts import open_study
from synthlearn.report.grid import case_title, largest_tumour_slice, pick_cases, show_study


def test_largest_tumour_slice_finds_the_peak():
    seg = np.zeros((8, 8, 10), np.int64)
    seg[2:4, 2:4, 3] = 1
    seg[1:6, 1:6, 7] = 2
    assert largest_tumour_slice(seg, np.ones((4, 8, 8, 10))) == 7


def test_pick_cases_covers_every_site(tiny_study):
    study = open_study(tiny_study)
    picked = pick_cases(study.cases, len(study.sites))
    assert {c.site for c in picked} == {s.name for s in study.sites}


def test_show_writes_png_with_one_row_per_case(tiny_study, tmp_path):
    out = show_study(tiny_study, tmp_path / "grid.png", max_cases=3)
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not blank


def test_show_cli_and_unknown_site(tiny_study, tmp_path, capsys):
    assert main(["show", str(tiny_study), "--out", str(tmp_path / "a.png"), "--max-cases", "2"]) == 0
    assert (tmp_path / "a.png").is_file()
    assert main(["show", str(tiny_study), "--out", str(tmp_path / "b.png"), "--sites", "nowhere"]) == 2
    assert "no cases" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_case_title_lists_known_labels(tiny_study):
    case = open_study(tiny_study).cases[0]
    title = case_title(case)
    assert case.case_id in title and case.labels.tumor_type in title
    assert read_case(case).seg is not None


def test_pick_cases_alternates_tumour_types(tiny_study):
    site = open_study(tiny_study).sites[0]
    types = {c.labels.tumor_type for c in site.cases}
    picked = pick_cases(site.cases, len(types))
    assert {c.labels.tumor_type for c in picked} == types
