"""Running a study: its arms on one or more presets, each with its seeds and, when the study tunes
LRs, its LR trials first. The seed report's four cumulative phases are the built-in ``seed``
study (src/tinylm/studies/seed.yaml).

Every run of a preset gets the same budget and the same validation stream; seed k of every arm
trains with the same seed (paired). The runs are planned here as tasks (executor.py) and trained
by an executor (local.py: in this process or in several; slurm.py), each through worker.py. A
finished run is skipped on a rerun; an interrupted one resumes; a failed one is retried; a rerun
with other settings is refused. OUT/study.json records the study as it goes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tinylm.config import RunConfig, TrainConfig
from tinylm.errors import UserError
from tinylm.paths import write_atomic
from tinylm.study.executor import TASKS_FILE, Executor, Outcome, Task
from tinylm.study.manifest import Manifest, study_lock
from tinylm.study.plan import Plan, trial_config
from tinylm.study.spec import DEFAULT_STUDY, PHASES, Arm, Phase, Study, dotted, load_study

__all__ = ["PHASES", "Phase", "StudyFailed", "ablate", "parse_phases", "phase_config", "plan_tasks", "run_study",
           "select_arms"]  # fmt: skip


def select_arms(study: Study, text: str | None) -> list[Arm]:
    """``--phases``: a subset of the study's arms, in the order given (all of them by default)."""
    arms = {a.name: a for a in study.arms}
    if not text:
        return list(arms.values())
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in arms]
    if unknown:
        raise UserError(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(arms)}")
    return [arms[n] for n in names]


def parse_phases(text: str | None) -> list[Phase]:
    return [PHASES[a.name] for a in select_arms(load_study(DEFAULT_STUDY), text)]


