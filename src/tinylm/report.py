"""Turn saved run metrics into the seed report's tables, plots and a CSV/JSON of results.

Only measured values go in: every number comes from a run's summary.json or
metrics.jsonl, and every sentence is a template over those numbers.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tinylm.ablation import PHASES
from tinylm.config import PRESETS, RunConfig
from tinylm.errors import UserError
from tinylm.metrics import read_metrics
from tinylm.stability import LABELS
from tinylm.summary import SUMMARY_FILE

MARKS = {"very stable": "🟢", "stable": "🟢", "ok": "🟡", "unstable": "🔴"}


@dataclass
class Run:
    preset: str
    phase: str
    seed: int
    run_dir: Path
    summary: dict
    metrics: list[dict]

    @property
    def val_curve(self) -> list[tuple[int, float]]:
        return [
            (r["tokens"], r["val_loss"]) for r in self.metrics if "val_loss" in r and isinstance(r["val_loss"], float)
        ]


@dataclass
class PhaseResult:
    """One phase of one preset: one run, or several seeds."""

    preset: str
    phase: str
    runs: list[Run] = field(default_factory=list)

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
        # the least stable seed speaks for the phase
        return max((r.summary["stability"] for r in self.runs), key=lambda s: LABELS.index(s["label"]))


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run directory (one holding summary.json) at or under the given paths."""
    runs = []
    for root in paths:
        if not root.exists():
            raise UserError(f"no such directory: {root}")
        for summary_path in sorted(root.rglob(SUMMARY_FILE)):
            run_dir = summary_path.parent
            cfg = RunConfig.load(run_dir / "config.json")
            phase = _phase_of(cfg)
            runs.append(
                Run(
                    cfg.preset or "custom",
                    phase,
                    cfg.train.seed,
                    run_dir,
                    json.loads(summary_path.read_text()),
                    read_metrics(run_dir),
                )
            )
    if not runs:
        raise UserError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return runs


def _phase_of(cfg: RunConfig) -> str:
    t = cfg.train
    for phase in PHASES.values():
        if (t.init, t.schedule, t.batching) == (phase.init, phase.schedule, phase.batching):
            return phase.name
    return f"{t.init}/{t.schedule}/{t.batching}"


def group(runs: list[Run]) -> dict[str, list[PhaseResult]]:
    """preset -> its phases in ablation order."""
    order = list(PHASES)
    by_preset: dict[str, dict[str, PhaseResult]] = {}
    for run in runs:
        phases = by_preset.setdefault(run.preset, {})
        phases.setdefault(run.phase, PhaseResult(run.preset, run.phase)).runs.append(run)
    preset_order = list(PRESETS)
    return {
        preset: sorted(phases.values(), key=lambda p: order.index(p.phase) if p.phase in order else len(order))
        for preset, phases in sorted(by_preset.items(), key=lambda kv: _index(preset_order, kv[0]))
    }


def _index(seq: list[str], item: str) -> int:
    return seq.index(item) if item in seq else len(seq)


# --- formatting -----------------------------------------------------------------------


def fmt_loss(p: PhaseResult, key: str) -> str:
    mean, std = p.mean(key), p.std(key)
    if mean is None:
        return "–"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def stability_text(s: dict) -> str:
    return f"{MARKS[s['label']]} {s['label'].capitalize()} ({s['reason']})"


def phase_notes(p: PhaseResult) -> str:
    """Notes derived from the (first seed's) curve and summary."""
    run = p.runs[0]
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
        notes.append(f"{'tight' if abs(gap) < 0.1 else 'wide' if abs(gap) > 0.3 else 'moderate'} "
                     f"train/val gap ({gap:+.2f})")  # fmt: skip
    if s.get("utilisation") is not None:
        notes.append(f"{100 * s['utilisation']:.0f}% of token slots real")
    return "; ".join(notes)


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


# --- the report ---------------------------------------------------------------------


