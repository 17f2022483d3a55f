"""Reading finished runs and pooling them into arms: runs are seeds of one arm only when their saved
configs are identical apart from the seed and bookkeeping."""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinylm.ablation import PHASES
from tinylm.config import PRESETS, ModelConfig, RunConfig, TrainConfig
from tinylm.errors import UserError
from tinylm.rundir import CONFIG_FILE, SUMMARY_FILE, read_metrics, read_summary
from tinylm.stability import LABELS

# Settings that say where and how a run is logged, not what it trains: they never separate arms.
BOOKKEEPING = frozenset({"out", "log_every", "checkpoint_every", "tensorboard"})
# The settings the ablation's phases change, named first when a difference is listed.
PHASE_SETTINGS = ("init", "schedule", "batching")
# Keys every tinylm version writes to summary.json and the report reads.
SUMMARY_KEYS = ("params", "steps", "best_step", "start_val_loss", "best_val_loss", "stability")


def recipe(config: dict[str, Any]) -> dict[str, Any]:
    """What a saved config.json trains, as setting -> value: every model and train setting but
    the seed and bookkeeping. A setting an older version did not save has its default (a new
    setting's default keeps the old behaviour); one this version does not know is kept as saved."""
    out: dict[str, Any] = {}
    for section, kind in (("model", ModelConfig), ("train", TrainConfig)):
        defaults = {f.name: f.default for f in dataclasses.fields(kind)}
        for name, value in {**defaults, **(config.get(section) or {})}.items():
            if name != "seed" and name not in BOOKKEEPING:
                out[name if name not in out else f"{section}.{name}"] = value
    return {k: out[k] for k in dict.fromkeys([*PHASE_SETTINGS, *out]) if k in out}


def phase_of(settings: dict[str, Any]) -> str:
    key = tuple(settings.get(k) for k in PHASE_SETTINGS)
    for phase in PHASES.values():
        if key == (phase.init, phase.schedule, phase.batching):
            return phase.name
    return "/".join(map(str, key))


def value_text(x: Any) -> str:
    """A setting's value as the report writes it."""
    if x is None:
        return "none"
    return f"{x:g}" if isinstance(x, float) else str(x)


def rank(label: str) -> int:
    """A stability label's place from most to least stable (an unknown label is last)."""
    return LABELS.index(label) if label in LABELS else len(LABELS)


@dataclass
class Run:
    preset: str
    seed: int
    run_dir: Path
    recipe: dict[str, Any]
    summary: dict
    metrics: list[dict]

    @property
    def phase(self) -> str:
        return phase_of(self.recipe)

    @property
    def skipped_updates(self) -> int | None:
        """Updates the guard skipped; None for runs from before this was recorded."""
        return self.summary.get("skipped_updates")

    @property
    def val_curve(self) -> list[tuple[int, float]]:
        return [
            (r["tokens"], r["val_loss"]) for r in self.metrics if "val_loss" in r and isinstance(r["val_loss"], float)
        ]


@dataclass
class Arm:
    """Runs of one preset whose configs are identical apart from the seed: one run, or several seeds."""

    preset: str
    recipe: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    name: str = ""
    """The phase, plus the settings that tell this arm from other arms of the same phase."""

    @property
    def phase(self) -> str:
        return phase_of(self.recipe)

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    def values(self, key: str) -> list[float]:
        return [r.summary[key] for r in self.runs if r.summary.get(key) is not None]

    def mean(self, key: str) -> float | None:
        vals = self.values(key)
        return statistics.fmean(vals) if vals else None

    def std(self, key: str) -> float | None:
        vals = self.values(key)
        return statistics.stdev(vals) if len(vals) > 1 else None

    @property
    def stability(self) -> dict:
        # the least stable seed speaks for the arm
        return max((r.summary["stability"] for r in self.runs), key=lambda s: rank(s["label"]))


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run directory (one holding summary.json) at or under the given paths."""
    runs = []
    for root in paths:
        if not root.exists():
            raise UserError(f"no such directory: {root}")
        runs += [_load_run(summary_path.parent) for summary_path in sorted(root.rglob(SUMMARY_FILE))]
    if not runs:
        raise UserError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return runs


def _load_run(run_dir: Path) -> Run:
    config = RunConfig.load(run_dir / CONFIG_FILE).to_dict()  # validated: a damaged file is one line
    train = config.get("train") or {}
    return Run(
        config.get("preset") or "custom",
        train.get("seed", TrainConfig.seed),
        run_dir,
        recipe(config),
        _complete_summary(run_dir),
        read_metrics(run_dir),
    )


def _complete_summary(run_dir: Path) -> dict[str, Any]:
    summary = read_summary(run_dir)
    missing = [k for k in SUMMARY_KEYS if k not in summary] + [
        f"stability.{k}" for k in ("label", "reason") if k not in (summary.get("stability") or {})
    ]
    if missing:
        raise UserError(f"{run_dir / SUMMARY_FILE} lacks {', '.join(missing)}: not a finished tinylm run summary; "
                        "train that run again or leave its folder out")  # fmt: skip
    return summary


def group(runs: list[Run]) -> dict[str, list[Arm]]:
    """preset -> its arms in ablation order; runs are seeds of one arm only if their recipes are equal."""
    by_preset: dict[str, dict[str, Arm]] = {}
    for run in runs:
        arms = by_preset.setdefault(run.preset, {})
        key = json.dumps(run.recipe, sort_keys=True, default=str)
        arms.setdefault(key, Arm(run.preset, run.recipe)).runs.append(run)
    groups = {}
    for preset in sorted(by_preset, key=lambda p: _index(list(PRESETS), p)):
        arms = sorted(by_preset[preset].values(), key=lambda a: _index(list(PHASES), a.phase))
        for arm in arms:
            arm.name = _arm_name(arm, [a for a in arms if a.phase == arm.phase])
        groups[preset] = arms
    return groups


def _arm_name(arm: Arm, alike: list[Arm]) -> str:
    """The phase, plus each setting on which the arms of that phase differ."""
    differing = [k for k in setting_names(alike) if len({value_text(a.recipe.get(k)) for a in alike}) > 1]
    settings = ", ".join(f"{k} {value_text(arm.recipe.get(k))}" for k in differing)
    return f"{arm.phase} ({settings})" if settings else arm.phase


def _index(seq: list[str], item: str) -> int:
    return seq.index(item) if item in seq else len(seq)


def setting_names(arms: list[Arm]) -> list[str]:
    """Every setting any of the arms names, in order of first appearance."""
    return list(dict.fromkeys(k for a in arms for k in a.recipe))
