"""Cross-entropy of a linear output layer, computed in row chunks.

With the GPT-2 vocabulary most of a small model's work and memory is the 50257-way output
layer: the textbook ``F.cross_entropy(hidden @ W.T, targets)`` materialises a
(rows x vocab) fp32 logits tensor and its gradient (823 MB each at batch 8, block 512).
Here the logits of a few hundred rows exist at a time. Because the gradient of softmax
cross-entropy is known in closed form (softmax - one_hot), the forward pass also computes
the gradients of the hidden states and of the weight, so the backward pass is a multiply.
Same arithmetic as the textbook, one logits chunk of memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1
"""Target value for positions the loss skips (padding)."""

_CHUNK_ELEMENTS = 1 << 23
"""Logit elements per chunk (32 MB in fp32): big enough for efficient matmuls, small enough for cache and memory."""


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, ignoring IGNORE_INDEX.

    hidden: (N, C), weight: (V, C), targets: (N,). Returns a scalar fp32 tensor.
    """
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    compute_dtype = hidden.dtype
    if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
        compute_dtype = torch.get_autocast_dtype("cuda")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, compute_dtype)
    return _chunked_loss(hidden, weight, targets, chunk_rows, compute_dtype)


def _accumulation_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    # logits and the loss are kept in at least fp32, whatever the matmuls run in
    return torch.promote_types(compute_dtype, torch.float32)


def _chunked_loss(hidden, weight, targets, chunk_rows, compute_dtype) -> torch.Tensor:
    acc = _accumulation_dtype(compute_dtype)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    w = weight.to(compute_dtype)
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = (hidden[start : start + chunk_rows].to(compute_dtype) @ w.t()).to(acc)
        total += F.cross_entropy(
            logits, targets[start : start + chunk_rows], ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, compute_dtype):
        n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden)
        acc = _accumulation_dtype(compute_dtype)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start : start + chunk_rows].to(compute_dtype)  # (n, C)
                t = targets[start : start + chunk_rows]  # (n,)
                keep = t != IGNORE_INDEX
                safe_t = torch.where(keep, t, 0)
                log_probs = torch.log_softmax((h @ w.t()).to(acc), dim=-1)  # (n, V), one fused pass
                total -= (log_probs.gather(1, safe_t[:, None]).squeeze(1) * keep).sum()
                # d loss / d logits = (softmax - one_hot) / n_valid on kept rows; built in place.
                grad_logits = log_probs.exp_()
                grad_logits[torch.arange(len(t), device=t.device), safe_t] -= 1.0
                grad_logits.mul_((keep.to(acc) / n_valid)[:, None])
                grad_logits = grad_logits.to(compute_dtype)
                grad_hidden[start : start + chunk_rows] = grad_logits @ w
                if compute_dtype == acc:
                    grad_weight.addmm_(grad_logits.t(), h)
                else:
                    grad_weight += (grad_logits.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None
