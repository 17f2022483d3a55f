"""summary.json: the figures of one run that the report and users read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tinylm.paths import write_atomic
from tinylm.rundir import SUMMARY_FILE, read_summary

__all__ = ["SUMMARY_FILE", "read_summary", "write_summary"]  # the first two: their old import path


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
        **per_document_figures(progress.val_losses_doc, progress.val_losses),
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
    write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def per_document_figures(doc_losses: list[tuple[int, float]], packed_losses: list[tuple[int, float]]) -> dict:
    """start/best/worst/final of the per-document validation loss; None where never measured.

    A run resumed from a checkpoint written before the per-document loss existed has it only
    from then on: its start is None then, not a later evaluation passed off as the start.
    """
    vals = [v for _, v in doc_losses]
    finite = [v for v in vals if math.isfinite(v)]
    started = bool(doc_losses) and bool(packed_losses) and doc_losses[0][0] == packed_losses[0][0]
    return {
        "start_val_loss_doc": vals[0] if started else None,
        "best_val_loss_doc": min(finite) if finite else None,
        "worst_val_loss_doc": max(finite) if finite else None,
        "final_val_loss_doc": vals[-1] if vals else None,
    }
