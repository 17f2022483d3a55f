"""What ``tinylm ablate`` says before it starts: how many runs, tokens per run, and a rough time on
this machine, from one training step of the study's first run measured here (a few seconds at most)."""

from __future__ import annotations

import dataclasses
import time

import torch

from tinylm.config import RunConfig
from tinylm.study.executor import Task
from tinylm.study.local import format_duration
from tinylm.study.plan import Plan


def step_seconds(cfg: RunConfig) -> float:
    """Seconds of one optimizer step of ``cfg``'s model and batch on its device (after a warm-up step)."""
    from tinylm.bench import StepRunner
    from tinylm.runtime import select_device, tune_for

    device = select_device(cfg.train.device)
    tune_for(device)
    runner = StepRunner("tinylm", cfg.model, cfg.train.batch_size, device, seed=cfg.train.seed, train=cfg.train)
    runner.step()
    t0 = time.perf_counter()
    runner.step()
    return (time.perf_counter() - t0) * (cfg.train.grad_accum or 1)


def describe(plan: Plan, tasks: list[Task], parallel: int, measure: bool = True) -> str:
    """``12 runs (4 LR trials), 250,000 tokens per run: about 40m of training steps on this machine (...)``.
    The runs of the first preset set the pace: other presets of the study add their own share."""
    cfg = plan.config(plan.presets[0], plan.arms[0], 0)
    budget = plan.arm_budget(cfg)
    trials = sum(t.kind == "trial" for t in tasks)
    tokens = budget["tokens"]
    head = f"{len(tasks)} runs" + (f" ({trials} LR trials)" if trials else "")
    size = f"{tokens:,} tokens per run" if tokens else f"{cfg.train.max_time:g} s per run"
    if not measure:
        return f"{head}, {size}"
    # the vocabulary the run will have (a trained BPE shrinks the output layer, most of a tiny model's cost)
    cfg.model = dataclasses.replace(cfg.model, vocab_size=plan.vocab_size(cfg))
    per_step = step_seconds(cfg)
    slots = plan.slots_per_step(cfg)
    if tokens:
        share = plan.study.lr_tune_share
        run_tokens = sum(tokens * (share if t.kind == "trial" else 1) for t in tasks)
        seconds = run_tokens / slots * per_step
    else:
        seconds = len(tasks) * (cfg.train.max_time or 0)
    device = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    speed = f"{slots / per_step:,.0f} tokens/s a run"
    when = format_duration(seconds / max(1, parallel) if device == "cuda" else seconds)
    return (
        f"{head}, {size}: about {when} of training steps on this machine ({device}, {speed} measured; "
        "each run's start-up and evaluations add to it, runs already finished take none)"
    )
