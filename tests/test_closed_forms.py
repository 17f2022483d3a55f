"""Numbers users read, against their closed forms worked out by hand: the LR schedules, perplexity and
bits per byte, the report's confidence intervals, and the FLOPs per token of a preset."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config, write_stories
from tinylm.config import ModelConfig, TrainConfig, preset
from tinylm.costs import model_costs, optimizer_state_values
from tinylm.data.batching import Batch, validation_batches
from tinylm.data.prepare import PrepareOptions, prepare
from tinylm.data.tokenizer import GPT2Tokenizer
from tinylm.evaluate import evaluate_run, validation_loss, validation_loss_sum
from tinylm.loss import IGNORE_INDEX
from tinylm.model import GPT
from tinylm.optim import ScheduleSpan, learning_rate
from tinylm.report.stats import t_interval
from tinylm.rundir import load_run
from tinylm.train import train

# --- learning-rate schedules ------------------------------------------------------------------
# peak 1e-3, floor 0.1 x peak = 1e-4; a 100-step budget warms up over 10 steps (step s: peak (s+1)/10)
# and decays over the 90 after; a time budget warms up over its first 5% and decays over the 95% after.


def _cfg(schedule: str, **changes) -> TrainConfig:
    return TrainConfig(max_steps=100, lr=1e-3, min_lr_ratio=0.1, schedule=schedule, **changes)


@pytest.mark.parametrize("step, expected", [
    (0, 1e-4), (4, 5e-4), (9, 1e-3),  # warm-up: linear from peak / 10
    (10, 1e-3),  # progress 0: the peak
    (55, 1e-4 + 9e-4 * 0.5),  # progress 0.5: cos(pi / 2) = 0, halfway between peak and floor
    (40, 1e-4 + 9e-4 * (1 + math.cos(math.pi / 3)) / 2),  # progress 1/3: 0.75 of the way up
    (100, 1e-4),  # progress 1: the floor
])  # fmt: skip
def test_cosine_over_a_step_budget(step, expected):
    assert learning_rate(_cfg("cosine", warmup_steps=10), step, 100) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step, expected", [
    (0, 1e-4), (10, 1e-3), (50, 1e-3),
    (82, 1e-3),  # progress 0.8: the last step of the stable phase (decay_fraction 0.2)
    (91, 1e-3 - 9e-4 * 0.5),  # progress 0.9: halfway through the linear decay
    (100, 1e-4),
])  # fmt: skip
def test_wsd_over_a_step_budget(step, expected):
    assert learning_rate(_cfg("wsd", warmup_steps=10, decay_fraction=0.2), step, 100) == pytest.approx(expected)


def test_wsd_without_a_decay_holds_the_peak_to_the_end():
    # decay_fraction 0: the stable phase is the whole run, its last instant included (progress 1)
    steps = _cfg("wsd", warmup_steps=10, decay_fraction=0.0)
    timed = TrainConfig(max_time=60.0, schedule="wsd", decay_fraction=0.0)
    assert [learning_rate(steps, s, 100) for s in (10, 99, 100, 150)] == [1e-3] * 4
    assert learning_rate(timed, 7, None, 1.0) == timed.lr
    assert ScheduleSpan(steps=None, time_s=60.0).lr(timed, 7, 90.0) == timed.lr  # past the budget too


def test_the_default_warmup_is_five_percent_of_the_steps():
    cfg = _cfg("cosine")  # warmup_steps None: round(0.05 x 200) = 10 steps
    assert [learning_rate(cfg, s, 200) for s in (0, 4, 9, 10)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3])


def test_constant_is_the_peak_at_every_step_and_time():
    cfg = _cfg("constant", warmup_steps=10)
    assert {learning_rate(cfg, s, 100) for s in (0, 5, 99)} == {1e-3}
    assert learning_rate(cfg, 0, None, 0.0) == 1e-3


@pytest.mark.parametrize("schedule, fraction, expected", [
    ("cosine", 0.0, 1e-6),  # the first step: peak x 1e-3, never 0
    ("cosine", 0.01, 2e-4), ("cosine", 0.025, 5e-4),  # warm-up: peak x fraction / 0.05
    ("cosine", 0.05, 1e-3),
    ("cosine", 0.525, 5.5e-4),  # progress (0.525 - 0.05) / 0.95 = 0.5
    ("cosine", 1.0, 1e-4),
    ("wsd", 0.02, 4e-4), ("wsd", 0.81, 1e-3),  # progress 0.8: still stable
    ("wsd", 0.905, 5.5e-4),  # progress 0.9: halfway down
    ("wsd", 1.0, 1e-4),
])  # fmt: skip
def test_time_budget_schedules_warm_up_then_follow_the_fraction_of_time(schedule, fraction, expected):
    cfg = TrainConfig(max_time=60.0, lr=1e-3, min_lr_ratio=0.1, schedule=schedule, decay_fraction=0.2)
    assert learning_rate(cfg, 7, None, fraction) == pytest.approx(expected, rel=1e-9)
    if fraction == 0.0:
        assert learning_rate(cfg, 7, None) == pytest.approx(expected)  # no fraction given: the start
    span = ScheduleSpan(steps=None, time_s=60.0)  # the trainer's path: elapsed seconds over the budget
    assert span.lr(cfg, 7, 60.0 * fraction) == pytest.approx(expected, rel=1e-9)


def test_a_span_holds_its_last_lr_past_its_budget():
    cfg = _cfg("cosine", warmup_steps=10)
    span = ScheduleSpan(steps=100, time_s=None)
    last = learning_rate(cfg, 99, 100)
    assert span.lr(cfg, 99, 0.0) == last and span.lr(cfg, 150, 0.0) == last
    assert ScheduleSpan(steps=None, time_s=10.0).lr(cfg, 3, 25.0) == pytest.approx(1e-4)  # time past: the floor
    # asked directly for a step past the budget, the schedule stays at its floor (the cosine does not rise)
    assert learning_rate(cfg, 150, 100) == pytest.approx(1e-4)
    assert learning_rate(_cfg("cosine", warmup_steps=1), 2, 2) == pytest.approx(1e-4)  # one step to decay over


# --- perplexity and bits per byte ----------------------------------------------------------


def test_bits_per_byte_is_nats_per_token_times_tokens_over_bytes_over_ln2(stories, tmp_path):
    # bpe:257 is the 256 bytes and <|endoftext|> with no merge: every scored token is one byte of
    # the text (the separator counts as one), so bytes == tokens and bpb = loss / ln 2 exactly.
    train(tiny_config(stories, tmp_path / "run", tokenizer="bpe:257", max_steps=3, eval_every=3), quiet=True)
    result = evaluate_run(tmp_path / "run", device_name="cpu")
    assert result["tokens"] == 512  # eval_tokens of tiny_config: all scored
    assert result["bytes"] == result["tokens"]
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2), rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert 2.0 < result["loss"] < math.log(257) + 0.5  # a barely trained byte model: a sane loss


def test_bits_per_byte_of_a_multibyte_tokenizer_counts_the_text_bytes(stories, tmp_path):
    # GPT-2's tokens of these ASCII stories: the bytes are counted token by token here (each token's
    # characters, one per separator), not from the decoded text as evaluate_run counts them.
    train(tiny_config(stories, tmp_path / "run", tokenizer="gpt2", max_steps=2, eval_every=2), quiet=True)
    result = evaluate_run(tmp_path / "run", device_name="cpu")
    tok = GPT2Tokenizer()
    run = load_run(tmp_path / "run")
    prepared = prepare(PrepareOptions.from_config(run.cfg.train), quiet=True)
    batches = validation_batches(prepared.split("val"), 64, 4, 512, 50256, False)
    targets = [i for b in batches for i in b.y.flatten().tolist()]
    n_bytes = sum(1 if i == 50256 else len(tok.decode([i]).encode()) for i in targets)
    assert result["tokens"] == len(targets) and result["bytes"] == n_bytes
    assert n_bytes > 2 * len(targets)  # whole words: several bytes a token
    loss = validation_loss(run.model, batches, run.model.lm_head.weight.device, 50257)
    assert result["bits_per_byte"] == pytest.approx(loss * len(targets) / (n_bytes * math.log(2)), rel=1e-9)


def test_evaluation_scores_the_mean_cross_entropy_of_the_real_targets():
    # A model in training mode with dropout, a soft cap its logits reach, 14 padded output rows, and
    # batches of every kind: packed with the doc mask, padded rows (IGNORE_INDEX), one of a single target.
    V, eot, cpu = 50, 49, torch.device("cpu")
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, dropout=0.5, logit_softcap=5.0)
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits well past the cap: the cap must act
    x = torch.randint(0, V, (2, 8))
    x[0, 3] = x[1, 6] = eot
    packed = Batch(x, torch.randint(0, V, (2, 8)), torch.cumsum(x == eot, 1), 16)
    y = torch.randint(0, V, (3, 5))
    y[0, 2:], y[1, 4:] = IGNORE_INDEX, IGNORE_INDEX
    padded = Batch(torch.randint(0, V, (3, 5)), y, None, 2 + 4 + 5)
    single = Batch(torch.tensor([[eot, 7]]), torch.tensor([[7, IGNORE_INDEX]]), None, 1)

    def by_hand(batches):
        model.eval()
        with torch.no_grad():
            total = sum(
                F.cross_entropy(
                    model(b.x, doc_ids=b.doc_ids)[0][..., :V].flatten(0, 1).double(), b.y.flatten(),
                    ignore_index=IGNORE_INDEX, reduction="sum",
                ).item()
                for b in batches
            )  # fmt: skip
        model.train()
        return total, sum(int((b.y != IGNORE_INDEX).sum()) for b in batches)

    model.train()
    total, count = validation_loss_sum(model, [packed, padded, single], cpu, V)
    assert model.training  # left as it was found
    assert (total, count) == pytest.approx(by_hand([packed, padded, single]), rel=1e-6) and count == 28
    # summed in float64: the batches' sums add up to the last bits (as ranks' sums must, all-reduced)
    batches = [packed, padded, single] * 3
    one_by_one = [validation_loss_sum(model, [b], cpu, V)[0] for b in batches]
    assert validation_loss_sum(model, batches, cpu, V)[0] == pytest.approx(math.fsum(one_by_one), rel=1e-14)
    assert validation_loss(model, [packed, padded], cpu, V) == pytest.approx(
        by_hand([packed, padded])[0] / 27, rel=1e-6
    )
    assert validation_loss(model, [single], cpu, V) == pytest.approx(by_hand([single])[0], rel=1e-6)  # one token
    model.eval()
    validation_loss_sum(model, [single], cpu, V)
    assert not model.training
    # what the checks above can tell apart: the cap, the padded rows and the doc mask each move the loss
    with torch.no_grad():
        uncapped = F.cross_entropy(model.lm_head(model.hidden_states(x, packed.doc_ids))[..., :V].flatten(0, 1),
                                   packed.y.flatten(), reduction="sum").item()  # fmt: skip
        unmasked = F.cross_entropy(model(x)[0][..., :V].flatten(0, 1), packed.y.flatten(), reduction="sum").item()
        all_rows = F.cross_entropy(
            model(x, doc_ids=packed.doc_ids)[0].flatten(0, 1), packed.y.flatten(), reduction="sum"
        ).item()
    for other in (uncapped, unmasked, all_rows):
        assert other != pytest.approx(by_hand([packed])[0], rel=1e-3)


def _packed_loss_by_hand(model, tokens, block_size: int, n_blocks: int, eot: int, vocab: int,
                         doc_mask: bool = True) -> tuple[float, int]:  # fmt: skip
    """The packed stream scored by hand: block i is tokens[i*T : i*T+T+1]. With the doc mask each
    <|endoftext|> opens a new document that sees nothing before it (positions restart), so every
    piece of a row is a forward pass of its own. The softmax runs over the first ``vocab`` rows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_blocks):
            row = torch.as_tensor(tokens[i * block_size : i * block_size + block_size + 1].astype("int64"))
            x, y = row[:-1], row[1:]
            inner = [j for j in range(1, block_size) if x[j] == eot] if doc_mask else []
            cuts = [0, *inner, block_size]
            for a, b in zip(cuts, cuts[1:]):
                logits, _ = model(x[None, a:b])
                total += F.cross_entropy(logits[0, :, :vocab].double(), y[a:b], reduction="sum").item()
            count += block_size
    return total / count, count


