"""The numbers the Trainer writes, each checked against a value worked out here from its definition:
metrics.jsonl's records (token counts, the learning rate, the train and validation losses, the z-loss
term), their cadence, the checkpoints, the time and step budgets, the run facts in summary.json and
what the terminal says. (The tests elsewhere mostly compare tinylm with itself: resumed with
uninterrupted, accumulated with one large batch; a count wrong on both sides passes those.)
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys

import pytest
import torch
import torch.nn.functional as F

import tinylm.trainer
from conftest import tiny_config, tiny_trainer
from tinylm import checkpoint, tracking
from tinylm.distributed import Cluster
from tinylm.loss import IGNORE_INDEX
from tinylm.metrics import read_metrics
from tinylm.optim import learning_rate
from tinylm.rundir import METRICS_FILE, SUMMARY_FILE
from tinylm.stability import StabilityMonitor
from tinylm.train import build_trainer, train
from tinylm.trainer import StopFlag

BLOCK = 64  # tiny_config's block_size
LOGGED = dict(max_steps=10, eval_every=4, log_every=3, batching="padded", grad_accum=2, batch_size=3,
              schedule="cosine", warmup_steps=3, z_loss=1e-3)  # fmt: skip
"""A run whose every count is distinguishable: padded rows (real targets < slots), two micro-batches of three
rows (2 x 3 is neither 2 + 3 nor 3 / 2), a warm-up and a decay, a log cadence apart from the evaluations',
and a last step on neither cadence."""


def step_rows(rows, t, step):
    """The rows of optimizer step ``step``, as the trainer's contract has it: micro-batch m of the step
    is rows (step * grad_accum + m) * batch_size onwards."""
    return [rows.batch((step * t.grad_accum + m) * t.batch_size, t.batch_size) for m in range(t.grad_accum)]


def real_targets(batch) -> int:
    return int((batch.y != IGNORE_INDEX).sum())


@pytest.fixture
def logged_run(stories, tmp_path, monkeypatch):
    """The LOGGED run trained to its end, with the steps at which it saved a checkpoint. (Trained again for
    each test: mutmut credits a fixture's calls to the first test that sets it up, so a shared run would
    leave the other tests unrun on the mutants they catch.)"""
    saved_steps = []
    real_save = checkpoint.save

    def recording_save(run_dir, model, optimizer, progress, *args, **kwargs):
        saved_steps.append(progress["step"])
        return real_save(run_dir, model, optimizer, progress, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", recording_save)
    result = train(tiny_config(stories, tmp_path / "logged", **LOGGED), quiet=True)
    monkeypatch.undo()
    return result, read_metrics(tmp_path / "logged"), saved_steps


def test_the_first_record_is_the_untrained_models_evaluation_at_step_zero(logged_run, stories, tmp_path):
    _, records, _ = logged_run
    first = records[0]
    assert set(first) == {"step", "tokens", "elapsed_s", "val_loss", "val_loss_doc"}
    assert first["step"] == 0 and first["tokens"] == 0 and first["elapsed_s"] == 0.0
    untrained = tiny_trainer(stories, tmp_path / "same", **LOGGED).validate()  # the same seed: the same weights
    assert first["val_loss"] == pytest.approx(untrained["val_loss"], rel=1e-9)
    assert first["val_loss_doc"] == pytest.approx(untrained["val_loss_doc"], rel=1e-9)


def test_evaluations_come_every_eval_every_steps_and_at_the_last_step(logged_run):
    _, records, _ = logged_run
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4, 8, 10]
    assert all("val_loss_doc" in r for r in records if "val_loss" in r)


def test_training_records_come_every_log_every_steps_and_with_each_evaluation(logged_run):
    _, records, _ = logged_run
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == [3, 4, 6, 8, 9, 10]
    keys = {"step", "tokens", "real_tokens", "lr", "train_loss", "train_z_loss", "grad_norm", "elapsed_s"}
    for r in steps:
        assert set(r) - {"val_loss", "val_loss_doc"} == keys, r
        assert ("val_loss" in r) == (r["step"] in (4, 8, 10))


def test_logged_token_counts_are_the_slots_and_the_real_targets_trained_so_far(logged_run, stories, tmp_path):
    result, records, _ = logged_run
    rows_of = tiny_trainer(stories, tmp_path / "rows", **LOGGED)  # the same data, to count its rows here
    t = rows_of.t
    real_per_step = [sum(real_targets(b) for b in step_rows(rows_of.data.rows, t, s)) for s in range(10)]
    assert len(set(real_per_step)) > 1 and all(n < 2 * 3 * BLOCK for n in real_per_step)  # padding varies
    for r in (r for r in records if "train_loss" in r):
        assert r["tokens"] == r["step"] * 2 * 3 * BLOCK
        assert r["real_tokens"] == sum(real_per_step[: r["step"]])
    assert result.summary["tokens"] == 10 * 2 * 3 * BLOCK and result.summary["real_tokens"] == sum(real_per_step)


def test_the_logged_learning_rate_is_the_schedules(logged_run, stories, tmp_path):
    _, records, _ = logged_run
    t = tiny_config(stories, tmp_path / "unused", **LOGGED).train
    for r in (r for r in records if "lr" in r):
        assert r["lr"] == pytest.approx(learning_rate(t, r["step"] - 1, 10), rel=1e-12), r["step"]


def test_checkpoints_come_every_eval_every_steps_and_at_the_last_step(logged_run):
    result, _, saved_steps = logged_run
    assert saved_steps == [4, 8, 10]
    assert json.loads((result.run_dir / checkpoint.POINTER_FILE).read_text())["step"] == 10
    assert checkpoint.weights_path(result.run_dir).parent.name == "checkpoint-000010"


def test_checkpoints_follow_checkpoint_every_when_it_is_set(stories, tmp_path, monkeypatch):
    saved_steps = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda d, m, o, progress, *a: saved_steps.append(progress["step"])
                        or real_save(d, m, o, progress, *a))  # fmt: skip
    train(tiny_config(stories, tmp_path / "run", max_steps=7, eval_every=4, checkpoint_every=3), quiet=True)
    assert saved_steps == [3, 6, 7]


class Killed(Exception):
    """What the test's stand-in for os.kill raises: the SIGKILL a real kill point sends, caught in-process."""


