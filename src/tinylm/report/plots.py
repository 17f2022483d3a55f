"""The report's plots (matplotlib, no display needed): validation curves per preset with a band over
seeds, the effect of each step with its interval, best loss per preset and phase, and `tinylm plot`'s
train/validation curves of any runs."""

from __future__ import annotations

import io
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tinylm.paths import write_atomic
from tinylm.report.effects import Effect
from tinylm.report.runs import Arm, metric_label
from tinylm.rundir import read_metrics, read_summary

FIGSIZE = (7, 4.2)
DPI = 110


@contextmanager
def figure(path: Path, **subplots: Any) -> Iterator[Any]:
    """The axes of a figure (plt.subplots) on the Agg backend, laid out and saved to path on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**{"figsize": FIGSIZE, **subplots})
    try:
        yield axes
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, dpi=DPI, format=path.suffix.lstrip(".") or "png")
        write_atomic(path, image.getvalue())  # a full disk leaves no half-written image
    finally:
        plt.close(fig)


def wants_log_scale(lows: list[float], highs: list[float]) -> bool:
    """A log y-axis when the plotted losses span more than a factor of five."""
    return bool(lows) and max(highs) / max(min(lows), 1e-9) > 5


def seed_band(arm: Arm) -> list[tuple[int, float, float, float]]:
    """(tokens, mean, min, max) of the arm's ranked validation curve over its seeds, at every evaluation
    all of its seeds measured (seeds of one arm share their evaluation points)."""
    curves = [dict(run.curve(arm.metric)) for run in arm.runs]
    curves = [c for c in curves if c]
    if not curves:
        return []
    band = []
    for x in sorted(set.intersection(*(set(c) for c in curves))):
        ys = [c[x] for c in curves]
        band.append((x, statistics.fmean(ys), min(ys), max(ys)))
    return band


def plot_curves(arms: list[Arm], path: Path) -> None:
    """Validation loss per arm: the mean over seeds, with a band from the lowest to the highest seed."""
    seeds = max(len(a.runs) for a in arms)
    with figure(path) as ax:
        lows, highs = [], []
        for j, arm in enumerate(arms):
            band = seed_band(arm)
            if not band:
                continue
            xs, mean, low, high = zip(*band)
            label = arm.name if len(arm.runs) == 1 else f"{arm.name} ({len(arm.runs)} seeds)"
            ax.plot(xs, mean, marker="o", markersize=3, label=label, color=f"C{j % 10}")
            if len(arm.runs) > 1:
                ax.fill_between(xs, low, high, color=f"C{j % 10}", alpha=0.2, linewidth=0)
            lows.append(min(low))
            highs.append(max(high))
        if wants_log_scale(lows, highs):
            ax.set_yscale("log")
        ax.set_xlabel("token slots trained")
        ax.set_ylabel(f"validation loss, {arms[0].metric.name}")
        band = ": mean over seeds, band min–max" if seeds > 1 else ""
        ax.set_title(f"{arms[0].preset}: validation loss by arm{band}")
        ax.grid(alpha=0.3)
        ax.legend()


def plot_effects(effects: list[Effect], path: Path) -> None:
    """One row per step: the mean paired difference and its 95% interval, a line at zero. Unreplicated
    effects are hollow points without a bar: they have no interval."""
    with figure(path, figsize=(FIGSIZE[0], 1.2 + 0.45 * len(effects))) as ax:
        for row, e in enumerate(effects):
            iv = e.interval
            if iv.replicated:
                ax.errorbar(iv.mean, row, xerr=iv.half_width, fmt="o", color="C0", capsize=4)
            else:
                ax.plot(iv.mean, row, "o", mfc="none", color="C7")
        ax.axvline(0.0, color="black", lw=1)
        ax.set_yticks(range(len(effects)), [f"{e.arm.name} vs {e.before.name}\n{e.verdict}" for e in effects])
        ax.invert_yaxis()  # the first step on top, as in the tables
        ax.set_xlabel(f"Δ best val loss, {effects[0].arm.metric.name} (95% CI; < 0 is better)")
        ax.set_title(f"{effects[0].arm.preset}: effect of each step, paired by seed")
        ax.grid(axis="x", alpha=0.3)


def plot_comparison(groups: dict[str, list[Arm]], path: Path) -> None:
    presets = list(groups)
    names = list(dict.fromkeys(a.name for arms in groups.values() for a in arms))
    with figure(path) as ax:
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            heights = []
            for preset in presets:
                match = [a for a in groups[preset] if a.name == name]
                heights.append((match and match[0].ranked_mean()) or 0.0)
            ax.bar([i + j * width for i in range(len(presets))], heights, width, label=name, color=f"C{j % 10}")
        ticks = [p + metric_label(groups, p) for p in presets]  # which loss, where presets rank by different ones
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(presets))], ticks)
        ax.set_ylabel("best validation loss")
        ax.set_title("best validation loss per preset and phase")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)


def plot_runs(run_dirs: list[Path], path: Path, log_scale: bool | None = None) -> Path:
    """Train and validation loss against tokens for any runs, side by side, labelled with their stability."""
    size = (5.5 * len(run_dirs), 4)
    with figure(path, ncols=len(run_dirs), figsize=size, sharey=True, squeeze=False) as axes:
        lows, highs = [], []
        for ax, run_dir in zip(axes[0], run_dirs):
            for ys in _draw_run(ax, run_dir):
                highs.append(max(ys))
                lows.append(min(ys))
        axes[0][0].set_ylabel("loss")
        if log_scale or (log_scale is None and wants_log_scale(lows, highs)):
            axes[0][0].set_yscale("log")
    return path


def _draw_run(ax, run_dir: Path) -> list[tuple[float, ...]]:
    """One run's train and validation curves and its divergence/recovery steps; returns the losses drawn."""
    summary = read_summary(run_dir)
    records = read_metrics(run_dir)
    train = [(r["tokens"], r["train_loss"]) for r in records if isinstance(r.get("train_loss"), float)]
    val = [(r["tokens"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), float)]
    drawn = []
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, markersize=3, label=label, alpha=0.8 if label == "train" else 1.0)
            drawn.append(ys)
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
    return drawn
