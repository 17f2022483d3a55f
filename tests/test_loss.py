"""The chunked linear + cross-entropy against the textbook: soft cap, z-loss, untied weights."""

import pytest
import torch
import torch.nn.functional as F

import tinylm.loss
from tinylm.loss import (
    IGNORE_INDEX,
    _chunked_loss,
    _hidden_grad_weight,
    _LinearCrossEntropy,
    _logits,
    _row_losses,
    _sums_transposed,
    _times_weight,
    _WeightGrad,
    linear_cross_entropy,
    textbook_loss,
)

VARIANTS = {"softcap": (5.0, 0.0), "z_loss": (None, 1e-2), "both": (5.0, 1e-2)}


def textbook(hidden, weight, targets, softcap=None, z_loss=0.0):
    """Full logits, the cap, F.cross_entropy and the z-loss term over the real targets."""
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    keep = targets != IGNORE_INDEX
    return loss + z_loss * torch.logsumexp(logits[keep], dim=1).square().mean()


def case(padding: bool, rows=37, vocab=101, width=16):
    torch.manual_seed(0)
    hidden = (torch.randn(rows, width) * 2).requires_grad_()  # logits of a few units: the cap bites
    weight = torch.randn(vocab, width, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    if padding:
        targets[::3] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_softcap_and_z_loss_match_textbook_loss_and_gradients(variant, padding):
    softcap, z = VARIANTS[variant]
    hidden, weight, targets = case(padding)
    ref = textbook(hidden, weight, targets, softcap, z)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=5, softcap=softcap, z_loss=z)  # 8 chunks
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation's path
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, 5, softcap=softcap, z_loss=z), ref)


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_cross_entropy_returned_beside_the_loss_is_the_textbooks_without_the_z_term(variant, padding):
    # What training logs as train_loss: the capped model's cross-entropy over the same real targets.
    softcap, z = VARIANTS[variant]
    hidden, weight, targets = case(padding)
    ref = textbook(hidden.detach(), weight.detach(), targets, softcap)
    loss, ce = linear_cross_entropy(hidden, weight, targets, 5, softcap=softcap, z_loss=z, return_cross_entropy=True)
    assert not ce.requires_grad and loss.requires_grad
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, textbook(hidden, weight, targets, softcap, z), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the path without gradients returns the same pair
        pair = linear_cross_entropy(hidden, weight, targets, 5, softcap=softcap, z_loss=z, return_cross_entropy=True)
    torch.testing.assert_close(pair, (loss.detach(), ce))


def test_z_loss_term_is_the_difference_and_evaluation_leaves_it_out():
    hidden, weight, targets = case(padding=True)
    with torch.no_grad():
        ce = linear_cross_entropy(hidden, weight, targets, 5)
        both = linear_cross_entropy(hidden, weight, targets, 5, z_loss=0.1)
        lse = torch.logsumexp(hidden @ weight.t(), dim=1)[targets != IGNORE_INDEX]
    torch.testing.assert_close(both - ce, 0.1 * lse.square().mean())
    torch.testing.assert_close(ce, F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX))


def test_softcap_bounds_the_logits_that_the_loss_sees():
    # A confident wrong answer costs at most 2 * cap per token once the logits are capped.
    hidden, weight, targets = case(padding=False)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden * 100, weight, targets, 5, softcap=3.0)
    assert loss.item() <= 2 * 3.0 + torch.log(torch.tensor(101.0)).item()
    assert linear_cross_entropy(hidden * 100, weight, targets, 5).item() > 100


