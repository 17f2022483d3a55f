"""Using a trained model: sampling with a KV cache, evaluation, export to Hugging Face."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from tinylm import runtime
from tinylm.config import ModelConfig
from tinylm.data.tokenizer import GPT2Tokenizer
from tinylm.errors import UserError
from tinylm.evaluate import evaluate_run
from tinylm.model import GPT
from tinylm.sample import SamplingOptions, generate, load_run, pick_next, sample_text
from tinylm.train import train


@pytest.fixture(scope="module")
def trained(stories, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(stories, out, max_steps=40, eval_every=20, tokenizer="gpt2"), quiet=True)
    return out


def test_cached_and_uncached_greedy_generation_agree(trained):
    run = load_run(trained)
    prompt = run.tokenizer.encode_batch(["once upon a time, lily"])[0]
    opts = SamplingOptions(max_new_tokens=100, temperature=0.0, stop_at_eot=False)  # runs past the 64-token block
    cached = list(generate(run.model, prompt, opts, run.tokenizer, use_cache=True))
    uncached = list(generate(run.model, prompt, opts, run.tokenizer, use_cache=False))
    assert len(cached) == 100
    assert cached[:50] == uncached[:50]  # until the window first slides the two see the same context


def test_sampling_is_seeded_and_stops_at_endoftext(trained):
    run = load_run(trained)
    opts = SamplingOptions(max_new_tokens=40, temperature=1.0, top_k=50, top_p=0.9)
    a = sample_text(run, "the cat", opts, seed=3)
    b = sample_text(run, "the cat", opts, seed=3)
    assert a == b and len(a) > 0
    assert "<|endoftext|>" not in a


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    picks = {pick_next(logits, SamplingOptions(temperature=1.0, top_k=2), gen).item() for _ in range(200)}
    assert picks == {0, 1}
    picks = {pick_next(logits, SamplingOptions(temperature=1.0, top_k=None, top_p=0.5), gen).item() for _ in range(50)}
    assert picks == {0}


def test_prompt_longer_than_the_block_is_refused(trained):
    run = load_run(trained)
    with pytest.raises(UserError, match="longer than the block size"):
        sample_text(run, "cat " * 200, SamplingOptions(max_new_tokens=2))


def test_sample_and_eval_commands(trained, tmp_path):
    done = subprocess.run([sys.executable, "-m", "tinylm", "sample", str(trained), "--prompt", "once upon a time",
                           "--max-new-tokens", "20", "--seed", "1"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("once upon a time") and len(done.stdout) > len("once upon a time") + 5
    out = tmp_path / "eval.json"
    # --device cpu: the run was trained and validated in fp32 on the CPU; on a GPU eval would use bf16
    done = subprocess.run([sys.executable, "-m", "tinylm", "eval", str(trained), "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    summary = json.loads((trained / "summary.json").read_text())
    assert result["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    assert result["perplexity"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-5)
    assert 0 < result["bits_per_byte"] < result["loss"]
    assert result["loss_doc"] == pytest.approx(summary["final_val_loss_doc"], rel=1e-6)
    assert "loss_doc" in done.stdout and "packed" in done.stdout  # says which loss perplexity and bpb come from


def test_eval_of_a_run_saved_before_precision_scores_in_fp32_on_the_cpu(stories, tmp_path, monkeypatch):
    # The rule resume follows too (test_precision.py): such a run was trained, and validated, in fp32 on a CPU.
    result = train(tiny_config(stories, tmp_path / "run", max_steps=2, eval_every=2, precision="fp32"), quiet=True)
    for name, drop in (("config.json", lambda c: c["train"].pop("precision")),  # as an older tinylm saved it
                       ("checkpoint.json", lambda c: c["settings"].pop("train.precision"))):  # fmt: skip
        path = tmp_path / "run" / name
        saved = json.loads(path.read_text())
        drop(saved)
        path.write_text(json.dumps(saved))
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")  # auto would pick bf16 for a new run here
    old = evaluate_run(tmp_path / "run", device_name="cpu")
    assert old["precision"] == "fp32" and old["loss"] == result.summary["final_val_loss"]


def test_export_to_hugging_face_matches_tinylm(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tinylm.export import export_hf

    out = export_hf(trained, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    run = load_run(trained)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = run.model(idx)
        theirs = hf_model(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    prompt = run.tokenizer.encode_batch(["once upon a time, tom"])[0]
    opts = SamplingOptions(max_new_tokens=20, temperature=0.0, stop_at_eot=False)
    ours_greedy = list(generate(run.model, prompt, opts, run.tokenizer))
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                   pad_token_id=run.tokenizer.eot_id)  # fmt: skip
    assert hf_out[0, len(prompt) :].tolist() == ours_greedy

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = 'Hello world!  It\'s 2026; "tinylm" tokenises\tthis:\n ünïcödé 東京 <|endoftext|>'
    ours_ids = GPT2Tokenizer().encode_batch(['Hello world!  It\'s 2026; "tinylm" tokenises\tthis:\n ünïcödé 東京 '])[0]
    assert hf_tok(text)["input_ids"] == ours_ids + [50256]
    assert hf_tok.decode(ours_ids) == text[: -len("<|endoftext|>")]


def test_export_refuses_a_non_empty_directory(trained, tmp_path):
    pytest.importorskip("transformers")
    from tinylm.export import export_hf

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_hf(trained, tmp_path / "x")


# --- a vocabulary padded beyond the tokenizer's (the quality preset's 50304 rows) -------


def _padded_model_with_loud_padding(real_vocab: int, padded_vocab: int) -> GPT:
    """A tiny model whose output rows beyond the tokenizer's vocabulary win every argmax."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=padded_vocab)).eval()
    with torch.no_grad():
        lift = torch.full((16,), 10.0)
        model.transformer.ln_f.bias.copy_(lift)  # every hidden state leans along `lift` ...
        model.lm_head.weight[real_vocab:] = lift / 10.0  # ... so padded rows get logits of about 100
    return model


