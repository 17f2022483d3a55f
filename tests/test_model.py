import math

import pytest
import torch

from conftest import make_story
from tinylm.config import ModelConfig, preset
from tinylm.data.tokenizer import GPT2Tokenizer
from tinylm.loss import IGNORE_INDEX, linear_cross_entropy
from tinylm.model import GPT

LN_V = math.log(50257)


@pytest.mark.parametrize("name, expected", [("basic", 7_291_776), ("mid", 12_417_216), ("quality", 40_807_680)])
def test_preset_parameter_counts_are_exact(name, expected):
    with torch.device("meta"):
        assert GPT(preset(name)).num_params() == expected


def test_output_layer_is_tied_to_token_embedding():
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=32))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_future_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=64)).eval()
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 64, (2, 6))
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, :10], logits_changed[:, :10])
    assert not torch.allclose(logits[:, 10:], logits_changed[:, 10:])


@pytest.fixture(scope="module")
def real_text_batch():
    """Two rows of 256 GPT-2 tokens of English text (the tests' own stories)."""
    import random

    rng = random.Random(1)
    ids = GPT2Tokenizer().encode_batch([" ".join(make_story(rng) for _ in range(60))])[0]
    tokens = torch.tensor(ids[: 2 * 257]).view(2, 257)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("name", ["basic", "mid", "quality"])
def test_scaled_init_starts_at_log_vocab(name, real_text_batch):
    x, y = real_text_batch
    model = GPT(preset(name))
    model.init_weights("scaled", seed=0)
    with torch.no_grad():
        _, loss = model(x, y)
    assert abs(loss.item() - LN_V) < 0.15


def test_naive_init_starts_far_above_and_grows_with_width(real_text_batch):
    x, y = real_text_batch
    losses = []
    for name in ("basic", "mid", "quality"):
        model = GPT(preset(name))
        model.init_weights("naive", seed=0)
        with torch.no_grad():
            losses.append(model(x, y)[1].item())
    assert losses[0] > 40
    assert losses[0] < losses[1] < losses[2]


def test_init_is_seeded():
    cfg = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=32)
    a, b, c = GPT(cfg), GPT(cfg), GPT(cfg)
    a.init_weights("scaled", seed=3)
    b.init_weights("scaled", seed=3)
    c.init_weights("scaled", seed=4)
    assert torch.equal(a.transformer.wte.weight, b.transformer.wte.weight)
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)


def test_residual_projections_are_scaled_down():
    cfg = ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=16, vocab_size=64)
    model = GPT(cfg)
    model.init_weights("scaled", seed=0)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001


@pytest.mark.parametrize("with_padding", [False, True])
def test_chunked_loss_matches_textbook_loss_and_gradients(with_padding):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    if with_padding:
        targets[::3] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=5)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_chunked_loss_is_exact_when_target_probabilities_underflow():
    # Naive init gives per-token losses in the hundreds: exp(-loss) is 0 in fp32, so the loss
    # must not be computed from the target's probability.
    torch.manual_seed(0)
    hidden = (torch.randn(40, 16) * 30).requires_grad_()
    weight = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (40,))
    ref = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().t(), targets)
    assert ref.item() > 150 and torch.exp(-ref.float()) == 0
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=7)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


def test_model_fast_step_equals_textbook_step_fp32():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=500)
    model = GPT(cfg)
    x = torch.randint(0, 500, (3, 32))
    y = torch.randint(0, 500, (3, 32))
    y[0, 20:] = IGNORE_INDEX
    _, fast = model(x, y)
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, slow = model(x, y, full_logits=True)
    slow.backward()
    assert abs(fast.item() - slow.item()) <= 1e-5 * slow.item()
    for g, p in zip(fast_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_kv_cache_logits_match_full_forward():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=50)).eval()
    idx = torch.randint(0, 50, (1, 12))
    full, _ = model(idx)
    last, cache = model.forward_cached(idx[:, :8], None)
    torch.testing.assert_close(last, full[:, 7])
    for t in range(8, 12):
        last, cache = model.forward_cached(idx[:, t : t + 1], cache)
        torch.testing.assert_close(last, full[:, t], rtol=1e-5, atol=1e-5)


def test_compiled_blocks_compute_the_same_step_and_keep_parameter_names():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=500)
    eager, compiled = GPT(cfg), GPT(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x, y = torch.randint(0, 500, (2, 32)), torch.randint(0, 500, (2, 32))
    for model in (eager, compiled):
        _, loss = model(x, y)
        loss.backward()
    torch.testing.assert_close(compiled(x, y)[1], eager(x, y)[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
