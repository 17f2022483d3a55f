"""The run's metrics log: one JSON object per line in metrics.jsonl, optionally an experiment tracker too."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tinylm.paths import write_atomic
from tinylm.rundir import METRICS_FILE, read_metrics
from tinylm.tracking import Tracking

__all__ = ["METRICS_FILE", "MetricsLog", "read_metrics", "truncate_metrics"]  # read_metrics: its old import path


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf; write them as strings so the file stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """metrics.jsonl, and the run's tracker (tinylm.tracking), which gets every record written here."""

    def __init__(self, run_dir: Path, tracking: Tracking | None = None):
        self.path = run_dir / METRICS_FILE
        self._file = open(self.path, "a")
        self.tracking = tracking

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self.tracking is not None:
            self.tracking.log(record)

    def sync(self) -> None:
        """Make every line written so far durable (fsync): a checkpoint is committed only after the
        metrics it covers, so a crash never leaves a checkpoint ahead of its metrics."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Close the file, and end the tracked run with the run's summary (its final figures)."""
        self._file.close()
        if self.tracking is not None:
            self.tracking.finish(summary)


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records past ``last_step`` (written after the checkpoint a resume starts from)."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
