"""Cross-entropy of a linear output layer, computed in row chunks.

With the GPT-2 vocabulary most of a small model's work and memory is the 50257-way output
layer: the textbook ``F.cross_entropy(hidden @ W.T, targets)`` materialises a
(rows x vocab) fp32 logits tensor and its gradient (823 MB each at batch 8, block 512).
Here the logits of a few hundred rows exist at a time. Because the gradient of softmax
cross-entropy is known in closed form (softmax - one_hot), the forward pass also computes
the gradients of the hidden states and of the weight, so the backward pass is a multiply.
Same arithmetic as the textbook, one logits chunk of memory. A tanh soft cap on the logits and
PaLM's z-loss are switches whose gradients are formed the same way; with both off the gradients
are the ones from before the switches, bit for bit on the same matmul kernels. The loss value is
not: on the CPU a row's loss is -log p_target (see _row_losses), equal to log-sum-exp - target logit
but rounded otherwise, so a row may differ from it in the last bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1
"""Target value for positions the loss skips (padding)."""

_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 28}
"""Logit elements per chunk, by device. CPU: 32 MB in fp32 (166 rows of GPT-2's vocabulary), big
enough for efficient matmuls and small enough for cache and memory. On the 2-core Zen 4 (1 MB L2 per
core, 32 MB L3) half and twice the rows made the basic step slower (benchmarks/bench_levers.py), and the
oneDNN logits matmul ran fastest at these rows; a size from the cache sizes would be the same 32 MB
there, so none is derived. CUDA: 1 GiB in fp32, because each chunk costs a dozen kernel
launches: with the CPU's size a batch of 32 x 512 took 99 chunks and the step ran at a third of
the textbook's speed on an H200 (scripts/gpu_check.sh); a few large chunks still hold a fraction
of the textbook's full logits tensor and its gradient."""


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    *,
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_cross_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, ignoring IGNORE_INDEX.

    hidden: (N, C), weight: (V, C) (the tied embedding or a separate output matrix), targets: (N,).
    Returns a scalar fp32 tensor: the loss the gradients are of.

    softcap: logits become ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2).
    z_loss: adds ``z_loss * mean(logsumexp(logits)^2)`` over the real targets (PaLM), which keeps
    the softmax normaliser near 1; evaluation leaves it at 0 so its loss is the cross-entropy alone.
    return_cross_entropy: return (loss, cross-entropy): the second is the loss without the z-loss
    term, detached (what training logs); with z_loss 0 the two are equal.
    """
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS.get(hidden.device.type, _CHUNK_ELEMENTS["cpu"]) // weight.shape[0])
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):  # bf16 matmuls under autocast, on CPU as on CUDA
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, cross_entropy = _LinearCrossEntropy.apply(
            hidden, weight, targets, chunk_rows, compute_dtype, softcap, z_loss
        )
    else:
        loss, cross_entropy = _chunked_loss(hidden, weight, targets, chunk_rows, compute_dtype, softcap, z_loss)
    return (loss, cross_entropy) if return_cross_entropy else loss


def textbook_loss(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same loss from full (N, V) logits: ``F.cross_entropy`` plus, with ``z_loss``, the same
    ``z_loss * mean(logsumexp(logits)^2)`` over the real targets. Returns (loss, cross-entropy
    detached). The reference the chunked loss is checked against, and the textbook step of bench."""
    cross_entropy = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    if not z_loss:
        return cross_entropy, cross_entropy.detach()
    keep = targets != IGNORE_INDEX
    z_term = (torch.logsumexp(logits, dim=1).square() * keep).sum() / keep.sum().clamp(min=1)
    return cross_entropy + z_loss * z_term, cross_entropy.detach()


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
"""oneDNN's fp32 kernel for the logits' shape (few rows, 50k outputs, small inner dimension)
ran 1.1-1.5x faster than the default BLAS (MKL) on this project's CPU benchmark machine; for
the blocks' matmuls MKL was the faster one. It is the kernel torch.compile's CPU
backend calls for linear layers."""


_ONEDNN_HIDDEN_GRAD = _ONEDNN
"""oneDNN for the hidden states' gradient too (few rows x small C outputs x 50k inner dimension): it
ran 1.13x (one thread) and 1.22x (two) faster than MKL at mid's shape here, the mid step 1.03x on either
(benchmarks/bench_levers.py --only onednn; results/bench/issue17-second/levers/). It needs the weight transposed
once per call, a copy of its size (39 MB for mid)."""


