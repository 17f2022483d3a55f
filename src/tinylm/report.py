"""Turn saved run metrics into the seed report's tables, plots and a CSV/JSON of results.

Only measured values go in: every number comes from a run's summary.json or
metrics.jsonl, and every sentence is a template over those numbers. Runs are pooled as
seeds of one arm only when their saved configs are identical apart from the seed and
bookkeeping; an effect is always stated with every setting that differs between the two
arms it compares.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinylm.ablation import PHASES
from tinylm.config import PRESETS, ModelConfig, RunConfig, TrainConfig
from tinylm.errors import UserError
from tinylm.rundir import CONFIG_FILE, SUMMARY_FILE, read_metrics, read_summary
from tinylm.stability import LABELS, Thresholds, gap_wording

MARKS = {"very stable": "🟢", "stable": "🟢", "ok": "🟡", "unstable": "🔴"}

# Settings that say where and how a run is logged, not what it trains: they never separate arms.
BOOKKEEPING = frozenset({"out", "log_every", "checkpoint_every", "tensorboard"})
# The settings the ablation's phases change, named first when a difference is listed.
PHASE_SETTINGS = ("init", "schedule", "batching")


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
        return max((r.summary["stability"] for r in self.runs), key=lambda s: _rank(s["label"]))


def _rank(label: str) -> int:
    return LABELS.index(label) if label in LABELS else len(LABELS)


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run directory (one holding summary.json) at or under the given paths."""
    runs = []
    for root in paths:
        if not root.exists():
            raise UserError(f"no such directory: {root}")
        for summary_path in sorted(root.rglob(SUMMARY_FILE)):
            run_dir = summary_path.parent
            config = RunConfig.load(run_dir / CONFIG_FILE).to_dict()  # validated: a damaged file is one line
            train = config.get("train") or {}
            runs.append(
                Run(
                    config.get("preset") or "custom",
                    train.get("seed", TrainConfig.seed),
                    run_dir,
                    recipe(config),
                    _complete_summary(run_dir),
                    read_metrics(run_dir),
                )
            )
    if not runs:
        raise UserError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return runs


# Keys every tinylm version writes to summary.json and the report reads.
SUMMARY_KEYS = ("params", "steps", "best_step", "start_val_loss", "best_val_loss", "stability")


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
            alike = [a for a in arms if a.phase == arm.phase]
            differing = [k for k in _keys(alike) if len({_value(a.recipe.get(k)) for a in alike}) > 1]
            settings = ", ".join(f"{k} {_value(arm.recipe.get(k))}" for k in differing)
            arm.name = f"{arm.phase} ({settings})" if settings else arm.phase
        groups[preset] = arms
    return groups


def _index(seq: list[str], item: str) -> int:
    return seq.index(item) if item in seq else len(seq)


def _keys(arms: list[Arm]) -> list[str]:
    return list(dict.fromkeys(k for a in arms for k in a.recipe))


def _value(x: Any) -> str:
    if x is None:
        return "none"
    return f"{x:g}" if isinstance(x, float) else str(x)


def changes(before: Arm, after: Arm) -> list[str]:
    """Every setting that differs between two arms, as 'name old→new'."""
    return [
        f"{k} {_value(before.recipe.get(k))}→{_value(after.recipe.get(k))}"
        for k in _keys([before, after])
        if before.recipe.get(k) != after.recipe.get(k)
    ]


def seed_change(before: Arm, after: Arm) -> list[str]:
    """'seed old→new' where two arms were measured on different seeds."""
    if before.seeds == after.seeds:
        return []
    return [f"seed {'+'.join(map(str, before.seeds))}→{'+'.join(map(str, after.seeds))}"]


@dataclass
class Effect:
    """One arm measured against the arm before it."""

    before: Arm
    arm: Arm
    changes: list[str]
    """The settings that differ (the seeds are not a setting: see seed_change)."""
    d_best: float


def measure_effects(arms: list[Arm]) -> list[Effect]:
    """Each arm against the one before it (pairs without a finite best loss are left out)."""
    effects = []
    for before, arm in zip(arms, arms[1:]):
        a, b = before.mean("best_val_loss"), arm.mean("best_val_loss")
        if a is not None and b is not None:
            effects.append(Effect(before, arm, changes(before, arm), b - a))
    return effects


# --- formatting -----------------------------------------------------------------------


