"""Typed configuration: YAML/dicts parse into dataclasses; unknown keys and wrong types fail.

Every config section in the project is a plain dataclass (TRL style: one dataclass per method). This module
turns nested dicts into those dataclasses, checking each value against the field's annotation, and names the
offending key path and file in the error, e.g.

    configs/demo.yaml: generation.n: expected int, got str ('four')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from preference.plumbing.errors import CurateError

T = TypeVar("T")


class ConfigError(CurateError):
    """A config value is missing, unknown or of the wrong type."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError:
                continue  # try the next member of the union
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} ({value!r})")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} ({value!r})")
        (inner,) = get_args(tp) or (Any,)
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} ({value!r})")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(key_tp, k, where): _convert(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} ({value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {type(value).__name__} ({value!r})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} ({value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} ({value!r})")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path string, got {type(value).__name__} ({value!r})")
        return Path(value)
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, recursively, rejecting unknown keys and wrong types."""
    label = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping for {cls.__name__}, got {type(data).__name__} ({data!r})")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        renamed = getattr(cls, "RENAMED", {})  # a class's old key → its new name, for configs written before
        if unknown[0] in renamed:
            raise ConfigError(f"{prefix}{unknown[0]}: renamed to {renamed[unknown[0]]!r}; rename the key in your config")
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key for {cls.__name__}; known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ checks raise ValueError with a message
        raise ConfigError(f"{label}: {exc}") from exc


def to_dict(obj: Any, skip: tuple[str, ...] = ()) -> Any:
    """Dataclass → plain JSON/YAML-able structure (Paths become strings). `skip`: leave out the dataclass fields
    whose metadata carries any of these tags (e.g. "operational": how to reach a server, not what a step makes)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name), skip) for f in dataclasses.fields(obj)
                if not any(f.metadata.get(tag) for tag in skip)}
    if isinstance(obj, dict):
        return {k: to_dict(v, skip) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, skip) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (or any JSON-able value); used to tell whether a finished step is stale."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass the path of a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_yaml(path: str | Path, cls: type[T]) -> T:
    """Parse YAML file `path` into dataclass `cls`; errors are prefixed with the file name."""
    data = read_yaml(path)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def replace_path(obj: T, dotted: str, value: Any) -> T:
    """Return a copy of dataclass `obj` with `a.b.c = value` (value is YAML-parsed and type-checked)."""
    head, _, rest = dotted.partition(".")
    if isinstance(obj, dict):  # a free-form mapping (e.g. `reward.trl`): its keys are checked where it is used
        parsed = yaml.safe_load(value) if isinstance(value, str) else value
        return {**obj, head: replace_path(obj.get(head, {}), rest, value) if rest else parsed}
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"--set {dotted}: {head!r} is inside a value of type {type(obj).__name__}, not a section")
    names = {f.name for f in dataclasses.fields(obj)}
    if head not in names:
        raise ConfigError(f"--set {dotted}: unknown key {head!r}; known keys: {', '.join(sorted(names))}")
    if rest:
        return _replace(obj, dotted, **{head: replace_path(getattr(obj, head), rest, value)})
    hints = get_type_hints(type(obj))
    parsed = yaml.safe_load(value) if isinstance(value, str) else value
    if hints[head] is str and not isinstance(parsed, str):
        parsed = value
    return _replace(obj, dotted, **{head: _convert(hints[head], parsed, dotted)})


def _replace(obj: T, dotted: str, **changes: Any) -> T:
    try:
        return dataclasses.replace(obj, **changes)
    except (ValueError, TypeError) as exc:  # __post_init__ range checks
        raise ConfigError(f"--set {dotted}: {exc}") from exc


__all__ = [
    "ConfigError",
    "config_hash",
    "from_dict",
    "load_yaml",
    "read_yaml",
    "replace_path",
    "to_dict",
]
