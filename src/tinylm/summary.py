"""summary.json: the figures of one run that the report and users read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tinylm.errors import UserError

SUMMARY_FILE = "summary.json"


def write_summary(run_dir: Path, progress, context: dict[str, Any], monitor, interrupted: bool, steps_budget) -> dict:
    vals = [v for _, v in progress.val_losses]
    finite = [v for v in vals if math.isfinite(v)]
    best_step = None
    if finite:
        best_step = min((v, s) for s, v in progress.val_losses if math.isfinite(v))[1]
    summary = {
        **context,
        "start_val_loss": vals[0] if vals else None,
        "best_val_loss": min(finite) if finite else None,
        "best_step": best_step,
        "worst_val_loss": max(finite) if finite else None,
        "final_val_loss": vals[-1] if vals else None,
        "final_train_loss": monitor.last_train_loss,
        "train_time_s": round(progress.elapsed_s, 3),
        "steps": progress.step,
        "steps_budget": steps_budget,
        "tokens": progress.tokens,
        "real_tokens": progress.real_tokens,
        "utilisation": progress.real_tokens / progress.tokens if progress.tokens else None,
        "tokens_per_s": progress.tokens / progress.elapsed_s if progress.elapsed_s > 0 else None,
        "stability": monitor.report(vals[-1] if vals else None),
        "skipped_updates": monitor.skipped,  # updates the guard left out: fewer real steps than "steps"
        "events": monitor.events,
        "interrupted": interrupted,
        "completed": not interrupted and not monitor.gave_up,
    }
    tmp = run_dir / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(run_dir / SUMMARY_FILE)
    return summary


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json; a missing or damaged one is a one-line UserError naming it."""
    path = run_dir / SUMMARY_FILE
    advice = "train that run again (tinylm train --resume rewrites it) or leave its folder out"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {advice}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged; {advice}")
    return data
