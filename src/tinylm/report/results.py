"""results.csv and results.json: one row per run, the figures behind the report's tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tinylm.report.runs import Arm

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


def write_results(arms: list[Arm], folder: Path) -> None:
    """results.json and results.csv in folder."""
    rows = result_rows(arms)
    (folder / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