def test_untied_output_matrix_gets_its_own_gradient():
    # The weight is an argument: a separate output matrix works like the tied embedding.
    hidden, weight, targets = case(padding=True)
    head = (weight.detach() * 0.5).requires_grad_()
    loss = linear_cross_entropy(hidden, head, targets, 5, softcap=5.0, z_loss=1e-2)
    loss.backward()
    ref_grads = torch.autograd.grad(textbook(hidden, head, targets, 5.0, 1e-2), (hidden, head))
    assert weight.grad is None
    torch.testing.assert_close(head.grad, ref_grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap,z_loss", [(None, 0.0), (5.0, 1e-2)], ids=["plain", "softcap+z_loss"])
def test_bf16_matmuls_stay_close_to_fp32(softcap, z_loss):
    # The GPU path (bf16 matmuls, fp32 softmax and accumulation), run here on the CPU.
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.2).requires_grad_()
    targets = torch.randint(0, 300, (64,))
    targets[::5] = IGNORE_INDEX
    ref = textbook(hidden, weight, targets, softcap, z_loss)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss, _ = _LinearCrossEntropy.apply(hidden, weight, targets, 16, torch.bfloat16, softcap, z_loss)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.005 * ref.item()
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert (g - r).norm() < 0.01 * r.norm()
    no_grad, _ = _chunked_loss(hidden.detach(), weight.detach(), targets, 16, torch.bfloat16, softcap, z_loss)
    assert abs(no_grad.item() - ref.item()) < 0.005 * ref.item()


def _before_the_switches(hidden, weight, targets, chunk_rows):
    """The fused forward as it was before softcap and z-loss (commit 00413b4), for bit-identity; its
    matmuls on the kernels tinylm.loss picks now (_logits, and oneDNN for d hidden on the CPU since)."""
    n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
    weight_t = _hidden_grad_weight(weight)
    grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros_like(weight)
    total = torch.zeros(())
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        keep = t != IGNORE_INDEX
        safe_t = torch.where(keep, t, 0)
        logits = _logits(h, weight)
        row_max = logits.amax(dim=1)
        target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
        probs = torch.softmax(logits, dim=-1)
        del logits
        log_sum_exp = row_max - probs.amax(dim=1).log()
        total += ((log_sum_exp - target_logit) * keep).sum()
        probs[torch.arange(len(t)), safe_t] -= 1.0
        row_scale = (keep.float() / n_valid)[:, None]
        grad_hidden[start : start + chunk_rows] = _times_weight(probs, weight, weight_t) * row_scale
        grad_weight.addmm_(probs.t(), h * row_scale)
    return total / n_valid, grad_hidden, grad_weight


def test_hidden_states_gradient_on_onednn_equals_the_plain_matmul(monkeypatch):
    # CPU fp32: d hidden = grad_logits @ W through oneDNN with W transposed once; the same product
    # as the BLAS one within fp32 rounding, and with the switch off it is the BLAS one.
    if not tinylm.loss._ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN")
    torch.manual_seed(0)
    grad_logits, weight = torch.rand(37, 5003), torch.randn(5003, 24)
    weight_t = _hidden_grad_weight(weight)
    assert weight_t is not None and weight_t.shape == (24, 5003) and weight_t.is_contiguous()
    torch.testing.assert_close(_times_weight(grad_logits, weight, weight_t), grad_logits.double() @ weight.double(),
                               rtol=1e-5, atol=1e-4, check_dtype=False)  # fmt: skip
    # CPU bf16 takes oneDNN too where it has bf16 kernels (1.2x faster at basic's shape), within bf16's
    # rounding of the plain product; on a CPU without them (AVX2 only) the plain product
    g16, w16 = grad_logits.bfloat16(), weight.bfloat16()
    w16_t = _hidden_grad_weight(w16)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert w16_t is not None and w16_t.dtype == torch.bfloat16 and w16_t.shape == (24, 5003)
    else:
        assert w16_t is None
    torch.testing.assert_close(_times_weight(g16, w16, w16_t).float(), (g16.float() @ w16.float()),
                               rtol=1e-2, atol=5e-2)  # fmt: skip
    # fp64 (and the GPU) keep the plain matmul: checked with the switch on, where only the dtype decides
    g, w = grad_logits.double(), weight.double()
    assert _hidden_grad_weight(w) is None
    assert torch.equal(_times_weight(g, w, weight_t), g @ w)  # a w_t made elsewhere is not used for it
    monkeypatch.setattr(tinylm.loss, "_ONEDNN_HIDDEN_GRAD", False)
    assert _hidden_grad_weight(weight) is None
    assert torch.equal(_times_weight(grad_logits, weight, None), grad_logits @ weight)


