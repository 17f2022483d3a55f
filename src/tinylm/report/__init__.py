"""Turn saved run metrics into the seed report's tables, plots and a CSV/JSON of results.

Only measured values go in: every number comes from a run's summary.json or
metrics.jsonl, and every sentence is a template over those numbers. Runs are pooled as
seeds of one arm only when their saved configs are identical apart from the seed and
bookkeeping; an effect is always stated with every setting that differs between the two
arms it compares.

runs: reading run directories and pooling them into arms. effects: what each arm changed and
by how much. notes, markdown: the report's text. plots: its figures. results: results.csv/json.
"""

from __future__ import annotations

from pathlib import Path

from tinylm.report.effects import Effect, changes, measure_effects, seed_change
from tinylm.report.markdown import comparison_section, effect_text, effects_section, render
from tinylm.report.notes import arm_notes, skipped_notes, stability_text
from tinylm.report.plots import plot_comparison, plot_curves, plot_runs
from tinylm.report.results import RESULT_COLUMNS, result_rows, write_results
from tinylm.report.runs import Arm, Run, find_runs, group, phase_of, recipe

__all__ = [
    "RESULT_COLUMNS", "Arm", "Effect", "Run", "arm_notes", "changes", "comparison_section", "effect_text",
    "effects_section", "find_runs", "group", "measure_effects", "phase_of", "plot_comparison", "plot_curves",
    "plot_runs", "recipe", "render", "result_rows", "seed_change", "skipped_notes", "stability_text", "write_report",
]  # fmt: skip


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
    write_results([arm for arms in groups.values() for arm in arms], folder)
    return out_file
