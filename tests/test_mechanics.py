"""The model switches beyond GPT-2 (position, norm, mlp, qk_norm, tie_embeddings, logit_softcap,
bias), each alone and all together, on the tiny preset."""

import dataclasses
import itertools
import math
import random

import pytest
import torch

from conftest import make_story, tiny_config
from tinylm.config import ModelConfig, RunConfig, preset
from tinylm.costs import model_costs
from tinylm.data.tokenizer import GPT2Tokenizer
from tinylm.layers import swiglu_hidden
from tinylm.loss import IGNORE_INDEX, linear_cross_entropy
from tinylm.metrics import read_metrics
from tinylm.model import GPT
from tinylm.train import train

LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)
SWITCHES = {
    "gpt2": {},
    "rope": dict(position="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "qk_norm": dict(qk_norm=True),
    "untied": dict(tie_embeddings=False),
    "softcap": dict(logit_softcap=15.0),
    "no_bias": dict(bias=False),
    "llama": dict(LLAMA, tie_embeddings=False),
    "all": dict(LLAMA, qk_norm=True, tie_embeddings=False, logit_softcap=15.0),
}
each_switch = pytest.mark.parametrize("switch", list(SWITCHES))


def tiny(switch: str, **changes) -> ModelConfig:
    return dataclasses.replace(preset("tiny"), **{**SWITCHES[switch], **changes})


def model_for(switch: str, init: str = "scaled", **changes) -> GPT:
    model = GPT(tiny(switch, **changes))
    model.init_weights(init, seed=0)
    return model


@pytest.fixture(scope="module")
def text_batch():
    """Four rows of 64 GPT-2 tokens of English text (the tests' own stories)."""
    ids = GPT2Tokenizer().encode_batch([" ".join(make_story(random.Random(1)) for _ in range(20))])[0]
    tokens = torch.tensor(ids[: 4 * 65]).view(4, 65)
    return tokens[:, :-1], tokens[:, 1:]


# --- shapes, parameters, costs -------------------------------------------------------------


@each_switch
@pytest.mark.parametrize("name", ["tiny", "basic"])
def test_cost_model_counts_the_parameters_and_matmul_flops_of_every_switch(switch, name):
    cfg = dataclasses.replace(preset(name), **SWITCHES[switch])
    with torch.device("meta"):
        model = GPT(cfg)
    costs = model_costs(cfg)
    assert costs.params == model.num_params()
    assert costs.params_non_embedding == model.num_params(non_embedding=True)
    # every weight matrix (the output layer included, counted once) is a multiply-add per token
    matrices = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    attention = cfg.n_layer * 4 * cfg.block_size * cfg.n_embd
    assert costs.flops_per_token_forward == 2 * sum(matrices.values()) + attention


@each_switch
def test_shapes_and_which_tables_exist(switch):
    cfg = tiny(switch)
    model = GPT(cfg)
    logits, _ = model(torch.randint(0, cfg.vocab_size, (2, 16)))
    assert logits.shape == (2, 16, cfg.vocab_size)
    assert ("wpe" in model.transformer) == (cfg.position == "learned")
    assert (model.lm_head.weight is model.transformer.wte.weight) == cfg.tie_embeddings
    gpt2 = GPT(preset("tiny")).num_params()
    extra = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd
    fewer = 0 if cfg.position == "learned" else cfg.block_size * cfg.n_embd
    assert abs(model.num_params() - extra + fewer - gpt2) <= 0.01 * gpt2  # norms, biases, MLP within 1%


@pytest.mark.parametrize("name", ["tiny", "basic", "mid", "quality"])
@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_matches_the_gelu_mlp_parameters_within_one_percent(name, bias):
    cfg = dataclasses.replace(preset(name), bias=bias)
    gelu = GPT(dataclasses.replace(cfg, n_layer=1, vocab_size=64)).transformer.h[0].mlp
    swiglu = GPT(dataclasses.replace(cfg, n_layer=1, vocab_size=64, mlp="swiglu")).transformer.h[0].mlp
    n_gelu = sum(p.numel() for p in gelu.parameters())
    n_swiglu = sum(p.numel() for p in swiglu.parameters())
    assert abs(n_swiglu - n_gelu) <= 0.01 * n_gelu
    hidden = swiglu.c_proj.in_features
    assert hidden == swiglu_hidden(cfg.n_embd, bias)
    if name in ("mid", "quality"):
        assert hidden % 64 == 0 and hidden == 8 * cfg.n_embd // 3


def test_a_config_saved_before_the_switches_loads_as_gpt2():
    old = RunConfig().to_dict()
    for key in ("position", "rope_theta", "norm", "mlp", "qk_norm", "tie_embeddings", "logit_softcap"):
        del old["model"][key]
    assert RunConfig.from_dict(old).model == ModelConfig()


# --- behaviour --------------------------------------------------------------------------------


@each_switch
def test_future_tokens_do_not_change_earlier_logits(switch):
    torch.manual_seed(0)
    model = model_for(switch, init="naive").eval()
    idx = torch.randint(0, 50257, (2, 32))
    changed = idx.clone()
    changed[:, 20:] = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        logits, logits_changed = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(logits[:, :20], logits_changed[:, :20])
    assert not torch.allclose(logits[:, 20:], logits_changed[:, 20:])


@pytest.mark.parametrize("switch", ["gpt2", "rope", "all"])
def test_with_a_document_mask_a_document_scores_the_same_wherever_it_starts(switch):
    # Positions restart per document, learned or rotary: the second document of a packed row
    # gets the logits it gets alone at the start of a row.
    torch.manual_seed(0)
    model = model_for(switch, init="naive").eval()
    first, second = torch.randint(0, 50257, (1, 11)), torch.randint(0, 50257, (1, 21))
    packed = torch.cat([first, second], dim=1)
    doc_ids = torch.tensor([[0] * 11 + [1] * 21])
    with torch.no_grad():
        alone = model.logits(model.hidden_states(second))
        inside = model.logits(model.hidden_states(packed, doc_ids))
    torch.testing.assert_close(inside[:, 11:], alone, rtol=1e-4, atol=1e-4)


@each_switch
def test_scaled_init_starts_at_log_vocab(switch, text_batch):
    x, y = text_batch
    with torch.no_grad():
        _, loss = model_for(switch)(x, y)
    assert abs(loss.item() - math.log(50257)) < 0.15


@each_switch
def test_one_optimizer_step_lowers_the_loss(switch, text_batch):
    x, y = text_batch
    model = model_for(switch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, before = model(x, y)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        _, after = model(x, y)
    assert after.item() < before.item() - 0.01


@each_switch
def test_kv_cache_logits_match_full_forward(switch):
    torch.manual_seed(0)
    model = model_for(switch, init="naive").eval()
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        full, _ = model(idx)
        tol = 5e-5 * full.abs().max().item()  # fp32 rounding of naive-init logits in the tens
        last, cache = model.forward_cached(idx[:, :10], None)
        torch.testing.assert_close(last, full[:, 9], rtol=0, atol=tol)
        for t in range(10, 24):
            last, cache = model.forward_cached(idx[:, t : t + 1], cache)
            torch.testing.assert_close(last, full[:, t], rtol=0, atol=tol)


@each_switch
def test_fast_loss_equals_the_textbook_loss_and_gradients(switch, text_batch):
    x, y = text_batch
    y = y.clone()
    y[0, 40:] = IGNORE_INDEX
    model = model_for(switch, init="naive")
    _, fast = model(x, y)
    fast_grads = torch.autograd.grad(fast, list(model.parameters()))
    _, slow = model(x, y, full_logits=True)
    slow_grads = torch.autograd.grad(slow, list(model.parameters()))
    assert abs(fast.item() - slow.item()) <= 1e-5 * slow.item()
    for g, s in zip(fast_grads, slow_grads):
        torch.testing.assert_close(g, s, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("switch", ["gpt2", "untied", "softcap"])
def test_the_textbook_path_adds_the_same_z_loss_as_the_fast_loss(switch, text_batch):
    # bench's textbook step times full logits with the z-loss term of the run it is compared with
    x, y = text_batch
    y = y.clone()
    y[0, 40:] = IGNORE_INDEX
    model = model_for(switch, init="naive")
    _, fast, fast_ce = model(x, y, z_loss=1e-2, return_cross_entropy=True)
    fast_grads = torch.autograd.grad(fast, list(model.parameters()))
    _, slow, slow_ce = model(x, y, full_logits=True, z_loss=1e-2, return_cross_entropy=True)
    slow_grads = torch.autograd.grad(slow, list(model.parameters()))
    _, plain = model(x, y, full_logits=True)
    assert slow.item() > plain.item() + 1e-3 and slow_ce.item() == pytest.approx(plain.item(), rel=1e-6)
    assert abs(fast.item() - slow.item()) <= 1e-5 * slow.item()
    assert abs(fast_ce.item() - slow_ce.item()) <= 1e-5 * slow_ce.item()
    for g, s in zip(fast_grads, slow_grads):
        torch.testing.assert_close(g, s, rtol=1e-4, atol=1e-5)


def test_softcap_bounds_every_logit_in_forward_sampling_and_loss():
    torch.manual_seed(0)
    model = model_for("softcap", init="naive", logit_softcap=5.0).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        logits, _ = model(idx)
        last, _ = model.forward_cached(idx, None)
        uncapped = model.lm_head(model.hidden_states(idx))
    assert uncapped.abs().max() > 20 and logits.abs().max() <= 5.0 and last.abs().max() <= 5.0
    torch.testing.assert_close(logits, 5.0 * torch.tanh(uncapped / 5.0))


def test_softcapped_linear_cross_entropy_matches_the_textbook():
    torch.manual_seed(0)
    hidden = (torch.randn(37, 16, dtype=torch.float64) * 3).requires_grad_()
    weight = torch.randn(101, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    targets[::4] = IGNORE_INDEX
    logits = 10.0 * torch.tanh(hidden @ weight.t() / 10.0)
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    loss = linear_cross_entropy(hidden, weight, targets, softcap=10.0)
    torch.testing.assert_close(loss.double(), ref)
    for g, r in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("switch", ["gpt2", "all"])
def test_bf16_autocast_forward_and_backward_stay_close_to_fp32(switch, text_batch):
    # The GPU's dtype path (bf16 matmuls, fp32 norms and residual stream), run on the CPU.
    x, y = text_batch
    model = model_for(switch)
    _, ref = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
        with torch.no_grad():
            last, cache = model.forward_cached(x[:, :8], None)
            last, _ = model.forward_cached(x[:, 8:9], cache)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.01 * ref.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.isfinite(last).all()


@pytest.mark.parametrize("switch", ["rmsnorm", "qk_norm", "all"])
def test_rmsnorms_under_bf16_autocast_take_the_fused_kernel_with_fp32_numbers(switch, text_batch, recwarn):
    # torch warns of an input/gain dtype mismatch (once per process unless warn_always) and falls
    # back to a slow path; QK-norm's bf16 queries and keys met the fp32 gain that way.
    x, _ = text_batch
    model = model_for(switch)
    ref = model(x)[0]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)[0]
            inputs = torch.randn(2, 5, norms[-1].normalized_shape[0])
            for norm in norms:
                n = norm.normalized_shape[0]
                out = norm(inputs[..., :n].bfloat16())
                assert out.dtype == torch.bfloat16
                fp32 = torch.nn.functional.rms_norm(inputs[..., :n].bfloat16().float(), (n,), norm.weight, norm.eps)
                torch.testing.assert_close(out.float(), fp32, rtol=1e-2, atol=1e-2)  # bf16's rounding
    finally:
        torch.set_warn_always(warn_always)
    assert not [w for w in recwarn if "Mismatch dtype" in str(w.message)]
    assert (logits.float() - ref).abs().max() < 0.05 * ref.abs().max()


# --- training ------------------------------------------------------------------------------------


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


@each_switch
def test_resume_equals_uninterrupted(switch, stories, tmp_path):
    def config(out):
        cfg = tiny_config(stories, tmp_path / out, max_steps=6, eval_every=3, batch_size=2)
        cfg.model = dataclasses.replace(cfg.model, **SWITCHES[switch])
        return cfg

    whole = train(config("whole"), quiet=True)
    split = config("split")
    assert train(split, quiet=True, interrupt_after=3).interrupted
    resumed = train(split, resume=True, quiet=True)
    assert _without_time(read_metrics(whole.run_dir)) == _without_time(read_metrics(resumed.run_dir))
    assert resumed.summary["final_val_loss"] < resumed.summary["start_val_loss"]


# --- export to Hugging Face ----------------------------------------------------------------------


QWEN3 = dict(LLAMA, qk_norm=True)
HF_CLASS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.mark.parametrize(
    "changes, family",
    [
        (dict(LLAMA), "llama"),
        (dict(LLAMA, tie_embeddings=False), "llama"),
        (dict(LLAMA, bias=True, rope_theta=500.0), "llama"),
        (dict(LLAMA, bias=True, tie_embeddings=False), "llama"),
        (dict(QWEN3), "qwen3"),
        (dict(QWEN3, tie_embeddings=False, rope_theta=500.0), "qwen3"),
    ],
)
def test_rotary_mechanics_export_to_llama_or_qwen3_with_equal_logits(changes, family):
    pytest.importorskip("transformers")
    from tinylm.export import hf_model

    torch.manual_seed(0)
    model = GPT(dataclasses.replace(preset("tiny"), **changes))
    model.init_weights("naive", seed=0)  # logits in the tens: a wrong mapping cannot hide
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm gains and biases away from 1 and 0
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    hf = hf_model(model, eot=50256)
    assert type(hf).__name__ == HF_CLASS[family]
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4 * ours.abs().max().item())


@pytest.mark.parametrize("family, changes", [("llama", dict(LLAMA, tie_embeddings=False)), ("qwen3", QWEN3)])
def test_exported_rotary_run_generates_the_same_greedy_text(stories, tmp_path, family, changes):
    transformers = pytest.importorskip("transformers")
    from tinylm.export import export_hf
    from tinylm.sample import SamplingOptions, generate, load_run

    cfg = tiny_config(stories, tmp_path / "run", max_steps=20, eval_every=10, tokenizer="gpt2")
    cfg.model = dataclasses.replace(cfg.model, **changes)
    train(cfg, quiet=True)
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == HF_CLASS[family]
    run = load_run(tmp_path / "run")
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, run.model(idx)[0], rtol=0, atol=1e-4)
    prompt = run.tokenizer.encode_batch(["once upon a time, tom"])[0]
    opts = SamplingOptions(max_new_tokens=20, temperature=0.0, stop_at_eot=False)
    ours = list(generate(run.model, prompt, opts, run.tokenizer))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=50256)
    assert theirs[0, len(prompt) :].tolist() == ours


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(qk_norm=True), "qk_norm=True"),
        (dict(QWEN3, bias=True), "bias=True"),
        (dict(QWEN3, logit_softcap=30.0), "logit_softcap=30.0"),
        (dict(position="rope", qk_norm=True), "norm='layernorm'"),
        (dict(LLAMA, logit_softcap=30.0), "logit_softcap=30.0"),
        (dict(position="rope"), "norm='layernorm'"),
        (dict(norm="rmsnorm"), "norm='rmsnorm'"),
        (dict(mlp="swiglu"), "mlp='swiglu'"),
        (dict(bias=False), "bias=False"),
    ],
)
def test_a_mechanic_hugging_face_cannot_represent_is_a_one_line_error_naming_it(changes, named):
    from tinylm.errors import UserError
    from tinylm.export import hf_family

    with pytest.raises(UserError, match=named) as caught:
        hf_family(dataclasses.replace(preset("tiny"), **changes))
    assert "\n" not in str(caught.value)