@pytest.mark.parametrize("has_bf16_kernels", [True, False])
def test_bf16_operands_take_onednn_only_where_it_has_bf16_kernels(monkeypatch, has_bf16_kernels):
    # oneDNN's bf16 inner product needs AVX-512: on an AVX2-only CPU (Zen 3) it raised "could not create
    # a primitive descriptor" and --precision bf16 failed in the loss. fp32 takes oneDNN either way.
    if not tinylm.loss._ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN")
    assert (torch.bfloat16 in tinylm.loss._ONEDNN_DTYPES) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if has_bf16_kernels and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 kernels")
    if not has_bf16_kernels:  # what an AVX2-only CPU sees, on any CPU
        monkeypatch.setattr(tinylm.loss, "_ONEDNN_DTYPES", (torch.float32,))
    hidden, weight, targets = case(padding=True)
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    assert tinylm.loss._on_onednn(hidden, weight) and tinylm.loss._on_onednn(h16, w16) == has_bf16_kernels
    assert (_hidden_grad_weight(w16) is not None) == has_bf16_kernels
    torch.testing.assert_close(_logits(h16, w16).float(), h16.float() @ w16.float().t(), rtol=1e-2, atol=5e-2)
    loss, _ = _LinearCrossEntropy.apply(hidden, weight, targets, 5, torch.bfloat16, None, 0.0)
    torch.testing.assert_close(loss, textbook(hidden, weight, targets), rtol=1e-2, atol=0)


def test_strided_hidden_states_and_weight_match_textbook():
    # The CPU's oneDNN kernels (the logits, d hidden) get views, not dense copies: an output matrix
    # stored (C, V) and used transposed, hidden states that are a transposed (C, N) tensor.
    hidden, weight, targets = case(padding=True)
    hidden_t = hidden.detach().t().contiguous().requires_grad_()  # (C, N)
    weight_t = weight.detach().t().contiguous().requires_grad_()  # (C, V)
    assert not hidden_t.t().is_contiguous() and not weight_t.t().is_contiguous()
    ref = textbook(hidden_t.t(), weight_t.t(), targets)
    ref_grads = torch.autograd.grad(ref, (hidden_t, weight_t))
    loss = linear_cross_entropy(hidden_t.t(), weight_t.t(), targets, chunk_rows=5)
    grads = torch.autograd.grad(loss, (hidden_t, weight_t))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation's path
        torch.testing.assert_close(linear_cross_entropy(hidden_t.t(), weight_t.t(), targets, 5), ref)


def test_default_path_gradients_are_bit_identical_to_the_ones_before_the_switches():
    # The gradients are bit for bit the old ones. The loss is not: on the CPU a row's loss is now
    # -log p_target rather than log-sum-exp - target logit, the same number but rounded otherwise
    # (52 of these 200 real rows differ in their last bits); only the mean happens to agree here.
    hidden, weight, targets = case(padding=True, rows=300, vocab=2000, width=32)
    old_loss, *old_grads = _before_the_switches(hidden.detach(), weight.detach(), targets, 64)
    loss = linear_cross_entropy(hidden, weight, targets, 64, softcap=None, z_loss=0.0)
    loss.backward()
    torch.testing.assert_close(loss, old_loss, rtol=1e-6, atol=0)
    assert torch.equal(hidden.grad, old_grads[0]) and torch.equal(weight.grad, old_grads[1])
    for row in (targets != IGNORE_INDEX).nonzero().flatten().tolist():  # one row at a time: no mean to hide it
        h, t = hidden.detach()[row : row + 1].requires_grad_(), targets[row : row + 1]
        old_row = _before_the_switches(h.detach(), weight.detach(), t, 1)[0]
        torch.testing.assert_close(linear_cross_entropy(h, weight, t, 1), old_row, rtol=1e-6, atol=0)
    with torch.no_grad():  # evaluation's path was one F.cross_entropy sum per chunk
        no_grad = linear_cross_entropy(hidden, weight, targets, 64)
        old = sum(F.cross_entropy(_logits(h, weight), t, ignore_index=IGNORE_INDEX, reduction="sum")
                  for h, t in zip(hidden.split(64), targets.split(64)))  # fmt: skip
    assert torch.equal(no_grad, old / (targets != IGNORE_INDEX).sum())


