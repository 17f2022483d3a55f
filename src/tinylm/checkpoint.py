"""Checkpoints of a run directory, each one atomic unit.

Layout::

    run_dir/checkpoint.json            the pointer: {"dir": "checkpoint-000012", "step": 12, "files": sizes}
    run_dir/checkpoint-000012/         model.safetensors (weights) + trainer_state.pt (optimizer, RNG,
                                       progress, the guard's roll-back snapshot, the run's settings)

A save writes the new folder under a temporary name, fsyncs its files, renames it, and only
then switches the pointer with one atomic os.replace; the previous folder is deleted after the
switch. A kill at any instant therefore leaves the pointer naming one complete checkpoint, and
the leftovers of a killed save (a temporary folder, a folder never pointed to) are removed by
the next save or fresh start. Readers go through the pointer and ignore everything else.

Run directories written before this layout hold model.safetensors and trainer_state.pt
directly in the run directory; they still load, and their first new save replaces them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from tinylm.errors import UserError, damaged, missing
from tinylm.paths import TMP_SUFFIX, replace_durably, write_atomic

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
POINTER_FILE = "checkpoint.json"
_FOLDER = re.compile(r"checkpoint-\d{6,}")  # checkpoint-000012: the step, zero-padded
_TMP_PREFIX = ".checkpoint-"  # a save in progress: .checkpoint-000012.tmp
_TMP_FILES = {name + TMP_SUFFIX for name in (POINTER_FILE, MODEL_FILE, STATE_FILE)}  # the last two: old layout
KILL_ENV = "TINYLM_TEST_KILL_AT"


@dataclass(frozen=True)
class Files:
    """Where a run's current checkpoint lies, and the sizes its pointer promises (None: old layout)."""

    model: Path
    state: Path
    sizes: dict[str, int] | None


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


def _write_file(path: Path, write: Callable[[BinaryIO], object]) -> int:
    """Write and fsync one file (the bytes are on disk before anything points to them); returns its size."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def save(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any],
         settings: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Write a new checkpoint and switch to it atomically; the previous one stays until the switch.

    ``settings``: those a resume must keep (RunConfig.fixed_settings), checked by load().
    A write that fails (a full disk, a read-only file system) is a UserError and leaves the
    previous checkpoint as it was.
    """
    step = int(progress["step"])
    discard_leftovers(run_dir)
    name = f"checkpoint-{step:06d}"
    tmp, folder = run_dir / f"{_TMP_PREFIX}{step:06d}.tmp", run_dir / name
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
        _write_file(tmp / MODEL_FILE, lambda f: f.write(weights))
        kill_point("checkpoint:between-files", step)
        state_size = _write_file(tmp / STATE_FILE, lambda f: torch.save(state, f))  # streamed: no copy in memory
        replace_durably(tmp, folder)
        kill_point("checkpoint:before-pointer", step)
        sizes = {MODEL_FILE: len(weights), STATE_FILE: state_size}
        pointer = json.dumps({"dir": name, "step": step, "files": sizes}) + "\n"
        write_atomic(run_dir / POINTER_FILE, pointer)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _current_dir(run_dir) != name:  # the switch did not happen: the new folder is a leftover
            shutil.rmtree(folder, ignore_errors=True)
        raise UserError(
            f"could not write the checkpoint of step {step} in {run_dir}: {e.strerror or e}; the previous "
            f"checkpoint is untouched: fix that and continue with tinylm train --resume {run_dir}"
        ) from e
    kill_point("checkpoint:after-pointer", step)
    discard_leftovers(run_dir)  # the previous checkpoint, now that the new one is in place


def discard_leftovers(run_dir: Path) -> None:
    """Remove what no pointer names: killed saves, the previous checkpoint, the old layout's files.

    Nothing is removed while the pointer is damaged: the user may still want to repair it.
    """
    if not run_dir.is_dir():
        return
    try:
        current = _read_pointer(run_dir).get("dir")
    except UserError:
        return
    for entry in run_dir.iterdir():
        killed_save = entry.name.startswith(_TMP_PREFIX) or entry.name in _TMP_FILES
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
        return Files(folder / MODEL_FILE, folder / STATE_FILE, pointer["files"])
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


def _check_size(path: Path, sizes: dict[str, int] | None) -> None:
    if not path.exists():
        raise missing(path, "restore it from a backup, or train again (--out NEW_DIR)")
    expected = (sizes or {}).get(path.name)
    actual = path.stat().st_size
    if expected is not None and actual != expected:
        raise _damaged(path, f"{actual} bytes where its checkpoint wrote {expected}: truncated or altered")
    if actual == 0:
        raise _damaged(path, "empty")


def _load_weights_from(files: Files, model: torch.nn.Module) -> dict[str, str]:
    path = files.model
    _check_size(path, files.sizes)
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
    """Load the current checkpoint's weights into model; returns the safetensors metadata."""
    return _load_weights_from(_require(run_dir), model)


def _check_settings(run_dir: Path, saved: dict[str, Any] | None, now: dict[str, Any] | None) -> None:
    """Refuse settings changed since the checkpoint (checkpoints from before it kept them: unchecked).
    A setting the checkpoint lacks is one added to tinylm since: it keeps its default."""
    if saved is None or now is None:
        return
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    if changed:
        raise UserError(
            f"{run_dir}: settings differ from those its checkpoint was trained with ({', '.join(changed[:3])}); "
            "a resume may change only --max-steps, --max-tokens, --max-time, --device, --compile and --tracker: "
            "put config.json back, or train a new run (--out NEW_DIR)"
        )


def load(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         settings: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Restore weights, optimizer and RNG; returns the saved progress. ``settings``: the run's now
    (RunConfig.fixed_settings); any that differ from the checkpoint's are refused before anything loads."""
    files = _require(run_dir)
    _check_size(files.state, files.sizes)
    try:
        state = torch.load(files.state, map_location="cpu", weights_only=False)
        step, optimizer_state, rng = state["progress"]["step"], state["optimizer"], state["rng"]
    except Exception as e:  # a damaged pickle/zip fails in many ways (EOFError, RuntimeError, UnpicklingError ...)
        raise _damaged(files.state, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from e
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