def fmt_loss(arm: Arm, key: str) -> str:
    mean, std = arm.mean(key), arm.std(key)
    if mean is None:
        return "–"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_params(arms: list[Arm]) -> str:
    counts = [r.summary["params"] for a in arms for r in a.runs]
    low, high = min(counts), max(counts)
    return f"{low / 1e6:.2f}M" if low == high else f"{low / 1e6:.2f}M–{high / 1e6:.2f}M"


def stability_text(arms: list[Arm]) -> str:
    """The least stable arms speak for the preset, each named with its reason."""
    label = max((a.stability["label"] for a in arms), key=_rank)
    alike = [a for a in arms if a.stability["label"] == label]
    reasons = {a.stability["reason"] for a in alike}
    if len(arms) == 1:
        where = alike[0].stability["reason"]
    elif len(reasons) == 1:
        where = f"{'every arm' if len(alike) == len(arms) else ', '.join(a.name for a in alike)}: {reasons.pop()}"
    else:
        where = "; ".join(f"{a.name}: {a.stability['reason']}" for a in alike)
    return f"{MARKS.get(label, '⚪')} {label.capitalize()} ({where})"


def arm_notes(arm: Arm, peers: list[Run]) -> str:
    """Notes derived from the (first seed's) curve and summary, and every seed's skipped updates."""
    run = arm.runs[0]
    s = run.summary
    notes = []
    curve = [v for _, v in run.val_curve]
    steps = s["steps"]
    if s.get("best_step") is not None and steps and len(curve) >= 4:
        if s["best_step"] <= steps / 3:
            notes.append("early saturation (best in the first third)")
        elif _has_plateau(curve):
            notes.append("long plateau")
        else:
            notes.append("still improving at the end" if s["best_step"] == steps else "converging")
    for event in s.get("events", []):
        if event["event"] == "divergence":
            notes.append(f"divergence at step {event['step']} (val {_num(event.get('value'))})")
        elif event["event"] == "recovery":
            notes.append(f"recovered at step {event['step']} with LR × {event['lr_scale']:g}")
    gap = s["stability"].get("train_val_gap")
    if gap is not None:
        notes.append(f"{gap_wording(gap, _thresholds(s['stability']))} train/val gap ({gap:+.2f})")
    if s.get("utilisation") is not None:
        notes.append(f"{100 * s['utilisation']:.0f}% of token slots real")
    return "; ".join(notes + skipped_notes(arm, peers))


def skipped_notes(arm: Arm, peers: list[Run]) -> list[str]:
    """A note for each run of the arm that skipped updates, against the fewest any other run skipped."""
    notes = []
    for run in arm.runs:
        n = run.skipped_updates
        if not n:
            continue
        note = f"{f'seed {run.seed} ' if len(arm.runs) > 1 else ''}skipped {n} of {run.summary['steps']} updates"
        others = [r.skipped_updates for r in peers if r is not run and r.skipped_updates is not None]
        if others and n > min(others):
            note += f": trained on {n - min(others)} fewer updates than its peers"
        notes.append(note)
    return notes


def _thresholds(stability: dict) -> Thresholds:
    """The limits a run was labelled with (saved in its summary; older runs used today's defaults)."""
    known = {f.name for f in dataclasses.fields(Thresholds)}
    return Thresholds(**{k: v for k, v in (stability.get("thresholds") or {}).items() if k in known})


def _num(x) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


def _has_plateau(curve: list[float]) -> bool:
    """Three consecutive evaluations within 1% of each other before the last quarter."""
    cut = max(3, int(len(curve) * 0.75))
    for i in range(cut - 2):
        window = curve[i : i + 3]
        if max(window) - min(window) < 0.01 * min(window):
            return True
    return False


def _best(arms: list[Arm]) -> Arm | None:
    finite = [a for a in arms if a.mean("best_val_loss") is not None]
    return min(finite, key=lambda a: a.mean("best_val_loss")) if finite else None


def _worst_loss(arms: list[Arm]) -> str:
    worst = [v for a in arms if (v := a.mean("worst_val_loss")) is not None]
    return f"{max(worst):.2f}" if worst else "–"


# --- the report ---------------------------------------------------------------------


