"""Commands that train or size a model from settings: ``train``, ``info`` and ``ablate``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import get_args

from tinylm.cli.flags import (
    TARGET_HALFWIDTH_HELP,
    Refused,
    Switch,
    add_settings_flags,
    at_least,
    given_settings,
    integer,
    positive_number,
)
from tinylm.cli.settings import BUDGET_DEFAULTS, DEFAULT_PRESET, preset_defaults, resolve_config, resume_config
from tinylm.config import PRESETS, ModelConfig, Optimizer, RunConfig, TrainConfig, preset
from tinylm.fields import sections
from tinylm.paths import check_writable_dir


def add_run_flags(parser: argparse.ArgumentParser, titles: dict[str, str] | None = None, skip=(),
                  train_defaults: dict[str, str] | None = None) -> None:  # fmt: skip
    """The flags of every section of RunConfig (model, train, and any section added later); ``titles``
    names a section's group where its name alone does not say enough."""
    titles = titles or {}
    defaults = {"model": preset_defaults(), "train": train_defaults or {}}
    for name, kind in sections(RunConfig).items():
        add_settings_flags(parser, kind, titles.get(name, name), f"{name}.", skip, defaults.get(name))


PRESET_HELP = f"model shape to start from: {', '.join(PRESETS)}"
RECIPE_HELP = "YAML recipe of settings (preset, model, train); flags override it (default: none)"


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (or --resume one)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help=f"{PRESET_HELP} (default: the recipe's, else {DEFAULT_PRESET})")  # fmt: skip
    p.add_argument("--config", metavar="RECIPE", help=RECIPE_HELP)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR where it stopped (default: start a new run)")  # fmt: skip
    p.add_argument("--quiet", action=Switch, default=False, help="no progress output")
    p.add_argument("--nproc-per-node", type=at_least(1), default=1,
                   help="data-parallel processes on this machine (more than 1 starts torchrun)")  # fmt: skip
    add_run_flags(p, {"train": "training"}, train_defaults=BUDGET_DEFAULTS)
    p.set_defaults(func=cmd_train)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from tinylm.distributed import relaunch_with_torchrun
    from tinylm.train import train

    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return relaunch_with_torchrun(args.nproc_per_node, _without_nproc(args.argv))
    cfg = resume_config(args) if args.resume else resolve_config(args)
    result = train(cfg, resume=bool(args.resume), quiet=args.quiet)
    if not result.summary:  # a data-parallel rank other than 0
        return 130 if result.interrupted else 0
    _print_summary(result.summary, result.run_dir)
    if result.interrupted:
        print(f"interrupted at step {result.summary['steps']}; continue with: tinylm train --resume {result.run_dir}")
        return 130
    return 0


def _print_summary(s: dict, run_dir: Path) -> None:
    def fmt(v):
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    rows = [
        ("val loss start -> best", f"{fmt(s['start_val_loss'])} -> {fmt(s['best_val_loss'])} (step {s['best_step']})"),
        ("final val / train loss", f"{fmt(s['final_val_loss'])} / {fmt(s['final_train_loss'])}"),
        ("steps, token slots", f"{s['steps']}, {s['tokens']:,}"),
        ("utilisation", fmt(s["utilisation"])),
        ("train time", f"{s['train_time_s']:.1f} s ({fmt(s['tokens_per_s'])} tok/s)"),
        ("stability", f"{s['stability']['label']} ({s['stability']['reason']})"),
    ]
    for name, value in rows:
        print(f"{name:<24} {value}")
    print(f"run directory            {run_dir}")


def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs and memory of a model")
    p.add_argument("--preset", choices=list(PRESETS),
                   help=f"{PRESET_HELP} (default: the recipe's, else {DEFAULT_PRESET})")  # fmt: skip
    p.add_argument("--config", metavar="RECIPE", help=RECIPE_HELP)
    p.add_argument("--json", action=Switch, default=False, help="print the figures as JSON")
    add_settings_flags(p, ModelConfig, "model", "model.", defaults=preset_defaults())
    p.add_argument("--batch-size", type=integer, default=argparse.SUPPRESS, dest="train.batch_size",
                   metavar="BATCH_SIZE", help=f"sequences per micro-batch, whose activations the memory estimate "
                   f"counts (default: the recipe's, else {TrainConfig.batch_size})")  # fmt: skip
    p.add_argument(
        "--optimizer", choices=get_args(Optimizer), default=argparse.SUPPRESS, dest="train.optimizer",
        help=f"whose state the memory estimate counts (default: the recipe's, else {TrainConfig.optimizer})",
    )  # fmt: skip
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from tinylm.costs import model_costs

    cfg = resolve_config(args)
    costs = model_costs(cfg.model, batch_size=cfg.train.batch_size, optimizer=cfg.train.optimizer)
    if args.json:
        info = {"preset": cfg.preset, "model": dataclasses.asdict(cfg.model), "optimizer": cfg.train.optimizer}
        print(json.dumps({**info, **costs.to_dict()}, indent=2))
        return 0
    m = cfg.model
    print(f"preset {cfg.preset}: {m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, block {m.block_size}, "
          f"vocabulary {m.vocab_size}")  # fmt: skip
    print(f"  parameters            {costs.params:,} ({costs.params_non_embedding:,} without embeddings)")
    print(f"  training FLOPs/token  {costs.flops_per_token_train:,} "
          f"({100 * costs.output_layer_flop_share:.0f}% in the output layer)")  # fmt: skip
    mem = costs.memory_bytes
    print(f"  memory, batch {cfg.train.batch_size}      ~{mem['total'] / 2**20:,.0f} MiB "
          f"(weights+grads+{cfg.train.optimizer} {(mem['weights'] + mem['gradients'] + mem['optimizer']) / 2**20:,.0f}, "
          f"activations {mem['activations'] / 2**20:,.0f}, logits chunk {mem['logits_chunk'] / 2**20:,.0f})")  # fmt: skip
    return 0


