"""The local executor (``--launcher local``, the default): a study's runs on this machine.

``--jobs 1`` (the default on CPU) trains one run after another in this process, its progress on
the terminal as a single run's. More jobs train that many runs at once, each in its own process
(``python -m tinylm.study.worker``) whose output goes to the run's train.log, under one overall
progress line. On CPU the cores are shared out, jobs x threads <= cores; on CUDA each job is
pinned to one visible GPU (CUDA_VISIBLE_DEVICES), at most ``--runs-per-gpu`` on each.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tinylm.errors import UserError
from tinylm.paths import DirLock
from tinylm.study.executor import WORKER_EXIT, Outcome, Task, claim_path, log_path, outcome_path

RETRY_BUSY_S = 2.0
"""How soon a run another process holds is tried again (it is finished or resumed by then, or still busy)."""
HEARTBEAT_S = 60.0
"""The overall progress line is printed at least this often while runs train."""


def add_flags(parser: argparse.ArgumentParser, settings_flags: Callable | None = None) -> None:
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="runs trained at once, each in its own process (default 1 on CPU; on CUDA the visible "
                             "GPUs x --runs-per-gpu); on CPU the cores are shared out among them")  # fmt: skip
    parser.add_argument("--runs-per-gpu", type=int, default=None, metavar="K",
                        help="runs sharing one GPU at once (CUDA only; default 1)")  # fmt: skip


def cpu_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_executor(args: argparse.Namespace) -> LocalExecutor:
    """The executor ``--jobs`` and ``--runs-per-gpu`` ask for on this machine, or a one-line UserError."""
    import torch

    device = getattr(args, "train.device", None) or "auto"
    jobs, per_gpu = getattr(args, "jobs", None), getattr(args, "runs_per_gpu", None)
    quiet = bool(getattr(args, "quiet", False))
    for flag, value in (("--jobs", jobs), ("--runs-per-gpu", per_gpu)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    cuda = device != "cpu" and torch.cuda.is_available()
    if not cuda:
        if per_gpu is not None:
            raise UserError("--runs-per-gpu needs CUDA, which is not available here (or the runs' --device is cpu); "
                            "use --jobs to train runs at once on the CPU")  # fmt: skip
        jobs, cores = jobs or 1, cpu_cores()
        if jobs > cores:
            raise UserError(f"--jobs {jobs} is more than the {cores} CPU cores here; give at most --jobs {cores}")
        threads = cores // jobs if jobs > 1 else None  # one job keeps torch's own choice, as a plain train does
        return LocalExecutor(jobs=jobs, threads=threads, quiet=quiet)
    gpus = list(range(torch.cuda.device_count()))
    per_gpu = per_gpu or 1
    jobs = jobs or len(gpus) * per_gpu
    if jobs > len(gpus) * per_gpu:
        raise UserError(f"--jobs {jobs} is more than {len(gpus)} GPU(s) x --runs-per-gpu {per_gpu}; raise "
                        "--runs-per-gpu or lower --jobs")  # fmt: skip
    threads = max(1, cpu_cores() // jobs)
    return LocalExecutor(jobs=jobs, threads=threads, gpus=gpus, runs_per_gpu=per_gpu, quiet=quiet)


@dataclass
class LocalExecutor:
    """Trains a study's tasks on this machine (see the module's docstring)."""

    jobs: int = 1
    threads: int | None = None
    """torch threads per run in its own process (None: torch's default)."""
    gpus: list[int] = field(default_factory=list)
    """Visible GPUs the runs are pinned to (empty on CPU)."""
    runs_per_gpu: int = 1
    quiet: bool = False
    name: str = "local"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "jobs": self.jobs, "threads": self.threads, "gpus": len(self.gpus) or None,
                "runs_per_gpu": self.runs_per_gpu if self.gpus else None}  # fmt: skip

    @property
    def in_process(self) -> bool:
        """One run at a time on the CPU or one GPU: this process trains it, as `tinylm train` would."""
        return self.jobs == 1 and len(self.gpus) <= 1

    def run(self, out: Path, tasks: Sequence[Task], on_outcome: Callable[[Outcome], None]) -> None:
        Scheduler(self, out, list(tasks), on_outcome).run()


