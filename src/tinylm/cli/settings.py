"""A run's settings from the command line: preset < YAML recipe < flags, in one merge.

Every layer is a nested mapping shaped like :class:`RunConfig` (:func:`tinylm.fields.nest` turns a
flat or sectioned recipe into one and refuses unknown keys); :func:`tinylm.fields.build` reads
and validates the merged result. A new field or a new nested section needs nothing here.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from tinylm.cli.flags import given_settings
from tinylm.config import (
    BUDGET_FIELDS,
    PRESETS,
    RESUMABLE,
    ModelConfig,
    RunConfig,
    preset,
    renamed_settings,
    resume_edits_text,
)
from tinylm.errors import UserError
from tinylm.fields import ConfigError, build, dotted, load_yaml, merge, nest

DEFAULT_PRESET = "basic"
DEFAULT_BUDGET = {"max_steps": 200}

BUDGET_DEFAULTS = {"max_steps": f"{DEFAULT_BUDGET['max_steps']} when no other budget is given"}
"""The budget a run gets when none is given, as train's --help shows it."""


def preset_defaults() -> dict[str, str]:
    """The model fields whose default is the preset's, as --help shows them (``the preset's: basic 4, ...``)."""
    shown = {}
    for f in dataclasses.fields(ModelConfig):
        values = {name: getattr(shape, f.name) for name, shape in PRESETS.items()}
        if len(set(values.values())) > 1:
            shown[f.name] = "the preset's: " + ", ".join(f"{name} {value}" for name, value in values.items())
    return shown


def has_budget(settings: dict[str, Any]) -> bool:
    return any(settings.get("train", {}).get(k) is not None for k in BUDGET_FIELDS)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Preset, then the YAML recipe (``--config``), then explicit flags; a bad value that came from
    the recipe is reported with the recipe's name."""
    source = getattr(args, "config", None)
    recipe = nest(RunConfig, renamed_settings(load_yaml(source)), source) if source else {}
    flags = given_settings(args)
    name = getattr(args, "preset", None) or recipe.get("preset") or DEFAULT_PRESET
    if not isinstance(name, str):
        raise UserError(f"{source}: preset must be a preset's name, got {name!r}")
    settings = merge({"model": dataclasses.asdict(preset(name))}, recipe, flags, {"preset": name})
    if not has_budget(settings):
        settings = merge(settings, {"train": DEFAULT_BUDGET})
    from_recipe = set(dotted(recipe)) - set(dotted(flags))
    try:
        return build(RunConfig, settings)
    except ConfigError as e:
        if any(path == e.path or path.startswith(e.path + ".") for path in from_recipe):  # lr: {a: 1} too
            raise UserError(f"{source}: {e}") from None
        raise


def resume_config(args: argparse.Namespace) -> RunConfig:
    """The saved settings of the run in ``--resume``, with the few flags a resumed run may change."""
    run_dir = Path(args.resume)
    from tinylm.rundir import CONFIG_FILE  # torch comes with it: not for --help

    saved = RunConfig.load(run_dir / CONFIG_FILE)
    flags = given_settings(args)
    if set(dotted(flags)) - RESUMABLE or args.preset or args.config:
        raise UserError(f"with --resume only {resume_edits_text()} may change (they leave the mathematics alone)")
    return build(RunConfig, merge(saved.to_dict(), flags, {"train": {"out": str(run_dir)}}))