def add_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="a study: arms of settings at equal compute, paired seeds, then the report")
    p.add_argument("--study", help="a study file, or the name of a shipped one: seed (the seed report's four "
                   "cumulative phases) or modern (default: seed)")  # fmt: skip
    p.add_argument("--preset", choices=list(PRESETS),
                   help=f"one preset (default: the study's, else {DEFAULT_PRESET})")  # fmt: skip
    p.add_argument("--presets", help="several presets, comma-separated, e.g. basic,mid,quality (default: --preset's)")
    p.add_argument("--phases", help="subset/order of the study's arms, comma-separated, e.g. for the seed study "
                   "baseline,init,cosine,packed (default: all, in the study's order)")  # fmt: skip
    p.add_argument("--seeds", type=at_least(1), metavar="N",
                   help="runs per arm: run k of every arm trains with seed FIRST_SEED + k (default: the study's)")  # fmt: skip
    p.add_argument("--first-seed", type=at_least(0), default=argparse.SUPPRESS, dest="train.seed", metavar="FIRST_SEED",
                   help=f"seed of each arm's first run (default: the study's, else {TrainConfig.seed})")  # fmt: skip
    p.add_argument("--seed", action=Refused,
                   hint="--first-seed N sets the seed of each arm's first run, --seeds N the runs per arm")  # fmt: skip
    p.add_argument("--out", required=True, help="study directory (rerun the command to finish an interrupted one)")
    p.add_argument("--quiet", action=Switch, default=False, help="no progress output")
    p.add_argument("--nproc-per-node", type=at_least(1), default=1,
                   help="data-parallel processes per run on this machine (more than 1 starts torchrun)")  # fmt: skip
    p.add_argument("--target-halfwidth", type=positive_number, metavar="LOSS", help=TARGET_HALFWIDTH_HELP)
    add_launcher_flags(p)
    titles = {"model": "model (over the preset and the study's base; defaults as shown otherwise)",
              "train": "training (over the study's base; defaults as shown otherwise; a step's own settings "
                       "cannot be given)"}  # fmt: skip
    add_run_flags(p, titles, skip=("out", "seed"), train_defaults=ABLATE_BUDGET_DEFAULTS)
    p.set_defaults(func=cmd_ablate)


ABLATE_BUDGET_DEFAULTS = {
    "max_tokens": "the study's budget, else token slots per run fit for the device and preset, "
                  "printed with the number of runs and a time estimate before the first run starts",
}
"""Without a budget flag a study's runs get the study's budget or a per-device default (tinylm.study.plan),
never train's 200 steps; ablate's --help says so rather than 'none'."""


def add_launcher_flags(parser: argparse.ArgumentParser) -> None:
    """--launcher, and each available executor's own flags (tinylm.study.local, tinylm.study.slurm)."""
    from tinylm.errors import UserError
    from tinylm.study.executor import LAUNCHERS, executor_module

    group = parser.add_argument_group("launcher (where the study's runs train)")
    group.add_argument("--launcher", choices=LAUNCHERS, default=None,
                       help="local: this machine, --jobs runs at once (default, or the study file's launch: "
                            "{launcher: ...}); slurm: a Slurm cluster")  # fmt: skip
    for name in LAUNCHERS:
        try:
            module = executor_module(name)
        except UserError:  # not part of this tinylm (or its package is missing): --launcher NAME says so
            continue
        if hasattr(module, "add_flags"):
            module.add_flags(group, add_settings_flags)


def add_status(sub) -> None:
    p = sub.add_parser("status", help="where a study stands: runs done, running, failed, pending per arm, and an ETA")
    p.add_argument("out", help="the study directory (ablate's --out)")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from tinylm.study.status import study_status

    print(study_status(Path(args.out)))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    import sys

    from tinylm.errors import UserError
    from tinylm.report import write_report
    from tinylm.study.estimate import describe
    from tinylm.study.executor import make_executor
    from tinylm.study.plan import check_flags
    from tinylm.study.runner import StudyFailed, make_plan, plan_tasks, run_tasks, select_arms
    from tinylm.study.spec import DEFAULT_STUDY, load_study

    study = load_study(args.study or DEFAULT_STUDY)
    given = args.presets or args.preset or study.base.get("preset") or "basic"
    names = [n.strip() for n in given.split(",") if n.strip()]  # "basic,mid," is two presets
    for name in names:
        preset(name)  # fail early on an unknown name
    arms = select_arms(study, args.phases)
    flags = given_settings(args)
    check_flags(study, flags)
    out = Path(args.out)
    check_writable_dir(out, "--out")
    launcher = args.launcher or (study.launch or {}).get("launcher") or "local"
    executor = make_executor(launcher, args, study.launch)
    plan = make_plan(study, names, flags, out, arms, seeds=args.seeds, nproc_per_node=args.nproc_per_node)
    tasks = plan_tasks(plan, executor)
    if not args.quiet:
        print(describe(plan, tasks, getattr(executor, "jobs", 1)), flush=True)
    try:
        run_tasks(out, tasks, executor)
    except StudyFailed as e:
        try:
            report = write_report([out], out / "report.md", target_halfwidth=args.target_halfwidth)
            print(f"report of the finished runs written to {report}")
        except UserError:  # no run finished yet: nothing to report
            pass
        print(f"tinylm: error: {e}", file=sys.stderr)
        return 1
    report = write_report([out], out / "report.md", target_halfwidth=args.target_halfwidth)
    print(f"report written to {report}")
    return 0