def _expected_family(c: ModelConfig) -> str | None:
    """The one Hugging Face class that represents these switches exactly, if any."""
    if c.logit_softcap is not None:
        return None
    if (c.position, c.norm, c.mlp, c.qk_norm, c.bias) == ("learned", "layernorm", "gelu", False, True):
        return "gpt2"
    if (c.position, c.norm, c.mlp) == ("rope", "rmsnorm", "swiglu"):
        return "qwen3" if c.qk_norm and not c.bias else None if c.qk_norm else "llama"
    return None


def test_every_combination_of_switches_exports_or_is_one_line_naming_a_mechanic_it_sets():
    from tinylm.errors import UserError
    from tinylm.export import hf_family

    axes = dict(position=["learned", "rope"], norm=["layernorm", "rmsnorm"], mlp=["gelu", "swiglu"],
                qk_norm=[False, True], bias=[False, True], logit_softcap=[None, 30.0], tie_embeddings=[True, False])  # fmt: skip
    exported = 0
    for values in itertools.product(*axes.values()):
        cfg = dataclasses.replace(preset("tiny"), **dict(zip(axes, values)))
        expected = _expected_family(cfg)
        if expected is None:
            with pytest.raises(UserError) as caught:
                hf_family(cfg)
            message = str(caught.value)
            assert "\n" not in message
            named = message.removeprefix("cannot export ").split(" ", 1)[0]  # "key=value"
            key = named.split("=")[0]
            assert named == f"{key}={getattr(cfg, key)!r}", message
        else:
            assert hf_family(cfg) == expected
            exported += 1
    assert exported == 8  # GPT-2, Llama with or without biases, Qwen3; each tied or not


def test_untied_gpt2_exports_its_own_output_matrix():
    pytest.importorskip("transformers")
    from tinylm.export import hf_model

    model = model_for("untied", init="naive").eval()
    hf = hf_model(model, eot=50256)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4 * ours.abs().max().item())
