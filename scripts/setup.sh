#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv/ with tinylm and its dev tools (tests, lint,
# the guide), the tested torch build (scripts/constraints.txt), and the GPT-2 tokenizer ranks for
# offline use.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e '.[dev]'
.venv/bin/tinylm fetch-tokenizer
echo "set-up done: activate with 'source .venv/bin/activate'"
