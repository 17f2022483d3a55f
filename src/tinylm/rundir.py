"""The run directory: the files a run leaves behind, and reading them back.

``tinylm train --out DIR`` writes::

    DIR/config.json          the resolved RunConfig                          read_config
    DIR/metrics.jsonl        one JSON record per logged step, evaluation, event  read_metrics
    DIR/summary.json         the figures of the finished (or stopped) run    read_summary
    DIR/checkpoint.json      the pointer to the current checkpoint folder    (checkpoint.py)
    DIR/checkpoint-NNNNNN/   its weights and trainer state                   (checkpoint.py)
    DIR/tokenizer.json       a trained BPE (absent for gpt2)
    DIR/eval.json            tinylm eval's result
    DIR/tensorboard/         with --tracker tensorboard
    DIR/wandb/               with --tracker wandb (its local files; the MLflow store is beside the runs)
    DIR/tracking.json        the tracker's run ids, so that a resume goes on in the same tracked run
    DIR/train.log            the run's output, when a study's executor ran it (tinylm.study)

Every whole-file write goes through :func:`write_atomic`, so a kill leaves the old file or
the new one; metrics.jsonl is the exception, appended line by line, and its reader drops a
torn last line. Each reader turns a missing or damaged file into one line naming it and
saying what to do. :func:`load_run` gives sampling, evaluation and export a trained model.
The checkpoint's own layout (its files, the atomic switch) is in checkpoint.py; its names are
repeated here so that this module lists everything a run directory holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinylm import checkpoint
from tinylm.checkpoint import MODEL_FILE, POINTER_FILE, STATE_FILE
from tinylm.config import RunConfig
from tinylm.data.tokenizer import BPETokenizer, Tokenizer, load_tokenizer
from tinylm.errors import damaged, missing
from tinylm.model import GPT
from tinylm.paths import write_atomic

__all__ = [
    "CONFIG_FILE", "EVAL_FILE", "METRICS_FILE", "MODEL_FILE", "POINTER_FILE", "RUN_LOG_FILE", "STATE_FILE",
    "SUMMARY_FILE", "TENSORBOARD_DIR", "TOKENIZER_FILE", "TRACKING_FILE", "LoadedRun", "load_run", "read_config",
    "read_metrics", "read_summary", "tokenizer_file", "write_atomic",
]  # fmt: skip

CONFIG_FILE = "config.json"
"""Where a run directory keeps its resolved RunConfig."""
SUMMARY_FILE = "summary.json"
RUN_LOG_FILE = "train.log"
"""The run's own output when a study's executor trains it away from the terminal; a fresh run may
start in a folder that holds only this (and keeps appending to it)."""
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
TENSORBOARD_DIR = "tensorboard"
TRACKING_FILE = "tracking.json"
TOKENIZER_FILE = BPETokenizer.FILE  # the tokenizer module reads and writes it, in prepared data too


def read_config(run_dir: Path) -> RunConfig:
    """The run's config.json; a missing, damaged or invalid file is a one-line UserError naming it."""
    return RunConfig.load(run_dir / CONFIG_FILE)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json; a missing or damaged one is a one-line UserError naming it."""
    path = run_dir / SUMMARY_FILE
    advice = "train that run again (tinylm train --resume rewrites it) or leave its folder out"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise missing(path, advice) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        raise damaged(path, advice)
    return data


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A torn last line (a kill inside a write) is dropped: its step is
    past the last checkpoint, so a resume trains it again. A damaged line before it is a UserError."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            if number == len(lines):
                break
            raise damaged(f"{path} line {number}", "delete that line and try again", "not a JSON object")
        records.append(record)
    return records


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def tokenizer_file(run_dir: Path) -> Path | None:
    """The run's trained tokenizer, None for a fixed one (gpt2)."""
    path = run_dir / TOKENIZER_FILE
    return path if path.exists() else None


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: GPT
    tokenizer: Tokenizer


def load_run(run_dir: Path, device: torch.device | None = None) -> LoadedRun:
    """A run's model (eval mode) and the tokenizer it was trained with."""
    cfg = read_config(run_dir)  # a missing or damaged file is a one-line UserError
    checkpoint.check_config(run_dir, run_dir / CONFIG_FILE, cfg.fixed_settings())  # a valid but altered one too
    model = GPT(cfg.model)
    checkpoint.load_weights(run_dir, model)
    model.to(device or torch.device("cpu")).eval()
    return LoadedRun(cfg, model, load_tokenizer(cfg.train.tokenizer, run_dir))
