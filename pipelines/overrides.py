"""Dotted-key overrides (``--set filter.min_side=256``) for frozen config dataclasses.

Every value is parsed according to the field's annotation, and the section is rebuilt with
``dataclasses.replace`` so its ``__post_init__`` checks run again. Unknown keys and bad values
raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}
REDACTED = "***"


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Returns a copy of ``config`` with every ``dotted.key=value`` applied (the last of a repeated key wins).

    The fields of one section change together, so a cross-field check sees all of them at once.
    """
    changes: dict[tuple[str, ...], str] = {}
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} must look like dotted.key=value")
        key, raw = override.split("=", 1)
        changes[tuple(key.strip().split("."))] = raw.strip()
    return _apply(config, changes, prefix="")


def to_flat_dict(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"filter.min_side": 512, ...}``: the form MLflow params and config diffs use.

    Fields marked ``metadata={"secret": True}`` show as ``***`` when set, so credentials never
    reach a log, a param or an artifact.
    """
    flat: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            flat.update(to_flat_dict(value, f"{prefix}{field.name}."))
        elif field.metadata.get("secret") and value:
            flat[f"{prefix}{field.name}"] = REDACTED
        else:
            flat[f"{prefix}{field.name}"] = value
    return flat


def _apply(section: Any, changes: dict[tuple[str, ...], str], prefix: str) -> Any:
    assert dataclasses.is_dataclass(section), "only dataclass configs take overrides"
    fields = {f.name: f for f in dataclasses.fields(section)}
    by_field: dict[str, dict[tuple[str, ...], str]] = {}
    for path, raw in changes.items():
        if path[0] not in fields:
            raise ValueError(
                f"unknown config key {prefix + '.'.join(path)!r}: {type(section).__name__} has no field {path[0]!r} "
                f"(valid: {', '.join(sorted(fields))})"
            )
        by_field.setdefault(path[0], {})[path[1:]] = raw
    values = {}
    for name, rest in by_field.items():
        current, key = getattr(section, name), prefix + name
        if dataclasses.is_dataclass(current):
            if () in rest:
                raise ValueError(
                    f"config key {key!r} is a section; set one of its fields "
                    f"({', '.join(sorted(f.name for f in dataclasses.fields(current)))})"
                )
            values[name] = _apply(current, rest, prefix=f"{key}.")
        else:
            if set(rest) != {()}:
                raise ValueError(
                    f"unknown config key {key + '.' + '.'.join(next(p for p in rest if p))!r}: "
                    f"{name!r} is a value, not a section"
                )
            values[name] = parse_value(typing.get_type_hints(type(section))[name], rest[()], key)
    try:
        return dataclasses.replace(section, **values)
    except ValueError as error:
        settings = ", ".join(f"{prefix}{name}" for name in values)
        raise ValueError(f"bad value for {settings}: {error}") from None


def parse_value(annotation: Any, raw: str, key: str) -> Any:
    """Parses the command-line text ``raw`` as a value of type ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in _NONE:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_value(inner, raw, key)
    if origin is typing.Literal:
        if raw not in args:
            raise ValueError(f"bad value for {key}: {raw!r} is not one of {', '.join(map(str, args))}")
        return raw
    if origin is tuple:
        assert len(args) == 2 and args[1] is Ellipsis, f"{key}: only tuple[X, ...] fields are supported"
        items = [item.strip() for item in raw.split(",") if item.strip()]
        return tuple(parse_value(args[0], item, key) for item in items)
    if annotation is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(f"bad value for {key}: {raw!r} is not a boolean (use true or false)")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            kind = "an integer" if annotation is int else "a number"
            raise ValueError(f"bad value for {key}: {raw!r} is not {kind}") from None
    if annotation is str:
        return raw
    raise AssertionError(f"{key}: no parser for config type {annotation!r}")
