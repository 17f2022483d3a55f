"""Commands that use finished runs: ``report``, ``plot``, ``sample``, ``eval`` and ``export``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tinylm.cli.flags import TARGET_HALFWIDTH_HELP, Switch, at_least, field_help, integer, positive_number
from tinylm.config import TrainConfig
from tinylm.errors import UserError
from tinylm.paths import check_writable_file

RUN_DIR_HELP = "a run directory written by tinylm train"


def _written(out: Path, what: str, make: Callable[[Path], Path]) -> int:
    """Check that ``out`` can be written, make it, and say where it went."""
    check_writable_file(out, "--out")
    print(f"{what} written to {make(out)}")
    return 0


def beside_runs(dirs: list[str], out: str | None, name: str) -> Path:
    """Where a file made from ``dirs`` goes: ``--out`` if given, else ``name`` in the one folder given,
    or in the folder that holds them all; never the working folder by default."""
    if out:
        return Path(out)
    if len(dirs) == 1:
        return Path(dirs[0]) / name
    common = Path(os.path.commonpath([Path(d).resolve() for d in dirs]))
    if common == Path.cwd().resolve():
        raise UserError(f"these folders share no folder but the working one; say where the {name} goes with --out")
    return common / name


def add_report(sub) -> None:
    p = sub.add_parser("report", help="tables, plots and CSV from finished runs or ablations")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="study (ablate --out) or run directories")
    p.add_argument("--out", metavar="FILE", help="Markdown file; plots and results.csv/json go beside it (default: "
                   "report.md in the one DIR given, else in the folder holding all DIRs)")  # fmt: skip
    p.add_argument("--rank-by", choices=["doc", "packed"], default=None,
                   help="the validation loss that ranks arms: per-document (default; a study's own rank_by "
                        "otherwise) or the packed stream; runs lacking the per-document one fall back to packed")  # fmt: skip
    p.add_argument("--target-halfwidth", type=positive_number, metavar="LOSS", help=TARGET_HALFWIDTH_HELP)
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from tinylm.report import write_report

    out = beside_runs(args.dirs, args.out, "report.md")
    dirs = [Path(p) for p in args.dirs]
    return _written(out, "report", lambda out: write_report(dirs, out, args.rank_by, args.target_halfwidth))


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="train/validation loss curves of runs, side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--out", metavar="FILE", help="PNG file (default: runs.png in the one RUN_DIR given, else in "
                   "the folder holding all RUN_DIRs)")  # fmt: skip
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from tinylm.report import plot_runs

    out = beside_runs(args.run_dirs, args.out, "runs.png")
    return _written(out, "plot", lambda out: plot_runs([Path(d) for d in args.run_dirs], out))


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--prompt", default="", help="text the samples continue (default: empty, a fresh start)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
    p.add_argument("--top-k", type=integer, default=200, help="sample from the K likeliest tokens only")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the likeliest tokens holding this much probability (default: no limit)")  # fmt: skip
    p.add_argument("--seed", type=integer, default=None,
                   help="seed of the first sample, the next ones count up from it (default: a fresh seed each time)")  # fmt: skip
    p.add_argument("--num-samples", type=at_least(1), default=1, help="samples to generate")
    p.add_argument("--stop", action=Switch, default=True,
                   help="end a sample at <|endoftext|> (--no-stop: go on past it)")  # fmt: skip
    p.add_argument("--device", default="auto", help=field_help(TrainConfig, "device"))
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    from tinylm.runtime import select_device
    from tinylm.sample import SamplingOptions, load_run, sample_text

    run = load_run(Path(args.run_dir), select_device(args.device))
    opts = SamplingOptions(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.stop)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(args.prompt)
        seed = None if args.seed is None else args.seed + i
        sample_text(
            run, args.prompt, opts, seed=seed, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush())
        )
        sys.stdout.write("\n")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained run")
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--data", help="other data, as train's --data (default: the run's own validation stream)")
    p.add_argument("--eval-tokens", type=at_least(1), default=None,
                   help="validation tokens to score (default: the run's --eval-tokens)")  # fmt: skip
    p.add_argument("--out", metavar="FILE", help="JSON file (default: RUN_DIR/eval.json)")
    p.add_argument("--device", default="auto", help=field_help(TrainConfig, "device"))
    p.add_argument("--precision", choices=["run", "fp32", "bf16"], default="run",
                   help="arithmetic of the evaluation: the run's own (as its val_loss), or fp32 / bf16 "
                        "(score runs trained in different precisions with the same one)")  # fmt: skip
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from tinylm.evaluate import evaluate_run
    from tinylm.rundir import EVAL_FILE, write_atomic

    out = Path(args.out) if args.out else Path(args.run_dir) / EVAL_FILE
    if args.out:
        check_writable_file(out, "--out")
    precision = None if args.precision == "run" else args.precision
    result = evaluate_run(Path(args.run_dir), args.data, args.eval_tokens, args.device, precision)
    for key in ("data", "precision", "tokens", "bytes", "loss", "perplexity", "bits_per_byte", "loss_doc", "tokens_doc"):
        value = result[key]
        print(f"{key:<14} {value:.4f}" if isinstance(value, float) else f"{key:<14} {value}")
    print("loss, perplexity, bits_per_byte: the packed validation stream; loss_doc: each document from its start")
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face transformers model directory (GPT-2, Llama or Qwen3 "
                       "class, as the run's mechanics need) with its tokenizer")  # fmt: skip
    p.add_argument("run_dir", help=RUN_DIR_HELP)
    p.add_argument("--format", choices=["hf"], default="hf",
                   help="hf: a directory transformers.AutoModelForCausalLM.from_pretrained loads")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from tinylm.export import export_hf

    out = export_hf(Path(args.run_dir), Path(args.out))
    print(f"exported to {out}: load with transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0
