"""Checks on the folders a user asks tinylm to write, made before any work starts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tinylm.errors import UserError


def check_writable_dir(path: Path, flag: str) -> None:
    """Refuse, in one line, a folder that is a file, lies under a file, or cannot be created or written.

    Creates nothing: it writes an unnamed temporary file in the nearest folder that exists,
    so processes checking the same path at once do not disturb each other.
    """
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under the file {existing}"
        raise UserError(f"{flag} {path} {where}; choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be created: {e.strerror or e}; choose another {flag}") from None


def check_writable_file(path: Path, flag: str) -> None:
    """Refuse, in one line, a file path that is a folder or whose folder cannot be created or written."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a file to write")
    check_writable_dir(path.parent, flag)
