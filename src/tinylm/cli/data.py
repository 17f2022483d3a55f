"""Commands about data and speed: ``prepare``, ``bench`` and ``fetch-tokenizer``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from pathlib import Path

from tinylm.cli.flags import Switch, add_settings_flags, at_least, field_help, given_settings, integer, reader
from tinylm.cli.settings import DEFAULT_PRESET, preset_defaults
from tinylm.config import PRESETS, ModelConfig, TrainConfig, preset
from tinylm.fields import build, merge
from tinylm.paths import check_writable_dir


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenise a data source into memory-mapped token files")
    # the same settings as train's, with the same help and defaults
    p.add_argument("--data", required=True, help=field_help(TrainConfig, "data"))
    p.add_argument("--tokenizer", default=TrainConfig.tokenizer, help=field_help(TrainConfig, "tokenizer"))
    p.add_argument("--out", help="directory to write (default: the cache, keyed by content)")
    p.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction,
                   help=field_help(TrainConfig, "val_fraction"))  # fmt: skip
    p.add_argument("--text-field", default=TrainConfig.text_field, help=field_help(TrainConfig, "text_field"))
    p.add_argument("--doc-sep", default=TrainConfig.doc_sep, help=field_help(TrainConfig, "doc_sep"))
    p.add_argument("--block-size", type=integer, default=512, help="report token utilisation at this block size")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from tinylm.data.prepare import PrepareOptions, prepare

    if args.out:
        check_writable_dir(Path(args.out), "--out")  # before minutes of tokenising
    options = PrepareOptions.from_config(args)
    data = prepare(options, out=Path(args.out) if args.out else None)
    meta = data.meta
    print(f"prepared {meta['source']} with {meta['tokenizer']} (vocabulary {meta['vocab_size']}, {meta['dtype']})")
    for split, info in meta["splits"].items():
        print(f"  {split:<5} {info['documents']:>9,} documents {info['tokens']:>12,} tokens")
    if args.block_size:
        _print_utilisation(data, args.block_size)
    print(f"  in {data.directory}")
    return 0


def _print_utilisation(data, block_size: int) -> None:
    from tinylm.data.batching import PackedRows, PaddedRows

    split = data.split("train")
    eot = data.meta["eot_id"]
    padded = PaddedRows(split, block_size, eot, seed=0)
    packed = PackedRows(split, block_size, eot, seed=0)
    packed_util = packed.n_rows * block_size / (len(split.tokens) - 1)
    print(
        f"  token utilisation at block {block_size}: packed {100 * packed_util:.2f}% of the stream in full "
        f"blocks (100% of slots real), padded {100 * padded.expected_utilisation:.2f}% of slots real "
        f"({padded.truncated_docs:,} documents truncated)"
    )


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time the training step: tokens/s, GFLOP/s, MFU, peak memory")
    p.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET, help="model shape to time")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="sequences per step")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed steps per variant; the median is reported")
    p.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps before the timed ones")
    p.add_argument("--compare-textbook", action=Switch, default=False,
                   help="also time the textbook step (full logits, F.cross_entropy, AdamW) on the same batch")  # fmt: skip
    p.add_argument("--memory", action=Switch, default=True,
                   help="measure each variant's peak memory in a fresh subprocess (--no-memory: faster)")  # fmt: skip
    p.add_argument("--compile", action=Switch, default=False,
                   help="torch.compile the tinylm step's blocks, as train --compile does")  # fmt: skip
    p.add_argument("--device", default="auto", help=field_help(TrainConfig, "device"))
    p.add_argument("--precision", type=reader(precision_list, "precisions"), default=["auto"],
                   help="the step's arithmetic, or several separated by commas, timed alternately: auto, fp32, "
                        "bf16 (default auto: what train --precision auto picks on this device)")  # fmt: skip
    p.add_argument("--profile", action=Switch, default=False,
                   help="also profile the tinylm step (torch.profiler): time in kernels against the step's, "
                        "launches, host syncs, top operators")  # fmt: skip
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (steadier when other programs share the CPU)")  # fmt: skip
    p.add_argument("--json", metavar="FILE", nargs="?", const="-",
                   help="the figures as JSON: to FILE (the table still prints), or alone to stdout "
                        "(default: the table only)")  # fmt: skip
    add_settings_flags(p, ModelConfig, "model (over the preset's shape: the mechanics to time)", "model.",
                       defaults=preset_defaults())  # fmt: skip
    others = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in BENCH_TRAIN_SETTINGS]
    add_settings_flags(p, TrainConfig, "training (what changes a step's cost: optimizer, z-loss)", "train.", others)
    p.set_defaults(func=cmd_bench)


def precision_list(text: str) -> list[str]:
    """'fp32,bf16' -> ['fp32', 'bf16']: each one of auto, fp32, bf16."""
    names = [name.strip() for name in text.split(",")]
    wrong = [name for name in names if name not in ("auto", "fp32", "bf16")]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: choose from auto, fp32, bf16 (several separated by commas)")
    return names


BENCH_TRAIN_SETTINGS = ("optimizer", "muon_lr", "muon_momentum", "z_loss")
"""The training settings bench takes, as train's flags: those that change what a step computes
(bench.BENCH_TRAIN holds the rest; not imported from there, so --help does not load torch)."""


def cmd_bench(args: argparse.Namespace) -> int:
    from tinylm.bench import BENCH_TRAIN, bench, format_report

    flags = given_settings(args)
    model = build(ModelConfig, merge(dataclasses.asdict(preset(args.preset)), flags.get("model", {})), "model.")
    train = build(TrainConfig, merge(BENCH_TRAIN, flags.get("train", {})), "train.")
    report = bench(args.preset, args.batch_size, args.repeats, args.warmup, args.compare_textbook, args.device,
                   measure_memory=args.memory, compile=args.compile, model=model, clock=args.clock,
                   train=train, precisions=args.precision, profile=args.profile)  # fmt: skip
    report["command"] = shlex.join(["tinylm", *args.argv])  # what made the figures, for whoever reads the JSON
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.json}")
    return 0


def add_fetch_tokenizer(sub) -> None:
    p = sub.add_parser("fetch-tokenizer", help="install the GPT-2 tokenizer ranks for offline use")
    p.set_defaults(func=cmd_fetch_tokenizer)


def cmd_fetch_tokenizer(args: argparse.Namespace) -> int:
    from tinylm.data.tokenizer import gpt2_ranks_path

    path = gpt2_ranks_path(fetch=True)
    print(f"GPT-2 tokenizer ranks verified at {path}")
    return 0
