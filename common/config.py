"""Typed configuration sections: frozen dataclasses built from plain mappings, checked on the way.

Each section lives with the code that owns it (StorageConfig with the storage modes,
DataConfig with the data, ...; cluster/config.py lists them); `build` makes any of them from a
mapping, rejecting unknown keys (and listing the valid ones) and wrong types (naming key, value
and expected type).
"""

from __future__ import annotations

import dataclasses
import types
import typing

from common.errors import ConfigError


def positive(key: str, value) -> None:
    if value < 1:
        raise ConfigError(f"{key}={value}: must be at least 1.")


def choice(key: str, value, choices: list) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: choose one of {choices}.")


def build(cls, data, key: str = ""):
    """Build dataclass `cls` from a mapping, checking keys and types on the way."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping of keys, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"in {key}" if key else "at the top level"
        raise ConfigError(f"unknown key(s) {unknown} {where}; valid keys: {sorted(fields)}.")
    missing = sorted(
        f.name for f in fields.values()
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"missing key(s) {missing} in {key or 'the config'}.")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, _join(key, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key or 'config'}: {err}") from None


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _convert(hint, value, key: str):
    """`value` as type `hint`, or a ConfigError naming key, value and type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key)
        for option in inner:  # e.g. `int | str` for a count or "auto": the first that takes it
            try:
                return _convert(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {' or '.join(a.__name__ for a in inner)}.")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list.")
        items = [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (
            hint is not bool and isinstance(value, bool))):
        raise ConfigError(f"{key}={value!r}: expected {hint.__name__}.")
    return value