_ONEDNN_BF16 = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
"""Whether oneDNN has bf16 kernels on this CPU: it needs AVX-512 at least. On an AVX2-only CPU (Zen 3) its bf16
inner product does not exist ("could not create a primitive descriptor"), so --precision bf16 there failed in
the loss; its bf16 operands take the plain matmul instead."""


_ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if _ONEDNN_BF16 else (torch.float32,)


def _on_onednn(*tensors: torch.Tensor) -> bool:
    """Whether these operands take oneDNN's kernels: CPU tensors in fp32, or bf16 where it has bf16 kernels (the
    bf16 ones ran as fast as MKL's for the logits and 1.2x faster for the hidden states' gradient;
    benchmarks/bench_levers.py)."""
    return _ONEDNN and all(t.device.type == "cpu" and t.dtype in _ONEDNN_DTYPES for t in tensors)


def _logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h @ w.T: (n, C) x (V, C) -> (n, V)."""
    if _on_onednn(h, w):
        return torch.ops.mkldnn._linear_pointwise(h, w, None, "none", [], "")
    return h @ w.t()


def _hidden_grad_weight(w: torch.Tensor) -> torch.Tensor | None:
    """w.T as a contiguous (C, V) matrix where the hidden states' gradient runs on oneDNN, else None."""
    return w.t().contiguous() if _ONEDNN_HIDDEN_GRAD and _on_onednn(w) else None


def _times_weight(g: torch.Tensor, w: torch.Tensor, w_t: torch.Tensor | None) -> torch.Tensor:
    """g @ w: (n, V) x (V, C) -> (n, C); w_t from _hidden_grad_weight."""
    if w_t is not None and _on_onednn(g):
        return torch.ops.mkldnn._linear_pointwise(g, w_t, None, "none", [], "")
    return g @ w


class _WeightGrad:
    """The output weight's gradient, summed over the chunks in the accumulation dtype.

    In fp32 each chunk's g.T @ h is added by addmm_, the kernel the identical-mathematics tests fix.
    In a lower precision each chunk's product is formed in it and added in fp32. On CPU that sum is
    kept as the transposed (C, V) matrix: h.T @ g ran 1.3x faster there than g.T @ h at the basic
    preset's shape (4096 x 128 x 50257 in bf16, one thread), and one transposing copy at the end costs
    a fraction of one chunk's product.
    """

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype, acc: torch.dtype):
        self.transposed = _sums_transposed(compute_dtype, acc, weight.device.type)
        shape = weight.shape[::-1] if self.transposed else weight.shape
        self.total = torch.zeros(shape, dtype=acc, device=weight.device)
        self.exact = compute_dtype == acc

    def add(self, grad_logits: torch.Tensor, h_scaled: torch.Tensor) -> None:
        if self.exact:
            self.total.addmm_(grad_logits.t(), h_scaled)
        elif self.transposed:
            self.total.add_(h_scaled.t() @ grad_logits)  # in-place add: converted to fp32 as it is read
        else:
            self.total += (grad_logits.t() @ h_scaled).to(self.total.dtype)

    def result(self) -> torch.Tensor:
        return self.total.t().contiguous() if self.transposed else self.total


def _sums_transposed(compute_dtype: torch.dtype, acc: torch.dtype, device_type: str) -> bool:
    """Whether _WeightGrad keeps its sum as the (C, V) transpose: products in a lower precision on the CPU."""
    return compute_dtype != acc and device_type == "cpu"


def _accumulation_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    # logits and the loss are kept in at least fp32, whatever the matmuls run in
    return torch.promote_types(compute_dtype, torch.float32)


def _chunked_loss(hidden, weight, targets, chunk_rows, compute_dtype, softcap, z_loss):
    """The loss and its cross-entropy part alone (no gradients): evaluation's path."""
    acc = _accumulation_dtype(compute_dtype)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    z_total = torch.zeros((), dtype=acc, device=hidden.device)
    w = weight.to(compute_dtype)
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = _logits(hidden[start : start + chunk_rows].to(compute_dtype), w).to(acc)
        t = targets[start : start + chunk_rows]
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        total += F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")
        if z_loss:
            z_total += z_loss * (torch.logsumexp(logits, dim=1).square() * (t != IGNORE_INDEX)).sum()
    n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return (total + z_total) / n_valid, total / n_valid  # z_total stays 0 without z-loss


_TINY_PROB = 1e-30
"""Below this a target's probability may be subnormal (fp32's normal range ends at 1.2e-38) and its
log imprecise or -inf; such rows take the log-sum-exp from the row maxima instead."""


