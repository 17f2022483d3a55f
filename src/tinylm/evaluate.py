"""Validation loss on a fixed list of batches."""

from __future__ import annotations

import contextlib

import torch

from tinylm.data.batching import Batch
from tinylm.model import GPT


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; fp32 elsewhere (this project's CPUs have no bf16 units)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def validation_loss(model: GPT, batches: list[Batch], device: torch.device) -> float:
    """Mean loss per target token over all batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        b = batch.to(device)
        with autocast_for(device):
            _, loss = model(b.x, b.y, b.doc_ids)
        total += loss.item() * b.real_tokens
        count += b.real_tokens
    model.train(was_training)
    return total / max(count, 1)
