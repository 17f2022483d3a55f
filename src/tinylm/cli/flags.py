"""Flags made from the config dataclasses, and the argparse pieces every command shares.

Each field becomes one flag spelt from its name (``max_steps`` -> ``--max-steps``) whose help is
the field's docstring and whose value is read by the same rules as YAML and config.json
(:mod:`tinylm.fields`). A flag's ``dest`` is the field's dotted path (``train.max_steps``), so
:func:`given_settings` returns the flags as a nested mapping for the one merge in settings.py; a
field holding another config dataclass (a nested section) gets its own group of flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any, Literal

from tinylm.fields import READERS, as_float, as_int, base_type, field_docs, sections, unflatten


class Parser(argparse.ArgumentParser):
    """Bad arguments get one line and exit code 2, like every other input error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def reader(read: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse type from a reading rule: its ValueError becomes argparse's one-line error."""

    def parse(text: str) -> Any:
        try:
            return read(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name
    return parse


integer = reader(as_int, "integer")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``."""

    def check(text: str) -> int:
        value = as_int(text)
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return reader(check, "integer")


def _positive(text: str) -> float:
    value = as_float(text)
    if not (0 < value < math.inf):
        raise ValueError(f"must be a positive number, got {text}")
    return value


positive_number = reader(_positive, "number")


TARGET_HALFWIDTH_HELP = ("the half-width of the paired 95%% interval the report counts seeds for (default: each "
                         "effect's own size, the seeds a clear verdict on it needs)")  # fmt: skip
"""--target-halfwidth of report and ablate."""


def _value_kwargs(name: str, hint: Any) -> dict[str, Any]:
    base = base_type(hint)
    if typing.get_origin(base) is Literal:
        return {"choices": typing.get_args(base)}
    if base is bool:
        return {"type": reader(READERS[bool], "on|off"), "nargs": "?", "const": True, "metavar": "on|off"}
    if base in READERS:
        return {"type": reader(READERS[base], base.__name__), "metavar": name.upper()}
    return {"type": str, "metavar": name.upper()}


def add_settings_flags(parser: argparse.ArgumentParser, kind: type, title: str, prefix: str, skip=()) -> None:
    """One flag per field of the config dataclass ``kind`` in a group ``title``; ``prefix`` is the
    dotted path of ``kind`` in the run's settings (``"train."``). Flags left out are not set."""
    group = parser.add_argument_group(title)
    hints, docs, parts = typing.get_type_hints(kind), field_docs(kind), sections(kind)
    for f in dataclasses.fields(kind):
        if f.name in skip:
            continue
        if f.name in parts:
            add_settings_flags(parser, parts[f.name], f.name, f"{prefix}{f.name}.", skip)
            continue
        help_text = " ".join(docs.get(f.name, "").split()).replace("%", "%%")  # argparse formats help with %
        group.add_argument("--" + f.name.replace("_", "-"), dest=prefix + f.name, default=argparse.SUPPRESS,
                           help=help_text, **_value_kwargs(f.name, hints[f.name]))  # fmt: skip


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, as a nested mapping (``{"train": {"lr": 0.004}}``)."""
    return unflatten({dest: value for dest, value in vars(args).items() if "." in dest})