def test_the_kill_point_after_a_steps_metrics_comes_once_they_are_written_and_before_its_checkpoint(
    stories, tmp_path, monkeypatch
):
    # the crash tests (test_checkpoint.py) SIGKILL a real process there; here the same moment, in-process
    run, seen = tmp_path / "run", []

    def kill(pid, sig):
        seen.append((pid, sig, [r["step"] for r in read_metrics(run)], checkpoint.exists(run)))
        raise Killed

    monkeypatch.setenv(checkpoint.KILL_ENV, "train:after-metrics:step=3")
    monkeypatch.setattr(os, "kill", kill)
    with pytest.raises(Killed):
        train(tiny_config(stories, run, max_steps=6, eval_every=3, log_every=1), quiet=True)
    monkeypatch.undo()
    assert seen == [(os.getpid(), signal.SIGKILL, [0, 1, 2, 3], False)]  # step 3 logged, its checkpoint not yet


def test_the_run_facts_in_the_summary_are_the_runs(logged_run, stories, tmp_path):
    from tinylm.costs import model_costs

    result, _, _ = logged_run
    s = result.summary
    same = tiny_trainer(stories, tmp_path / "same", **LOGGED)  # the run's model and rows, untrained
    model = same.model
    params = sum(p.numel() for p in model.parameters())
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()  # output matrix tied
    flops_per_token = model_costs(same.cfg.model).flops_per_token_train
    assert s["params"] == params and s["params_non_embedding"] == params - embeddings
    assert (s["device"], s["precision"], s["world_size"], s["batching"]) == ("cpu", "fp32", 1, "padded")
    assert s["grad_accum"] == 2 and s["global_batch_rows"] == 6
    assert s["data"] == str(stories)  # the data the run was given
    assert s["tokenizer"] == "bpe:512" and s["schedule_extended"] is None
    assert s["flops_per_token"] == flops_per_token and s["train_flops"] == flops_per_token * 10 * 6 * BLOCK
    assert s["truncated_docs"] == same.data.rows.truncated_docs > 0


