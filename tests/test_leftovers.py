"""Left from the last trust round: a padded vocabulary scored alike in training and evaluation, the
guard telling overfitting from divergence, a block_size step flagged in the report, and a run
refused under torchrun ending with its one line."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from test_report import make_run, report_of
from tinylm.config import ModelConfig
from tinylm.data.batching import Batch
from tinylm.distributed import Cluster
from tinylm.evaluate import validation_loss
from tinylm.model import GPT
from tinylm.stability import StabilityMonitor
from tinylm.train import train
from tinylm.trainer import accumulate_gradients

# --- the padded vocabulary ---------------------------------------------------------------------

TOKENIZER_VOCAB, PADDED_VOCAB = 300, 320  # as gpt2's 50257 padded to quality's 50304


def _padded_model_and_batch():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=PADDED_VOCAB))
    model.init_weights("scaled", seed=0)
    tokens = torch.randint(0, TOKENIZER_VOCAB, (2, 17))
    return model, Batch(tokens[:, :-1], tokens[:, 1:], None, real_tokens=32)


def test_training_scores_a_padded_vocabulary_as_evaluation_does():
    model, batch = _padded_model_and_batch()
    trained_loss = accumulate_gradients(model, [batch], 32, Cluster(), torch.device("cpu"), 0.0, TOKENIZER_VOCAB)[0]
    evaluated = validation_loss(model, [batch], torch.device("cpu"), TOKENIZER_VOCAB)
    assert trained_loss.item() / 32 == pytest.approx(evaluated, rel=1e-6)  # the 20 rows would add ~log(320/300)
    # the padding rows are out of the softmax: no gradient reaches them
    assert model.lm_head.weight.grad[TOKENIZER_VOCAB:].abs().max() == 0
    assert model.lm_head.weight.grad[:TOKENIZER_VOCAB].abs().max() > 0


def test_a_run_with_a_padded_vocabulary_never_moves_its_padding_rows(stories, tmp_path):
    """Before, training's softmax took the padding rows in (evaluation's left them out): training pushed
    them down, so its train loss and evaluation's val loss were of two different distributions."""
    cfg = tiny_config(stories, tmp_path / "run", tokenizer="gpt2", max_steps=3, weight_decay=0.0, eval_every=3)
    cfg.model.vocab_size = 50304
    result = train(cfg, quiet=True)
    from tinylm import checkpoint

    torch.manual_seed(cfg.train.seed)  # as train.build_model starts it
    model = GPT(cfg.model)
    model.init_weights(cfg.train.init, seed=cfg.train.seed)
    initial = model.transformer.wte.weight[50257:].clone()
    checkpoint.load_weights(result.run_dir, model)
    assert torch.equal(model.transformer.wte.weight[50257:], initial)


# --- the guard: overfitting is not divergence ----------------------------------------------------


def _run_monitor(train_losses, val_losses, every=10):
    """Feed a guarded monitor train losses step by step and a val loss every ``every`` steps."""
    monitor = StabilityMonitor(guard=True)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    vals = iter(val_losses)
    for step, loss in enumerate(train_losses):
        assert monitor.allow_update(step, loss, 1.0)
        if (step + 1) % every == 0:
            monitor.observe_val(step + 1, next(vals))
            monitor.remember_good(model, opt, step + 1)
            assert not monitor.rollback_wanted, step
    return monitor


def test_val_rising_while_train_falls_is_reported_as_overfitting_without_a_roll_back():
    train_losses = [3.0 - 0.02 * i for i in range(60)]  # falling throughout
    monitor = _run_monitor(train_losses, [2.9, 2.5, 2.4, 2.8, 3.0, 3.3])  # val's best at step 30, then rising
    kinds = [e["event"] for e in monitor.events]
    assert kinds == ["overfitting"]  # one event for the episode, no divergence, no recovery
    assert monitor.events[0]["step"] == 40
    report = monitor.report(final_val=3.3)
    assert report["overfitting_steps"] == [40] and not report["divergence"]
    assert report["label"] == "ok" and report["reason"].startswith("overfitting from step 40")


def test_while_overfitting_the_guard_keeps_the_weights_of_the_best_val_loss():
    """The state a later roll-back returns to is the best val loss's, not an overfitted one's."""
    train_losses = [3.0 - 0.02 * i for i in range(60)]
    monitor = _run_monitor(train_losses, [2.9, 2.5, 2.4, 2.8, 3.0, 3.3])
    assert [e["event"] for e in monitor.events] == ["overfitting"]
    assert monitor.state.good["step"] == 30 and monitor.state.good["val_loss"] == 2.4


def test_a_val_jump_past_the_hard_rise_while_train_still_falls_is_a_divergence():
    """An update that breaks the weights shows in the next evaluation before the train loss, which is
    measured before each update, has seen it: a val loss three times its best is no overfitting."""
    train_losses = [3.0 - 0.02 * i for i in range(40)]
    monitor = StabilityMonitor(guard=True)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, loss in enumerate(train_losses):
        monitor.allow_update(step, loss, 1.0)
        if (step + 1) % 10 == 0:
            monitor.observe_val(step + 1, [2.9, 2.5, 2.4, 7.2][step // 10])
            monitor.remember_good(model, opt, step + 1)
    assert [e["event"] for e in monitor.events] == ["divergence"] and monitor.rollback_wanted
    assert monitor.state.good["step"] == 30


def test_val_rising_while_train_rises_too_is_still_a_divergence():
    train_losses = [3.0 - 0.02 * i for i in range(30)] + [2.4 + 0.2 * i for i in range(30)]
    monitor = StabilityMonitor(guard=True)
    for step, loss in enumerate(train_losses):
        monitor.allow_update(step, loss, 1.0)
        if step + 1 == 30:
            monitor.observe_val(30, 2.4)
        if step + 1 in (40, 50):
            monitor.observe_val(step + 1, 3.5)
    assert "divergence" in [e["event"] for e in monitor.events]
    assert "overfitting" not in [e["event"] for e in monitor.events]


# --- a study step that changes block_size --------------------------------------------------------


def test_a_step_that_changes_block_size_is_flagged_in_the_report(tmp_path):
    make_run(tmp_path, "init", "init", best=6.02)
    longer = make_run(tmp_path, "cosine", "cosine", best=5.5)
    config = json.loads((longer / "config.json").read_text())
    config["model"]["block_size"] = 1024
    (longer / "config.json").write_text(json.dumps(config))
    report = report_of(tmp_path)
    assert "⚠ block_size changed" in report
    assert "block_size 512→1024" in report


def test_a_step_that_keeps_block_size_is_not_flagged(tmp_path):
    make_run(tmp_path, "init", "init", best=6.02)
    make_run(tmp_path, "cosine", "cosine", best=5.5)
    assert "block_size changed" not in report_of(tmp_path)


# --- a run refused under torchrun ----------------------------------------------------------------


def test_a_run_refused_on_two_processes_ends_with_its_one_line(stories, tmp_path):
    args = ["--preset", "tiny", "--batch-size", "2", "--grad-accum", "3", "--eval-tokens", "512", "--tokenizer",
            "bpe:512", "--quiet", "--device", "cpu", "--max-steps", "2", "--data", str(stories)]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "tinylm", "train", *args, "--nproc-per-node", "2", "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("tinylm: error:")]
    assert len(errors) == 1 and "make --grad-accum a multiple of 2" in errors[0], done.stderr[-3000:]
    assert done.stderr.rstrip().endswith(errors[0])
    assert "ChildFailedError" not in done.stderr and "Traceback" not in done.stderr
