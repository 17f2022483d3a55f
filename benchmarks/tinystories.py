"""Where the TinyStories slice is: the one setting the benchmarks and the slow tests read.

The slice (a TinyStories excerpt in the layout `tinylm train --data` reads: train.txt and
valid.txt) is not shipped with tinylm. Point TINYLM_TINYSTORIES at your copy; without it, a
tinystories-lc folder beside the repository is tried.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_VAR = "TINYLM_TINYSTORIES"
REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO.parent / "shared" / "data" / "tinystories-lc"


def tinystories_path() -> Path:
    """The slice's folder, whether or not it exists (see tinystories_or_exit for a checked one)."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT)


def missing_reason() -> str | None:
    """Why the slice cannot be used, or None when its folder is there."""
    path = tinystories_path()
    if path.is_dir():
        return None
    return f"the TinyStories slice is not at {path}: set {ENV_VAR} to a folder holding train.txt and valid.txt"


def tinystories_or_exit() -> Path:
    """The slice's folder, or a one-line error (exit code 2) for a benchmark that needs it."""
    if reason := missing_reason():
        print(f"benchmark: error: {reason}", file=sys.stderr)
        raise SystemExit(2)
    return tinystories_path()
