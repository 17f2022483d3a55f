"""``--launcher slurm``: a study's tasks as Slurm job arrays, one array task per run, through submitit.

The launcher submits the tasks that wait for nothing as one array, then, for each arm that tunes
its LR, its full runs as another array that starts once that arm's trials have ended
(``--dependency=afterany`` on their array tasks; the worker refuses a run whose trials did not
finish, as a failed outcome). It then follows the tasks (their outcome files in OUT and
``squeue``) until each has an outcome. Every task calls the worker (tinylm.study.worker), so a run
is the same run as the local executor's. The last task of a launch to end writes OUT/report.md,
so the report appears even if the launcher was stopped; ``tinylm report OUT`` writes it too.

A task stopped by its time limit (Slurm sends SIGUSR2 shortly before) finishes its step, saves a
checkpoint and puts itself back in the queue (``scontrol requeue``); one pre-empted, or cancelled
with ``scancel``, saves a checkpoint on the SIGTERM and, requeued (by Slurm's pre-emption, or by
``scontrol requeue JOB_TASK``), resumes from it. Submitit's files and each task's log are kept in
OUT/.slurm/, so OUT must be on a filesystem every node shares.

Settings come from the ``slurm:`` part of the study file's ``launch:`` block, then the
``--slurm-*`` flags (which win); see docs/slurm.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.errors import UserError
from tinylm.study.executor import Outcome, Task, claim_path, log_path, outcome_path
from tinylm.study.slurm_options import SlurmOptions, read_options
from tinylm.study.slurm_options import add_flags as add_flags  # the launcher's flags, found here by the CLI

SUBMITIT_DIR = ".slurm"
"""OUT/.slurm/: submitit's pickles and every array task's log (``<array>_<task>_0_log.out``: what the
task did, its requeues, its one-line error); the run's own output goes to OUT/KEY/train.log."""
REPORT_LOCK = ".report.lock"
"""OUT/.report.lock: held while a task writes the report, so two tasks ending at once take turns."""
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "COMPLETING",
         "CONFIGURING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "PREEMPTED"}  # fmt: skip
"""squeue states of a task that has not ended (a pre-empted one is requeued by Slurm)."""
GRACE_S = 30.0
"""How long a task may be gone from squeue without an outcome before it counts as failed: a shared
filesystem's lag, or a cancelled task being requeued by hand."""


# --- is there a cluster? ------------------------------------------------------------------------


def check_submitit() -> None:
    """submitit submits the job arrays: an optional extra, so its absence is one line naming it."""
    if importlib.util.find_spec("submitit") is None:
        raise UserError("--launcher slurm needs the submitit package: pip install 'tinylm[slurm]'")