def render(groups: dict[str, list[Arm]], plot_names: dict[str, str]) -> str:
    lines: list[str] = ["# tinylm ablation report", ""]
    lines.append("Every number below is measured: it comes from the runs' `summary.json` and `metrics.jsonl`.")
    lines.append("")
    for preset, arms in groups.items():
        peers = [r for a in arms for r in a.runs]
        lines += [f"## {preset.upper()} MODEL ({fmt_params(arms)} params)", "", "### Timeline of improvements", ""]
        lines += ["| Phase | Key change | Val loss (start → best) | Notes |", "| --- | --- | --- | --- |"]
        for i, arm in enumerate(arms):
            if i == 0:
                key = ", ".join(f"{k} {_value(arm.recipe.get(k))}" for k in PHASE_SETTINGS)
            else:
                key = ", ".join(changes(arms[i - 1], arm) + seed_change(arms[i - 1], arm))
            lines.append(f"| {arm.name} | {key} | {fmt_loss(arm, 'start_val_loss')} → "
                         f"**{fmt_loss(arm, 'best_val_loss')}** | {arm_notes(arm, peers)} |")  # fmt: skip
        best = _best(arms)
        times = [t for a in arms for t in a.values("train_time_s")]
        lines += ["", "### Final metrics", "", "| Metric | Value |", "| --- | --- |"]
        lines.append(f"| Worst val loss | {_worst_loss(arms)} |")
        best_text = f"**{best.mean('best_val_loss'):.2f}** ({best.name})" if best else "–"
        lines.append(f"| Best val loss | {best_text} |")
        if times:
            low, high = fmt_time(min(times)), fmt_time(max(times))
            per_run = low if low == high else f"{low}–{high}"
            lines.append(f"| Training time | {fmt_time(sum(times))} in all ({per_run} per run) |")
        skipped = "; ".join(
            f"{a.name}: {', '.join('unknown' if r.skipped_updates is None else str(r.skipped_updates) for r in a.runs)}"
            for a in arms
        )
        lines.append(f"| Skipped updates | {skipped} |")
        lines.append(f"| Stability | {stability_text(arms)} |")
        lines.append("")
        if preset in plot_names:
            lines += [f"![validation loss, {preset}]({plot_names[preset]})", ""]
        lines += effects_section(arms)
    lines += comparison_section(groups)
    if "comparison" in plot_names:
        lines += [f"![best validation loss per preset and phase]({plot_names['comparison']})", ""]
    return "\n".join(lines)


def effect_text(e: Effect) -> str:
    before, arm = e.before, e.arm
    b0, b1 = before.mean("best_val_loss"), arm.mean("best_val_loss")
    text = f"**{arm.name}** against **{before.name}** ({', '.join(e.changes + seed_change(before, arm))}): "
    text += f"{'' if e.d_best < 0 else 'did not help here: '}best val loss {b0:.2f} → {b1:.2f} ({e.d_best:+.2f})"
    s0, s1 = before.mean("start_val_loss"), arm.mean("start_val_loss")
    if s0 is not None and s1 is not None and abs(s1 - s0) >= 0.01:
        text += f"; start loss {s0:.2f} → {s1:.2f}"
    u0, u1 = before.mean("utilisation"), arm.mean("utilisation")
    if u0 and u1 and abs(u1 - u0) > 0.005:
        text += f"; real tokens per slot {u0:.2f} → {u1:.2f} (×{u1 / u0:.2f} real tokens for the same compute)"
    k0, k1 = before.mean("skipped_updates"), arm.mean("skipped_updates")
    if k0 is not None and k1 is not None and k0 != k1:
        text += f"; skipped updates {k0:.3g} → {k1:.3g}"
    return text


def effects_section(arms: list[Arm]) -> list[str]:
    """Each arm's measured effect against the one before it, ranked by the gain in best loss."""
    lines = ["### What changed the result (measured)", ""]
    effects = measure_effects(arms)
    for rank, effect in enumerate(sorted(effects, key=lambda e: e.d_best), 1):
        lines.append(f"{rank}. {effect_text(effect)}")
    helped = [e for e in effects if e.d_best < 0]
    if not helped:
        lines += ["", "No phase lowered the best validation loss on this data and budget."]
        return lines + [""]
    top = min(helped, key=lambda e: e.d_best)
    if len(top.changes) == 1:
        lines += ["", f"The largest single contributor here was **{top.arm.name}** ({top.changes[0]}, "
                      f"{top.d_best:+.2f} best val loss)."]  # fmt: skip
    else:
        lines += ["", f"The largest gain here was **{top.arm.name}** against **{top.before.name}** "
                      f"({top.d_best:+.2f} best val loss), which changed {len(top.changes)} settings at once: "
                      "these runs cannot say which of them gave it."]  # fmt: skip
    return lines + [""]