def test_packed_runs_have_no_truncated_documents_fact(stories, tmp_path):
    trainer = tiny_trainer(stories, tmp_path / "run")
    assert "truncated_docs" not in trainer.run_facts() and trainer.run_facts()["batching"] == "packed"


# --- one step, against the loss and schedule worked out here ---------------------------------------


VOCABULARIES = {"bpe": dict(tokenizer="bpe:512"), "gpt2-padded": dict(tokenizer="gpt2", vocab_size=50304, batch_size=2)}
"""A trained BPE (the embedding fits it exactly) and GPT-2's 50257 tokens in an embedding padded to 50304:
the padding rows must stay out of the softmax, in training as in evaluation."""


def textbook_cross_entropy_and_z(model, batch, vocab: int, z_loss: float = 0.0) -> tuple[float, float, int]:
    """Summed cross-entropy over the batch's real targets, summed z-loss term, number of real targets: from
    the full logits of the tokenizer's rows, in float64."""
    with torch.no_grad():
        logits = model.logits(model.hidden_states(batch.x, batch.doc_ids))[..., :vocab].flatten(0, 1).double()
    targets = batch.y.flatten()
    keep = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
    return ce, z_loss * torch.logsumexp(logits[keep], dim=1).square().sum().item(), int(keep.sum())


STEP_VARIANTS = {**VOCABULARIES, "doc-mask": dict(doc_mask=True, batching="packed")}  # attention within documents


@pytest.mark.parametrize("variant", list(STEP_VARIANTS))
def test_train_loss_is_the_mean_cross_entropy_over_the_steps_real_targets_and_the_z_term_is_logged_beside(
    stories, tmp_path, variant
):
    trainer = tiny_trainer(stories, tmp_path / "run", **{**LOGGED, **STEP_VARIANTS[variant]})
    model, vocab, z = trainer.model, trainer.data.meta["vocab_size"], LOGGED["z_loss"]
    assert (model.config.vocab_size > vocab) == (variant == "gpt2-padded")
    batches = step_rows(trainer.data.rows, trainer.t, 0)
    n = [real_targets(b) for b in batches]
    if trainer.t.batching == "padded":
        assert n[0] != n[1]  # a mean of the micro-batch means would differ from the mean over targets
    # the model's own per-micro-batch cross-entropies, on the training path (the values the step sums) ...
    own = [model(b.x, b.y, b.doc_ids, z_loss=z, return_cross_entropy=True, vocab_size=vocab)[2] for b in batches]
    ce_sum, z_sum, _ = (sum(v) for v in zip(*(textbook_cross_entropy_and_z(model, b, vocab, z) for b in batches)))
    record = trainer.train_step()
    assert record["train_loss"] == pytest.approx(ce_sum / sum(n), rel=1e-5)
    # ... summed in float64: exactly the weighted mean of the model's own micro-batch values
    assert record["train_loss"] == pytest.approx(sum(c.double().item() * k for c, k in zip(own, n)) / sum(n), rel=1e-14)
    assert record["train_z_loss"] == pytest.approx(z_sum / sum(n), rel=1e-4)
    assert record["real_tokens"] == sum(n) and record["tokens"] == trainer.t.grad_accum * trainer.t.batch_size * BLOCK


def test_accumulated_gradients_by_default_are_of_the_fp32_cross_entropy_alone(stories, tmp_path):
    # as benchmarks/bench_phases.py calls it: no z-loss, no precision given
    from tinylm.distributed import Cluster
    from tinylm.trainer import accumulate_gradients, step_batches

    trainer = tiny_trainer(stories, tmp_path / "run", **LOGGED)
    batches, real = step_batches(trainer.data.rows, trainer.t, 0, Cluster())
    sums = accumulate_gradients(trainer.model, batches, real, Cluster(), torch.device("cpu"))
    ce_sum = sum(textbook_cross_entropy_and_z(trainer.model, b, trainer.data.meta["vocab_size"])[0] for b in batches)
    assert sums[1].item() == 0.0 and sums[0].item() == pytest.approx(ce_sum, rel=1e-5)


