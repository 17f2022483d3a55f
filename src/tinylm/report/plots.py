"""The report's plots (matplotlib, no display needed): validation curves per preset, best loss per
preset and phase, and `tinylm plot`'s train/validation curves of any runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tinylm.report.runs import Arm
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
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)


def wants_log_scale(lows: list[float], highs: list[float]) -> bool:
    """A log y-axis when the plotted losses span more than a factor of five."""
    return bool(lows) and max(highs) / max(min(lows), 1e-9) > 5


def plot_curves(arms: list[Arm], path: Path) -> None:
    with figure(path) as ax:
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
        if wants_log_scale(lows, highs):
            ax.set_yscale("log")
        ax.set_xlabel("token slots trained")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{arms[0].preset}: validation loss by phase")
        ax.grid(alpha=0.3)
        ax.legend()


def plot_comparison(groups: dict[str, list[Arm]], path: Path) -> None:
    presets = list(groups)
    names = list(dict.fromkeys(a.name for arms in groups.values() for a in arms))
    with figure(path) as ax:
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
