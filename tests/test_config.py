import dataclasses

import pytest

from synthlearn.config import ConfigError, from_dict, load_toml, to_dict
from synthlearn.data.preprocess import PreprocessConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 0.01
    sizes: tuple[int, ...] = (4, 8)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = Inner()
    preprocess: PreprocessConfig = PreprocessConfig()
    note: str | None = None


def test_nested_build_and_tuple_coercion():
    cfg = from_dict(Outer, {"name": "x", "inner": {"lr": 1, "sizes": [1, 2, 3]},
                            "preprocess": {"shape": [16, 16, 16]}})
    assert cfg.inner == Inner(lr=1.0, sizes=(1, 2, 3))
    assert cfg.preprocess.shape == (16, 16, 16)
    assert to_dict(cfg)["inner"]["sizes"] == [1, 2, 3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "y"


def test_unknown_missing_and_wrong_type_keys_are_refused():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) inner.lrr"):
        from_dict(Outer, {"name": "x", "inner": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match="missing required config key name"):
        from_dict(Outer, {})
    with pytest.raises(ConfigError, match="inner.lr: expected a number, found str"):
        from_dict(Outer, {"name": "x", "inner": {"lr": "fast"}})


def test_toml_base_chain_and_overrides(tmp_path):
    (tmp_path / "base.toml").write_text('name = "base"\n[inner]\nlr = 0.5\nsizes = [2]\n')
    (tmp_path / "child.toml").write_text('base = "base.toml"\nname = "child"\n[inner]\nlr = 0.1\n')
    cfg = load_toml(Outer, tmp_path / "child.toml", overrides={"note": "hi"})
    assert cfg == Outer(name="child", inner=Inner(lr=0.1, sizes=(2,)), note="hi")
    (tmp_path / "bad.toml").write_text('name = "x"\ntypo = 1\n')
    with pytest.raises(ConfigError, match="bad.toml: unknown config key"):
        load_toml(Outer, tmp_path / "bad.toml")
    with pytest.raises(FileNotFoundError):
        load_toml(Outer, tmp_path / "none.toml")


def test_a_value_the_config_refuses_names_the_file(tmp_path):
    from synthlearn.study import load_study_config

    (tmp_path / "study.toml").write_text('[train]\naugment_intensity = 1.5\n')
    with pytest.raises(ConfigError, match=r"study\.toml: train\.augment_intensity must be in \[0, 1\), found 1\.5"):
        load_study_config(tmp_path / "study.toml")
