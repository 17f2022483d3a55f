"""The one exception type that means "the user asked for something we cannot do", and the
wording of its most common case: a file tinylm wrote that is now missing or damaged."""

from __future__ import annotations

import errno
from pathlib import Path

DISK_ERRORS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS}
"""A full disk, a spent quota, a file system remounted read-only: wherever a write meets one, it is
one line naming the folder, not a traceback (paths.disk_full_is_one_line)."""


class UserError(Exception):
    """Bad input: the CLI prints the message on one line and exits with code 2."""


def damaged(what: Path | str, advice: str, why: str | None = None) -> UserError:
    """``PATH is damaged (WHY); ADVICE``: one line naming the file and what to do about it."""
    because = f" ({why})" if why else ""
    return UserError(f"{what} is damaged{because}; {advice}")


def missing(what: Path | str, advice: str) -> UserError:
    """``PATH is missing; ADVICE``."""
    return UserError(f"{what} is missing; {advice}")