def test_without_z_loss_no_z_term_is_logged(stories, tmp_path):
    assert "train_z_loss" not in tiny_trainer(stories, tmp_path / "run").train_step()


def test_the_guard_s_lr_scale_multiplies_the_scheduled_lr_that_is_set_and_logged(stories, tmp_path, monkeypatch):
    trainer = tiny_trainer(stories, tmp_path / "run", **LOGGED)
    monkeypatch.setattr(StabilityMonitor, "lr_scale", property(lambda self: 0.25))  # as after two roll-backs
    seen = []
    real_step = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda: seen.append(trainer.optimizer.param_groups[0]["lr"])
                        or real_step())  # fmt: skip
    trainer.train_step()
    record = trainer.train_step()
    expected = learning_rate(trainer.t, 1, 10) * 0.25
    assert record["lr"] == pytest.approx(expected, rel=1e-12) and seen[-1] == pytest.approx(expected, rel=1e-12)


def test_a_time_budget_lays_the_schedule_over_the_time_used(stories, tmp_path):
    trainer = tiny_trainer(stories, tmp_path / "run", max_steps=None, max_time=100.0, schedule="cosine")
    trainer.progress.elapsed_s = 40.0
    record = trainer.train_step()
    assert record["lr"] == pytest.approx(learning_rate(trainer.t, 0, None, time_fraction=0.4), rel=1e-12)
    assert record["lr"] < trainer.t.lr  # past the warm-up, decaying


@pytest.mark.parametrize("vocabulary", list(VOCABULARIES))
def test_an_evaluation_is_the_mean_cross_entropy_over_the_validation_targets(stories, tmp_path, vocabulary):
    trainer = tiny_trainer(stories, tmp_path / "run", batching="padded", **VOCABULARIES[vocabulary])
    model, vocab = trainer.model, trainer.data.meta["vocab_size"]

    def mean_cross_entropy(batches):
        sums = [textbook_cross_entropy_and_z(model, b, vocab) for b in batches]
        return sum(ce for ce, _, _ in sums) / sum(n for _, _, n in sums)

    model.eval()
    packed, per_document = (
        mean_cross_entropy(trainer.data.val_batches),
        mean_cross_entropy(trainer.data.val_doc_batches),
    )
    model.train()
    assert packed != pytest.approx(per_document, rel=1e-4)  # two different figures, not one logged twice
    losses = trainer.validate()
    assert losses["val_loss"] == pytest.approx(packed, rel=1e-5)
    assert losses["val_loss_doc"] == pytest.approx(per_document, rel=1e-5)


def test_grad_clip_zero_means_no_clipping(stories, tmp_path):
    updated = {}
    for clip in (0.0, 1e9, 0.05):  # off, a cap no gradient reaches, a cap every gradient here exceeds
        trainer = tiny_trainer(stories, tmp_path / f"clip-{clip}", grad_clip=clip)
        record = trainer.train_step()
        updated[clip] = (record["grad_norm"], trainer.model.transformer.wte.weight.detach().clone())
    assert updated[0.0][0] == updated[1e9][0] == updated[0.05][0] > 0.05  # the norm before clipping, logged
    assert torch.equal(updated[0.0][1], updated[1e9][1])
    assert not torch.equal(updated[0.05][1], updated[1e9][1])


def test_a_resume_may_move_the_data_but_not_change_it(stories, tmp_path):
    import shutil

    from conftest import write_stories
    from tinylm.errors import UserError
    from tinylm.evaluate import evaluate_run

    run = tmp_path / "run"
    train(tiny_config(stories, run, max_steps=2, eval_every=2), quiet=True)
    moved = tmp_path / "moved" / stories.name
    moved.parent.mkdir()
    shutil.copy(stories, moved)
    resumed = train(tiny_config(moved, run, max_steps=3, eval_every=2), resume=True, quiet=True).summary
    assert resumed["steps"] == 3
    # the moved copy reuses the cache filled from the first path; the records name the data now given
    assert resumed["data"] == str(moved) and evaluate_run(run)["data"] == str(moved)
    other = write_stories(tmp_path / "other.txt", 400, seed=1)
    with pytest.raises(UserError, match="data.content"):
        train(tiny_config(other, run, max_steps=4, eval_every=2), resume=True, quiet=True)