def legacy_settings(study: Study, base: TrainConfig, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """A whole TrainConfig as flags over a study: every setting but those the study sets and the run's folder."""
    fixed = set(dotted(study.base)) | {key for arm in study.arms for key in arm.changed} | {"train.out"}
    train = {k: v for k, v in dataclasses.asdict(base).items() if f"train.{k}" not in fixed}
    return {"train": train, "model": dict(model or {})}


def phase_config(base: TrainConfig, preset_name: str, phase: Phase, seed: int, run_dir: Path) -> RunConfig:
    """The config of one seed-study phase on a preset: ``base`` with the phase's settings."""
    study = load_study(DEFAULT_STUDY)
    arm = select_arms(study, phase.name)[0]
    plan = Plan(study, [preset_name], legacy_settings(study, dataclasses.replace(base, seed=seed)), run_dir.parent,
                [arm], seeds=1)  # fmt: skip
    cfg = plan.config(preset_name, arm, 0)
    cfg.train.out = str(run_dir)
    return cfg


def ablate(
    presets: list[str],
    base: TrainConfig,
    out: Path,
    phases: list[Phase],
    seeds: int = 1,
    model_overrides: dict[str, Any] | None = None,
    quiet: bool = False,
    nproc_per_node: int = 1,
) -> list[Path]:
    """The seed study's ``phases`` on every preset, ``base`` holding every other training setting."""
    study = load_study(DEFAULT_STUDY)
    arms = select_arms(study, ",".join(p.name for p in phases))
    settings = legacy_settings(study, base, model_overrides)
    return run_study(study, presets, settings, out, arms, seeds, quiet, nproc_per_node)


def run_study(
    study: Study,
    presets: list[str],
    settings: dict[str, Any],
    out: Path,
    arms: list[Arm] | None = None,
    seeds: int | None = None,
    quiet: bool = False,
    nproc_per_node: int = 1,
    executor: Executor | None = None,
) -> list[Path]:
    """Run (or finish) ``arms`` of ``study`` (all by default) on every preset, ``settings`` (the
    flags) over its base, with ``executor`` (default: one run at a time in this process); returns
    the full runs' directories in order. Every run's config is made, and so checked, before the
    first one trains. A failed run does not stop the others: StudyFailed lists them at the end."""
    plan = make_plan(study, presets, settings, out, arms, seeds, nproc_per_node)
    tasks = plan_tasks(plan, executor)
    run_tasks(out, tasks, executor or sequential(quiet))
    return [out / t.key for t in tasks if t.kind == "run"]


def make_plan(study: Study, presets: list[str], settings: dict[str, Any], out: Path, arms: list[Arm] | None = None,
              seeds: int | None = None, nproc_per_node: int = 1) -> Plan:  # fmt: skip
    seeds = study.seeds if seeds is None else seeds
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    return Plan(study, presets, settings, out, arms or study.arms, seeds, nproc_per_node)


def sequential(quiet: bool) -> Executor:
    from tinylm.study.local import LocalExecutor

    return LocalExecutor(jobs=1, quiet=quiet)


class StudyFailed(UserError):
    """Some runs of a study failed (the others trained): each with its one-line error."""

    def __init__(self, failed: list[Outcome]):
        self.failed = failed
        lines = [f"  {o.key}: {o.error}" for o in failed]
        super().__init__(f"{len(failed)} run(s) of the study failed (rerun the same command to retry only "
                         "them):\n" + "\n".join(lines))  # fmt: skip


def run_tasks(out: Path, tasks: list[Task], executor: Executor) -> None:
    """Hand the planned tasks to the executor; StudyFailed if any failed."""
    outcomes: dict[str, Outcome] = {}
    executor.run(out, tasks, lambda o: outcomes.__setitem__(o.key, o))
    failed = [outcomes[t.key] for t in tasks if t.key in outcomes and outcomes[t.key].status == "failed"]
    if failed:
        raise StudyFailed(failed)


def plan_tasks(plan: Plan, executor: Executor | None = None) -> list[Task]:
    """Every run of the plan as a Task (an LR-tuned arm's trials first), recorded in OUT/tasks.json
    and study.json (which names the executor). The full runs' folders: seed 0 keeps the one it has."""
    study, out = plan.study, plan.out
    configs = {(p, arm.name): [plan.config(p, arm, k) for k in range(plan.seeds)]
               for p in plan.presets for arm in plan.arms}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(plan)
    if executor is not None:
        manifest.executor = executor.describe()
    entries: dict[str, dict[str, Any]] = {}
    tasks = []
    for p in plan.presets:
        for arm in plan.arms:
            runs = configs[(p, arm.name)]
            trials: list[tuple[float, str]] = []
            for factor in study.lr_tune or []:
                run_dir = plan.trial_dir(p, arm, factor)
                cfg = trial_config(runs[0], factor, study.lr_tune_share, run_dir)
                key = manifest.relative(run_dir)
                trials.append((factor, key))
                entries[key] = _entry(study, p, arm, "trial", cfg, plan.nproc, f"trials/{p}/{run_dir.name}",
                                      f"LR trial: lr x {factor:g}", lr_factor=factor)  # fmt: skip
                tasks.append(Task(key, p, arm.name, "trial", (), entries[key]["what"]))
            tune = {"trials": [list(t) for t in trials], "rank_by": study.rank_by} if trials else None
            for cfg in runs:
                key = manifest.relative(Path(cfg.train.out))
                entries[key] = _entry(study, p, arm, "run", cfg, plan.nproc, f"{p}/{Path(key).name}", arm.key_change,
                                      after=[k for _, k in trials], tune=tune)  # fmt: skip
                tasks.append(Task(key, p, arm.name, "run", tuple(k for _, k in trials), arm.key_change))
            _record_arm(plan, manifest, p, arm, runs, trials)
    manifest.write()
    _write_tasks(out, entries)
    return tasks


def _entry(study: Study, preset_name: str, arm: Arm, kind: str, cfg: RunConfig, nproc: int, label: str, what: str,
           **more: Any) -> dict[str, Any]:  # fmt: skip
    return {"study": study.name, "preset": preset_name, "arm": arm.name, "kind": kind, "after": [], "lr_factor": None,
            "tune": None, "nproc": nproc, "label": label, "what": what, "config": cfg.to_dict(), **more}  # fmt: skip


def _record_arm(plan: Plan, manifest: Manifest, p: str, arm: Arm, runs: list[RunConfig],
                trials: list[tuple[float, str]]) -> None:  # fmt: skip
    """study.json's entries of an arm on a preset: its runs (those of earlier, larger seed counts kept),
    its budget, its trials, and its LR when the study tunes none."""
    earlier = manifest.arm(arm).get("runs", {}).get(p) or []
    mine = [manifest.relative(Path(c.train.out)) for c in runs]
    manifest.set(arm, "runs", p, list(dict.fromkeys([*mine, *earlier])) if len(earlier) > len(mine) else mine)
    manifest.set(arm, "budget", p, plan.arm_budget(runs[0]))
    if trials:
        manifest.set(arm, "trials", p, {f"{f:g}": key for f, key in trials})
    else:
        manifest.set(arm, "lr", p, runs[0].train.lr)
        manifest.set(arm, "lr_factor", p, None)


def _write_tasks(out: Path, entries: dict[str, dict[str, Any]]) -> None:
    """OUT/tasks.json: this plan's tasks over those of earlier commands (other arms, presets, seeds)."""
    from tinylm.study.worker import read_tasks

    with study_lock(out):
        tasks = {**read_tasks(out), **entries}
        write_atomic(out / TASKS_FILE, json.dumps({"tasks": tasks}, indent=1) + "\n")