@pytest.fixture(scope="module")
def padded_doc_masked_run(stories, tmp_path_factory):
    """GPT-2's tokens in an embedding padded to 50304 rows, trained with the doc mask, fp32."""
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = tiny_config(stories, out, tokenizer="gpt2", max_steps=2, eval_every=2, doc_mask=True, precision="fp32")
    cfg.model.vocab_size = 50304
    train(cfg, quiet=True)
    return out


def test_eval_json_agrees_with_scoring_the_stream_by_hand(padded_doc_masked_run):
    from test_doc_eval import _docs_within_budget, _manual_per_document_loss

    run_dir, T, eot, V = padded_doc_masked_run, 64, 50256, 50257
    result = evaluate_run(run_dir, eval_tokens=150, device_name="cpu")  # 150 tokens: 3 blocks of 64
    assert set(result) == {"run", "data", "precision", "tokens", "bytes", "loss", "perplexity", "bits_per_byte",
                           "loss_doc", "tokens_doc"}  # fmt: skip
    run = load_run(run_dir)
    prepared = prepare(PrepareOptions.from_config(run.cfg.train), quiet=True)
    split = prepared.split("val")
    assert len(split.tokens) > 2 * 512  # the run's own budget (512) and no budget at all score differently

    loss, tokens = _packed_loss_by_hand(run.model, split.tokens, T, 3, eot, V)
    targets = split.tokens[1 : 3 * T + 1].tolist()
    tok = GPT2Tokenizer()
    n_bytes = sum(1 if i == eot else len(tok.decode([i]).encode()) for i in targets)  # a separator: one byte
    assert result["tokens"] == tokens == 192 and result["bytes"] == n_bytes
    assert result["loss"] == pytest.approx(loss, rel=1e-6)  # fp32 sums in another order: not to the last bit
    nats = result["loss"]
    assert result["perplexity"] == pytest.approx(math.exp(nats), rel=1e-12)
    assert result["bits_per_byte"] == pytest.approx(nats * tokens / (n_bytes * math.log(2)), rel=1e-12)
    assert result["loss_doc"] == pytest.approx(_manual_per_document_loss(run.model, split, T, eot, 192, V), rel=1e-6)
    lengths = [len(split.document(i)) for i in range(split.n_docs)]
    assert result["tokens_doc"] == sum(min(n, T) for n in lengths[: _docs_within_budget(lengths, T, 192)])
    assert result["precision"] == "fp32" and result["run"] == str(run_dir)
    assert result["data"] == run.cfg.train.data  # a file's source: its path
    # What the comparisons can tell apart: documents end inside the scored blocks, and the doc mask
    # and the padded rows (50304 - 50257, never trained) each move the loss well beyond the tolerance.
    assert targets.count(eot) >= 2 and run.model.lm_head.weight.shape[0] == 50304
    assert _packed_loss_by_hand(run.model, split.tokens, T, 3, eot, V, doc_mask=False)[0] != pytest.approx(loss)
    assert _packed_loss_by_hand(run.model, split.tokens, T, 3, eot, 50304)[0] != pytest.approx(loss)

    own = evaluate_run(run_dir)  # the default device (auto) and the run's own budget: 512 tokens, 8 blocks
    assert own["tokens"] == 512
    assert own["loss"] == pytest.approx(_packed_loss_by_hand(run.model, split.tokens, T, 8, eot, V)[0], rel=1e-6)

    other_text = write_stories(run_dir.parent / "other.txt", 400, seed=1)
    other = evaluate_run(run_dir, data=str(other_text), eval_tokens=150, device_name="cpu")
    other_split = prepare(PrepareOptions.from_config(run.cfg.train, str(other_text)), quiet=True).split("val")
    assert other["data"] == str(other_text)
    assert other["loss"] == pytest.approx(
        _packed_loss_by_hand(run.model, other_split.tokens, T, 3, eot, V)[0], rel=1e-6
    )


