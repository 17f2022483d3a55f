"""How a study's runs are handed to an executor, and how each run's outcome comes back.

The launcher (``tinylm ablate``, :func:`tinylm.study.runner.run_study`) plans the study once:
every run, LR trials included, becomes a :class:`Task` named by its **key**, the run's folder
relative to the study folder OUT (``tiny/base-seed0``, ``trials/tiny/base-lr0.5``). The plan is
written to OUT/tasks.json (each task's planned config, what it waits for), study.json is
started, and the tasks go to one executor:

- an executor trains a task by calling :func:`tinylm.study.worker.train_task` ``(out, key)``, in
  its own process or another: ``python -m tinylm.study.worker OUT KEY`` is the same call from a
  shell, a subprocess or a Slurm task. The worker reads the task from OUT/tasks.json, claims the
  run (a lock held while it trains, so two processes never train one run), resolves its config
  at start (a full run of an LR-tuned arm takes the factor its arm's finished trials chose),
  trains it, resuming from its checkpoint when it has one, and returns an :class:`Outcome`;
- a task waits for the tasks in its ``after`` (an arm's LR trials before that arm's full runs on
  the same preset; nothing else). The executor starts it only once they are ``done``; if one of
  them failed, the task fails too without training. The worker refuses, as a failed outcome, a
  task started before its ``after`` are done;
- each outcome is also kept in OUT (:func:`outcome_path`), so ``tinylm status``, a rerun and
  another executor see it: a rerun retries failed tasks, skips done ones, and resumes the rest.

An executor is a module of this package named by ``--launcher`` (``local.py``, ``slurm.py``),
holding ``make_executor(args) -> Executor`` and, if it has flags, ``add_flags(parser, settings_flags)``:
``settings_flags`` is the CLI's flag maker for a config dataclass, passed in so that no executor
imports the CLI (which imports the study package).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

TaskKind = Literal["trial", "run"]
"""An LR trial (a short run at one LR factor, first seed) or one of an arm's full runs."""

Status = Literal["done", "failed", "busy"]
"""done: trained (now or before); failed: its one-line error says why; busy: another process holds
the run's claim (it is training it), so this one left it alone."""

TASKS_FILE = "tasks.json"
"""OUT/tasks.json: every task of the study by key, with its planned config (see runner.plan_tasks)."""

WORKER_EXIT = {"done": 0, "failed": 1, "busy": 3}
"""Exit code of ``python -m tinylm.study.worker OUT KEY`` for each status."""


@dataclass(frozen=True)
class Task:
    """One run of a study, as an executor sees it."""

    key: str
    """The run's folder relative to OUT (posix): what the worker is given."""
    preset: str
    arm: str
    kind: TaskKind
    after: tuple[str, ...] = ()
    """Keys of the tasks that must be done before this one starts (its arm's LR trials)."""
    label: str = ""
    """What the run is, for progress lines (``LR trial: lr x 0.5``, ``+ position rope``)."""


@dataclass(frozen=True)
class Outcome:
    """What became of one task."""

    key: str
    status: Status
    error: str | None = None
    """One line: why it failed (or, when busy, that another process holds it)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Outcome:
        raw = json.loads(text)
        return cls(raw["key"], raw["status"], raw.get("error"))


def side_path(out: Path, key: str, suffix: str) -> Path:
    """A file kept beside the run's folder, not in it (a fresh run wants its folder new or its own):
    OUT/tiny/.base-seed0<suffix>."""
    run_dir = out / key
    return run_dir.parent / f".{run_dir.name}{suffix}"


def outcome_path(out: Path, key: str) -> Path:
    """Where the worker keeps the task's last outcome (JSON of :class:`Outcome`)."""
    return side_path(out, key, ".outcome.json")


def claim_path(out: Path, key: str) -> Path:
    """The file whose lock the worker holds while it trains the run (tinylm.paths.DirLock)."""
    return side_path(out, key, ".claim")


def log_path(out: Path, key: str) -> Path:
    """The run's own output when an executor runs it away from the terminal."""
    from tinylm.rundir import RUN_LOG_FILE

    return out / key / RUN_LOG_FILE


class Executor(Protocol):
    """Trains a study's tasks somewhere."""

    name: str
    """``--launcher``'s value: local, slurm."""

    def describe(self) -> dict[str, Any]:
        """What study.json records as the study's ``executor`` (name and its settings), for ``tinylm status``."""
        ...

    def run(self, out: Path, tasks: Sequence[Task], on_outcome: Callable[[Outcome], None]) -> None:
        """Train ``tasks`` (in an order that respects ``after``), calling ``on_outcome`` once per task
        as it ends, and return when every task has an outcome. A task held by another process
        (``busy``) may be tried again later; its outcome is the one of that later try."""
        ...


LAUNCHERS = ("local", "slurm")
"""``--launcher``'s choices: each a module of this package."""


def executor_module(name: str):
    """The module of the executor ``--launcher NAME`` names, or a one-line UserError where it is missing."""
    import importlib

    from tinylm.errors import UserError

    try:
        return importlib.import_module(f"tinylm.study.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"tinylm.study.{name}":
            raise UserError(f"--launcher {name} needs {e.name}, which is not installed") from None
        raise UserError(f"--launcher {name} is not available in this tinylm") from None


def make_executor(name: str, args: Any, launch: dict[str, Any] | None = None) -> Executor:
    """The executor ``--launcher NAME`` and its flags (``args``) ask for; ``launch``: the study file's
    ``launch:`` block, whose settings for this executor the flags override (slurm's ``slurm:``)."""
    module = executor_module(name)
    if launch and name in launch:
        return module.make_executor(args, launch=launch)
    return module.make_executor(args)