@pytest.mark.parametrize("variant", [None, *VARIANTS])
def test_underflowing_target_probabilities_and_padding_match_textbook(variant):
    # Large logits: most targets' probabilities are 0 in fp32 (the loss falls back to the row
    # maxima there), and the padding rows' placeholder targets underflow too (they must stay
    # out of the loss and gradients, not turn them into inf or nan).
    softcap, z = VARIANTS.get(variant, (None, 0.0))
    softcap = softcap and 100.0  # a cap that leaves the logits large
    hidden, weight, targets = case(padding=True)
    hidden = (hidden.detach() * 40).requires_grad_()
    with torch.no_grad():
        probs = torch.softmax(hidden @ weight.t(), dim=1)
        targets[1::3] = probs[1::3].argmax(dim=1)  # and some likely targets: the usual path
        target_probs = probs[torch.arange(len(targets)), targets.clamp(min=0)]
    assert (target_probs == 0).sum() > len(targets) // 2 and (target_probs > 1e-3).any()
    ref = textbook(hidden, weight, targets, softcap, z)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=5, softcap=softcap, z_loss=z)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    # With logits and log-sum-exps of hundreds, fp32 rounding alone moves the gradients by ~1e-4
    # (the fp32 textbook's own error against fp64 is 2e-3 on this case), and by how much depends
    # on the CPU's matmul kernels: the gradients are judged against the exact (fp64) textbook and
    # must be within twice the fp32 textbook's distance from it (or 1e-5 relative, where both are close).
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    exact = torch.autograd.grad(textbook(h64, w64, targets, softcap, z), (h64, w64))
    for g, r, e in zip(grads, ref_grads, exact):
        assert torch.isfinite(g).all()
        ours, fp32_textbook = (g.double() - e).abs().max(), (r.double() - e).abs().max()
        floor = 1e-5 * max(1.0, e.abs().max().item())  # rounding a few ulps from the exact value
        assert ours <= max(2 * fp32_textbook, floor), (ours.item(), fp32_textbook.item())


@pytest.mark.parametrize("may_sync", [True, False])
def test_row_losses_from_target_probability_or_row_maxima_match_textbook(may_sync):
    # may_sync=True is the CPU's way (the target's probability, the maxima only for tiny ones);
    # False is the accelerators' (the maxima for every row, no host sync). Both are the textbook's.
    hidden, weight, targets = case(padding=True)
    logits = hidden.detach() @ weight.detach().t()
    logits[::4] *= 40  # some rows' target probabilities underflow
    keep = targets != IGNORE_INDEX
    safe_t = torch.where(keep, targets, 0)
    rows = torch.arange(len(targets))
    probs = torch.softmax(logits, dim=1)
    assert (probs[rows, safe_t][keep] == 0).any()
    got = _row_losses(logits, probs, logits[rows, safe_t], rows, safe_t, keep, may_sync=may_sync)
    ref = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _spy(monkeypatch, name):
    """Replace tinylm.loss.<name> by a wrapper that records its calls' arguments and calls it."""
    calls, real = [], getattr(tinylm.loss, name)

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(tinylm.loss, name, spy)
    return calls


