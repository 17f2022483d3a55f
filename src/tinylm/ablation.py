"""Running a study (tinylm.study): its arms on one or more presets, each with its seeds and, when the
study tunes LRs, its LR trials first. The seed report's four cumulative phases are the built-in
``seed`` study (src/tinylm/studies/seed.yaml).

Every run of a preset gets the same budget and the same validation stream; seed k of every arm
trains with the same seed (paired). A finished run is skipped on a rerun; an interrupted one
resumes; a rerun with other settings is refused. OUT/study.json records the study as it goes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm import checkpoint
from tinylm.config import RunConfig, TrainConfig
from tinylm.errors import UserError
from tinylm.manifest import Manifest, mark_summary, study_block
from tinylm.rundir import CONFIG_FILE, SUMMARY_FILE, read_summary
from tinylm.study import DEFAULT_STUDY, Arm, Study, dotted, load_study
from tinylm.studyplan import Plan, trial_config, with_lr_factor

__all__ = ["PHASES", "Phase", "ablate", "parse_phases", "phase_config", "pick_lr_factor",
           "run_study", "select_arms"]  # fmt: skip


@dataclass(frozen=True)
class Phase:
    """An arm of the seed study, by the three settings its phases change (what the report groups by)."""

    name: str
    key_change: str
    init: str
    schedule: str
    batching: str


def _seed_phases() -> dict[str, Phase]:
    study = load_study(DEFAULT_STUDY)
    phases = {}
    for arm in study.arms:
        train = {**study.base.get("train", {}), **arm.changes.get("train", {})}
        phases[arm.name] = Phase(arm.name, arm.key_change, train["init"], train["schedule"], train["batching"])
    return phases


PHASES: dict[str, Phase] = _seed_phases()


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
) -> list[Path]:
    """Run (or finish) ``arms`` of ``study`` (all by default) on every preset, ``settings`` (the
    flags) over its base; returns the run directories in order. Every run's config is made, and so
    checked, before the first one trains."""
    seeds = study.seeds if seeds is None else seeds
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    plan = Plan(study, presets, settings, out, arms or study.arms, seeds, nproc_per_node)
    configs = {(p, arm.name): [plan.config(p, arm, k) for k in range(seeds)] for p in presets for arm in plan.arms}
    out.mkdir(parents=True, exist_ok=True)
    manifest = _start_manifest(plan, configs)
    run_dirs = []
    for p in presets:
        for arm in plan.arms:
            runs = configs[(p, arm.name)]
            factor = _tune(plan, manifest, p, arm, runs[0], quiet) if study.lr_tune else None
            for cfg in runs if factor is None else [with_lr_factor(c, factor) for c in runs]:
                run_dir = Path(cfg.train.out)
                run_dirs.append(run_dir)
                _run_phase(cfg, run_dir, f"{p}/{run_dir.name}", arm.key_change, quiet, nproc_per_node)
                mark_summary(run_dir, study_block(study.name, arm, factor))
    return run_dirs


def _start_manifest(plan: Plan, configs: dict[tuple[str, str], list[RunConfig]]) -> Manifest:
    """study.json with every planned run and its budget (and its LR, when the study tunes none)."""
    manifest = Manifest(plan)
    for arm in plan.arms:
        for p in plan.presets:
            first = configs[(p, arm.name)][0]
            manifest.set(arm, "runs", p, [manifest.relative(Path(c.train.out)) for c in configs[(p, arm.name)]])
            manifest.set(arm, "budget", p, plan.arm_budget(first))
            if not plan.study.lr_tune:
                manifest.set(arm, "lr", p, first.train.lr)
                manifest.set(arm, "lr_factor", p, None)
    manifest.write()
    return manifest


def _tune(plan: Plan, manifest: Manifest, preset_name: str, arm: Arm, cfg: RunConfig, quiet: bool) -> float:
    """The arm's LR trials (first seed, a share of its budget), run or found finished; returns the
    LR factor its full runs train at and records it, its LR and the trials in study.json."""
    study, summaries, trials = plan.study, {}, {}
    for factor in study.lr_tune or []:
        run_dir = plan.trial_dir(preset_name, arm, factor)
        trial = trial_config(cfg, factor, study.lr_tune_share, run_dir)
        label = f"trials/{preset_name}/{run_dir.name}"
        _run_phase(trial, run_dir, label, f"LR trial: lr x {factor:g}", quiet, plan.nproc)
        mark_summary(run_dir, study_block(study.name, arm, factor, trial=True))
        summaries[factor], trials[f"{factor:g}"] = read_summary(run_dir), manifest.relative(run_dir)
        manifest.set(arm, "trials", preset_name, trials)
        manifest.write()
    chosen = pick_lr_factor(summaries, study.rank_by, f"arm {arm.name} on {preset_name}")
    tuned = with_lr_factor(cfg, chosen)
    manifest.set(arm, "lr_factor", preset_name, chosen)
    manifest.set(arm, "lr", preset_name, tuned.train.lr)
    manifest.set(
        arm, "trial_losses", preset_name, {f"{f:g}": v for f, v in _ranked_losses(summaries, study.rank_by).items()}
    )
    manifest.write()
    if not quiet:
        print(f"[{preset_name}/{arm.name}] LR x {chosen:g} chosen (lr {tuned.train.lr:g})", flush=True)
    return chosen


def _ranked_losses(summaries: dict[float, dict[str, Any]], rank_by: str) -> dict[float, float | None]:
    """Each trial's best loss by ``rank_by``; by the packed best_val_loss for all of them where one lacks it
    (a trial finished by an older tinylm): one metric ranks them all, as in the report (runs.choose_metric)."""
    key = f"best_{rank_by}"
    if not all(key in s for s in summaries.values()):
        key = "best_val_loss"
    return {f: s.get(key) for f, s in summaries.items()}


def pick_lr_factor(summaries: dict[float, dict[str, Any]], rank_by: str, what: str) -> float:
    """The factor whose trial reached the lowest best validation loss (the first of equals)."""
    losses = _ranked_losses(summaries, rank_by)
    finite = {f: v for f, v in losses.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if not finite:
        raise UserError(f"every LR trial of {what} failed to reach a finite validation loss; lower --lr")
    return min(finite, key=lambda f: finite[f])


def _run_phase(cfg: RunConfig, run_dir: Path, label: str, what: str, quiet: bool, nproc_per_node: int) -> None:
    """Train one run, resume it if it was interrupted, or skip it if it finished (with these settings)."""
    from tinylm.train import train

    if (run_dir / SUMMARY_FILE).exists() and read_summary(run_dir).get("completed"):
        _check_same_recipe(run_dir / CONFIG_FILE, cfg)
        if not quiet:
            print(f"[{label}] already finished, skipped")
        return
    resume = (run_dir / CONFIG_FILE).exists() and checkpoint.exists(run_dir)  # else a fresh start reclaims
    if resume:
        _check_same_recipe(run_dir / CONFIG_FILE, cfg)
    if not quiet:
        print(f"[{label}] {'resuming' if resume else 'training'}: {what}", flush=True)
    if nproc_per_node > 1:
        _train_with_torchrun(cfg, resume, quiet, nproc_per_node)
        return
    if train(cfg, resume=resume, quiet=quiet).interrupted:
        raise KeyboardInterrupt


def _check_same_recipe(saved_path: Path, cfg: RunConfig) -> None:
    saved = RunConfig.load(saved_path)
    saved.model.vocab_size = cfg.model.vocab_size  # a trained BPE resizes it at run time
    saved.train.out = cfg.train.out  # the folder, which a resume may spell otherwise (absolute, relative)
    if cfg.train.grad_accum is None:  # resolved from the process count at run time
        saved.train.grad_accum = None
    if cfg.train.precision == "auto":  # resolved from the device at run time
        saved.train.precision = "auto"
    if saved.to_dict() != cfg.to_dict():
        raise UserError(
            f"{saved_path.parent} was started with other settings; rerun the original command or use another --out"
        )


def _train_with_torchrun(cfg: RunConfig, resume: bool, quiet: bool, nproc: int) -> None:
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