def check_cluster(timeout_s: float = 20.0) -> None:
    """One line, before anything is planned or submitted, when Slurm's commands are missing or its
    controller does not answer."""
    missing = [c for c in ("sbatch", "squeue", "scontrol", "srun") if shutil.which(c) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"--launcher slurm needs Slurm's commands, and {', '.join(missing)} {verb} not on PATH; "
                        "run tinylm on a machine of the cluster (a login node)")  # fmt: skip
    try:
        answer = subprocess.run(["squeue", "-h", "-u", _user(), "-o", "%i"], capture_output=True, text=True,
                                timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise UserError(f"--launcher slurm: the Slurm controller did not answer within {timeout_s:g} s "
                        "(squeue); check that the cluster is up with: sinfo") from None  # fmt: skip
    if answer.returncode != 0:
        said = (answer.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"--launcher slurm: the Slurm controller does not answer (squeue: {said}); "
                        "check that the cluster is up with: sinfo")  # fmt: skip


def _user() -> str:
    import getpass

    return getpass.getuser()


def make_executor(args: argparse.Namespace | None, launch: dict[str, Any] | None = None,
                  quiet: bool = False) -> SlurmExecutor:  # fmt: skip
    """The executor ``--launcher slurm`` names, its settings read and the cluster asked first."""
    options = read_options(args, launch)
    check_submitit()
    check_cluster()
    return SlurmExecutor(options, quiet=quiet or bool(getattr(args, "quiet", False)))


# --- the launcher's side ------------------------------------------------------------------------


@dataclass
class Submitted:
    """A task handed to Slurm: its array task id (``12_3``) and its log."""

    key: str
    job_id: str
    log: Path


class SlurmExecutor:
    """Trains a study's tasks as Slurm array tasks and follows them until each has an outcome."""

    name = "slurm"

    def __init__(self, options: SlurmOptions, quiet: bool = False, poll_s: float = 5.0):
        self.options, self.quiet, self.poll_s = options, quiet, poll_s

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v for k, v in dataclasses.asdict(self.options).items() if v not in (None, {})}}

    def run(self, out: Path, tasks: Sequence[Task], on_outcome: Callable[[Outcome], None]) -> None:
        from tinylm.study.worker import is_done

        out = out.resolve()  # the tasks run in another process, maybe on another machine
        todo = []
        for task in tasks:
            if is_done(out / task.key):
                on_outcome(Outcome(task.key, "done"))
            else:
                todo.append(task)
        if not todo:
            return
        for task in todo:  # an outcome from an earlier command is not this one's
            outcome_path(out, task.key).unlink(missing_ok=True)
        submitted = self.submit(out, todo)
        if not self.quiet:
            arrays = sorted({s.job_id.split("_")[0] for s in submitted.values()})
            print(f"slurm: {len(submitted)} task(s) submitted as job array(s) {', '.join(arrays)} "
                  f"(squeue -j {','.join(arrays)}); logs in {out / SUBMITIT_DIR}", flush=True)  # fmt: skip
        try:
            self.follow(out, submitted, on_outcome)
        except KeyboardInterrupt:
            print(f"slurm: stopped following; the tasks go on (squeue), and the last to end writes "
                  f"{out / 'report.md'}", file=sys.stderr, flush=True)  # fmt: skip
            raise

    def submit(self, out: Path, tasks: Sequence[Task]) -> dict[str, Submitted]:
        """One array for the tasks that wait for nothing here, then one per group of tasks waiting for
        the same tasks (an arm's full runs after its trials), each depending on those array tasks."""
        import submitit

        folder = out / SUBMITIT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        keys = [t.key for t in tasks]
        waves: dict[tuple[str, ...], list[Task]] = {}
        for task in tasks:
            waves.setdefault(tuple(k for k in task.after if k in keys), []).append(task)
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=self.options.requeues)
        params = self.options.submitit_parameters(f"tinylm-{out.name}")
        submitted: dict[str, Submitted] = {}
        for after in sorted(waves, key=len):  # () first: nothing waits on a later wave
            wave = waves[after]
            dependency = ":".join(submitted[k].job_id for k in after)
            executor.update_parameters(**params, dependency=f"afterany:{dependency}" if dependency else None)
            n = len(wave)
            jobs = executor.map_array(run_task, [str(out)] * n, [t.key for t in wave], [keys] * n,
                                      [self.options.requeues] * n)  # fmt: skip
            for task, job in zip(wave, jobs):
                submitted[task.key] = Submitted(task.key, job.job_id, Path(str(job.paths.stdout)))
        return submitted

    def follow(self, out: Path, submitted: dict[str, Submitted], on_outcome: Callable[[Outcome], None]) -> None:
        """Until every task has an outcome: the task's own outcome file, or, for a task that left the
        queue without one (cancelled, killed, out of memory, failed to start), a failed outcome."""
        from tinylm.paths import DirLock
        from tinylm.study.worker import is_done

        waiting = dict(submitted)
        finishing: set[str] = set()  # tasks that wrote their outcome: they may still be writing the report
        gone_since: dict[str, float] = {}
        shown = None
        while waiting:
            states = queue_states({s.job_id.split("_")[0] for s in waiting.values()})
            if states is None:  # the controller is busy: ask again later, take nothing as ended
                time.sleep(self.poll_s)
                continue
            for key, task in list(waiting.items()):
                outcome = read_outcome(out, key)
                if outcome is None and states.get(task.job_id) in ALIVE:
                    gone_since.pop(key, None)
                    continue
                if outcome is None and is_done(out / key):  # finished by another process (this task found it busy)
                    outcome = Outcome(key, "done")
                elif outcome is None and DirLock(claim_path(out, key), file=True).held_elsewhere():
                    gone_since.pop(key, None)  # another launch trains it now: follow it until it ends
                    continue
                if outcome is None and time.monotonic() - gone_since.setdefault(key, time.monotonic()) < GRACE_S:
                    continue
                if outcome is not None:
                    finishing.add(task.job_id)
                on_outcome(outcome or Outcome(key, "failed", lost_task(task)))
                del waiting[key]
            counts = _counts(states, waiting)
            if not self.quiet and counts != shown and waiting:
                print(f"slurm: {len(submitted) - len(waiting)} ended, {counts[0]} running, {counts[1]} pending",
                      flush=True)  # fmt: skip
                shown = counts
            if waiting:
                time.sleep(self.poll_s)
        self.wait_for_exit(finishing)

    def wait_for_exit(self, jobs: set[str], limit_s: float = 600.0) -> None:
        """A task writes its outcome before it ends, and the last one then writes the report: return
        once these tasks have left the queue, so the study's command ends with its report written."""
        arrays = {job.split("_")[0] for job in jobs}
        deadline = time.monotonic() + limit_s
        while jobs and time.monotonic() < deadline:
            states = queue_states(arrays)
            if states is not None and not jobs & {job for job, state in states.items() if state in ALIVE}:
                return
            time.sleep(self.poll_s)


