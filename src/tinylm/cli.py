"""The ``tinylm`` command: thin argument parsing over functions that return results.

Flags for the model and training settings are generated from the config dataclasses, so
every field can be set from the command line (``--n-layer 6``, ``--max-tokens 2e6``) and
their help is the field's docstring. Precedence: preset < --config YAML < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from tinylm.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    RunConfig,
    TrainConfig,
    as_bool,
    as_int,
    field_docs,
    preset,
)
from tinylm.errors import UserError
from tinylm.paths import check_writable_dir, check_writable_file

BUDGET_FIELDS = ("max_steps", "max_tokens", "max_time")


# --- flags generated from the dataclasses ---------------------------------------------


def _on_off(text: str) -> bool:
    try:
        return as_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _integer(text: str) -> int:
    try:
        return as_int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _at_least(minimum: int):
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _add_dataclass_flags(parser: argparse.ArgumentParser, kind: type, title: str, skip=()) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(kind)
    docs = field_docs(kind)
    for f in dataclasses.fields(kind):
        if f.name in skip:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        flag = "--" + f.name.replace("_", "-")
        help_text = " ".join(docs.get(f.name, "").split()).replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif base is bool:
            kwargs.update(type=_on_off, nargs="?", const=True, metavar="on|off")
        elif base is int:
            kwargs["type"] = _integer
        elif base is float:
            kwargs["type"] = float
        else:
            kwargs["type"] = str
        group.add_argument(flag, **kwargs)


def _split_flags(args: argparse.Namespace) -> tuple[dict, dict]:
    given = vars(args)
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    return (
        {k: v for k, v in given.items() if k in model_names},
        {k: v for k, v in given.items() if k in train_names},
    )


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.exists():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of settings")
    return raw


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Preset, then the YAML recipe, then explicit flags."""
    recipe = _load_yaml(args.config) if getattr(args, "config", None) else {}
    recipe_preset = recipe.pop("preset", None)
    preset_name = getattr(args, "preset", None) or recipe_preset or "basic"
    model = dataclasses.asdict(preset(preset_name))
    train: dict[str, Any] = {}
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    from_recipe: set[str] = set()
    for section, target, names in (("model", model, model_names), ("train", train, train_names)):
        nested = recipe.pop(section, {}) or {}
        if not isinstance(nested, dict):
            raise UserError(f"{args.config}: {section} must be a mapping of settings, got {nested!r}")
        unknown = set(nested) - names
        if unknown:
            raise UserError(f"unknown {section} setting(s) in {args.config}: {', '.join(sorted(unknown))}")
        target.update(nested)
        from_recipe |= set(nested)
    for key, value in recipe.items():  # flat keys go wherever they belong
        if key in model_names:
            model[key] = value
        elif key in train_names:
            train[key] = value
        else:
            raise UserError(f"unknown setting {key!r} in {args.config}")
        from_recipe.add(key)
    model_flags, train_flags = _split_flags(args)
    model.update(model_flags)
    train.update(train_flags)
    from_recipe -= set(model_flags) | set(train_flags)
    if all(train.get(k) is None for k in BUDGET_FIELDS):
        train["max_steps"] = 200
    try:
        return RunConfig(model=ModelConfig(**model), train=TrainConfig(**train), preset=preset_name)
    except ConfigError as e:
        if e.field in from_recipe:
            raise UserError(f"{args.config}: {e}") from None
        raise


# --- commands -------------------------------------------------------------------------


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
    from tinylm.rundir import CONFIG_FILE
    from tinylm.train import train

    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return relaunch_with_torchrun(args.nproc_per_node, _without_nproc(args.argv))

    if args.resume:
        run_dir = Path(args.resume)
        cfg = RunConfig.load(run_dir / CONFIG_FILE)
        model_flags, train_flags = _split_flags(args)
        other = sorted(set(model_flags) | (set(train_flags) - set(BUDGET_FIELDS) - {"device", "compile"}))
        if other or args.preset or args.config:
            raise UserError(
                "with --resume only --max-steps, --max-tokens, --max-time, --device and --compile may change"
            )
        for key, value in train_flags.items():
            setattr(cfg.train, key, value)
        cfg.train.out = str(run_dir)
        cfg.train.__post_init__()  # saved by train() once the checkpoint has loaded
    else:
        cfg = resolve_config(args)
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