# --- budgets and stops --------------------------------------------------------------------------


class FixedClock:
    def __init__(self, elapsed_s: float) -> None:
        self.elapsed = elapsed_s

    def elapsed_s(self) -> float:
        return self.elapsed


def test_the_time_budget_is_spent_when_the_clock_reaches_it(stories, tmp_path):
    trainer = tiny_trainer(stories, tmp_path / "run", max_steps=None, max_time=5.0)
    trainer.clock = FixedClock(4.99)
    assert trainer.agree_to_stop(StopFlag()) == (False, False)
    trainer.clock = FixedClock(5.0)
    assert trainer.agree_to_stop(StopFlag()) == (True, False)
    assert trainer.agree_to_stop(StopFlag(interrupt_after=0)) == (True, True)


def test_the_step_budget_is_spent_at_its_last_step(stories, tmp_path):
    trainer = tiny_trainer(stories, tmp_path / "run", max_steps=3)
    trainer.clock = FixedClock(0.0)
    trainer.progress.step = 2
    assert trainer.agree_to_stop(StopFlag()) == (False, False)
    assert trainer.agree_to_stop(StopFlag(interrupt_after=2)) == (False, True)
    trainer.progress.step = 3
    assert trainer.agree_to_stop(StopFlag()) == (True, False)


@pytest.mark.parametrize(
    "spent", [dict(max_steps=3, step=3, elapsed_s=1.0), dict(max_steps=None, step=2, elapsed_s=5.0)]
)
def test_a_run_whose_budget_is_spent_exactly_trains_no_step(stories, tmp_path, monkeypatch, spent):
    trainer = tiny_trainer(stories, tmp_path / "run", max_steps=spent["max_steps"],
                           max_time=None if spent["max_steps"] else 5.0)  # fmt: skip
    trainer.progress.step, trainer.progress.elapsed_s = spent["step"], spent["elapsed_s"]
    monkeypatch.setattr(trainer, "train_step", lambda: pytest.fail("a step past the budget"))
    assert trainer.run_steps(StopFlag()) is False


def test_a_stop_ends_the_steps_with_a_checkpoint_of_the_last_one(stories, tmp_path):
    trainer = tiny_trainer(stories, tmp_path / "run", max_steps=12, eval_every=100)
    trainer.fit(interrupt_after=2)
    assert trainer.progress.step == 2 and [s for s, _ in trainer.progress.val_losses] == [0]  # no evaluation added
    assert json.loads((tmp_path / "run" / checkpoint.POINTER_FILE).read_text())["step"] == 2


def test_the_summary_says_whether_a_stop_ended_the_run_before_its_step_budget(stories, tmp_path):
    cfg = tiny_config(stories, tmp_path / "run", max_steps=5, eval_every=100)
    for resume, expected in ((False, (True, False, 2)), (True, (False, True, 5))):  # stopped, then finished
        result = train(cfg, resume=resume, quiet=True, interrupt_after=None if resume else 2)
        s = result.summary
        assert result.interrupted is expected[0]
        assert (s["interrupted"], s["completed"], s["steps"], s["steps_budget"]) == (*expected, 5)
        assert json.loads((result.run_dir / SUMMARY_FILE).read_text()) == json.loads(json.dumps(s, default=str))


# --- what the terminal says ----------------------------------------------------------------------