def test_eval_of_a_diverged_run_reports_an_infinite_perplexity(padded_doc_masked_run, monkeypatch):
    import tinylm.evaluate

    # 710 nats a token: past exp's range (ln of the largest float is 709.78), a run that blew up
    monkeypatch.setattr(tinylm.evaluate, "validation_loss", lambda *args, **kwargs: 710.0)
    result = evaluate_run(padded_doc_masked_run, eval_tokens=150, device_name="cpu")
    assert result["perplexity"] == math.inf and result["loss"] == result["loss_doc"] == 710.0
    assert result["bits_per_byte"] == pytest.approx(710.0 * result["tokens"] / (result["bytes"] * math.log(2)))


def test_eval_on_other_text_tokenises_it_with_the_runs_trained_bpe(stories, tmp_path):
    # The other text is the stories spelt backwards: a BPE trained on it would merge other pairs.
    # Its tokens must be the run's tokenizer's, the only ids the run's model knows.
    run_dir = tmp_path / "run"
    train(tiny_config(stories, run_dir, max_steps=2, eval_every=2), quiet=True)
    backwards = [story[::-1] for story in stories.read_text().split("\n<|endoftext|>\n")[:-1]]
    other_text = tmp_path / "backwards.txt"
    other_text.write_text("".join(f"{story}\n<|endoftext|>\n" for story in backwards))
    result = evaluate_run(run_dir, data=str(other_text), eval_tokens=150, device_name="cpu")
    run = load_run(run_dir)
    options = PrepareOptions.from_config(run.cfg.train, str(other_text), run_dir / "tokenizer.json")
    split = prepare(options, quiet=True).split("val")
    eot = run.tokenizer.eot_id
    assert run.tokenizer.decode(split.document(0)[:-1].tolist()) in backwards  # the run's ids of the text
    loss, tokens = _packed_loss_by_hand(run.model, split.tokens, 64, 3, eot, run.tokenizer.vocab_size, doc_mask=False)
    assert result["tokens"] == tokens and result["loss"] == pytest.approx(loss, rel=1e-6)