def _counts(states: dict[str, str], waiting: dict[str, Submitted]) -> tuple[int, int]:
    running = sum(states.get(s.job_id) == "RUNNING" for s in waiting.values())
    return running, len(waiting) - running


def queue_states(arrays: set[str]) -> dict[str, str] | None:
    """``{"12_3": "RUNNING", ...}``: every array task squeue still lists (pending ones one by one);
    None when squeue did not answer this time. squeue, not sacct: a cluster without accounting
    (slurmdbd) has no sacct, and submitit's states are then UNKNOWN."""
    try:
        answer = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(sorted(arrays)), "-o", "%i %T"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    if answer.returncode != 0:  # every id unknown: they all ended some time ago
        return {} if "Invalid job id" in answer.stderr else None
    return dict(line.split()[:2] for line in answer.stdout.splitlines() if len(line.split()) >= 2)


def read_outcome(out: Path, key: str) -> Outcome | None:
    path = outcome_path(out, key)
    try:
        return Outcome.from_json(path.read_text())
    except (OSError, ValueError, KeyError):  # absent, or being written by a filesystem that is not atomic
        return None


def lost_task(task: Submitted) -> str:
    """Why a task left the queue without an outcome: its state, and the error its log ends with."""
    state = _final_state(task.job_id)
    said = _last_error(task.log)
    why = f"Slurm task {task.job_id} ended {state or 'without an outcome'}"
    if said:
        return f"{why}: {said}"
    return (f"{why} and wrote no outcome; its log: {task.log} (requeue it with: scontrol requeue {task.job_id}, "
            "or rerun the command; a task that cannot see the study folder fails so: it must be on a filesystem "
            "every node shares)")  # fmt: skip


def _final_state(job_id: str) -> str | None:
    try:
        answer = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    for word in answer.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return None