def test_the_terminal_gets_the_global_batch_and_a_line_per_evaluation(stories, tmp_path, capsys):
    trainer = tiny_trainer(stories, tmp_path / "run", quiet=False, max_steps=4, eval_every=2, grad_accum=2,
                           batch_size=3)  # fmt: skip
    capsys.readouterr()
    result = trainer.fit()
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0]
        == "global batch: 6 rows per step (--grad-accum 2 x --batch-size 3; 1 process(es), 2 micro-batch(es) each)"
    )
    records = {r["step"]: r for r in read_metrics(result.run_dir)}
    expected = [f"step {s}: train {records[s]['train_loss']:.4f} val {records[s]['val_loss']:.4f} "
                f"(per-document {records[s]['val_loss_doc']:.4f})" for s in (2, 4)]  # fmt: skip
    assert [line for line in out if line.startswith("step ")] == expected


def test_the_terminal_says_when_the_budget_is_extended_past_the_schedule(stories, tmp_path, capsys):
    cfg = tiny_config(stories, tmp_path / "run", max_steps=4, eval_every=4, schedule="cosine")
    train(cfg, quiet=True)
    cfg.train.max_steps = 6
    capsys.readouterr()
    train(cfg, resume=True)
    assert ("budget extended past the LR schedule's span: the schedule spans the first 4 steps; "
            "steps 5-6 keep its last LR") in capsys.readouterr().out.splitlines()  # fmt: skip


def test_a_resumed_time_budget_past_the_schedules_span_is_an_extension(stories, tmp_path):
    trainer = tiny_trainer(stories, tmp_path / "run", max_steps=None, max_time=10.0)
    trainer.train_step()
    trainer.validate()
    trainer.maybe_checkpoint(final=True)  # a checkpoint whose schedule spans 10 s
    cfg = tiny_config(stories, tmp_path / "run", max_steps=None, max_time=20.0)
    resumed = build_trainer(cfg, resume=True, quiet=True, cluster=Cluster(), device=torch.device("cpu"))
    extended = resumed.run_facts()["schedule_extended"]
    assert (extended["from_time_s"], extended["to_time_s"]) == (10.0, 20.0)


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as an interactive run's is: tqdm draws its bar there."""

    def isatty(self) -> bool:
        return True


def test_the_progress_bar_counts_the_steps_from_where_the_run_stands_and_shows_loss_and_speed(
    stories, tmp_path, monkeypatch
):
    trainer = tiny_trainer(stories, tmp_path / "run", quiet=False, max_steps=3, eval_every=100)
    trainer.progress.step = 1  # as a run resumed after its first step
    monkeypatch.setattr(tinylm.trainer, "RunClock", lambda earlier_s: FixedClock(0.25))  # a quarter second a step
    monkeypatch.setattr(sys, "stderr", Terminal())
    result = trainer.fit()
    frames = [f for f in sys.stderr.getvalue().split("\r") if f.strip()]
    monkeypatch.undo()
    last = read_metrics(result.run_dir)[-1]
    assert trainer.bar.n == trainer.bar.total == 3
    assert "1/3" in frames[0] and "3/3" in frames[-1] and ("step/s" in frames[-1] or "s/step" in frames[-1])
    assert f"loss={last['train_loss']:.3f}, tok_s={last['tokens'] / 0.25:,.0f}]" in frames[-1]


def test_a_quiet_run_draws_no_bar_even_on_a_terminal(stories, tmp_path, monkeypatch):
    trainer = tiny_trainer(stories, tmp_path / "run", max_steps=2)
    monkeypatch.setattr(sys, "stderr", Terminal())
    trainer.fit()
    assert sys.stderr.getvalue() == ""


def test_a_good_state_taken_at_the_checkpoint_step_is_saved_once(stories, tmp_path):
    trainer = tiny_trainer(stories, tmp_path / "run", guard=True)
    trainer.train_step()
    trainer.validate()  # the guard keeps step 1 as good ...
    trainer.maybe_checkpoint(final=True)  # ... and the checkpoint of step 1 holds it: marked, not stored again
    good = checkpoint.load(tmp_path / "run", trainer.model, trainer.optimizer)["stability"]["good"]
    assert good["step"] == 1 and good["model"] is None and good["optimizer"] is None


