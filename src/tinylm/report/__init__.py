"""Turn saved run metrics into the report's tables, statistics, plots and a CSV/JSON of results.

Only measured values go in: every number comes from a run's summary.json or metrics.jsonl (and a
study's study.json for what its arms are), and every sentence is a template over those numbers.
Without a study.json, runs are pooled as seeds of one arm only when their saved configs are identical
apart from the seed and bookkeeping; an effect is always stated with every setting that differs
between the two arms it compares, and as an interval over the seeds both arms ran.

runs: reading run directories and pooling them into arms. studies: reading study.json. stats: paired
differences, intervals, verdicts, noise floors. effects: what each arm changed and by how much.
notes, findings, markdown: the report's text. plots: its figures. results: results.csv/json.
"""

from __future__ import annotations

import re
from pathlib import Path

from tinylm.paths import disk_full_is_one_line, write_atomic
from tinylm.report.effects import Effect, changes, measure_effects, seed_change
from tinylm.report.findings import effect_text, effects_section
from tinylm.report.markdown import PlotNames, comparison_section, render
from tinylm.report.notes import arm_notes, skipped_notes, stability_text
from tinylm.report.plots import plot_comparison, plot_curves, plot_effects, plot_runs
from tinylm.report.results import RESULT_COLUMNS, result_rows, write_results
from tinylm.report.runs import Arm, Run, find_runs, group, phase_of, recipe
from tinylm.report.studies import Study, load_studies

__all__ = [
    "RESULT_COLUMNS", "Arm", "Effect", "Run", "Study", "arm_notes", "changes", "comparison_section", "effect_text",
    "effects_section", "find_runs", "group", "load_studies", "measure_effects", "phase_of", "plot_comparison",
    "plot_curves", "plot_effects", "plot_runs", "recipe", "render", "result_rows", "seed_change", "skipped_notes",
    "stability_text", "write_report",
]  # fmt: skip


def write_report(paths: list[Path], out_file: Path, rank_by: str | None = None,
                 target_halfwidth: float | None = None) -> Path:  # fmt: skip
    """Write out_file (Markdown) with its plots, results.csv and results.json beside it. rank_by ('doc' or
    'packed') overrides each study's own ranked metric (default: per-document where every run has it).
    target_halfwidth: the interval half-width the effects table counts the seeds needed for (default: each
    effect's measured size)."""
    studies = load_studies(paths, rank_by)
    with disk_full_is_one_line(out_file.parent, "the runs are untouched: make room and run tinylm report again"):
        return _write(studies, out_file, target_halfwidth)


def _write(studies: list[Study], out_file: Path, target_halfwidth: float | None) -> Path:
    folder = out_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    plot_names: list[PlotNames] = []
    stems: set[str] = set()
    for study in studies:
        stem = _plot_stem(out_file, study, stems)
        plots: PlotNames = {}
        for preset, arms in study.groups.items():
            plots[(preset, "curves")] = f"{stem}-{preset}-val-loss.png"
            plot_curves(arms, folder / plots[(preset, "curves")])
            if effects := measure_effects(arms):
                plots[(preset, "effects")] = f"{stem}-{preset}-effects.png"
                plot_effects(effects, folder / plots[(preset, "effects")])
        if study.groups:  # none where every run outside a study was interrupted
            plots[("comparison", "best")] = f"{stem}-best-loss.png"
            plot_comparison(study.groups, folder / plots[("comparison", "best")])
        plot_names.append(plots)
    write_atomic(out_file, render(studies, plot_names, target_halfwidth))
    write_results(studies, folder)
    return out_file


def _plot_stem(out_file: Path, study: Study, taken: set[str]) -> str:
    """Runs outside a study keep the plot names they always had; a study's name tells its plots apart,
    numbered when two reported folders hold studies of one name (their plots would overwrite each other)."""
    stem = out_file.stem if study.name is None else f"{out_file.stem}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', study.name)}"
    unique, n = stem, 1
    while unique in taken:
        n += 1
        unique = f"{stem}-{n}"
    taken.add(unique)
    return unique