def test_default_chunks_hold_32_mb_of_fp32_logits_on_the_cpu(monkeypatch):
    # 2^23 logits at a time (166 rows of GPT-2's vocabulary), whatever the width: the chunking bounds
    # the memory and leaves the loss as it is. A vocabulary bigger than a chunk goes a row at a time.
    calls = _spy(monkeypatch, "_logits")
    torch.manual_seed(0)
    vocab = 50257
    hidden = torch.randn(170, 4, requires_grad=True)
    weight = (torch.randn(vocab, 4) * 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (170,))
    full_rows = (1 << 23) // vocab
    loss = linear_cross_entropy(hidden, weight, targets)
    assert [h.shape[0] for h, _ in calls] == [full_rows, 170 - full_rows]
    torch.testing.assert_close(loss, textbook(hidden, weight, targets), rtol=1e-5, atol=1e-5)
    calls.clear()
    with torch.no_grad():
        linear_cross_entropy(hidden, weight, targets)
    assert [h.shape[0] for h, _ in calls] == [full_rows, 170 - full_rows]
    calls.clear()
    monkeypatch.setitem(tinylm.loss._CHUNK_ELEMENTS, "cpu", 64)  # smaller than a row of 101 logits
    hidden, weight, targets = case(padding=True)
    loss = linear_cross_entropy(hidden, weight, targets)
    assert [h.shape[0] for h, _ in calls] == [1] * len(targets)
    torch.testing.assert_close(loss, textbook(hidden, weight, targets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trained", ["hidden", "weight"])
def test_gradients_flow_when_only_the_hidden_states_or_only_the_weight_are_trained(trained):
    # A frozen output matrix (or frozen features) still gets the loss's gradient to the other operand.
    hidden, weight, targets = case(padding=True)
    hidden, weight = (
        hidden.detach().requires_grad_(trained == "hidden"),
        weight.detach().requires_grad_(trained == "weight"),
    )
    param = hidden if trained == "hidden" else weight
    loss = linear_cross_entropy(hidden, weight, targets, 5, softcap=5.0, z_loss=1e-2)
    (grad,) = torch.autograd.grad(loss, param)
    (ref,) = torch.autograd.grad(textbook(hidden, weight, targets, 5.0, 1e-2), param)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [None, "both"])
def test_without_onednn_the_plain_matmuls_match_textbook(monkeypatch, variant):
    # PyTorch builds without oneDNN's linear (or other CPUs) multiply with the plain matmul, in fp32:
    # the loss runs with autocast off whatever the caller's setting.
    monkeypatch.setattr(tinylm.loss, "_ONEDNN", False)
    softcap, z = VARIANTS.get(variant, (None, 0.0))
    hidden, weight, targets = case(padding=True)
    assert not tinylm.loss._on_onednn(hidden, weight) and _hidden_grad_weight(weight) is None
    ref = textbook(hidden, weight, targets, softcap, z)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, 5, softcap=softcap, z_loss=z)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_fp64_inputs_are_computed_and_summed_in_fp64():
    # Nothing in the loss rounds to fp32 behind fp64 inputs: loss, cross-entropy and both gradients
    # agree with the fp64 textbook far below fp32's rounding (1e-7).
    hidden, weight, targets = case(padding=True)
    hidden, weight = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = textbook(hidden, weight, targets, 5.0, 1e-2)
    ref_ce = textbook(hidden, weight, targets, 5.0).detach()
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss, ce = linear_cross_entropy(hidden, weight, targets, 5, softcap=5.0, z_loss=1e-2, return_cross_entropy=True)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == ce.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-12, atol=0)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)
    with torch.no_grad():  # evaluation's path
        pair = linear_cross_entropy(hidden, weight, targets, 5, softcap=5.0, z_loss=1e-2, return_cross_entropy=True)
    assert pair[0].dtype == torch.float64
    torch.testing.assert_close(pair, (ref.detach(), ref_ce), rtol=1e-12, atol=0)


