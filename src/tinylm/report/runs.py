"""Reading finished runs and pooling them into arms: runs are seeds of one arm only when their saved
configs are identical apart from the seed and bookkeeping."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinylm.config import PRESETS, ModelConfig, RunConfig, TrainConfig
from tinylm.errors import UserError
from tinylm.rundir import CONFIG_FILE, SUMMARY_FILE, read_metrics, read_summary
from tinylm.stability import LABELS
from tinylm.study.spec import PHASES

# Settings that say where and how a run is logged, not what it trains: they never separate arms.
BOOKKEEPING = frozenset({"out", "log_every", "checkpoint_every", "tracker"})
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


@dataclass(frozen=True)
class Metric:
    """Which validation loss ranks arms: the per-document one or the packed stream's."""

    name: str
    """How the report names it."""
    suffix: str
    """What it adds to a summary key: best_val_loss -> best_val_loss_doc."""

    def key(self, base: str) -> str:
        """The summary.json (or metrics.jsonl) key of this metric's version of base ('best_val_loss')."""
        return base + self.suffix


DOC = Metric("per-document", "_doc")
PACKED = Metric("packed", "")
RANK_BY = {"doc": DOC, "packed": PACKED, "val_loss_doc": DOC, "val_loss": PACKED}
"""`tinylm report --rank-by` values and study.json's rank_by values."""


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
    def interrupted(self) -> bool:
        """Stopped before its budget (Ctrl-C writes a summary too): its best loss is a partial run's, not a seed's."""
        return bool(self.summary.get("interrupted"))

    @property
    def skipped_updates(self) -> int | None:
        """Updates the guard skipped; None for runs from before this was recorded."""
        return self.summary.get("skipped_updates")

    @property
    def val_curve(self) -> list[tuple[int, float]]:
        return self.curve(PACKED)

    def curve(self, metric: Metric) -> list[tuple[int, float]]:
        """(tokens, loss) of every evaluation that measured a finite value of the metric."""
        key = metric.key("val_loss")
        return [(r["tokens"], r[key]) for r in self.metrics if isinstance(r.get(key), float) and math.isfinite(r[key])]

    @property
    def study_tag(self) -> dict[str, Any]:
        """summary.json's {"name", "arm", "lr_factor"} as a study runner wrote it; {} for other runs."""
        tag = self.summary.get("study")
        return tag if isinstance(tag, dict) else {}


@dataclass
class Arm:
    """Runs of one preset whose configs are identical apart from the seed: one run, or several seeds."""

    preset: str
    recipe: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    name: str = ""
    """The study's name for the arm; for runs grouped by recipe, the phase plus the settings that tell
    this arm from other arms of the same phase."""
    compare_to: str | None = None
    """The name of the arm this one's effect is measured against (None: the first arm)."""
    metric: Metric = PACKED
    """The validation loss that ranks this arm (chosen per preset: see choose_metric)."""
    note: str = ""
    key_change: str = ""
    """The study's words for what this arm changes; empty: the report lists the settings that differ."""
    lr: float | None = None
    """The learning rate a study chose for the arm's full runs (None: not from a study)."""
    trials: dict[str, dict | None] = field(default_factory=dict)
    """LR factor -> the summary of its trial run (None: not finished), where a study tuned the learning rate."""

    @property
    def phase(self) -> str:
        return phase_of(self.recipe)

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    def values(self, key: str) -> list[float]:
        """The key's finite numbers over the arm's runs (absent, None and NaN are left out)."""
        return [v for r in self.runs if finite_number(v := r.summary.get(key))]

    def mean(self, key: str) -> float | None:
        vals = self.values(key)
        return statistics.fmean(vals) if vals else None

    def std(self, key: str) -> float | None:
        vals = self.values(key)
        return statistics.stdev(vals) if len(vals) > 1 else None

    def ranked(self) -> dict[int, float]:
        """seed -> the ranked best loss, over the runs that have a finite one (seeds run twice: their mean)."""
        by_seed: dict[int, list[float]] = {}
        for r in self.runs:
            value = r.summary.get(self.metric.key("best_val_loss"))
            if finite_number(value):
                by_seed.setdefault(r.seed, []).append(float(value))
        return {seed: statistics.fmean(values) for seed, values in sorted(by_seed.items())}

    def ranked_mean(self) -> float | None:
        return self.mean(self.metric.key("best_val_loss"))

    @property
    def stability(self) -> dict:
        # the least stable seed speaks for the arm
        return max((r.summary["stability"] for r in self.runs), key=lambda s: rank(s["label"]))


def finite_number(x: Any) -> bool:
    """A number (not a bool) that is neither NaN nor infinite: a loss the report can state."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def find_runs(paths: list[Path], outside: list[Path] = ()) -> list[Run]:
    """Every run directory (one holding summary.json) at or under the given paths, but not under a
    folder of `outside` (a study's folder: its runs are read through its study.json)."""
    runs = []
    for root in paths:
        if not root.exists():
            raise UserError(f"no such directory: {root}")
        for summary_path in sorted(root.rglob(SUMMARY_FILE)):
            if not any(summary_path.is_relative_to(folder) for folder in outside):
                runs.append(load_run(summary_path.parent))
    if not runs and not outside:
        raise UserError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return runs


def load_run(run_dir: Path) -> Run:
    """One finished run: its config (validated), summary (checked for the keys the report reads) and metrics."""
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


def choose_metric(wanted: Metric, runs: list[Run]) -> tuple[Metric, str | None]:
    """The metric to rank these runs by, and a note when it is not the one wanted: runs from before the
    per-document validation lack it, and one metric ranks them all (a paired difference of a per-document
    loss and a packed one would measure the evaluation, not the arm)."""
    if wanted == PACKED:
        return PACKED, None
    lacking = [r for r in runs if DOC.key("best_val_loss") not in r.summary]
    if not lacking:
        return DOC, None
    return PACKED, (
        f"Ranked by the packed validation loss: {len(lacking)} of {len(runs)} runs lack the per-document one "
        "(written before tinylm measured it)."
    )


def metric_label(groups: dict[str, list[Arm]], preset: str) -> str:
    """' (packed loss)' where the presets are ranked by different metrics (one's runs lack the per-document
    loss): their losses are then not one quantity side by side. Empty where one metric ranks them all."""
    if len({arms[0].metric for arms in groups.values()}) < 2:
        return ""
    return f" ({groups[preset][0].metric.name} loss)"


def group(runs: list[Run], wanted: Metric = DOC) -> dict[str, list[Arm]]:
    """preset -> its arms in ablation order, each compared to the arm before it; runs are seeds of one arm
    only if their recipes are equal. Each preset is ranked by the wanted metric where all its runs have it."""
    by_preset: dict[str, dict[str, Arm]] = {}
    for run in runs:
        arms = by_preset.setdefault(run.preset, {})
        key = json.dumps(run.recipe, sort_keys=True, default=str)
        arms.setdefault(key, Arm(run.preset, run.recipe)).runs.append(run)
    groups = {}
    for preset in sorted(by_preset, key=lambda p: _index(list(PRESETS), p)):
        arms = sorted(by_preset[preset].values(), key=lambda a: _index(list(PHASES), a.phase))
        metric, _ = choose_metric(wanted, [r for a in arms for r in a.runs])
        for i, arm in enumerate(arms):
            arm.name = _arm_name(arm, [a for a in arms if a.phase == arm.phase])
            arm.compare_to = arms[i - 1].name if i else None
            arm.metric = metric
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
