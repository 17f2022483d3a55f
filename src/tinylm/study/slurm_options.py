"""The Slurm launcher's settings: the ``launch: {slurm: ...}`` block of a study file and the
``--slurm-*`` flags. Apart from the executor (slurm.py) so that reading a study file checks its
block without importing what runs the tasks (and, through it, the report)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinylm.errors import UserError
from tinylm.fields import ConfigError, build, field_docs, nest, read_fields, require

__all__ = ["FLAG_DEST", "SlurmOptions", "add_flags", "read_options"]


@dataclass
class SlurmOptions:
    """What each array task asks Slurm for: the ``launch: {slurm: ...}`` block of a study file, or
    the ``--slurm-*`` flags."""

    partition: str | None = None
    """Slurm partition the tasks run in (default: the cluster's default partition)."""
    time: int = 60
    """Time limit of each task in minutes; a run stopped by it saves a checkpoint and is requeued to resume."""
    cpus_per_task: int | None = None
    """CPU cores per task (default: Slurm's, usually 1); the run's torch uses that many threads."""
    gpus_per_task: int | None = None
    """GPUs per task (default: none)."""
    mem_gb: float | None = None
    """Memory per task in GB (default: the partition's)."""
    account: str | None = None
    """Slurm account the tasks are charged to."""
    max_parallel: int | None = None
    """At most this many tasks of an array run at once (default: as many as Slurm starts)."""
    requeues: int = 10
    """Times a task stopped by its time limit puts itself back in the queue before it fails."""
    sbatch: dict[str, Any] = field(default_factory=dict)
    """More sbatch options by name, e.g. {qos: high, constraint: a100}; the flag: --slurm-sbatch qos=high."""

    def __post_init__(self) -> None:
        read_fields(self)
        require(self, ("time", "cpus_per_task", "max_parallel"), lambda v: v >= 1, "at least 1")
        require(self, ("gpus_per_task", "requeues"), lambda v: v >= 0, "0 or more")
        require(self, ("mem_gb",), lambda v: v > 0, "positive")
        if not isinstance(self.sbatch, dict) or not all(isinstance(k, str) for k in self.sbatch):
            raise ConfigError("sbatch", f"must map sbatch option names to values, got {self.sbatch!r}")

    def submitit_parameters(self, job_name: str) -> dict[str, Any]:
        """SlurmExecutor.update_parameters' arguments."""
        given = {
            "partition": self.partition, "cpus_per_task": self.cpus_per_task, "gpus_per_task": self.gpus_per_task,
            "account": self.account, "mem": f"{round(self.mem_gb * 1024)}MB" if self.mem_gb else None,
        }  # fmt: skip
        return {
            **{k: v for k, v in given.items() if v is not None},
            "job_name": job_name,
            "time": self.time,
            # SIGUSR2 this long before the limit: time to finish a step and save (a quarter of a short limit).
            "signal_delay_s": min(90, self.time * 60 // 4),
            "stderr_to_stdout": True,
            "additional_parameters": {k.replace("_", "-"): v for k, v in self.sbatch.items()},
            **({"array_parallelism": self.max_parallel} if self.max_parallel else {}),
        }


# --- flags and the launch block ----------------------------------------------------------------

FLAG_DEST = "slurm_"
"""The argparse dest of --slurm-X is slurm_X: no dot, so it is not taken for a run's setting."""


def add_flags(parser: argparse.ArgumentParser, settings_flags: Callable) -> None:
    """``--slurm-partition``, ``--slurm-time`` ...: one flag per SlurmOptions field, and
    ``--slurm-sbatch KEY=VALUE`` (repeatable) for any other sbatch option."""
    title = "Slurm (with --launcher slurm; over the study file's launch: {slurm: ...})"
    settings_flags(parser, SlurmOptions, title, FLAG_DEST, skip=("sbatch",), flag_prefix="slurm-")
    parser.add_argument("--slurm-sbatch", action="append", metavar="KEY=VALUE", dest=FLAG_DEST + "sbatch",
                        default=argparse.SUPPRESS,
                        help=" ".join(field_docs(SlurmOptions)["sbatch"].split()) + " (default: none)")  # fmt: skip


def read_options(args: argparse.Namespace | None, launch: dict[str, Any] | None = None) -> SlurmOptions:
    """The study file's ``launch: {slurm: ...}`` with the flags over it; a bad value is one line
    naming the flag or the block's key."""
    flags = {name[len(FLAG_DEST) :]: v for name, v in vars(args or argparse.Namespace()).items()
             if name.startswith(FLAG_DEST)}  # fmt: skip
    settings = nest(SlurmOptions, (launch or {}).get("slurm") or {}, "launch: slurm")
    if "sbatch" in flags:
        flags["sbatch"] = {**(settings.get("sbatch") or {}), **_key_values(flags["sbatch"])}
    try:
        return build(SlurmOptions, {**settings, **flags})
    except ConfigError as e:
        name = f"--slurm-{e.field.replace('_', '-')}" if e.field in flags else f"launch: slurm: {e.field}"
        raise UserError(f"{name} {str(e).removeprefix(e.field).strip()}") from None


def _key_values(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm-sbatch takes KEY=VALUE (an sbatch option without its --), got {pair!r}")
        out[key.strip()] = value.strip()
    return out
