"""Typed settings: reading a value as the type its dataclass field declares, and building nested
config dataclasses from layers of plain mappings.

One set of rules for flags, YAML recipes and config.json. A config dataclass may hold another
(a *section*: ``RunConfig.model``, ``RunConfig.train``); every function here walks sections
generally, so a new field or a new nested section needs no new merging or checking code.
Unknown keys are refused in one place, :func:`nest`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from tinylm.errors import UserError


class ConfigError(UserError):
    """An invalid value of one setting; ``field`` names it and ``path`` is its dotted place in a
    nested config (``train.lr``), so a caller can say which file it came from."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.path = field


# --- reading values as the type a field declares ----------------------------------------
# PyYAML reads `1e-3` and `2e6` as strings (YAML 1.1 wants a dot), so text holding a number
# is the number users mean.

ON = ("on", "true", "yes", "1")
OFF = ("off", "false", "no", "0")


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ON + OFF:
        return value.lower() in ON
    raise ValueError(f"must be true or false, got {value!r}")


def as_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"must be a number, got {value!r}")


def as_int(value: Any) -> int:
    number = as_float(value)
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"must be a whole number, got {value!r}")
    return int(number)


READERS: dict[Any, Callable[[Any], Any]] = {bool: as_bool, int: as_int, float: as_float}
"""How a value given as text (a flag) or as YAML/JSON is read as each scalar type."""


def base_type(hint: Any) -> Any:
    """``X`` for ``X | None``, else the hint itself."""
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint


def read_as(name: str, hint: Any, value: Any) -> Any:
    """value read as the type hint ``hint`` of field ``name``: int, float, bool, str, a Literal, or X | None."""
    if value is None and type(None) in typing.get_args(hint):
        return None
    hint = base_type(hint)
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be text, got {value!r}")
        return value
    read = READERS.get(hint)
    if read is None:  # a type with no reading rule here: the field's own checks see it as given
        return value
    try:
        value = read(value)
    except ValueError as e:
        raise ConfigError(name, str(e)) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value}")
    return value


def read_fields(obj: Any) -> None:
    """Replace every field of a config dataclass by its value read as the declared type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, read_as(f.name, hints[f.name], getattr(obj, f.name)))


def require(obj: Any, names: tuple[str, ...], ok: Callable[[Any], Any], rule: str) -> None:
    """Every named field that is set (not None) satisfies ``ok(value)``; else a ConfigError saying ``rule``."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not ok(value):
            raise ConfigError(name, f"must be {rule}, got {value!r}")


def field_docs(kind: type) -> dict[str, str]:
    """The docstring under each dataclass field (used as CLI help)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(kind)))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value
    return docs


# --- nested settings: one shape, one merge, one build ------------------------------------


def sections(kind: type) -> dict[str, type]:
    """The fields of ``kind`` that hold another config dataclass, by name."""
    hints = typing.get_type_hints(kind)
    return {f.name: hints[f.name] for f in dataclasses.fields(kind) if dataclasses.is_dataclass(hints[f.name])}


def _holds(kind: type, key: str) -> bool:
    return key in {f.name for f in dataclasses.fields(kind)} or any(_holds(s, key) for s in sections(kind).values())


def nest(kind: type, raw: Any, source: str = "", section: str = "") -> dict[str, Any]:
    """``raw``, flat or in sections, as a mapping shaped like ``kind``; unknown keys are refused here.

    A key naming a section holds that section's settings; any other key is ``kind``'s own field or
    goes to the first section (at any depth) that has a field of that name. ``source`` (a file)
    starts every error message; ``section`` is the dotted place of ``kind`` (``train``).
    """
    where = f"{source}: " if source else ""
    if not isinstance(raw, dict):
        raise UserError(f"{where}must hold a mapping of settings, got {raw!r}")
    parts, own, unknown = sections(kind), {f.name for f in dataclasses.fields(kind)}, []
    out: dict[str, Any] = {}
    for key, value in sorted(raw.items(), key=lambda item: item[0] not in parts):  # sections first, then flat keys
        if key in parts:
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{where}{key} must be a mapping of settings, got {value!r}")
            out = merge(out, {key: nest(parts[key], value or {}, source, _within(section, key))})
        elif key in own:
            out[key] = value
        elif home := next((name for name, part in parts.items() if _holds(part, key)), None):
            out = merge(out, {home: nest(parts[home], {key: value}, source, _within(section, home))})
        else:
            unknown.append(str(key))
    if unknown:
        raise UserError(f"{where}unknown {section + ' ' if section else ''}setting(s): {', '.join(sorted(unknown))}")
    return out


def _within(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """The layers laid over each other in order, mapping by mapping: later values win."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            both = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if both else value
    return out


def dotted(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted path -> value (``{"model.position": "rope"}``)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def unflatten(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1}`` as ``{"train": {"lr": 1}}``."""
    out: dict[str, Any] = {}
    for path, value in dotted.items():
        *outer, last = path.split(".")
        inner = out
        for key in outer:
            inner = inner.setdefault(key, {})
        inner[last] = value
    return out


def build(kind: type, values: dict[str, Any], prefix: str = "") -> Any:
    """``kind`` from a mapping shaped like it (see :func:`nest`), each section built first; a
    ConfigError carries the dotted ``path`` of the setting it names."""
    parts = sections(kind)
    kwargs = {k: build(parts[k], v, f"{prefix}{k}.") if k in parts else v for k, v in values.items()}
    try:
        return kind(**kwargs)
    except ConfigError as e:
        e.path = prefix + e.field
        raise


def from_mapping(kind: type, raw: Any, source: str = "") -> Any:
    """``kind`` from a flat or sectioned mapping (a YAML recipe, a config.json)."""
    return build(kind, nest(kind, raw, source))


def read_settings(kind: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A mapping shaped like ``kind`` (see :func:`nest`) with every value read as the type its field
    declares, without building ``kind``: for settings that are only part of a config (a study's
    changes). A wrong type is a ConfigError whose ``path`` is the dotted setting."""
    hints, parts = typing.get_type_hints(kind), sections(kind)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in parts:
            out[key] = read_settings(parts[key], value, f"{prefix}{key}.")
            continue
        try:
            out[key] = read_as(key, hints[key], value)
        except ConfigError as e:
            e.path = prefix + e.field
            raise
    return out


def load_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping a YAML file holds; a missing, unreadable or unparsable file, or one that holds no
    mapping, is a one-line UserError naming it."""
    import yaml

    file = Path(path)
    if not file.exists():
        raise UserError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of settings")
    return raw
