"""``tinylm status OUT``: where a study stands, per preset and arm, read from its folder alone.

A run is done when its summary says it completed, running while another process holds its claim,
failed when its last outcome says so, pending otherwise. The ETA is the mean training time of the
finished runs times the runs left, over the executor's jobs (rough: trials are shorter).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tinylm.errors import UserError
from tinylm.paths import DirLock
from tinylm.rundir import read_summary
from tinylm.study.executor import Outcome, claim_path, outcome_path
from tinylm.study.local import format_duration
from tinylm.study.manifest import read_manifest
from tinylm.study.worker import is_done, read_tasks

STATES = ("done", "running", "failed", "pending")


def run_state(out: Path, key: str) -> tuple[str, str | None]:
    """One task's state and, when failed, its one-line error."""
    if is_done(out / key):
        return "done", None
    if DirLock(claim_path(out, key), file=True).held_elsewhere():
        return "running", None
    try:
        outcome = Outcome.from_json(outcome_path(out, key).read_text())
    except (OSError, ValueError, KeyError):
        return "pending", None
    return ("failed", outcome.error) if outcome.status == "failed" else ("pending", None)


def study_status(out: Path) -> str:
    manifest = read_manifest(out)
    tasks = read_tasks(out)
    if manifest is None or not tasks:
        raise UserError(f"{out} holds no study started by this tinylm (no study.json and tasks.json); "
                        "start one with tinylm ablate --out DIR")  # fmt: skip
    counts: dict[tuple[str, str], Counter] = {}
    failures, times = [], []
    for key, task in tasks.items():
        state, error = run_state(out, key)
        counts.setdefault((task["preset"], task["arm"]), Counter())[state] += 1
        if error:
            failures.append(f"  {key}: {error}")
        if state == "done":
            times.append(read_summary(out / key).get("train_time_s") or 0.0)
    executor = manifest.get("executor") or {"name": "local", "jobs": 1}
    lines = [f"study {manifest.get('study')} in {out}: executor {_executor_text(executor)}", "",
             f"{'preset':<10} {'arm':<20} " + " ".join(f"{s:>8}" for s in STATES)]  # fmt: skip
    total = Counter()
    for (preset, arm), c in counts.items():
        total.update(c)
        lines.append(f"{preset:<10} {arm:<20} " + " ".join(f"{c[s]:>8}" for s in STATES))
    lines.append(f"{'all':<10} {'':<20} " + " ".join(f"{total[s]:>8}" for s in STATES))
    left = total["pending"] + total["running"] + total["failed"]
    if times and left:
        eta = sum(times) / len(times) * left / max(1, executor.get("jobs") or 1)
        lines.append(f"\nETA about {format_duration(eta)} (mean of the {len(times)} finished runs' training time)")
    elif not left:
        lines.append("\nevery run is done")
    if failures:
        lines += ["", "failed (a rerun of the study's command retries them):", *failures]
    return "\n".join(lines)


def _executor_text(executor: dict) -> str:
    settings = ", ".join(f"{k} {v}" for k, v in executor.items() if k != "name" and v is not None)
    return f"{executor.get('name')}" + (f" ({settings})" if settings else "")