# --- confidence intervals ----------------------------------------------------------------


@pytest.mark.parametrize("n", range(2, 31))
def test_the_interval_is_students_t_for_every_small_n(n):
    from scipy import stats

    values = [random.Random(n * 1000 + i).gauss(0.1, 0.05) for i in range(n)]
    low, high = stats.t.interval(0.95, df=n - 1, loc=sum(values) / n, scale=stats.sem(values))
    got = t_interval(values)
    assert got.n == n and got.replicated
    assert got.low == pytest.approx(low, rel=1e-12, abs=1e-15) and got.high == pytest.approx(high, rel=1e-12)


@pytest.mark.parametrize("n, quantile", [(2, 12.706), (3, 4.303), (5, 2.776), (10, 2.262), (30, 2.045)])
def test_the_interval_uses_the_printed_t_table(n, quantile):
    # values 0, 1, 0, 1 ...: a hand-computable sd; half width = t(0.975, n-1) sd / sqrt(n)
    values = [float(i % 2) for i in range(n)]
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    assert t_interval(values).half_width == pytest.approx(quantile * sd / math.sqrt(n), rel=2e-4)


# --- FLOPs per token -------------------------------------------------------------------


def test_flops_per_token_of_the_basic_preset_written_out():
    # basic: L = 4 blocks, C = 128, T = 512 positions, V = 50257 tokens. A matmul costs 2 FLOPs per
    # weight per token. Per block: q, k, v and the output projection 4 C^2 weights, the MLP 8 C^2:
    # 2 x 12 x 128^2 = 393,216; attention against the whole block, scores and the weighted sum,
    # 2 x 2 x T x C = 262,144. Output layer 2 x V x C = 12,865,792.
    forward = 4 * (393_216 + 262_144) + 12_865_792
    assert forward == 15_487_232
    costs = model_costs(preset("basic"))
    assert costs.flops_per_token_forward == forward
    assert costs.flops_per_token_train == 3 * forward  # backward: twice the forward
    assert costs.output_layer_flop_share == pytest.approx(12_865_792 / forward)
    # parameters: V C tied embedding + T C positions + 4 x (12 C^2 + 9 C biases + 4 C norm) + 2 C final norm
    assert costs.params == 50257 * 128 + 512 * 128 + 4 * (12 * 128**2 + 9 * 128 + 4 * 128) + 2 * 128 == 7_291_776