@dataclass
class Running:
    task: Task
    process: subprocess.Popen
    gpu: int | None
    log: TextIO
    started: float


class Scheduler:
    """Starts each task once what it waits for is done, keeps ``jobs`` of them going, and prints one
    overall progress line (done / running / failed / pending, ETA)."""

    def __init__(self, executor: LocalExecutor, out: Path, tasks: list[Task], on_outcome: Callable[[Outcome], None]):
        self.ex, self.out, self.on_outcome = executor, out, on_outcome
        self.pending = tasks
        self.outcomes: dict[str, Outcome] = {}
        self.running: dict[str, Running] = {}
        self.retry_at: dict[str, float] = {}
        self.durations: list[float] = []
        self.total = len(tasks)
        self.started = time.monotonic()
        self.last_line = 0.0

    def run(self) -> None:
        try:
            while self.pending or self.running:
                self.fail_orphans()
                started = self.start_ready()
                finished = self.reap()
                if not (started or finished):
                    if self.running or self.pending:
                        time.sleep(0.2)
                    if time.monotonic() - self.last_line > HEARTBEAT_S:
                        self.progress()
        except BaseException:
            self.stop_all()
            raise

    # --- choosing what to start ---------------------------------------------------------

    def dependency(self, key: str) -> str:
        """done, failed or waiting: a task's outcome here, else (a task of an earlier command) its folder."""
        if key in self.outcomes:
            return self.outcomes[key].status if self.outcomes[key].status != "busy" else "waiting"
        if any(t.key == key for t in self.pending) or key in self.running:
            return "waiting"
        from tinylm.study.worker import is_done

        return "done" if is_done(self.out / key) else "failed"

    def fail_orphans(self) -> None:
        """A task whose LR trial failed fails too, untrained."""
        for task in list(self.pending):
            failed = [k for k in task.after if self.dependency(k) == "failed"]
            if failed:
                from tinylm.study.worker import record_failure

                self.pending.remove(task)
                self.finish(record_failure(self.out, task.key, f"its LR trial {failed[0]} failed"))

    def ready(self) -> list[Task]:
        now = time.monotonic()
        return [t for t in self.pending if self.retry_at.get(t.key, 0) <= now
                and all(self.dependency(k) == "done" for k in t.after)]  # fmt: skip

    def start_ready(self) -> bool:
        from tinylm.study.worker import is_done

        started = False
        for task in self.ready():
            if len(self.running) >= self.ex.jobs:
                break
            self.pending.remove(task)
            if self.ex.in_process:
                self.train_here(task)
            elif is_done(self.out / task.key):  # a process would load torch for seconds only to say so
                self.settle(task, Outcome(task.key, "done"), 0.0)
            elif DirLock(claim_path(self.out, task.key), file=True).held_elsewhere():  # nor to find it busy
                self.settle(task, Outcome(task.key, "busy", "held by another process"), 0.0)
                continue
            else:
                self.spawn(task)
            started = True
        return started

    # --- training -----------------------------------------------------------------------

    def train_here(self, task: Task) -> None:
        from tinylm.study.worker import train_task

        t0 = time.monotonic()
        outcome = train_task(self.out, task.key, quiet=self.ex.quiet)
        self.settle(task, outcome, time.monotonic() - t0)

    def spawn(self, task: Task) -> None:
        gpu = self.free_gpu()
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        argv = [sys.executable, "-m", "tinylm.study.worker", str(self.out), task.key, "--verbose"]
        if self.ex.threads:
            argv += ["--threads", str(self.ex.threads)]
            env["OMP_NUM_THREADS"] = str(self.ex.threads)
        path = log_path(self.out, task.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a")
        log.write(f"--- tinylm study worker: {' '.join(argv[1:])}\n")
        log.flush()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        self.running[task.key] = Running(task, process, gpu, log, time.monotonic())
        self.progress(f"started {task.key}")

    def free_gpu(self) -> int | None:
        if not self.ex.gpus:
            return None
        load = {g: 0 for g in self.ex.gpus}
        for r in self.running.values():
            load[r.gpu] += 1
        return min(load, key=lambda g: (load[g], g))

    def reap(self) -> bool:
        finished = False
        for key, r in list(self.running.items()):
            code = r.process.poll()
            if code is None:
                continue
            del self.running[key]
            r.log.close()
            if code == 130 or code < 0 and -code in (signal.SIGINT, signal.SIGTERM):
                raise KeyboardInterrupt
            self.settle(r.task, self.read_outcome(r.task, code), time.monotonic() - r.started)
            finished = True
        return finished

    def read_outcome(self, task: Task, code: int) -> Outcome:
        """The worker's own record; without one (it was killed), what its exit code says."""
        path = outcome_path(self.out, task.key)
        if code == WORKER_EXIT["busy"]:
            return Outcome(task.key, "busy", "held by another process")
        try:
            return Outcome.from_json(path.read_text())
        except (OSError, ValueError, KeyError):
            from tinylm.study.worker import record_failure

            why = f"its process ended with exit code {code}; see {log_path(self.out, task.key)}"
            return record_failure(self.out, task.key, why)

    def settle(self, task: Task, outcome: Outcome, seconds: float) -> None:
        if outcome.status == "busy":  # another launcher trains it: try again later, when it may be done
            self.pending.append(task)
            self.retry_at[task.key] = time.monotonic() + RETRY_BUSY_S
            self.outcomes[task.key] = outcome
            return
        if outcome.status == "done":
            self.durations.append(seconds)
        self.finish(outcome)

    def finish(self, outcome: Outcome) -> None:
        self.outcomes[outcome.key] = outcome
        self.on_outcome(outcome)
        what = outcome.status if outcome.status == "done" else f"FAILED: {outcome.error}"
        self.progress(f"{outcome.key} {what}")

    # --- the one progress line ----------------------------------------------------------

    def counts(self) -> dict[str, int]:
        ended = [o for o in self.outcomes.values() if o.status != "busy"]
        return {"done": sum(o.status == "done" for o in ended), "running": len(self.running),
                "failed": sum(o.status == "failed" for o in ended), "pending": len(self.pending)}  # fmt: skip

    def eta_s(self) -> float | None:
        """Mean time of the runs finished here x the runs left, over the jobs; None before one finished."""
        trained = [d for d in self.durations if d > 1.0] or None  # a run found finished took no time
        if trained is None:
            return None
        left = len(self.pending) + len(self.running)
        return sum(trained) / len(trained) * left / max(1, self.ex.jobs)

    def progress(self, event: str = "") -> None:
        self.last_line = time.monotonic()
        if self.ex.quiet or (self.ex.in_process and "FAILED" not in event):
            return  # one run at a time here: its own progress lines say what happens
        c = self.counts()
        eta = self.eta_s()
        line = (f"[study {c['done']} done, {c['running']} running, {c['failed']} failed, {c['pending']} pending"
                f"{'' if eta is None else f', ETA {format_duration(eta)}'}] {event}")  # fmt: skip
        print(line.rstrip(), flush=True)

    def stop_all(self) -> None:
        """Ctrl-C or an error in the launcher: each run saves its checkpoint and stops (the rerun resumes it)."""
        for r in self.running.values():
            if r.process.poll() is None:
                r.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        for r in self.running.values():
            try:
                r.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.process.kill()
            r.log.close()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _die_with_parent() -> None:
    """Linux: the worker is sent SIGTERM when the launcher dies (even by SIGKILL), so it checkpoints and
    stops instead of training on unseen; a rerun resumes it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
