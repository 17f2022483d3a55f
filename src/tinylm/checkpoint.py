"""Checkpoints of a run directory, each one atomic unit.

Layout::

    run_dir/checkpoint.json            the pointer: {"dir": "checkpoint-000012", "step": 12, "files": sizes,
                                       "xxh3_128": each file's checksum, "settings": the fixed ones}
    run_dir/checkpoint-000012/         model.safetensors (weights) + trainer_state.pt (optimizer, RNG,
                                       progress, the guard's roll-back snapshot, the run's settings)

A save writes the new folder under a temporary name, fsyncs its files, renames it, and only
then switches the pointer with one atomic os.replace; the previous folder is deleted after the
switch. A kill at any instant therefore leaves the pointer naming one complete checkpoint, and
the leftovers of a killed save (a temporary folder, a folder never pointed to) are removed by
the next save or fresh start. Readers go through the pointer and ignore everything else.

Every reader checks each file against the pointer's size and checksum before using it, so a
damaged file is named in one line instead of training on. The trainer state is read with
``torch.load(weights_only=True)``: it holds only tensors, numbers, strings and containers of them,
and a file that asks to build any other object is refused, so a run folder someone else made
runs no code on the machine that resumes it.

Run directories written before this layout hold model.safetensors and trainer_state.pt
directly in the run directory; they still load, and their first new save replaces them.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from tinylm.config import resume_edits_text
from tinylm.errors import UserError, damaged, missing
from tinylm.paths import is_temporary, replace_durably, write_atomic

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
POINTER_FILE = "checkpoint.json"
_FOLDER = re.compile(r"checkpoint-\d{6,}")  # checkpoint-000012: the step, zero-padded
_TMP_PREFIX = ".checkpoint-"  # a save in progress: .checkpoint-000012.PID.tmp
KILL_ENV = "TINYLM_TEST_KILL_AT"
CHECKSUM = "xxh3_128"
"""The pointer's key for its files' checksums: XXH3-128, against accidental damage (a flipped bit, a
truncated copy), not tampering: whoever can rewrite a file can rewrite the pointer. It hashed about
14x faster than SHA-256 here, which would have added about a fifth to a save's time (docs/reliability.md)."""


RUN_FILES = ("tokenizer.json",)
"""Files of the run folder, beside the checkpoints, that a run reads back (a trained BPE's vocabulary and
merges): each save records their checksums in the pointer too (``run_files``), and every reader checks them."""


@dataclass(frozen=True)
class Files:
    """Where a run's current checkpoint lies, and the sizes and checksums its pointer promises
    (None: the old layout; checksums: None in pointers written before them)."""

    model: Path
    state: Path
    sizes: dict[str, int] | None
    checksums: dict[str, str] | None = None


def kill_point(where: str, step: int) -> None:
    """For tests: SIGKILL this process at a named moment, set as TINYLM_TEST_KILL_AT="where:step=N".

    It makes the narrow windows of a save reachable from a real process, so tests can prove
    that a kill there loses nothing.
    """
    if os.environ.get(KILL_ENV) == f"{where}:step={step}":
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


# --- writing ------------------------------------------------------------------------------


