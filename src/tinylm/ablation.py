"""The seed report's ablation: four cumulative phases at equal compute, for one or more presets.

Every phase of a preset trains with the same seed, the same token-slot budget
(steps x batch x block) and the same validation stream; only init, schedule and batching
change, one at a time. A finished phase is skipped on a rerun; an interrupted one resumes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm import checkpoint
from tinylm.config import RunConfig, TrainConfig, preset
from tinylm.errors import UserError
from tinylm.rundir import CONFIG_FILE, SUMMARY_FILE, read_summary


@dataclass(frozen=True)
class Phase:
    name: str
    key_change: str
    init: str
    schedule: str
    batching: str


PHASES: dict[str, Phase] = {
    p.name: p
    for p in (
        Phase("baseline", "Random init N(0, 1), fixed LR, padded", "naive", "constant", "padded"),
        Phase("init", "Scaled (GPT-2) init", "scaled", "constant", "padded"),
        Phase("cosine", "+ Warm-up and cosine decay", "scaled", "cosine", "padded"),
        Phase("packed", "+ Packed sequences", "scaled", "cosine", "packed"),
    )
}

# Token slots per phase when no budget is given: enough for a real result on one GPU.
DEFAULT_TOKENS = {"tiny": 200_000, "basic": 20_000_000, "mid": 40_000_000, "quality": 80_000_000}


def parse_phases(text: str | None) -> list[Phase]:
    if not text:
        return list(PHASES.values())
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        raise UserError(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    return [PHASES[n] for n in names]


def phase_config(base: TrainConfig, preset_name: str, phase: Phase, seed: int, run_dir: Path) -> RunConfig:
    train = dataclasses.replace(
        base, init=phase.init, schedule=phase.schedule, batching=phase.batching, seed=seed, out=str(run_dir),
        doc_mask=base.doc_mask and phase.batching == "packed",  # --doc-mask applies to the packed phase only
    )  # fmt: skip
    return RunConfig(model=preset(preset_name), train=train, preset=preset_name)


def run_dir_for(out: Path, preset_name: str, phase: Phase, seed_index: int, n_seeds: int) -> Path:
    name = phase.name if n_seeds == 1 else f"{phase.name}-seed{seed_index}"
    return out / preset_name / name


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
    """Run (or finish) every phase of every preset; returns the run directories in order."""
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = []
    for preset_name in presets:
        for phase in phases:
            for k in range(seeds):
                run_dir = run_dir_for(out, preset_name, phase, k, seeds)
                cfg = phase_config(base, preset_name, phase, base.seed + k, run_dir)
                for key, value in (model_overrides or {}).items():
                    setattr(cfg.model, key, value)
                cfg.model.__post_init__()
                run_dirs.append(run_dir)
                _run_phase(cfg, run_dir, f"{preset_name}/{run_dir.name}", phase, quiet, nproc_per_node)
    return run_dirs


def _run_phase(cfg: RunConfig, run_dir: Path, label: str, phase: Phase, quiet: bool, nproc_per_node: int) -> None:
    """Train one phase's run, resume it if it was interrupted, or skip it if it finished."""
    from tinylm.train import train

    if (run_dir / SUMMARY_FILE).exists() and read_summary(run_dir).get("completed"):
        if not quiet:
            print(f"[{label}] already finished, skipped")
        return
    resume = (run_dir / CONFIG_FILE).exists() and checkpoint.exists(run_dir)  # else a fresh start reclaims
    if resume:
        _check_same_recipe(run_dir / CONFIG_FILE, cfg)
    if not quiet:
        print(f"[{label}] {'resuming' if resume else 'training'}: {phase.key_change}", flush=True)
    if nproc_per_node > 1:
        _train_with_torchrun(cfg, resume, quiet, nproc_per_node)
        return
    if train(cfg, resume=resume, quiet=quiet).interrupted:
        raise KeyboardInterrupt


def _check_same_recipe(saved_path: Path, cfg: RunConfig) -> None:
    saved = RunConfig.load(saved_path)
    saved.model.vocab_size = cfg.model.vocab_size  # a trained BPE resizes it at run time
    if cfg.train.grad_accum is None:  # resolved from the process count at run time
        saved.train.grad_accum = None
    if saved.to_dict() != cfg.to_dict():
        raise UserError(
            f"{saved_path.parent} was started with other settings; rerun the original command or use another --out"
        )


def _train_with_torchrun(cfg: RunConfig, resume: bool, quiet: bool, nproc: int) -> None:
    """One phase as `torchrun -m tinylm train`, from a recipe file holding its exact config."""
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