def render(groups: dict[str, list[PhaseResult]], plot_names: dict[str, str]) -> str:
    lines: list[str] = ["# tinylm ablation report", ""]
    lines.append("Every number below is measured: it comes from the runs' `summary.json` and `metrics.jsonl`.")
    lines.append("")
    for preset, phases in groups.items():
        params = phases[0].runs[0].summary["params"]
        lines += [f"## {preset.upper()} MODEL ({fmt_params(params)} params)", "", "### Timeline of improvements", ""]
        lines += ["| Phase | Key change | Val loss (start → best) | Notes |", "| --- | --- | --- | --- |"]
        for p in phases:
            key = PHASES[p.phase].key_change if p.phase in PHASES else p.phase
            lines.append(f"| {p.phase} | {key} | {fmt_loss(p, 'start_val_loss')} → **{fmt_loss(p, 'best_val_loss')}** "
                         f"| {phase_notes(p)} |")  # fmt: skip
        best = min(phases, key=lambda p: p.mean("best_val_loss") or math.inf)
        times = [t for p in phases for t in p.values("train_time_s")]
        lines += ["", "### Final metrics", "", "| Metric | Value |", "| --- | --- |"]
        lines.append(f"| Worst val loss | {max(p.mean('worst_val_loss') for p in phases):.2f} |")
        lines.append(f"| Best val loss | **{best.mean('best_val_loss'):.2f}** ({best.phase}) |")
        lines.append(f"| Training time | {fmt_time(sum(times))} in all ({fmt_time(min(times))}–{fmt_time(max(times))} "
                     f"per phase) |")  # fmt: skip
        lines.append(f"| Stability | {stability_text(best.stability)} |")
        lines.append("")
        if preset in plot_names:
            lines += [f"![validation loss, {preset}]({plot_names[preset]})", ""]
        lines += effects_section(phases)
    lines += comparison_section(groups)
    if "comparison" in plot_names:
        lines += [f"![best validation loss per preset and phase]({plot_names['comparison']})", ""]
    return "\n".join(lines)


def effects_section(phases: list[PhaseResult]) -> list[str]:
    """Each phase's measured effect against the one before it, ranked by the gain in best loss."""
    lines = ["### What changed the result (measured)", ""]
    effects = []
    for prev, cur in zip(phases, phases[1:]):
        d_best = cur.mean("best_val_loss") - prev.mean("best_val_loss")
        d_start = cur.mean("start_val_loss") - prev.mean("start_val_loss")
        u_prev, u_cur = prev.mean("utilisation"), cur.mean("utilisation")
        text = f"**{cur.phase}** ({PHASES[cur.phase].key_change if cur.phase in PHASES else cur.phase}): "
        if d_best < 0:
            text += f"best val loss {prev.mean('best_val_loss'):.2f} → {cur.mean('best_val_loss'):.2f} ({d_best:+.2f})"
        else:
            text += (f"did not help here: best val loss {prev.mean('best_val_loss'):.2f} → "
                     f"{cur.mean('best_val_loss'):.2f} ({d_best:+.2f})")  # fmt: skip
        if abs(d_start) >= 0.01:
            text += f"; start loss {prev.mean('start_val_loss'):.2f} → {cur.mean('start_val_loss'):.2f}"
        if u_prev and u_cur and abs(u_cur - u_prev) > 0.005:
            text += (f"; real tokens per slot {u_prev:.2f} → {u_cur:.2f} (×{u_cur / u_prev:.2f} real tokens "
                     "for the same compute)")  # fmt: skip
        effects.append((d_best, text))
    for rank, (_, text) in enumerate(sorted(effects, key=lambda e: e[0]), 1):
        lines.append(f"{rank}. {text}")
    helped = [e for e in effects if e[0] < 0]
    if helped:
        biggest = min(helped, key=lambda e: e[0])
        name = biggest[1].split("**")[1]
        lines += ["", f"The largest single contributor here was **{name}** ({biggest[0]:+.2f} best val loss)."]
    else:
        lines += ["", "No phase lowered the best validation loss on this data and budget."]
    return lines + [""]