def test_the_interval_edges_one_value_and_none():
    from tinylm.report.stats import Interval

    assert t_interval([0.25]) == Interval(0.25, None, 1)  # one value: a mean without an interval
    with pytest.raises(ValueError, match=r"^an interval needs at least one value$"):
        t_interval([])
    # touching intervals share a point: neither is clear of the other, in either order
    a, b = Interval(-0.5, 0.1, 3), Interval(-0.3, 0.1, 3)  # a.high == b.low == -0.4
    assert not a.clear_of(b) and not b.clear_of(a)
    assert Interval(-0.5, 0.1, 3).clear_of(Interval(-0.3, 0.09, 3))


def test_an_interval_whose_low_end_is_zero_is_within_noise():
    from tinylm.report.stats import Interval, verdict

    assert verdict(Interval(0.5, 0.5, 3)) == "within noise (±0.500)"
    assert verdict(Interval(-0.5, 0.5, 3)) == "within noise (±0.500)"


def test_the_spread_of_two_seeds_has_a_standard_deviation():
    from tinylm.report.stats import spread

    s = spread([5.0, 5.2])
    assert s.std == pytest.approx(0.2 / math.sqrt(2)) and (s.n, s.low, s.high) == (2, 5.0, 5.2)


def test_effect_interval_pairs_by_seed_or_falls_back_to_the_difference_of_means():
    from scipy import stats

    from tinylm.report.stats import effect_interval

    before = {1: 6.0, 2: 6.3, 3: 6.1, 9: 1.0}
    after = {1: 5.8, 2: 6.2, 3: 5.8, 7: 9.0}
    interval, pairing = effect_interval(before, after)
    diffs = [-0.2, -0.1, -0.3]  # seeds 1, 2, 3; 7 and 9 have no partner
    assert pairing.diffs == pytest.approx({1: -0.2, 2: -0.1, 3: -0.3}) and pairing.unpaired == [7, 9]
    low, high = stats.t.interval(0.95, df=2, loc=-0.2, scale=stats.sem(diffs))
    assert (interval.n, interval.low, interval.high) == (3, pytest.approx(low), pytest.approx(high))
    unpaired, pairing = effect_interval({1: 6.0, 2: 6.4}, {3: 5.5, 4: 5.7})
    assert (unpaired.mean, unpaired.half_width, unpaired.n) == (pytest.approx(5.6 - 6.2), None, 0)
    assert pairing.diffs == {} and pairing.unpaired == [1, 2, 3, 4]
    assert effect_interval({}, after) is None and effect_interval(before, {}) is None


