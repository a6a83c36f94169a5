"""Typed configuration: YAML/JSON files into dataclasses, with unknown keys and bad values refused.

Declare settings as a dataclass; give bounds with :func:`setting`::

    @dataclass
    class Train:
        epochs: int = setting(20, lo=1, hi=10_000, help="training epochs")
        loss: str = setting("l1", choices=("l1", "mse"))

    cfg = load_config("train.yaml", Train)

Nested dataclasses are nested mappings in the file. Every error names the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
import warnings
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from .errors import ConfigError

C = TypeVar("C")
_EXPONENT_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def setting(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
            choices: tuple | None = None, help: str = "", default_factory: Any = dataclasses.MISSING):
    """A dataclass field with validation metadata."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        val = default
        return dataclasses.field(default_factory=lambda: type(val)(val), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def read_mapping(path: str | Path) -> dict:
    """Read a YAML or JSON file that must hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot parse config {path.name}: {first}") from None
    if data is None:  # an empty file, or one of comments only: say so, as a wrong file would look the same
        warnings.warn(f"config {path.name} holds no settings: every setting takes its default", stacklevel=2)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path.name} must hold a mapping of settings, not {type(data).__name__}")
    return data


def load_config(source: str | Path | Mapping | None, cls: type[C], *, overrides: Mapping | None = None) -> C:
    """Build ``cls`` from a file or mapping, refusing unknown keys and out-of-range values."""
    data: dict = {} if source is None else (dict(source) if isinstance(source, Mapping) else read_mapping(source))
    if overrides:
        data = _merge(data, overrides)
    return _build(cls, data, prefix="")


def to_dict(cfg: Any) -> dict:
    """A dataclass config as a plain mapping (for saving with results)."""
    return dataclasses.asdict(cfg)


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}) or {}, v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _build(cls: type, data: Any, prefix: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + u for u in unknown)} (allowed: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        kwargs[name] = _coerce(hints[name], data[name], f.metadata, prefix + name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def _coerce(tp: Any, value: Any, meta: Mapping, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        return _coerce(tp, value, meta, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, not {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, meta, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-3, without a dot, as text: the user wrote a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, not {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, not {value!r}")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{key} must be a whole number, not {value!r}")
        value = tp(value)
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(str, choices))}")
        lo, hi = meta.get("lo"), meta.get("hi")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{key} = {value!r} is out of range [{lo if lo is not None else '-inf'}, "
                              f"{hi if hi is not None else 'inf'}]")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be text, not {value!r}")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, not {value!r}")
        return dict(value)
    return value
