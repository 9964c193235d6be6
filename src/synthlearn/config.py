"""Frozen dataclass configs loaded from TOML.

Every config in synthlearn is a frozen dataclass. :func:`from_dict` builds one from a nested mapping
and refuses unknown keys (a typo in a config file must never be silently ignored), wrong types and
missing required values, naming the dotted key, what was expected and what was found.
:func:`load_toml` reads a file, optionally merging it over a base file named by a top-level
``base = "other.toml"`` key (path relative to the file), so paper-scale configs can override tiny ones.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, missing or of the wrong type."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert TOML forms (lists -> tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table for {tp.__name__}, found {type(value).__name__} {value!r}")
        return from_dict(tp, value, _prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {tp}, found {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, found {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, found {type(value).__name__} {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, found {len(value)}: {value!r}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [_coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, found {type(value).__name__} {value!r}")
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, found {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, found {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, found {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, found {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, found {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, _prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``, refusing unknown keys.

    Args:
        cls: a dataclass type whose fields may themselves be dataclasses.
        data: nested mapping, typically parsed TOML.

    Raises:
        ConfigError: naming the dotted key, expected and found values.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(_prefix + k for k in unknown)} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = _prefix + name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {key} ({_type_name(hints[name])}) for {cls.__name__}")
    return cls(**kwargs)


def merge_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` table by table (nested dicts merge; any other value replaces)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_tables(out[k], v)
        else:
            out[k] = v
    return out



def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, resolving a top-level ``base = "file.toml"`` chain (relative paths)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a path string, found {base!r}")
        data = merge_tables(read_toml(path.parent / base), data)
    return data


def load_toml(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from a TOML file (with ``base`` chain) and optional nested overrides.

    Raises:
        ConfigError: a key the dataclasses do not know or a value of the wrong type, and also a value their own
            checks (``__post_init__``) refuse; every message starts with ``path``.
    """
    data = read_toml(path)
    if overrides:
        data = merge_tables(data, overrides)
    try:
        return from_dict(cls, data)
    except ValueError as exc:  # ConfigError from the key/type checks, ValueError from a dataclass's own checks
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a (nested) dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