@pytest.mark.parametrize("source", ["autocast", "bf16 tensors"])
@pytest.mark.parametrize("path", ["gradients", "evaluation"])
def test_bf16_matmuls_feed_an_fp32_softmax_cap_and_sums(path, source):
    # Only the matmuls run in bf16, whether autocast asks for it or the operands are bf16: the cap, the
    # softmax, the z-term and the sums take the bf16 logits in fp32. The reference is the textbook of
    # those logits in fp32, so any other step in bf16 (0.4% rounding) shows far above 1e-5.
    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 32), torch.randn(1000, 32) * 3.0  # logits of about 17
    targets = torch.randint(0, 1000, (300,))
    targets[::7] = IGNORE_INDEX
    logits = (hidden.bfloat16() @ weight.bfloat16().t()).float()
    ref, ref_ce = textbook_loss(20.0 * torch.tanh(logits / 20.0), targets, z_loss=1e-4)
    if source == "bf16 tensors":
        hidden, weight = hidden.bfloat16(), weight.bfloat16()
    hidden.requires_grad_(path == "gradients")
    with (
        torch.set_grad_enabled(path == "gradients"),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=source == "autocast"),
    ):
        loss, ce = linear_cross_entropy(
            hidden, weight, targets, 64, softcap=20.0, z_loss=1e-4, return_cross_entropy=True
        )
    assert loss.dtype == ce.dtype == torch.float32 and loss.requires_grad == (path == "gradients")
    torch.testing.assert_close((loss.detach(), ce), (ref, ref_ce), rtol=1e-5, atol=0)


def test_weight_gradient_sums_bf16_products_in_fp32_in_the_cpus_layout_and_the_gpus(monkeypatch):
    # On the CPU the bf16 sum is kept as the (C, V) transpose (h.T @ g ran faster); on a GPU as (V, C).
    # Both layouts give the fp32 sum of the chunks' bf16 products; the GPU's runs here by its rule.
    # 512 chunks of 2 rows: each product's own bf16 rounding leaves the sum within 0.3% of the reference,
    # a sum kept in bf16 drifts 2% from it (4 chunks could not tell the two apart).
    assert _sums_transposed(torch.bfloat16, torch.float32, "cpu")
    assert not _sums_transposed(torch.bfloat16, torch.float32, "cuda")
    assert not _sums_transposed(torch.float32, torch.float32, "cpu")
    torch.manual_seed(0)
    hidden, weight = torch.randn(1024, 32, requires_grad=True), (torch.randn(300, 32) * 0.2).requires_grad_()
    targets = torch.randint(0, 300, (1024,))
    targets[::5] = IGNORE_INDEX
    on_cpu = _WeightGrad(weight, torch.bfloat16, torch.float32)
    assert on_cpu.total.shape == (32, 300) and on_cpu.total.dtype == torch.float32
    logits = (hidden.detach().bfloat16() @ weight.detach().bfloat16().t()).float().requires_grad_()
    grad_logits = torch.autograd.grad(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX), logits)[0]
    reference = grad_logits.bfloat16().float().t() @ hidden.detach().bfloat16().float()
    for gpu_layout in (False, True):
        if gpu_layout:
            monkeypatch.setattr(tinylm.loss, "_sums_transposed", lambda *_: False)
        loss, _ = _LinearCrossEntropy.apply(hidden, weight, targets, 2, torch.bfloat16, None, 0.0)
        (grad,) = torch.autograd.grad(loss, weight)
        assert grad.dtype == torch.float32 and grad.is_contiguous()
        assert (grad - reference).norm() < 5e-3 * reference.norm()


def test_fp32_weight_gradient_is_added_by_addmm_in_the_weights_layout():
    # The kernel the bit-identity above fixes, at a shape where h.T @ g summed otherwise differs in the last bits.
    hidden, weight, targets = case(padding=False, rows=1000, vocab=50, width=7)
    _, _, old_grad_weight = _before_the_switches(hidden.detach(), weight.detach(), targets, 999)
    linear_cross_entropy(hidden, weight, targets, 999).backward()
    assert torch.equal(weight.grad, old_grad_weight)


