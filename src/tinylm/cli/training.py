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
    add_settings_flags,
    at_least,
    given_settings,
    integer,
    positive_number,
)
from tinylm.cli.settings import resolve_config, resume_config
from tinylm.config import PRESETS, ModelConfig, Optimizer, RunConfig, preset
from tinylm.fields import sections
from tinylm.paths import check_writable_dir


def add_run_flags(parser: argparse.ArgumentParser, train_title: str = "training", skip=()) -> None:
    """The flags of every section of RunConfig (model, train, and any section added later)."""
    for name, kind in sections(RunConfig).items():
        add_settings_flags(parser, kind, train_title if name == "train" else name, f"{name}.", skip)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (or --resume one)")
    p.add_argument("--preset", choices=list(PRESETS), help="model shape to start from (default basic)")
    p.add_argument("--config", help="YAML recipe; flags override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--nproc-per-node", type=at_least(1), default=1, help="data-parallel processes (starts torchrun)")
    add_run_flags(p)
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
    p.add_argument("--preset", choices=list(PRESETS))
    p.add_argument("--config", help="YAML recipe")
    p.add_argument("--json", action="store_true")
    add_settings_flags(p, ModelConfig, "model", "model.")
    p.add_argument(
        "--batch-size", type=integer, default=argparse.SUPPRESS, dest="train.batch_size", metavar="BATCH_SIZE"
    )
    p.add_argument(
        "--optimizer", choices=get_args(Optimizer), default=argparse.SUPPRESS, dest="train.optimizer",
        help="whose state the memory estimate counts (default adamw)",
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
    p.add_argument("--study", help="a study file, or the name of a shipped one (seed, modern; default seed: the "
                   "seed report's four cumulative phases)")  # fmt: skip
    p.add_argument("--preset", choices=list(PRESETS), help="one preset (default: the study's, else basic)")
    p.add_argument("--presets", help="several presets, comma-separated, e.g. basic,mid,quality")
    p.add_argument("--phases", help="subset/order of the study's arms (seed: baseline,init,cosine,packed)")
    p.add_argument("--seeds", type=integer, help="runs per arm, seed k of every arm the same (default: the study's)")
    p.add_argument("--out", required=True, help="study directory (rerun the command to finish an interrupted one)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--nproc-per-node", type=at_least(1), default=1, help="data-parallel processes per run (torchrun)")
    p.add_argument("--target-halfwidth", type=positive_number, metavar="LOSS", help=TARGET_HALFWIDTH_HELP)
    add_run_flags(p, "training (over the study's base; a step's own settings cannot be given)", skip=("out",))
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    from tinylm.ablation import run_study, select_arms
    from tinylm.report import write_report
    from tinylm.study import DEFAULT_STUDY, load_study
    from tinylm.studyplan import check_flags

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
    run_study(study, names, flags, out, arms, seeds=args.seeds, quiet=args.quiet,
              nproc_per_node=args.nproc_per_node)  # fmt: skip
    report = write_report([out], out / "report.md", target_halfwidth=args.target_halfwidth)
    print(f"report written to {report}")
    return 0
