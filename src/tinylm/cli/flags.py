"""Flags made from the config dataclasses, and the argparse pieces every command shares.

Each field becomes one flag spelt from its name (``max_steps`` -> ``--max-steps``) whose help is
the first paragraph of the field's docstring (later paragraphs are notes for readers of the
code) followed by its default, and whose value is read by the same rules as YAML and config.json
(:mod:`tinylm.fields`). A boolean field is a switch, ``--flag`` / ``--no-flag``. A flag's
``dest`` is the field's dotted path (``train.max_steps``), so :func:`given_settings` returns the
flags as a nested mapping for the one merge in settings.py; a field holding another config
dataclass (a nested section) gets its own group of flags.

Every option of every command shows its default in ``--help``: :class:`DefaultsShown` appends it
where the option has one and its help does not already say it (tests/test_cli_help.py keeps it so).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from tinylm.fields import OFF, ON, READERS, as_float, as_int, base_type, field_docs, sections, unflatten

Switch = argparse.BooleanOptionalAction
"""The one spelling of a boolean option: ``--flag`` turns it on, ``--no-flag`` off."""


class DefaultsShown(argparse.HelpFormatter):
    """Help that ends with the option's default, unless the help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or action.required or default is None or default is argparse.SUPPRESS:
            return text
        if "default" in text.lower():
            return text
        shown = switch_spelling(action, default) if isinstance(action, Switch) else "%(default)s"
        return f"{text} (default: {shown})"


def switch_spelling(action: argparse.Action, on: bool) -> str:
    """``--flag`` or ``--no-flag``: how a switch is given to be on or off."""
    positive, negative = action.option_strings[:2]
    return positive if on else negative


class Parser(argparse.ArgumentParser):
    """Bad arguments get one line and exit code 2, like every other input error; every option shows
    its default; an option is never matched by a prefix of its name (``--seed`` is not ``--seeds``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsShown)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        if args is not None:  # main and the sub-command dispatch always pass the list
            self._refuse_switch_values(list(args))
        return super().parse_known_args(args, namespace)

    def _refuse_switch_values(self, args: list[str]) -> None:
        """``--qk-norm on`` or ``--guard=off`` (the older spelling): one line naming the switch to write."""
        switches = {name: a for a in self._actions if isinstance(a, Switch) for name in a.option_strings}
        for i, arg in enumerate(args):
            if arg == "--":
                return
            flag, equals, value = arg.partition("=")
            if flag not in switches:
                continue
            if not equals:
                value = args[i + 1] if i + 1 < len(args) else ""
                if value.lower() not in ON + OFF:
                    continue
            action = switches[flag]
            if value.lower() in ON + OFF:
                on = (value.lower() in ON) != flag.startswith("--no-")
                self.error(f"{flag} takes no value: write {switch_spelling(action, on)} instead of '{flag} {value}'")
            self.error(f"{flag} takes no value: write {switch_spelling(action, True)} or "
                       f"{switch_spelling(action, False)}")  # fmt: skip


class Refused(argparse.Action):
    """An option a command does not take although a similar one exists: one line saying what to
    write instead (``ablate --seed``: the first seed or the number of seeds?). Hidden from --help."""

    def __init__(self, option_strings: list[str], dest: str, hint: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("nargs", "?")
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.hint = hint

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is not an option here: {self.hint}")


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
        return {"action": Switch}
    if base in READERS:
        return {"type": reader(READERS[base], base.__name__), "metavar": name.upper()}
    return {"type": str, "metavar": name.upper()}


def flag_help(doc: str) -> str:
    """The first paragraph of a field's docstring, on one line: its --help (the rest is for the code's readers)."""
    return " ".join(re.split(r"\n\s*\n", doc.strip())[0].split())


def field_help(kind: type, name: str) -> str:
    """The --help of field ``name`` of ``kind``: for a command's own option that is the same setting."""
    return flag_help(field_docs(kind)[name])


def _default_text(f: dataclasses.Field, flag: str) -> str:
    """A field's default as its help shows it: a switch's spelling, 'none', or the value."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return "none" if value is None else str(value)


def add_settings_flags(parser: argparse.ArgumentParser, kind: type, title: str, prefix: str, skip=(),
                       defaults: Mapping[str, str] | None = None, flag_prefix: str = "") -> None:  # fmt: skip
    """One flag per field of the config dataclass ``kind`` in a group ``title`` (or in ``parser`` when it is
    an argument group already); ``prefix`` is the dotted path of ``kind`` in the run's settings
    (``"train."``). Flags left out are not set, so each help names the default that applies: ``defaults``
    (by field name) where it is not the field's own (a preset's shape), unless the docstring already says it.
    ``flag_prefix`` starts each flag's name (``"slurm-"``: ``--slurm-partition``); settings that are
    not a run's give a ``prefix`` without a dot (``"slurm_"``), so :func:`given_settings` leaves them out."""
    # Given a group already (an executor's flags go into the launcher's group), its flags join it.
    group = parser if isinstance(parser, argparse._ArgumentGroup) else parser.add_argument_group(title)
    hints, docs, parts = typing.get_type_hints(kind), field_docs(kind), sections(kind)
    defaults = defaults or {}
    for f in dataclasses.fields(kind):
        if f.name in skip:
            continue
        if f.name in parts:
            add_settings_flags(parser, parts[f.name], f.name, f"{prefix}{f.name}.", skip, defaults, flag_prefix)
            continue
        flag = "--" + flag_prefix + f.name.replace("_", "-")
        help_text = flag_help(docs.get(f.name, ""))
        if "default" not in help_text.lower():
            help_text += f" (default: {defaults.get(f.name) or _default_text(f, flag)})"
        group.add_argument(flag, dest=prefix + f.name, default=argparse.SUPPRESS,
                           help=help_text.replace("%", "%%"),  # argparse formats help with %
                           **_value_kwargs(f.name, hints[f.name]))  # fmt: skip


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, as a nested mapping (``{"train": {"lr": 0.004}}``)."""
    return unflatten({dest: value for dest, value in vars(args).items() if "." in dest})