def cmd_info(args: argparse.Namespace) -> int:
    from tinylm.costs import model_costs

    cfg = resolve_config(args)
    costs = model_costs(cfg.model, batch_size=cfg.train.batch_size)
    if args.json:
        print(json.dumps({"preset": cfg.preset, "model": dataclasses.asdict(cfg.model), **costs.to_dict()}, indent=2))
        return 0
    m = cfg.model
    print(f"preset {cfg.preset}: {m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, block {m.block_size}, "
          f"vocabulary {m.vocab_size}")  # fmt: skip
    print(f"  parameters            {costs.params:,} ({costs.params_non_embedding:,} without embeddings)")
    print(f"  training FLOPs/token  {costs.flops_per_token_train:,} "
          f"({100 * costs.output_layer_flop_share:.0f}% in the output layer)")  # fmt: skip
    mem = costs.memory_bytes
    print(f"  memory, batch {cfg.train.batch_size}      ~{mem['total'] / 2**20:,.0f} MiB "
          f"(weights+grads+AdamW {(mem['weights'] + mem['gradients'] + mem['optimizer']) / 2**20:,.0f}, "
          f"activations {mem['activations'] / 2**20:,.0f}, logits chunk {mem['logits_chunk'] / 2**20:,.0f})")  # fmt: skip
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from tinylm.ablation import DEFAULT_TOKENS, ablate, parse_phases
    from tinylm.report import write_report

    names = [n.strip() for n in (args.presets or args.preset or "basic").split(",") if n.strip()]
    for name in names:
        preset(name)  # fail early on an unknown name
    phases = parse_phases(args.phases)
    model_flags, train_flags = _split_flags(args)
    for fixed in ("init", "schedule", "batching", "out"):
        train_flags.pop(fixed, None)
    out = Path(args.out)
    check_writable_dir(out, "--out")
    if all(train_flags.get(k) is None for k in BUDGET_FIELDS):
        if len(names) > 1:
            raise UserError("give a budget (--max-tokens, --max-steps or --max-time) when ablating several presets")
        train_flags["max_tokens"] = DEFAULT_TOKENS[names[0]]
    base = TrainConfig(**train_flags)
    ablate(names, base, out, phases, seeds=args.seeds, model_overrides=model_flags, quiet=args.quiet,
           nproc_per_node=args.nproc_per_node)  # fmt: skip
    report = write_report([out], out / "report.md")
    print(f"report written to {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tinylm.report import write_report

    check_writable_file(Path(args.out), "--out")
    report = write_report([Path(p) for p in args.dirs], Path(args.out))
    print(f"report written to {report}")
    return 0


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


def cmd_eval(args: argparse.Namespace) -> int:
    from tinylm.evaluate import evaluate_run
    from tinylm.rundir import EVAL_FILE, write_atomic

    out = Path(args.out) if args.out else Path(args.run_dir) / EVAL_FILE
    if args.out:
        check_writable_file(out, "--out")
    result = evaluate_run(Path(args.run_dir), args.data, args.eval_tokens, args.device)
    for key in ("data", "tokens", "bytes", "loss", "perplexity", "bits_per_byte"):
        value = result[key]
        print(f"{key:<14} {value:.4f}" if isinstance(value, float) else f"{key:<14} {value}")
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tinylm.export import export_hf

    out = export_hf(Path(args.run_dir), Path(args.out))
    print(f"exported to {out}: load with transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tinylm.bench import bench, format_report

    report = bench(args.preset, args.batch_size, args.repeats, args.warmup, args.compare_textbook, args.device,
                   measure_memory=not args.no_memory, compile=args.compile)  # fmt: skip
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.json}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from tinylm.report import plot_runs

    check_writable_file(Path(args.out), "--out")
    path = plot_runs([Path(d) for d in args.run_dirs], Path(args.out))
    print(f"plot written to {path}")
    return 0


def cmd_fetch_tokenizer(args: argparse.Namespace) -> int:
    from tinylm.data.tokenizer import gpt2_ranks_path

    path = gpt2_ranks_path(fetch=True)
    print(f"GPT-2 tokenizer ranks verified at {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line and exit code 2, like every other input error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tinylm", description="Train small GPT models and measure what matters.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model (or --resume one)")
    p.add_argument("--preset", choices=list(PRESETS), help="model shape to start from (default basic)")
    p.add_argument("--config", help="YAML recipe; flags override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--nproc-per-node", type=_at_least(1), default=1, help="data-parallel processes (starts torchrun)")
    _add_dataclass_flags(p, ModelConfig, "model")
    _add_dataclass_flags(p, TrainConfig, "training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="tokenise a data source into memory-mapped token files")
    p.add_argument("--data", required=True, help="path, 'shakespeare', 'tinystories' or 'hf:NAME[:CONFIG]'")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' or 'bpe:N'")
    p.add_argument("--out", help="directory to write (default: the cache, keyed by content)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--text-field", default="text")
    p.add_argument("--doc-sep", default=None)
    p.add_argument("--block-size", type=_integer, default=512, help="report token utilisation at this block size")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("info", help="parameters, FLOPs and memory of a model")
    p.add_argument("--preset", choices=list(PRESETS))
    p.add_argument("--config", help="YAML recipe")
    p.add_argument("--json", action="store_true")
    _add_dataclass_flags(p, ModelConfig, "model")
    p.add_argument("--batch-size", type=_integer, default=argparse.SUPPRESS, dest="batch_size")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ablate", help="the four cumulative phases at equal compute, then the report")
    p.add_argument("--preset", choices=list(PRESETS), help="one preset (default basic)")
    p.add_argument("--presets", help="several presets, comma-separated, e.g. basic,mid,quality")
    p.add_argument("--phases", help="subset/order of baseline,init,cosine,packed")
    p.add_argument("--seeds", type=_integer, default=1, help="repeat each phase with K seeds (mean ± std)")
    p.add_argument("--out", required=True, help="ablation directory (rerun to finish an interrupted one)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--nproc-per-node", type=_at_least(1), default=1, help="data-parallel processes per phase (torchrun)"
    )
    _add_dataclass_flags(p, ModelConfig, "model")
    _add_dataclass_flags(
        p, TrainConfig, "training (passed to every phase)", skip=("init", "schedule", "batching", "out")
    )
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("report", help="tables, plots and CSV from finished runs or ablations")
    p.add_argument("dirs", nargs="+", help="ablation or run directories")
    p.add_argument("--out", default="report.md", help="Markdown file; plots and results.csv/json go beside it")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=_integer, default=200)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=_integer, default=None)
    p.add_argument("--num-samples", type=_at_least(1), default=1)
    p.add_argument("--no-stop", action="store_true", help="go on past <|endoftext|>")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained run")
    p.add_argument("run_dir")
    p.add_argument("--data", help="other data (default: the run's own validation stream)")
    p.add_argument("--eval-tokens", type=_at_least(1), default=None)
    p.add_argument("--out", help="JSON file (default RUN_DIR/eval.json)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a Hugging Face GPT2LMHeadModel directory")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["hf"], default="hf")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="time the training step: tokens/s, GFLOP/s, MFU, peak memory")
    p.add_argument("--preset", choices=list(PRESETS), default="basic")
    p.add_argument("--batch-size", type=_at_least(1), default=8)
    p.add_argument("--repeats", type=_at_least(1), default=5)
    p.add_argument("--warmup", type=_at_least(0), default=2)
    p.add_argument("--compare-textbook", action="store_true", help="also time full logits + F.cross_entropy + AdamW")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--compile", action="store_true", help="torch.compile the tinylm step's blocks (as train --compile)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="FILE", nargs="?", const="-",
                   help="the figures as JSON: to FILE (the table still prints), or alone to stdout")  # fmt: skip
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plot", help="train/validation loss curves of runs, side by side")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="runs.png")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("fetch-tokenizer", help="install the GPT-2 tokenizer ranks for offline use")
    p.set_defaults(func=cmd_fetch_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except UserError as e:
        print(f"tinylm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinylm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
