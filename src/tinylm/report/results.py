"""results.csv and results.json: one row per run, the figures behind the report's tables."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from tinylm.paths import write_atomic
from tinylm.report.studies import Study

RESULT_COLUMNS = ["study", "preset", "arm", "phase", "seed", "lr", "lr_factor", "params", "start_val_loss",
                  "best_val_loss", "worst_val_loss", "final_val_loss", "best_val_loss_doc", "final_val_loss_doc",
                  "train_time_s", "steps", "skipped_updates", "tokens", "real_tokens", "flops_per_token",
                  "train_flops", "utilisation", "stability", "stability_reason", "run_dir"]  # fmt: skip
"""A key a run's summary lacks (one written before it existed) is empty in the CSV and null in the JSON."""


def result_rows(studies: list[Study]) -> list[dict]:
    rows = []
    for study in studies:
        for arm in (arm for arms in study.groups.values() for arm in arms):
            for r in arm.runs:
                s = r.summary
                row = {k: s.get(k) for k in RESULT_COLUMNS}
                row.update(study=study.name or r.study_tag.get("name"), preset=r.preset, arm=arm.name, phase=r.phase,
                           seed=r.seed, lr=r.recipe.get("lr"), lr_factor=r.study_tag.get("lr_factor"),
                           stability=s["stability"]["label"], stability_reason=s["stability"]["reason"],
                           run_dir=_relative(r.run_dir, study.folder))  # fmt: skip
                rows.append(row)
    return rows


def _relative(run_dir: Path, folder: Path | None) -> str:
    """The run's folder as seen from the study's: results stay true when the study folder moves to another machine."""
    if folder is None:
        return str(run_dir)
    return Path(os.path.relpath(run_dir.resolve(), folder.resolve())).as_posix()


def write_results(studies: list[Study], folder: Path) -> None:
    """results.json and results.csv in folder."""
    rows = result_rows(studies)
    write_atomic(folder / "results.json", json.dumps(rows, indent=2) + "\n")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=RESULT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(folder / "results.csv", table.getvalue())
