"""Commands that use finished runs: ``report``, ``plot``, ``sample``, ``eval`` and ``export``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from tinylm.cli.flags import at_least, integer
from tinylm.paths import check_writable_file


def _written(out: str, what: str, make: Callable[[Path], Path]) -> int:
    """Check that ``out`` can be written, make it, and say where it went."""
    check_writable_file(Path(out), "--out")
    print(f"{what} written to {make(Path(out))}")
    return 0


def add_report(sub) -> None:
    p = sub.add_parser("report", help="tables, plots and CSV from finished runs or ablations")
    p.add_argument("dirs", nargs="+", help="ablation or run directories")
    p.add_argument("--out", default="report.md", help="Markdown file; plots and results.csv/json go beside it")
    p.add_argument("--rank-by", choices=["doc", "packed"], default=None,
                   help="the validation loss that ranks arms: per-document (default; a study's own rank_by "
                        "otherwise) or the packed stream; runs lacking the per-document one fall back to packed")  # fmt: skip
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from tinylm.report import write_report

    return _written(args.out, "report", lambda out: write_report([Path(p) for p in args.dirs], out, args.rank_by))


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="train/validation loss curves of runs, side by side")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="runs.png")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from tinylm.report import plot_runs

    return _written(args.out, "plot", lambda out: plot_runs([Path(d) for d in args.run_dirs], out))


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=at_least(1), default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=integer, default=200)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=integer, default=None)
    p.add_argument("--num-samples", type=at_least(1), default=1)
    p.add_argument("--no-stop", action="store_true", help="go on past <|endoftext|>")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    from tinylm.runtime import select_device
    from tinylm.sample import SamplingOptions, load_run, sample_text

    run = load_run(Path(args.run_dir), select_device(args.device))
    opts = SamplingOptions(args.max_new_tokens, args.temperature, args.top_k, args.top_p, not args.no_stop)
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
    p.add_argument("run_dir")
    p.add_argument("--data", help="other data (default: the run's own validation stream)")
    p.add_argument("--eval-tokens", type=at_least(1), default=None)
    p.add_argument("--out", help="JSON file (default RUN_DIR/eval.json)")
    p.add_argument("--device", default="auto")
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
    p = sub.add_parser("export", help="write a Hugging Face GPT2LMHeadModel directory")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["hf"], default="hf")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from tinylm.export import export_hf

    out = export_hf(Path(args.run_dir), Path(args.out))
    print(f"exported to {out}: load with transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0