def comparison_section(groups: dict[str, list[PhaseResult]]) -> list[str]:
    lines = ["## Final comparison table", "",
             "| Category | Params | Worst loss | Best loss | Training time | Stability |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for preset, phases in groups.items():
        best = min(phases, key=lambda p: p.mean("best_val_loss") or math.inf)
        worst = max(p.mean("worst_val_loss") for p in phases)
        total = sum(t for p in phases for t in p.values("train_time_s"))
        params = phases[0].runs[0].summary["params"]
        lines.append(f"| **{preset}** | {fmt_params(params)} | {worst:.2f} | **{best.mean('best_val_loss'):.2f}** "
                     f"| {fmt_time(total)} | {stability_text(best.stability)} |")  # fmt: skip
    return lines + [""]


# --- plots and tables of results ----------------------------------------------------


def plot_curves(phases: list[PhaseResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    lows, highs = [], []
    for p in phases:
        for i, run in enumerate(p.runs):
            curve = run.val_curve
            if not curve:
                continue
            xs, ys = zip(*curve)
            ax.plot(xs, ys, marker="o", markersize=3, label=p.phase if i == 0 else None,
                    color=f"C{list(PHASES).index(p.phase) if p.phase in PHASES else 5}")  # fmt: skip
            lows.append(min(ys))
            highs.append(max(ys))
    if lows and max(highs) / max(min(lows), 1e-9) > 5:
        ax.set_yscale("log")
    ax.set_xlabel("token slots trained")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{phases[0].preset}: validation loss by phase")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(groups: dict[str, list[PhaseResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(groups)
    phase_names = [n for n in PHASES if any(p.phase == n for ps in groups.values() for p in ps)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(1, len(phase_names))
    for j, name in enumerate(phase_names):
        heights = []
        for preset in presets:
            match = [p for p in groups[preset] if p.phase == name]
            heights.append(match[0].mean("best_val_loss") if match else 0.0)
        ax.bar([i + j * width for i in range(len(presets))], heights, width, label=name, color=f"C{j}")
    ax.set_xticks([i + width * (len(phase_names) - 1) / 2 for i in range(len(presets))], presets)
    ax.set_ylabel("best validation loss")
    ax.set_title("best validation loss per preset and phase")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RESULT_COLUMNS = ["preset", "phase", "seed", "params", "start_val_loss", "best_val_loss", "worst_val_loss",
                  "final_val_loss", "train_time_s", "steps", "tokens", "real_tokens", "utilisation",
                  "stability", "stability_reason", "run_dir"]  # fmt: skip


def result_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        s = r.summary
        row = {k: s.get(k) for k in RESULT_COLUMNS if k in s}
        row.update(preset=r.preset, phase=r.phase, seed=r.seed, stability=s["stability"]["label"],
                   stability_reason=s["stability"]["reason"], run_dir=str(r.run_dir))  # fmt: skip
        rows.append({k: row.get(k) for k in RESULT_COLUMNS})
    return rows


def write_report(paths: list[Path], out_file: Path) -> Path:
    """Write out_file (Markdown) with its plots, results.csv and results.json beside it."""
    runs = find_runs(paths)
    groups = group(runs)
    folder = out_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = out_file.stem
    plot_names: dict[str, str] = {}
    for preset, phases in groups.items():
        name = f"{stem}-{preset}-val-loss.png"
        plot_curves(phases, folder / name)
        plot_names[preset] = name
    plot_comparison(groups, folder / f"{stem}-best-loss.png")
    plot_names["comparison"] = f"{stem}-best-loss.png"
    out_file.write_text(render(groups, plot_names))
    rows = result_rows([run for phases in groups.values() for p in phases for run in p.runs])
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
        if not (run_dir / SUMMARY_FILE).exists():
            raise UserError(f"{run_dir} has no {SUMMARY_FILE}")
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
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