def comparison_section(groups: dict[str, list[Arm]]) -> list[str]:
    lines = ["## Final comparison table", "",
             "| Category | Params | Worst loss | Best loss | Training time | Stability |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for preset, arms in groups.items():
        best = _best(arms)
        total = sum(t for a in arms for t in a.values("train_time_s"))
        best_text = f"**{best.mean('best_val_loss'):.2f}**" if best else "–"
        lines.append(f"| **{preset}** | {fmt_params(arms)} | {_worst_loss(arms)} | {best_text} "
                     f"| {fmt_time(total)} | {stability_text(arms)} |")  # fmt: skip
    return lines + [""]


# --- plots and tables of results ----------------------------------------------------


def plot_curves(arms: list[Arm], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    lows, highs = [], []
    for j, arm in enumerate(arms):
        for i, run in enumerate(arm.runs):
            curve = run.val_curve
            if not curve:
                continue
            xs, ys = zip(*curve)
            ax.plot(xs, ys, marker="o", markersize=3, label=arm.name if i == 0 else None, color=f"C{j % 10}")
            lows.append(min(ys))
            highs.append(max(ys))
    if lows and max(highs) / max(min(lows), 1e-9) > 5:
        ax.set_yscale("log")
    ax.set_xlabel("token slots trained")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{arms[0].preset}: validation loss by phase")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(groups: dict[str, list[Arm]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(groups)
    names = list(dict.fromkeys(a.name for arms in groups.values() for a in arms))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        heights = []
        for preset in presets:
            match = [a for a in groups[preset] if a.name == name]
            heights.append((match and match[0].mean("best_val_loss")) or 0.0)
        ax.bar([i + j * width for i in range(len(presets))], heights, width, label=name, color=f"C{j % 10}")
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(presets))], presets)
    ax.set_ylabel("best validation loss")
    ax.set_title("best validation loss per preset and phase")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RESULT_COLUMNS = ["preset", "arm", "phase", "seed", "params", "start_val_loss", "best_val_loss", "worst_val_loss",
                  "final_val_loss", "train_time_s", "steps", "skipped_updates", "tokens", "real_tokens",
                  "utilisation", "stability", "stability_reason", "run_dir"]  # fmt: skip


def result_rows(arms: list[Arm]) -> list[dict]:
    rows = []
    for arm in arms:
        for r in arm.runs:
            s = r.summary
            row = {k: s.get(k) for k in RESULT_COLUMNS}
            row.update(preset=r.preset, arm=arm.name, phase=r.phase, seed=r.seed, stability=s["stability"]["label"],
                       stability_reason=s["stability"]["reason"], run_dir=str(r.run_dir))  # fmt: skip
            rows.append(row)
    return rows


def write_report(paths: list[Path], out_file: Path) -> Path:
    """Write out_file (Markdown) with its plots, results.csv and results.json beside it."""
    groups = group(find_runs(paths))
    folder = out_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = out_file.stem
    plot_names: dict[str, str] = {}
    for preset, arms in groups.items():
        name = f"{stem}-{preset}-val-loss.png"
        plot_curves(arms, folder / name)
        plot_names[preset] = name
    plot_comparison(groups, folder / f"{stem}-best-loss.png")
    plot_names["comparison"] = f"{stem}-best-loss.png"
    out_file.write_text(render(groups, plot_names))
    rows = result_rows([arm for arms in groups.values() for arm in arms])
    (folder / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return out_file


def plot_runs(run_dirs: list[Path], path: Path, log_scale: bool | None = None) -> Path:
    """Train and validation loss against tokens for any runs, side by side, labelled with their stability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(run_dirs), figsize=(5.5 * len(run_dirs), 4), sharey=True, squeeze=False)
    highs, lows = [], []
    for ax, run_dir in zip(axes[0], run_dirs):
        summary = read_summary(run_dir)
        records = read_metrics(run_dir)
        train = [(r["tokens"], r["train_loss"]) for r in records if isinstance(r.get("train_loss"), float)]
        val = [(r["tokens"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), float)]
        for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, markersize=3, label=label, alpha=0.8 if label == "train" else 1.0)
                highs.append(max(ys))
                lows.append(min(ys))
        for event in summary.get("events", []):
            if event["event"] in ("divergence", "recovery"):
                tokens = next((r["tokens"] for r in records if r.get("step") == event["step"] and "tokens" in r), None)
                if tokens is not None:
                    ax.axvline(tokens, color="red" if event["event"] == "divergence" else "green", ls="--", lw=1)
        s = summary["stability"]
        ax.set_title(f"{run_dir.name}: {s['label']}\n({s['reason']})", fontsize=9)
        ax.set_xlabel("token slots trained")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss")
    if log_scale or (log_scale is None and lows and max(highs) / max(min(lows), 1e-9) > 5):
        axes[0][0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
