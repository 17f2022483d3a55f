"""The ``tinylm`` command: thin argument parsing over functions that return results.

Flags for the model and training settings are generated from the config dataclasses, so
every field can be set from the command line (``--n-layer 6``, ``--max-tokens 2e6``) and
their help is the field's docstring. Precedence: preset < --config YAML < flags.

- ``flags.py``: flags from the dataclasses, argparse types, the one-line-error parser;
- ``settings.py``: the one merge of preset < YAML recipe < flags (and of a resumed run's flags);
- ``training.py`` (train, info, ablate), ``data.py`` (prepare, bench, fetch-tokenizer),
  ``runs.py`` (report, plot, sample, eval, export): each command's flags beside its code.
"""

from __future__ import annotations

import argparse
import sys

from tinylm.cli import data, runs, training
from tinylm.cli.flags import Parser
from tinylm.cli.settings import resolve_config
from tinylm.errors import DISK_ERRORS, UserError

__all__ = ["build_parser", "main", "resolve_config"]

COMMANDS = (
    training.add_train,
    data.add_prepare,
    training.add_info,
    training.add_ablate,
    training.add_status,
    runs.add_report,
    runs.add_sample,
    runs.add_eval,
    runs.add_export,
    data.add_bench,
    runs.add_plot,
    data.add_fetch_tokenizer,
)
"""Each adds one sub-command, in the order ``tinylm --help`` lists them."""


def version() -> str:
    """The installed package's version (its metadata, as pip sees it)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("tinylm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tinylm", description="Train small GPT models and measure what matters.")
    parser.add_argument("--version", action="version", version=f"tinylm {version()}",
                        help="print the version and exit")  # fmt: skip
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return parser


# A full disk met where no command words it itself is still one line (errors.DISK_ERRORS). Nothing
# is lost: a checkpoint is switched atomically, and resuming drops what was written past it.


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command is None:  # bare `tinylm`: what it can do, not an error
        parser.print_help()
        return 0
    args.argv = argv
    try:
        return args.func(args)
    except UserError as e:
        print(f"tinylm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        print(f"tinylm: error: could not write {e.filename or 'a file'}: {e.strerror}; make room and run the "
              "command again (a run goes on from its last checkpoint: tinylm train --resume RUN_DIR)",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("tinylm: interrupted", file=sys.stderr)
        return 130
