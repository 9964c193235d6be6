"""FedGAN's sweep (paper 002): its realism measure, its trends and table, and the sweep end to end on tiny
federations (two sizes, the pretrained pair reused by the second)."""

import json
from pathlib import Path

import numpy as np
import pytest

from synthlearn.checks.fedgan_sweep import (
    SweepConfig,
    combine_seeds,
    format_over_seeds,
    format_table,
    realism,
    run_sweep,
    run_sweep_seeds,
    trends,
)

ROOT = Path(__file__).resolve().parents[2]


def test_realism_tells_other_images_from_real_ones_and_not_real_from_real():
    rng = np.random.default_rng(0)
    real, more = (np.clip(rng.normal(0.3, 0.2, (48, 3, 32, 32)), -1, 1).astype(np.float32) for _ in range(2))
    other = np.clip(rng.normal(-0.5, 0.05, (48, 3, 32, 32)), -1, 1).astype(np.float32)
    assert realism(real, other, seed=0, steps=60) < 0.2
    assert 0.3 < realism(real, more, seed=0, steps=60) < 0.7  # other real images: it cannot tell


def test_trends_and_table_read_the_rows():
    rows = {f"non-iid-{n}": {"split": "non-iid", "sites": n, "images_per_site": 60 // n, "realism": r / 100,
                             "realism_own": r,
                             "frechet": fd, "frechet_real": 1.0, "coverage": {"0": 1.0, "1": 0.5},
                             "arms": {"centralized": {"acc": 0.5, "quadratic_kappa": 0.8},
                                      "fedgan": {"acc": 0.3, "quadratic_kappa": k}}}
            for n, r, fd, k in ((3, 0.4, 10.0, 0.5), (5, 0.3, 12.0, 0.4), (10, 0.2, 20.0, 0.3))}
    t = trends(rows, SweepConfig(sizes=(3, 5, 10), splits=("non-iid",)))
    assert t["non-iid"]["realism_falls"] and t["non-iid"]["realism_slope_per_site"] < 0
    assert t["non-iid"]["frechet_slope_per_site"] > 0
    table = format_table({"rows": rows, "paper_realism": {3: 0.43, 5: 0.37, 7: 0.36, 10: 0.35}, "trend": t})
    assert "| non-iid | 3 | 20 | 0.40 (0.43) | 0.004 (control -) |" in table and "falls as sites grow" in table
    with pytest.raises(ValueError, match="splits must be iid"):
        SweepConfig(splits=("mixed",))


def _summary(realism_own: dict[int, float]) -> dict:
    rows = {f"iid-{n}": {"split": "iid", "sites": n, "images_per_site": 60 // n, "realism": 1e-4,
                         "realism_real": 0.3, "realism_own": r, "frechet": 1.0, "frechet_real": 0.5,
                         "coverage": {"0": 1.0}, "arms": {"fedgan": {"acc": 0.3, "quadratic_kappa": 0.1}}}
            for n, r in realism_own.items()}
    cfg = SweepConfig(sizes=tuple(realism_own), splits=("iid",))
    return {"rows": rows, "trend": trends(rows, cfg), "paper_realism": {3: 0.43, 5: 0.37}, "wall_s": 1.0}


def test_seeds_combine_into_mean_sd_and_a_trend_counted_per_seed():
    summary = combine_seeds({0: _summary({3: 0.40, 5: 0.30}), 1: _summary({3: 0.30, 5: 0.32}),
                             2: _summary({3: 0.35, 5: 0.25})})
    row = summary["rows"]["iid-3"]
    assert row["realism_own"]["mean"] == pytest.approx(0.35) and row["realism_own"]["sd"] == pytest.approx(0.05)
    assert row["realism_own"]["values"] == [0.40, 0.30, 0.35] and row["n_seeds"] == 3
    assert row["arms"]["centralized"]["quadratic_kappa"]["mean"] is None  # an arm a sweep did not run
    trend = summary["trend"]["iid"]
    assert trend["seeds_where_realism_falls"] == 2 and trend["n_seeds"] == 3  # seed 1 rises
    assert trend["realism_own_change_3_to_5_sites"]["mean"] == pytest.approx((-0.10 + 0.02 - 0.10) / 3)
    table = format_over_seeds(summary)
    assert "| iid | 3 | 20 | 0.35 +/- 0.05 (0.43) | 0.40 0.30 0.35 |" in table
    assert "negative on 2 of 3 seeds" in table


def test_a_seed_already_swept_with_the_same_settings_is_read_back(tmp_path, monkeypatch):
    import dataclasses

    from synthlearn.checks import fedgan_sweep

    cfg = SweepConfig(sizes=(3, 5), splits=("iid",))
    for seed, values in ((0, {3: 0.4, 5: 0.3}), (1, {3: 0.3, 5: 0.2})):
        wanted = {k: (str(v) if isinstance(v, Path) else v)
                  for k, v in dataclasses.asdict(dataclasses.replace(cfg, seed=seed)).items()}
        (tmp_path / f"seed-{seed}").mkdir()
        (tmp_path / f"seed-{seed}" / "check.json").write_text(json.dumps({**_summary(values), "config": wanted}))
    ran = []
    monkeypatch.setattr(fedgan_sweep, "run_sweep", lambda out, c, progress=True: ran.append(c.seed) or _summary(
        {3: 0.5, 5: 0.5}))
    summary = run_sweep_seeds(tmp_path, cfg, [0, 1, 2], progress=False)
    assert ran == [2]  # seeds 0 and 1 were complete
    assert summary["rows"]["iid-3"]["realism_own"]["values"] == [0.4, 0.3, 0.5]
    for name in ("check.json", "table.md", "sweep.png"):
        assert (tmp_path / name).is_file()


def test_the_sweep_runs_two_tiny_federations_and_reuses_the_pretrained_pair(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text(f'base = "{ROOT / "configs" / "study_tiny_fundus.toml"}"\narms = ["centralized", "fedgan"]\n'
                      '[fedgan]\nbackend = "inprocess"\nrounds = 1\nper_class = 2\n')
    cfg = SweepConfig(sizes=(2, 3), splits=("non-iid",), total_images=12, test_images=10, config=config)
    summary = run_sweep(tmp_path / "sweep", cfg, progress=False)
    rows = summary["rows"]
    assert set(rows) == {"non-iid-2", "non-iid-3"}
    for row in rows.values():
        assert 0.0 <= row["realism"] <= 1.0 and 0.0 <= row["realism_own"] <= 1.0 and row["frechet"] >= 0
        assert set(row["coverage"]) == set("01234")
        assert set(row["arms"]) == {"centralized", "fedgan"} and "quadratic_kappa" in row["arms"]["fedgan"]
    second = json.loads((tmp_path / "sweep" / "non-iid-3" / "results.json").read_text())["arms"]["fedgan"]
    assert second["pretrained_from"].endswith("non-iid-2/fedgan/pretrained.pt")
    assert "non-iid-3: FedGAN's generated images per grade" in (tmp_path / "sweep" / "report.md").read_text()
    assert (tmp_path / "sweep" / "reader" / "centralized" / "model").is_dir()  # one reader for every federation
    for name in ("check.json", "table.md", "sweep.png", "report.html"):
        assert (tmp_path / "sweep" / name).is_file()