def _chunk_loss_and_grad(logits, t, softcap, z_loss):
    """Summed loss of one chunk's kept rows, its cross-entropy part, and d(loss sum)/d(logits),
    before any row scale.

    logits: (n, V) in the accumulation dtype, overwritten. The gradient is formed in the softmax's
    own buffer: softmax - one_hot for the cross-entropy, the softmax scaled by 2 z lse per row for
    the z-loss, times 1 - tanh^2 for the cap.
    """
    keep = t != IGNORE_INDEX
    safe_t = torch.where(keep, t, 0)
    rows = torch.arange(len(t), device=t.device)
    tanh = None
    if softcap is not None:
        tanh = logits.div_(softcap).tanh_()  # kept for the cap's derivative
        logits = tanh * softcap
    probs = torch.softmax(logits, dim=-1)  # (n, V)
    target_logit = logits[rows, safe_t]  # (n,)
    row_loss = _row_losses(logits, probs, target_logit, rows, safe_t, keep, may_sync=logits.device.type == "cpu")
    total = cross_entropy = row_loss.sum()
    if z_loss:
        log_sum_exp = row_loss + target_logit
        total = cross_entropy + z_loss * (log_sum_exp.square() * keep).sum()
        probs.mul_((1.0 + 2.0 * z_loss * log_sum_exp)[:, None])
    del logits
    probs[rows, safe_t] -= 1.0
    if tanh is not None:
        probs.mul_(tanh.square_().neg_().add_(1.0))
    return total, cross_entropy, probs, keep


def _row_losses(logits, probs, target_logit, rows, safe_t, keep, may_sync: bool) -> torch.Tensor:
    """Per-row cross-entropy, 0 on padding rows.

    On the CPU it is -log(p_target), read from the softmax, so the logits get no passes for their
    row maxima: that saved two of the four passes over each chunk besides the matmuls and ran the
    basic step about 4% faster (benchmarks/bench_levers.py). Rows whose target probability is tiny
    take the log-sum-exp from the maxima; finding them costs a host sync, so on an accelerator
    every row takes the maxima (its passes are cheap there; a sync per chunk is not).
    """
    if not may_sync:
        return torch.where(keep, _log_sum_exp(logits, probs) - target_logit, 0.0)
    target_prob = probs[rows, safe_t]
    row_loss = target_prob.log().neg_().masked_fill_(~keep, 0.0)  # padding rows: 0, never inf
    tiny = (target_prob < _TINY_PROB) & keep
    if tiny.any():  # rare: a target far below its row's best logit (untrained or naive-init models)
        row_loss[tiny] = _log_sum_exp(logits[tiny], probs[tiny]) - target_logit[tiny]
    return row_loss


def _log_sum_exp(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Per row, from the softmax itself: the largest probability is 1 / sum(exp(x - max)), and it is
    at least 1/V, so unlike a target's probability it never underflows."""
    return logits.amax(dim=1) - probs.amax(dim=1).log()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, compute_dtype, softcap, z_loss):
        n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden)
        acc = _accumulation_dtype(compute_dtype)
        grad_weight = _WeightGrad(weight, compute_dtype, acc)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        cross_entropy = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            w_t = _hidden_grad_weight(w)  # (C, V) or None
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start : start + chunk_rows].to(compute_dtype)  # (n, C)
                logits = _logits(h, w).to(acc)  # (n, V)
                loss_sum, ce_sum, probs, keep = _chunk_loss_and_grad(
                    logits, targets[start : start + chunk_rows], softcap, z_loss
                )
                del logits
                total += loss_sum
                cross_entropy += ce_sum
                # d loss / d logits is probs / n_valid on kept rows. The row scale is applied to
                # the (n, C) operands and results rather than to the (n, V) gradient.
                grad_logits = probs.to(compute_dtype)
                row_scale = (keep.to(acc) / n_valid)[:, None]  # (n, 1)
                grad_hidden[start : start + chunk_rows] = _times_weight(grad_logits, w, w_t) * row_scale
                grad_weight.add(grad_logits, (h * row_scale).to(compute_dtype))
        ctx.save_for_backward(grad_hidden, grad_weight.result().to(weight.dtype))
        cross_entropy = cross_entropy / n_valid
        ctx.mark_non_differentiable(cross_entropy)  # logged only; the gradients are of the loss
        return total / n_valid, cross_entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_cross_entropy):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None, None
