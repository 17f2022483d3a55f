"""The run's metrics log: one JSON object per line in metrics.jsonl, optionally TensorBoard too."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tinylm.paths import write_atomic
from tinylm.rundir import METRICS_FILE, TENSORBOARD_DIR, read_metrics

__all__ = ["METRICS_FILE", "MetricsLog", "read_metrics", "truncate_metrics"]  # read_metrics: its old import path


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf; write them as strings so the file stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = run_dir / METRICS_FILE
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / TENSORBOARD_DIR))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def sync(self) -> None:
        """Make every line written so far durable (fsync): a checkpoint is committed only after the
        metrics it covers, so a crash never leaves a checkpoint ahead of its metrics."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records past ``last_step`` (written after the checkpoint a resume starts from)."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
