"""Train one task of a study: ``train_task(out, key)``, or ``python -m tinylm.study.worker OUT KEY``.

Every executor trains a run through this function (in its own process or another), so a run is
the same run whichever executor trained it. See tinylm.study.executor for the contract.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tinylm import checkpoint
from tinylm.config import RunConfig
from tinylm.errors import UserError
from tinylm.paths import DirLock, write_atomic
from tinylm.rundir import CONFIG_FILE, SUMMARY_FILE, read_summary
from tinylm.study.executor import TASKS_FILE, WORKER_EXIT, Outcome, claim_path, outcome_path
from tinylm.study.manifest import mark_summary, study_block, update_arm
from tinylm.study.plan import with_lr_factor


def read_tasks(out: Path) -> dict[str, dict[str, Any]]:
    """OUT/tasks.json's tasks by key ({} where there is none yet)."""
    path = out / TASKS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return dict(data["tasks"])
    except (OSError, ValueError, KeyError, TypeError):
        from tinylm.errors import damaged

        raise damaged(path, "delete it and rerun the study's command (finished runs are kept)") from None


def is_done(run_dir: Path) -> bool:
    """A run whose summary says it completed (an interrupted run writes one too, not completed)."""
    return (run_dir / SUMMARY_FILE).exists() and bool(read_summary(run_dir).get("completed"))


def train_task(out: Path, key: str, quiet: bool = True) -> Outcome:
    """Claim the run ``key`` of the study in ``out``, resolve its config, train (or resume, or find
    finished) it, and record the outcome beside it. Ctrl-C (KeyboardInterrupt) is not an outcome:
    it propagates, and the run resumes from its checkpoint next time."""
    claim = DirLock(claim_path(out, key), f"{out / key} is being trained by another process", file=True)
    try:
        claim_path(out, key).parent.mkdir(parents=True, exist_ok=True)
        if not claim.try_acquire():
            return Outcome(key, "busy", f"{out / key} is being trained by another process")
        outcome_path(out, key).unlink(missing_ok=True)
        try:
            _train(out, key, quiet)
            outcome = Outcome(key, "done")
        except Exception as e:  # noqa: BLE001 - any failure of one run is that run's outcome, in one line
            outcome = Outcome(key, "failed", one_line(e))
        write_atomic(outcome_path(out, key), outcome.to_json() + "\n")
        return outcome
    finally:
        claim.release()


def record_failure(out: Path, key: str, error: str) -> Outcome:
    """A failure the worker could not record (its LR trial failed, so it never started; it was killed):
    kept beside the run as a worker keeps its outcome, so that ``tinylm status`` says failed too. Left
    alone while another process holds the run (it trains it now)."""
    outcome = Outcome(key, "failed", error)
    claim = DirLock(claim_path(out, key), f"{out / key} is being trained by another process", file=True)
    claim_path(out, key).parent.mkdir(parents=True, exist_ok=True)
    if claim.try_acquire():
        try:
            write_atomic(outcome_path(out, key), outcome.to_json() + "\n")
        finally:
            claim.release()
    return outcome