def test_sampling_and_evaluation_ignore_rows_beyond_the_tokenizer(tmp_path):
    from conftest import tiny_config
    from tinylm.data.batching import validation_batches
    from tinylm.data.prepare import TokenSplit
    from tinylm.evaluate import validation_loss_sum
    from tinylm.sample import LoadedRun

    tok = GPT2Tokenizer()
    V = tok.vocab_size
    model = _padded_model_with_loud_padding(V, 50304)
    idx = torch.tensor([tok.encode_batch(["once upon a time, lily saw a cat."])[0]])
    logits, _ = model(idx)
    assert (logits.argmax(-1) >= V).all()  # unmasked, every position would pick a padded row

    cfg = tiny_config("unused", tmp_path / "run", tokenizer="gpt2")
    cfg.model = model.config
    run = LoadedRun(cfg, model, tok)
    greedy = SamplingOptions(max_new_tokens=40, temperature=0.0, stop_at_eot=False)
    hot = SamplingOptions(max_new_tokens=40, temperature=2.0, top_k=None, top_p=None, stop_at_eot=False)
    for opts in (greedy, hot):
        ids = list(generate(model, idx[0].tolist(), opts, tok, torch.Generator().manual_seed(1)))
        assert len(ids) == 40 and max(ids) < V
        sample_text(run, "once upon a time", opts, seed=2)  # decodes: no KeyError on an id >= 50257

    # Evaluation scores the tokenizer's rows only: the same as the manually masked computation
    # and as an unpadded model holding the same real rows.
    rng = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, V - 1, (int(n),), generator=rng).tolist() + [tok.eot_id] for n in (20, 35, 50)]
    split = TokenSplit(
        torch.tensor([i for d in docs for i in d]).numpy(),
        torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()]).numpy(),
    )
    batches = validation_batches(split, 32, batch_size=2, max_tokens=None, eot_id=tok.eot_id)
    total, count = validation_loss_sum(model, batches, torch.device("cpu"), V)
    expected, full = 0.0, 0.0
    for b in batches:
        with torch.no_grad():
            all_logits, _ = model(b.x)
        expected += F.cross_entropy(all_logits[..., :V].flatten(0, 1), b.y.flatten(), reduction="sum").item()
        full += F.cross_entropy(all_logits.flatten(0, 1), b.y.flatten(), reduction="sum").item()
    assert total / count == pytest.approx(expected / count, rel=1e-5)
    assert full / count > total / count + 50  # the padded rows would have dominated the score

    unpadded = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=V)).eval()
    state = {
        k: v[:V] if k in ("transformer.wte.weight", "lm_head.weight") else v for k, v in model.state_dict().items()
    }
    unpadded.load_state_dict(state)
    unpadded_total, _ = validation_loss_sum(unpadded, batches, torch.device("cpu"), V)
    assert total == pytest.approx(unpadded_total, rel=1e-6)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_a_temperature_that_is_not_a_finite_non_negative_number_is_refused(temperature):
    with pytest.raises(UserError, match="--temperature"):
        SamplingOptions(temperature=temperature)