def _tied_head(model: torch.nn.Module) -> bool:
    """Whether the output matrix is the token embedding (GPT-2's tie; tinylm's default)."""
    head, wte = getattr(model, "lm_head", None), getattr(getattr(model, "transformer", None), "wte", None)
    return head is not None and wte is not None and head.weight is wte.weight


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without a tied output matrix (it is the token embedding); an untied one is kept."""
    state = model.state_dict()
    if _tied_head(model):
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


class _Hashing:
    """A file wrapper for torch.save: hashes the bytes on their way to the file, and keeps the OSError a
    write met (torch reports it as a RuntimeError about an "unexpected pos", which names no cause)."""

    def __init__(self, f: BinaryIO):
        self.f, self.digest, self.error = f, xxhash.xxh3_128(), None

    def write(self, data: bytes) -> int:
        try:
            written = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.digest.update(data)
        return written

    def flush(self) -> None:
        self.f.flush()


def _write_file(path: Path, write: Callable[[BinaryIO], object]) -> tuple[int, str]:
    """Write and fsync one file (the bytes are on disk before anything points to them); returns its
    size and checksum, hashed as the bytes go by (no second read)."""
    with open(path, "wb") as f:
        hashing = _Hashing(f)
        try:
            write(hashing)
        except RuntimeError as e:
            if hashing.error is not None:  # a full disk inside torch.save: say so, not torch's words
                raise hashing.error from e
            raise
        f.flush()
        os.fsync(f.fileno())
        return f.tell(), hashing.digest.hexdigest()


def last_good(run_dir: Path) -> str:
    """``the last good checkpoint, untouched, is DIR/checkpoint-000010 (step 10)``: for the lines that say a
    write failed."""
    try:
        pointer = _read_pointer(run_dir)
    except UserError:
        return f"its pointer {run_dir / POINTER_FILE} is damaged"
    if pointer:
        return f"the last good checkpoint, untouched, is {run_dir / pointer['dir']} (step {pointer['step']})"
    if (run_dir / STATE_FILE).exists():
        return f"the last good checkpoint, untouched, is the one in {run_dir}"
    return "there is no checkpoint yet (the run starts again)"


def save(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any],
         settings: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Write a new checkpoint and switch to it atomically; the previous one stays until the switch.

    ``settings``: those a resume must keep (RunConfig.fixed_settings), checked by load().
    A write that fails (a full disk, a read-only file system) is a UserError naming the folder and
    the last good checkpoint; it removes what it wrote and leaves the previous checkpoint as it was.
    """
    step = int(progress["step"])
    discard_leftovers(run_dir)
    name = f"checkpoint-{step:06d}"
    # The process id makes the name of a save in progress unique; a killed one's is a leftover.
    tmp, folder = run_dir / f"{_TMP_PREFIX}{step:06d}.{os.getpid()}.tmp", run_dir / name
    if _read_pointer(run_dir).get("dir") == name:
        raise RuntimeError(f"a second checkpoint of step {step} in one run")  # the loop saves once per step
    state = {
        "settings": settings,
        "progress": progress,
        "optimizer": optimizer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    try:
        tmp.mkdir()
        weights = safetensors_bytes(model_tensors(model), metadata={"step": str(step)})
        weights_file = _write_file(tmp / MODEL_FILE, lambda f: f.write(weights))
        kill_point("checkpoint:between-files", step)
        state_file = _write_file(tmp / STATE_FILE, lambda f: torch.save(state, f))  # streamed: no copy in memory
        replace_durably(tmp, folder)
        kill_point("checkpoint:before-pointer", step)
        files = {MODEL_FILE: weights_file, STATE_FILE: state_file}
        run_files = {n: file_checksum(run_dir / n) for n in RUN_FILES if (run_dir / n).exists()}
        pointer = {"dir": name, "step": step, "files": {k: size for k, (size, _) in files.items()},
                   CHECKSUM: {k: digest for k, (_, digest) in files.items()}, "run_files": run_files,
                   "settings": settings}  # fmt: skip  (sampling checks config.json against them)
        write_atomic(run_dir / POINTER_FILE, json.dumps(pointer) + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _current_dir(run_dir) != name:  # the switch did not happen: the new folder is a leftover
            shutil.rmtree(folder, ignore_errors=True)
        raise UserError(
            f"could not write the checkpoint of step {step} in {run_dir}: {e.strerror or e}; {last_good(run_dir)}: "
            f"make room and continue with tinylm train --resume {run_dir}"
        ) from e
    kill_point("checkpoint:after-pointer", step)
    discard_leftovers(run_dir)  # the previous checkpoint, now that the new one is in place


def discard_leftovers(run_dir: Path) -> None:
    """Remove what no pointer names: killed saves and writes, the previous checkpoint, the old layout's files.

    Called under the run folder's lock (at a fresh start, a resume and each save), so nothing
    removed here is another live process's.

    Nothing is removed while the pointer is damaged: the user may still want to repair it.
    """
    if not run_dir.is_dir():
        return
    try:
        current = _read_pointer(run_dir).get("dir")
    except UserError:
        return
    for entry in run_dir.iterdir():
        # a killed save or write_atomic (of the pointer, config.json, a summary): only this process writes here
        killed_save = entry.name.startswith(_TMP_PREFIX) or is_temporary(entry.name)
        replaced = _FOLDER.fullmatch(entry.name) and entry.is_dir() and entry.name != current
        old_layout = current is not None and entry.name in (MODEL_FILE, STATE_FILE)
        if killed_save or replaced or old_layout:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# --- reading ------------------------------------------------------------------------------


_RESTORE = "restore it from a backup, or train again (tinylm train ... --out NEW_DIR)"


def _damaged(path: Path, why: str) -> UserError:
    return damaged(path, _RESTORE, why)


def _current_dir(run_dir: Path) -> str | None:
    """The folder the pointer names; None without a pointer, or with a damaged one."""
    try:
        return _read_pointer(run_dir).get("dir")
    except UserError:
        return None


def _read_pointer(run_dir: Path) -> dict[str, Any]:
    """The pointer's content; {} when there is none (no checkpoint yet, or the old layout)."""
    path = run_dir / POINTER_FILE
    if not path.exists():
        return {}
    try:
        pointer = json.loads(path.read_text())
        ok = (
            isinstance(pointer, dict)
            and isinstance(pointer.get("dir"), str)
            and _FOLDER.fullmatch(pointer["dir"])
            and isinstance(pointer.get("step"), int)
            and isinstance(pointer.get("files"), dict)
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, "not readable JSON") from e
    if not ok:
        raise _damaged(path, "not a checkpoint pointer")
    return pointer


def locate(run_dir: Path) -> Files | None:
    """The run's current checkpoint, in either layout; None when it has none."""
    pointer = _read_pointer(run_dir)
    if pointer:
        folder = run_dir / pointer["dir"]
        checksums = pointer.get(CHECKSUM)
        return Files(folder / MODEL_FILE, folder / STATE_FILE, pointer["files"],
                     checksums if isinstance(checksums, dict) else None)  # fmt: skip
    if (run_dir / MODEL_FILE).exists() or (run_dir / STATE_FILE).exists():
        return Files(run_dir / MODEL_FILE, run_dir / STATE_FILE, None)
    return None


def exists(run_dir: Path) -> bool:
    """Whether the run has a checkpoint to resume from (a damaged one counts: resuming says why)."""
    return (run_dir / POINTER_FILE).exists() or (run_dir / STATE_FILE).exists()


def weights_path(run_dir: Path) -> Path:
    """The safetensors file holding the run's current weights."""
    return _require(run_dir).model


def _require(run_dir: Path) -> Files:
    files = locate(run_dir)
    if files is None:
        raise UserError(f"{run_dir} has no checkpoint (no {POINTER_FILE}); train it first")
    return files


def _check_file(path: Path, files: Files) -> None:
    """The file is there, has the size its checkpoint wrote and, when the pointer holds one, its checksum."""
    if not path.exists():
        raise missing(path, "restore it from a backup, or train again (--out NEW_DIR)")
    expected = (files.sizes or {}).get(path.name)
    actual = path.stat().st_size
    if expected is not None and actual != expected:
        raise _damaged(path, f"{actual} bytes where its checkpoint wrote {expected}: truncated or altered")
    if actual == 0:
        raise _damaged(path, "empty")
    checksum = (files.checksums or {}).get(path.name)
    if checksum is not None and file_checksum(path) != checksum:
        raise _damaged(path, "its checksum is not the one its checkpoint recorded: altered since it was written")


def check_run_files(run_dir: Path) -> None:
    """The run folder's RUN_FILES are those its checkpoint recorded (pointers from before say nothing)."""
    for name, digest in (_read_pointer(run_dir).get("run_files") or {}).items():
        path = run_dir / name
        if not path.exists():
            raise missing(path, "restore it from a backup, or train again (--out NEW_DIR)")
        if file_checksum(path) != digest:
            raise _damaged(path, "its checksum is not the one the checkpoint recorded: altered since it was written")


def file_checksum(path: Path) -> str:
    """The file's CHECKSUM, read in 4 MB pieces."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _load_weights_from(files: Files, model: torch.nn.Module) -> dict[str, str]:
    path = files.model
    _check_file(path, files)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise _damaged(path, str(e)) from e
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not _tied_head(model)]
    if missing or unexpected:
        raise UserError(f"{path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return metadata


def load_weights(run_dir: Path, model: torch.nn.Module) -> dict[str, str]:
    """Load the current checkpoint's weights into model; returns the safetensors metadata.

    The trainer state is checked too (size and checksum, not unpickled): a checkpoint is one unit, and a
    damaged state is better named now than at the resume that needs it.

    A run still training may switch to a new checkpoint and remove this one while it is being read
    (sample or eval beside a run): if the pointer has moved on by then, the new checkpoint is read."""
    for attempt in range(3):
        files = _require(run_dir)
        try:
            if files.checksums is not None:
                _check_file(files.state, files)
            check_run_files(run_dir)
            return _load_weights_from(files, model)
        except (UserError, OSError):
            if attempt == 2 or locate(run_dir) == files:  # the pointer stands: the error is this checkpoint's
                raise
    raise AssertionError("unreachable")


def changed_settings(saved: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """``train.lr 0.001 -> 0.002``: the settings that differ from a checkpoint's (one from before
    checkpoints kept them: none). A setting the checkpoint lacks is one added to tinylm since: it
    keeps its default. The data path is compared only where its content hash is not (an older checkpoint)."""
    if saved is None or now is None:
        return []
    skip = {"train.data"} if "data.content" in saved and "data.content" in now else set()
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and k not in skip and saved[k] != now[k]]


def _check_settings(run_dir: Path, saved: dict[str, Any] | None, now: dict[str, Any] | None) -> None:
    """Refuse settings changed since the checkpoint, listing them."""
    changed = changed_settings(saved, now)
    if changed:
        raise UserError(
            f"{run_dir}: settings differ from those its checkpoint was trained with ({', '.join(changed)}); "
            f"a resume may change only {resume_edits_text()} (the same data at another path): "
            "put config.json back, or train a new run (--out NEW_DIR)"
        )


def check_config(run_dir: Path, config_file: Path, now: dict[str, Any]) -> None:
    """For sampling, evaluation and export: the run's config.json must hold the settings its checkpoint
    recorded (a flipped byte or an edit would build another model, or score other data, silently)."""
    try:
        saved = _read_pointer(run_dir).get("settings")
    except UserError:
        return  # the weights' own check names the damaged pointer
    changed = changed_settings(saved if isinstance(saved, dict) else None, now)
    if changed:
        raise damaged(
            config_file,
            "put it back from a copy, or train the run again",
            f"{', '.join(changed)}: not the settings its checkpoint recorded; altered since it was written",
        )


def _read_state(path: Path) -> dict[str, Any]:
    """The trainer state, unpickled with weights_only=True: tensors, numbers, strings and their
    containers only, so a crafted file cannot run code. One that asks for anything else is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["progress"]["step"], state["optimizer"], state["rng"]["torch"]  # noqa: B018 (what load() needs)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e):
            raise _damaged(path, f"UnpicklingError: {_first_line(e)}") from None
        raise UserError(
            f"{path} holds Python objects that loading would have to build (which can run code), not only "
            "tensors, numbers and strings: refused (another tool or an older tinylm wrote it). Its weights still sample, "
            "evaluate and export; to train on, start a new run (tinylm train ... --out NEW_DIR)"
        ) from None
    except Exception as e:  # a damaged zip fails in many ways (EOFError, RuntimeError, KeyError, TypeError ...)
        raise _damaged(path, f"{type(e).__name__}: {_first_line(e)}") from None
    return state


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else "unreadable"


def load(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         settings: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Restore weights, optimizer and RNG; returns the saved progress. ``settings``: the run's now
    (RunConfig.fixed_settings); any that differ from the checkpoint's are refused before anything loads."""
    files = _require(run_dir)
    _check_file(files.state, files)
    check_run_files(run_dir)
    state = _read_state(files.state)
    step, optimizer_state, rng = state["progress"]["step"], state["optimizer"], state["rng"]
    _check_settings(run_dir, state.get("settings"), settings)
    metadata = _load_weights_from(files, model)
    if metadata.get("step") != str(step):
        raise UserError(f"{run_dir}: weights and trainer state are from different steps; cannot resume")
    try:
        optimizer.load_state_dict(optimizer_state)
    except (KeyError, ValueError) as e:  # torch's words for another optimizer's state (an older checkpoint)
        raise UserError(f"{run_dir}: the checkpoint's optimizer state does not fit --optimizer; cannot resume") from e
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["progress"]