def test_a_quiet_run_prints_nothing(stories, tmp_path, capsys):
    # evaluations (a line each when not quiet), a resumed run's extended budget and a spent time budget
    cfg = tiny_config(stories, tmp_path / "run", max_steps=4, eval_every=2, schedule="cosine")
    train(cfg, quiet=True)
    cfg.train.max_steps = 6
    train(cfg, resume=True, quiet=True)
    cfg.train.max_time = 1e-9
    train(cfg, resume=True, quiet=True)
    assert capsys.readouterr().out == ""


# --- the tracker and the other ranks ------------------------------------------------------------


class RecordingBackend:
    """A tracker backend that keeps what the run tells it."""

    made: list[RecordingBackend] = []

    def __init__(self, run, resuming: bool) -> None:
        self.run, self.resuming, self.continued = run, resuming, False
        self.logged: list[tuple[int, dict]] = []
        self.summary = None
        RecordingBackend.made.append(self)

    def log(self, step: int, values: dict) -> None:
        self.logged.append((step, values))

    def finish(self, summary: dict) -> None:
        self.summary = summary


def test_the_tracker_gets_every_record_and_the_summary_and_a_resumed_run_says_so(stories, tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.PACKAGES, "tensorboard", ("json", "tensorboard"))  # installed or not
    monkeypatch.setitem(tracking.BACKENDS, "tensorboard", RecordingBackend)
    monkeypatch.setattr(RecordingBackend, "made", [])
    cfg = tiny_config(stories, tmp_path / "run", max_steps=4, eval_every=2, tracker="tensorboard")
    first = train(cfg, quiet=True)
    first_steps = [r["step"] for r in read_metrics(first.run_dir)]
    cfg.train.max_steps = 6
    resumed = train(cfg, resume=True, quiet=True)
    fresh, later = RecordingBackend.made
    assert (fresh.resuming, later.resuming) == (False, True)
    assert fresh.run.quiet and fresh.run.dir == (tmp_path / "run").resolve()
    assert [step for step, _ in fresh.logged] == first_steps == [0, 1, 2, 3, 4]
    assert fresh.summary == first.summary and later.summary == resumed.summary
    # a tracked run the tracker had not continued gets metrics.jsonl's earlier records first
    assert [step for step, _ in later.logged] == [r["step"] for r in read_metrics(resumed.run_dir)] == list(range(7))


class SecondOfTwo(Cluster):
    """Rank 1 of two processes, its collectives answered alone (no process group): what a rank other than 0
    does with the run's files."""

    def __init__(self) -> None:
        super().__init__(rank=1, world=2)

    @property
    def active(self) -> bool:
        return False


def test_a_rank_other_than_0_writes_nothing_and_returns_an_empty_summary(stories, tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # rank 0 makes it
    cfg = tiny_config(stories, run, max_steps=3, eval_every=2, grad_accum=2)
    trainer = build_trainer(cfg, resume=False, quiet=True, cluster=SecondOfTwo(), device=torch.device("cpu"))
    result = trainer.fit()
    assert trainer.log is None and trainer.progress.step == 3
    assert result.summary == {} and result.interrupted is False and result.run_dir == run
    assert list(run.iterdir()) == []  # no metrics, checkpoint or summary: rank 0 writes them
    assert not (run / METRICS_FILE).exists() and not (run / SUMMARY_FILE).exists()


def test_a_bf16_run_trains_and_evaluates_in_bf16(stories, tmp_path):
    # Same seed, so both runs start from the same weights: the step-0 evaluation and the first step's loss
    # differ only by the arithmetic, which each of the run's forward passes must take from its precision.
    records = {}
    for precision in ("fp32", "bf16"):
        run = train(tiny_config(stories, tmp_path / precision, max_steps=1, eval_every=1, precision=precision),
                    quiet=True)  # fmt: skip
        records[precision] = read_metrics(run.run_dir)
    fp32, bf16 = records["fp32"], records["bf16"]
    for step, key in ((0, "val_loss"), (0, "val_loss_doc"), (1, "train_loss"), (1, "val_loss")):
        assert bf16[step][key] != fp32[step][key], (step, key)  # bf16 was really on
        assert bf16[step][key] == pytest.approx(fp32[step][key], rel=2e-2), (step, key)