@pytest.mark.parametrize("real_targets", [0, 1])
def test_one_real_target_is_its_own_mean_and_none_gives_zero(real_targets):
    # The mean is over the real targets: one real row is that row's loss, all padding is 0 (never nan).
    hidden, weight, targets = case(padding=False)
    targets[real_targets:] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, targets, 5, softcap=5.0, z_loss=1e-2)
    grads = torch.autograd.grad(loss, (hidden, weight))
    with torch.no_grad():
        no_grad = linear_cross_entropy(hidden, weight, targets, 5, softcap=5.0, z_loss=1e-2)
    if real_targets:
        ref = textbook(hidden[:1], weight, targets[:1], 5.0, 1e-2)
        ref_grads = torch.autograd.grad(ref, (hidden, weight))
        torch.testing.assert_close((loss, no_grad), (ref, ref.detach()), rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    else:
        assert loss.item() == no_grad.item() == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_a_one_token_vocabulary_with_padding_has_zero_loss():
    # The placeholder target of padding rows stays inside the vocabulary, whatever its size.
    hidden, weight, targets = case(padding=True, vocab=1)
    loss = linear_cross_entropy(hidden, weight, targets, 5)
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(loss, (hidden, weight)))


def test_cpu_rows_take_the_row_maxima_only_where_the_target_probability_is_tiny(monkeypatch):
    # On the CPU a row's loss is -log p_target, with no passes for the row maxima; only rows whose target
    # probability underflows take them. An accelerator takes them for every row (no host sync).
    calls = _spy(monkeypatch, "_log_sum_exp")
    hidden, weight, targets = case(padding=True)
    linear_cross_entropy(hidden, weight, targets, 5).backward()
    assert calls == []
    hidden = (hidden.detach() * 40).requires_grad_()
    with torch.no_grad():
        probs = torch.softmax(hidden @ weight.t(), dim=1)
        targets[1::3] = probs[1::3].argmax(dim=1)  # likely targets beside the underflowing ones
        tiny = (probs[torch.arange(len(targets)), targets.clamp(min=0)] < 1e-30) & (targets != IGNORE_INDEX)
    assert 0 < tiny.sum() < (targets != IGNORE_INDEX).sum()
    linear_cross_entropy(hidden, weight, targets, len(targets)).backward()  # one chunk
    assert len(calls) == 1 and calls[0][0].shape[0] == tiny.sum()
    calls.clear()
    logits = hidden.detach() @ weight.detach().t()
    keep, rows = targets != IGNORE_INDEX, torch.arange(len(targets))
    safe_t = torch.where(keep, targets, 0)
    _row_losses(logits, torch.softmax(logits, 1), logits[rows, safe_t], rows, safe_t, keep, may_sync=False)
    assert len(calls) == 1 and calls[0][0].shape[0] == len(targets)


def test_textbook_loss_is_cross_entropy_plus_the_z_term_over_the_real_targets():
    # The full-logits path (model full_logits, bench's textbook step): F.cross_entropy and, with z_loss,
    # z * mean(logsumexp^2) over the rows that are not padding; the second value is the detached cross-entropy.
    torch.manual_seed(0)
    logits = (torch.randn(12, 30) * 3).requires_grad_()
    targets = torch.randint(0, 30, (12,))
    targets[::4] = IGNORE_INDEX
    real = targets != IGNORE_INDEX
    log_probs = logits.log_softmax(dim=1)[real]
    ce = -log_probs[torch.arange(int(real.sum())), targets[real]].mean()
    z_term = logits.logsumexp(dim=1)[real].square().mean()
    loss, detached = textbook_loss(logits, targets)
    torch.testing.assert_close((loss, detached), (ce, ce.detach()))
    assert loss.requires_grad and not detached.requires_grad
    loss_z, detached_z = textbook_loss(logits, targets, z_loss=0.1)
    torch.testing.assert_close((loss_z, detached_z), (ce + 0.1 * z_term, ce.detach()))
    assert not detached_z.requires_grad
    grads = torch.autograd.grad(loss_z, logits)[0]  # the z-term is part of what is differentiated
    torch.testing.assert_close(grads, torch.autograd.grad(ce + 0.1 * z_term, logits)[0])
    one = torch.full_like(targets, IGNORE_INDEX)
    one[1] = targets[1]  # one real target: its own loss, not half of it
    loss_one, _ = textbook_loss(logits, one, z_loss=0.1)
    row = logits[1:2]
    torch.testing.assert_close(loss_one, F.cross_entropy(row, one[1:2]) + 0.1 * row.logsumexp(dim=1).square().sum())
