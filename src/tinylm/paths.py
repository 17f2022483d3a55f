"""Writing files safely: checks on the folders a user asks tinylm to write (made before any
work starts), the one atomic write every file tinylm keeps goes through, and the lock that keeps
a second process out of a folder being written."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from tinylm.errors import DISK_ERRORS, UserError

try:
    import fcntl
except ImportError:  # Windows: no flock, so a folder there is not guarded against a second process
    fcntl = None

TMP_SUFFIX = ".tmp"
"""``NAME.PID.tmp``: where write_atomic puts a file's new bytes before renaming them over ``NAME``."""


def temporary_path(path: Path) -> Path:
    """Where this process writes ``path``'s new bytes: named after the process, so that two writing
    one file at once never share (and truncate) one temporary file."""
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def is_temporary(name: str, of: str | None = None) -> bool:
    """Whether ``name`` is a temporary file of write_atomic (of the file named ``of``, if given);
    versions before temporary names held the process id wrote ``NAME.tmp``."""
    match = re.fullmatch(r"(.+?)(\.\d+)?" + re.escape(TMP_SUFFIX), name)
    return match is not None and (of is None or match.group(1) == of)


_TMP_INFIX = ".tmp-"
_HOST = socket.gethostname()


def temporary_dir(directory: Path) -> Path:
    """``NAME.tmp-HOST-PID`` beside ``directory``: where this process builds a folder that is renamed
    to ``directory`` only once complete (prepared data, an export)."""
    return directory.with_name(f"{directory.name}{_TMP_INFIX}{_HOST}-{os.getpid()}")


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the temporary folders of ``directory`` (temporary_dir) whose process was killed.

    A temporary folder is stale once the process named in it is gone (older versions named the
    process alone). Folders of other hosts (a shared cache) are left alone: their process may live.
    """
    prefix = f"{directory.name}{_TMP_INFIX}"
    if not directory.parent.is_dir():
        return
    for path in directory.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        host, _, pid = path.name[len(prefix) :].rpartition("-")
        if host in (_HOST, "") and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had this id; this one is not writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


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


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` so that a reader, or a kill at any instant, sees the old file or the new one.

    The bytes go to ``NAME.PID.tmp`` in the same folder (a rename is atomic only within one file
    system), are fsynced, and only then renamed over ``path``. A failed write (a full disk) removes
    its temporary file; one left over means a write was killed, and the run folder's next start
    removes it (checkpoint.discard_leftovers).
    """
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no half-written copy
        raise


@contextlib.contextmanager
def disk_full_is_one_line(folder: Path, then: str | Callable[[], str]):
    """Inside, a full disk (a spent quota, a read-only file system) is a one-line UserError naming
    ``folder`` and ``then`` (or what ``then()`` says when it happens): what is kept and how to go on.
    Whoever writes removes its own temporary files; this only words the error."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        advice = then() if callable(then) else then
        raise UserError(f"could not write {e.filename or 'a file'} in {folder}: {e.strerror}; {advice}") from None


def replace_durably(src: Path, dest: Path) -> None:
    """Rename a finished file or folder over ``dest`` atomically, and make the rename itself durable.

    A folder's own entries are fsynced first, so that its files (fsynced by whoever wrote
    them) cannot appear under ``dest`` before they do.
    """
    if src.is_dir():
        fsync_dir(src)
    os.replace(src, dest)
    fsync_dir(dest.parent)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new file, a rename) durable; POSIX only."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirLock:
    """One process at a time in a folder: an exclusive flock on the folder itself (nothing is written
    for it), released by release(), at the end of a ``with``, or when the process ends, a kill included.

    The path may also be a file (made empty if missing): a study's runs are claimed through a file
    beside each run's folder, and its study.json is written under one (tinylm.study)."""

    def __init__(self, path: Path, busy: str = "in use by another process", file: bool = False):
        self.path, self.busy = path, busy  # busy: the one-line error a second process gets
        self.file = file  # a lock file, made empty where missing
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> None:
        """Take the lock (nothing if held already); the folder must exist. ``wait``: block until the
        holder lets go, instead of raising ``busy``."""
        if self._fd is not None or fcntl is None:
            return
        try:
            if self.file:
                self.path.touch()
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # an unreadable folder: the writes that follow say so in one line
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise UserError(self.busy) from None
        except OSError:  # a file system without flock on folders (some NFS): unguarded, as before
            os.close(fd)
            return
        self._fd = fd

    def try_acquire(self) -> bool:
        """Take the lock if no other process holds it; False (nothing raised) if one does."""
        try:
            self.acquire()
        except UserError:
            return False
        return True

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now (tried and let go at once)."""
        if self._fd is not None or not self.path.exists():
            return False
        probe = DirLock(self.path, self.busy, self.file)
        if probe.try_acquire():
            probe.release()
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