def _last_error(log: Path) -> str | None:
    """The task's own one-line error (``tinylm: error: ...``), if its log holds one."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    errors = [line for line in lines if line.startswith("tinylm: error: ")]
    return errors[-1].removeprefix("tinylm: error: ") if errors else None


# --- the task's side ----------------------------------------------------------------------------


def run_task(out: str, key: str, launch: list[str], requeues: int = 10) -> str:
    """One array task: train the run ``key`` of the study in ``out`` through the worker; then, if it
    is the last of ``launch`` (the keys submitted together) to end, write the report. Returns the
    outcome's status. Exits with code 2 and one ``tinylm: error:`` line when the study folder cannot
    be written from this node."""
    study = Path(out)
    try:
        check_shared(study)
    except UserError as e:
        print(f"tinylm: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    from tinylm.study.worker import train_task
    _threads_from_slurm()
    requeue = _RequeueOnTimeout(requeues)
    log = log_path(study, key)  # the run's own output, where every executor puts it
    log.parent.mkdir(parents=True, exist_ok=True)
    with requeue.installed(), open(log, "a") as stream:
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                outcome = train_task(study, key, quiet=False)
        except KeyboardInterrupt:  # stopped by a signal: the run saved a checkpoint
            requeue.after_stop(key)
            raise SystemExit(143) from None
    print(f"tinylm: {key}: {outcome.status}{': ' + outcome.error if outcome.error else ''}", flush=True)
    if all(read_outcome(study, k) is not None for k in launch):
        write_report(study)
    return outcome.status


def check_shared(out: Path) -> None:
    """The study folder exists here and takes a new file: a task on a node that does not share it
    (or cannot write it) says so instead of failing somewhere in training."""
    from tinylm.study.executor import TASKS_FILE

    host = socket.gethostname()
    problem = None
    if not (out / TASKS_FILE).is_file():
        problem = f"it does not hold {TASKS_FILE} here"
    else:
        try:
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as e:
            problem = f"it cannot be written here ({e.strerror or e})"
    if problem:
        raise UserError(f"the study folder {out} is not usable on node {host}: {problem}; with --launcher slurm "
                        "it must be on a filesystem every node shares and can write")  # fmt: skip


def _threads_from_slurm() -> None:
    """The run's torch uses the cores Slurm gave the task, not every core of the node (a cluster without
    cgroups does not hide the others, and two tasks on one node would fight over them)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    if cpus and cpus.isdigit():
        import torch

        torch.set_num_threads(int(cpus))


class _RequeueOnTimeout:
    """Slurm's SIGUSR2 before the time limit becomes the SIGTERM a run stops on (it finishes its step
    and saves a checkpoint); the task then puts itself back in the queue, up to ``requeues`` times.
    On a plain SIGTERM (pre-emption, scancel) it only stops: Slurm's pre-emption requeues it itself,
    and a cancelled task waits for ``scontrol requeue``."""

    def __init__(self, requeues: int) -> None:
        self.requeues, self.timed_out = requeues, False

    def installed(self):
        @contextlib.contextmanager
        def handler():
            def on_usr2(signum, frame):  # noqa: ANN001 - a signal handler's signature
                self.timed_out = True
                signal.raise_signal(signal.SIGTERM)

            previous = signal.signal(signal.SIGUSR2, on_usr2)
            try:
                yield
            finally:
                signal.signal(signal.SIGUSR2, previous)

        return handler()

    def after_stop(self, key: str) -> None:
        job = _own_job_id()
        if not self.timed_out or job is None:
            print(f"tinylm: {key}: stopped; it resumes from its checkpoint when requeued (scontrol requeue "
                  f"{job or 'JOB_TASK'})", flush=True)  # fmt: skip
            return
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= self.requeues:
            print(f"tinylm: error: {key} reached its time limit {restarts + 1} times; give it more with "
                  "--slurm-time and rerun the command", flush=True)  # fmt: skip
            return
        print(f"tinylm: {key}: time limit near; checkpoint saved, requeued to resume ({job})", flush=True)
        subprocess.run(["scontrol", "requeue", job], timeout=60, check=False)


def _own_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def write_report(out: Path) -> None:
    """OUT/report.md, by one task at a time (two ending together take turns; the later one rewrites it)."""
    from tinylm.paths import DirLock
    from tinylm.report import write_report as report

    lock = DirLock(out / REPORT_LOCK, file=True)
    lock.acquire(wait=True)
    try:
        print(f"tinylm: report written to {report([out], out / 'report.md')}", flush=True)
    finally:
        lock.release()