@pytest.mark.parametrize("bytes_per_value, device_type", [(4, "cpu"), (2, "cuda")])
def test_memory_of_the_basic_preset_written_out(bytes_per_value, device_type):
    # batch 8 x 512 positions = 4,096 tokens; P = 7,291,776 parameters. Weights and gradients in the
    # compute dtype; AdamW's two fp32 moments; activations 16 C values a token and layer plus 4 C
    # (4,096 x (4 x 16 x 128 + 4 x 128) = 35,651,584 values); the logits chunk twice (values and
    # gradients) in fp32: 2^23 elements on a CPU, and on a GPU all 4,096 x 50,257 (under its 2^28).
    gpu = dict(bytes_per_value=bytes_per_value, device_type=device_type) if device_type == "cuda" else {}
    costs = model_costs(preset("basic"), **gpu)  # on a CPU the defaults: batch 8, fp32
    P = 7_291_776
    logits = 2 * 4 * (2**23 if device_type == "cpu" else 4_096 * 50_257)
    expected = {"weights": P * bytes_per_value, "gradients": P * bytes_per_value, "optimizer": 2 * P * 4,
                "activations": 35_651_584 * bytes_per_value, "logits_chunk": logits}  # fmt: skip
    assert costs.memory_bytes == {**expected, "total": sum(expected.values())}
    assert optimizer_state_values(preset("basic"), P) == 2 * P  # AdamW's two moments unless told otherwise
