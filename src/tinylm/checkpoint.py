"""Checkpoints of a run directory: weights in safetensors, optimizer/RNG/progress in a torch file.

Both files are written under temporary names and renamed, so a kill at any moment leaves
the previous complete checkpoint. The step is recorded in both and checked on load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tinylm.errors import UserError

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied output matrix (it is the token embedding)."""
    state = model.state_dict()
    state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
    step = str(progress["step"])
    _atomic(run_dir / MODEL_FILE, lambda p: save_file(model_tensors(model), str(p), metadata={"step": step}))
    state = {
        "progress": progress,
        "optimizer": optimizer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    _atomic(run_dir / STATE_FILE, lambda p: torch.save(state, p))


def load_weights(run_dir: Path, model: torch.nn.Module) -> dict[str, str]:
    """Load model.safetensors into model; returns the file's metadata."""
    path = run_dir / MODEL_FILE
    if not path.exists():
        raise UserError(f"{run_dir} has no {MODEL_FILE}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"{path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return metadata


def load(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG; returns the saved progress."""
    if not (run_dir / STATE_FILE).exists():
        raise UserError(f"{run_dir} has no checkpoint to resume ({STATE_FILE} missing)")
    metadata = load_weights(run_dir, model)
    state = torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=False)
    if metadata.get("step") != str(state["progress"]["step"]):
        raise UserError(f"{run_dir}: weights and trainer state are from different steps; cannot resume")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["progress"]