def one_line(error: BaseException) -> str:
    """A failure as one line: a UserError's own text, else the exception's type and first line."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(error, UserError) else f"{type(error).__name__}: {first}".rstrip(": ")


def _train(out: Path, key: str, quiet: bool) -> None:
    task = read_tasks(out).get(key)
    if task is None:
        raise UserError(f"{out / TASKS_FILE} has no task {key}; rerun the study's command")
    if waiting := [k for k in task["after"] if not is_done(out / k)]:
        raise UserError(f"{key} started before {', '.join(waiting)} finished")
    cfg = RunConfig.from_dict(task["config"])
    factor = task.get("lr_factor")
    if task.get("tune"):  # a full run of an LR-tuned arm: the factor its trials chose
        summaries = {float(f): read_summary(out / k) for f, k in task["tune"]["trials"]}
        factor = pick_lr_factor(summaries, task["tune"]["rank_by"], f"arm {task['arm']} on {task['preset']}")
        cfg = with_lr_factor(cfg, factor)
        losses = {f"{f:g}": v for f, v in ranked_losses(summaries, task["tune"]["rank_by"]).items()}
        update_arm(out, task["arm"], task["preset"], lr_factor=factor, lr=cfg.train.lr, trial_losses=losses)
    run_dir = Path(cfg.train.out)
    _train_run(cfg, run_dir, task, quiet)
    trial = task["kind"] == "trial"
    mark_summary(run_dir, study_block(task["study"], task["arm"], factor, trial=trial))
    if trial:
        update_arm(out, task["arm"], task["preset"], trials={f"{factor:g}": key}, merge=True)


def _train_run(cfg: RunConfig, run_dir: Path, task: dict[str, Any], quiet: bool) -> None:
    """Train one run, resume it if it was interrupted, or leave it if it finished (with these settings)."""
    from tinylm.train import train

    label = task["label"]
    if is_done(run_dir):
        check_same_recipe(run_dir / CONFIG_FILE, cfg)
        if not quiet:
            print(f"[{label}] already finished, skipped", flush=True)
        return
    resume = (run_dir / CONFIG_FILE).exists() and checkpoint.exists(run_dir)  # else a fresh start reclaims
    if resume:
        check_same_recipe(run_dir / CONFIG_FILE, cfg)
    if not quiet:
        print(f"[{label}] {'resuming' if resume else 'training'}: {task['what']}", flush=True)
    nproc = task.get("nproc", 1)
    if nproc > 1:
        train_with_torchrun(cfg, resume, quiet, nproc)
        return
    if train(cfg, resume=resume, quiet=quiet).interrupted:
        raise KeyboardInterrupt


def ranked_losses(summaries: dict[float, dict[str, Any]], rank_by: str) -> dict[float, float | None]:
    """Each trial's best loss by ``rank_by``; by the packed best_val_loss for all of them where one lacks it
    (a trial finished by an older tinylm): one metric ranks them all, as in the report (runs.choose_metric)."""
    key = f"best_{rank_by}"
    if not all(key in s for s in summaries.values()):
        key = "best_val_loss"
    return {f: s.get(key) for f, s in summaries.items()}


def pick_lr_factor(summaries: dict[float, dict[str, Any]], rank_by: str, what: str) -> float:
    """The factor whose trial reached the lowest best validation loss (the first of equals)."""
    losses = ranked_losses(summaries, rank_by)
    finite = {f: v for f, v in losses.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if not finite:
        raise UserError(f"every LR trial of {what} failed to reach a finite validation loss; lower --lr")
    return min(finite, key=lambda f: finite[f])


def check_same_recipe(saved_path: Path, cfg: RunConfig) -> None:
    saved = RunConfig.load(saved_path)
    saved.model.vocab_size = cfg.model.vocab_size  # a trained BPE resizes it at run time
    saved.train.out = cfg.train.out  # the folder, which a resume may spell otherwise (absolute, relative)
    saved.train.tracker = cfg.train.tracker  # where a copy of the metrics goes, not what the run trains
    if cfg.train.grad_accum is None:  # resolved from the process count at run time
        saved.train.grad_accum = None
    if cfg.train.precision == "auto":  # resolved from the device at run time
        saved.train.precision = "auto"
    if saved.to_dict() != cfg.to_dict():
        raise UserError(
            f"{saved_path.parent} was started with other settings; rerun the original command or use another --out"
        )


def train_with_torchrun(cfg: RunConfig, resume: bool, quiet: bool, nproc: int) -> None:
    """One run as `torchrun -m tinylm train`, from a recipe file holding its exact config."""
    from tinylm.distributed import relaunch_with_torchrun

    run_dir = Path(cfg.train.out)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        argv = ["train", "--resume", str(run_dir)]
    else:
        recipe = run_dir.parent / f".{run_dir.name}.recipe.json"  # JSON is YAML too
        recipe.write_text(json.dumps(cfg.to_dict()))
        argv = ["train", "--config", str(recipe)]
    code = relaunch_with_torchrun(nproc, argv + (["--quiet"] if quiet else []))
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        raise UserError(f"training {run_dir} on {nproc} processes failed (exit code {code})")


def main(argv: list[str] | None = None) -> int:
    """``python -m tinylm.study.worker OUT KEY [--threads N] [--verbose]``: exit code by status
    (executor.WORKER_EXIT); a failed run's one-line error is the last line on stderr."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tinylm.study.worker", description=main.__doc__)
    parser.add_argument("out", type=Path, help="the study folder")
    parser.add_argument("key", help="the run's folder relative to it, e.g. tiny/base-seed0")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--verbose", action="store_true", help="the run's progress lines (a log file takes them)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        outcome = train_task(args.out, args.key, quiet=not args.verbose)
    except KeyboardInterrupt:
        print("tinylm: interrupted", file=sys.stderr)
        return 130
    if outcome.error:
        print(f"tinylm: {outcome.status}: {outcome.error}", file=sys.stderr)
    return WORKER_EXIT[outcome.status]


if __name__ == "__main__":
    sys.exit(main())
