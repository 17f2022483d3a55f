import json

import pytest
import torch

from conftest import tiny_config, tiny_trainer
from tinylm import checkpoint
from tinylm.config import TrainConfig
from tinylm.errors import UserError
from tinylm.metrics import read_metrics
from tinylm.optim import learning_rate
from tinylm.train import train


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


def test_loss_falls_and_run_directory_is_complete(stories, tmp_path):
    result = train(tiny_config(stories, tmp_path / "run", max_steps=30, eval_every=10, tokenizer="gpt2"), quiet=True)
    s = result.summary
    assert s["best_val_loss"] < s["start_val_loss"] - 2.0
    assert abs(s["start_val_loss"] - 10.825) < 0.15
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.json"):
        assert (result.run_dir / name).exists(), name
    for name in ("model.safetensors", "trainer_state.pt"):  # the one checkpoint folder the pointer names
        assert (result.run_dir / "checkpoint-000030" / name).exists(), name
    for key in ("params", "start_val_loss", "best_val_loss", "worst_val_loss", "final_val_loss",
                "train_time_s", "tokens", "steps"):  # fmt: skip
        assert s[key] is not None, key
    assert s["steps"] == 30 and s["tokens"] == 30 * 4 * 64
    records = read_metrics(result.run_dir)
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("step", "tokens", "lr", "train_loss", "grad_norm", "elapsed_s"):
        assert key in steps[0]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20, 30]
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["train"]["max_steps"] == 30 and saved["model"]["n_embd"] == 32


def test_same_seed_gives_identical_metrics(stories, tmp_path):
    a = train(tiny_config(stories, tmp_path / "a"), quiet=True)
    b = train(tiny_config(stories, tmp_path / "b"), quiet=True)
    c = train(tiny_config(stories, tmp_path / "c", seed=8), quiet=True)
    assert _without_time(read_metrics(a.run_dir)) == _without_time(read_metrics(b.run_dir))
    assert _without_time(read_metrics(a.run_dir)) != _without_time(read_metrics(c.run_dir))


RESUMED = {  # what changes the state a checkpoint carries, or which rows a step reads
    "constant": {},
    "cosine": {"schedule": "cosine"},
    "wsd": {"schedule": "wsd", "warmup_steps": 3},  # stopped inside the stable phase
    "padded": {"batching": "padded"},
    "doc-mask": {"doc_mask": True},
    "grad-accum": {"grad_accum": 3, "batch_size": 2},
    "dropout": {},  # the torch RNG: the checkpoint's, restored
    "checkpoint-every-5": {"checkpoint_every": 5},  # stopped between two checkpoints: saved at the stop
}


@pytest.mark.parametrize("case", list(RESUMED))
def test_resume_equals_uninterrupted(stories, tmp_path, case):
    def config(out):
        cfg = tiny_config(stories, tmp_path / out, **RESUMED[case])
        cfg.model.dropout = 0.1 if case == "dropout" else 0.0
        return cfg

    whole = train(config("whole"), quiet=True)
    cfg = config("split")
    first = train(cfg, quiet=True, interrupt_after=6)
    assert first.interrupted and first.summary["steps"] == 6
    resumed = train(cfg, resume=True, quiet=True)
    assert not resumed.interrupted
    assert _without_time(read_metrics(whole.run_dir)) == _without_time(read_metrics(resumed.run_dir))
    assert resumed.summary["best_val_loss"] == whole.summary["best_val_loss"]
    for key in ("start_val_loss_doc", "best_val_loss_doc", "worst_val_loss_doc", "final_val_loss_doc", "train_flops"):
        assert resumed.summary[key] == whole.summary[key] is not None, key


def test_resume_after_kill_drops_metrics_past_the_checkpoint(stories, tmp_path):
    whole = train(tiny_config(stories, tmp_path / "whole", checkpoint_every=4), quiet=True)
    cfg = tiny_config(stories, tmp_path / "killed", checkpoint_every=4)
    train(cfg, quiet=True, interrupt_after=4)
    # A kill after step 4's checkpoint: metrics of steps 5-6 were written, the checkpoint was not.
    extra = [{"step": 5, "train_loss": 1.0}, {"step": 6, "train_loss": 1.0}]
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in extra)
    resumed = train(cfg, resume=True, quiet=True)
    assert _without_time(read_metrics(whole.run_dir)) == _without_time(read_metrics(resumed.run_dir))


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_resume_with_a_longer_budget_keeps_the_learning_rate_continuous(stories, tmp_path, schedule):
    cfg = tiny_config(stories, tmp_path / "run", schedule=schedule, max_steps=8)
    first = train(cfg, quiet=True)
    assert first.summary["schedule_extended"] is None
    cfg.train.max_steps = 12
    resumed = train(cfg, resume=True, quiet=True)
    lrs = {r["step"]: r["lr"] for r in read_metrics(resumed.run_dir) if "lr" in r}
    assert lrs[7] > lrs[8]  # the original schedule decayed to its last step ...
    assert [lrs[s] for s in range(9, 13)] == [lrs[8]] * 4  # ... and the added steps hold its LR: no jump
    assert resumed.summary["steps"] == 12
    extended = resumed.summary["schedule_extended"]
    assert extended["from_steps"] == 8 and extended["to_steps"] == 12 and "hold" in extended["rule"]


def test_learning_rate_holds_past_the_span_of_a_time_budget():
    from tinylm.optim import ScheduleSpan

    cfg = TrainConfig(lr=1.0, schedule="cosine", max_time=10.0)
    span = ScheduleSpan(steps=None, time_s=10.0)
    assert span.lr(cfg, 50, 10.0) == pytest.approx(0.1)
    assert span.lr(cfg, 90, 25.0) == pytest.approx(0.1)
    extended = span.extension(None, 20.0)
    assert extended["from_time_s"] == 10.0 and extended["to_time_s"] == 20.0
    assert span.extension(None, 10.0) is None


def test_token_budget_sets_the_steps(stories, tmp_path):
    result = train(tiny_config(stories, tmp_path / "run", max_steps=None, max_tokens=2560), quiet=True)
    assert result.summary["steps"] == 10  # 2560 slots / (4 rows x 64 tokens)


def test_time_budget_ends_the_run_cleanly(stories, tmp_path):
    result = train(tiny_config(stories, tmp_path / "run", max_steps=None, max_time=1.0), quiet=True)
    assert result.summary["completed"] and result.summary["steps"] >= 1
    assert checkpoint.weights_path(tmp_path / "run").exists()


def test_gradient_accumulation_matches_a_larger_batch(stories, tmp_path):
    big = train(tiny_config(stories, tmp_path / "big", batch_size=4, max_steps=3), quiet=True)
    acc = train(tiny_config(stories, tmp_path / "acc", batch_size=2, grad_accum=2, max_steps=3), quiet=True)
    a = [r["train_loss"] for r in read_metrics(big.run_dir) if "train_loss" in r]
    b = [r["train_loss"] for r in read_metrics(acc.run_dir) if "train_loss" in r]
    assert a == pytest.approx(b, rel=1e-5)


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(checkpoint.weights_path(run_dir)))


def test_padded_loss_is_the_mean_over_the_whole_steps_real_tokens(stories, tmp_path):
    # Padded micro-batches hold different numbers of real targets: the step's loss and gradient
    # are the mean over all of them, not a mean of per-micro-batch means.
    common = dict(batching="padded", max_steps=4, eval_every=4)
    big = train(tiny_config(stories, tmp_path / "big", batch_size=4, **common), quiet=True)
    acc = train(tiny_config(stories, tmp_path / "acc", batch_size=2, grad_accum=2, **common), quiet=True)
    steps_big = [r for r in read_metrics(big.run_dir) if "train_loss" in r]
    steps_acc = [r for r in read_metrics(acc.run_dir) if "train_loss" in r]
    assert [r["real_tokens"] for r in steps_big] == [r["real_tokens"] for r in steps_acc]
    assert [r["train_loss"] for r in steps_acc] == pytest.approx([r["train_loss"] for r in steps_big], abs=1e-5)
    assert [r["grad_norm"] for r in steps_acc] == pytest.approx([r["grad_norm"] for r in steps_big], abs=1e-5)
    weights_big, weights_acc = _weights(big.run_dir), _weights(acc.run_dir)
    for name, w in weights_big.items():
        torch.testing.assert_close(weights_acc[name], w, atol=1e-5, rtol=0, msg=name)


def test_grad_accum_defaults_to_one_micro_batch_per_process_and_resume_keeps_it(stories, tmp_path):
    from tinylm.train import resolve_grad_accum

    cfg = tiny_config(stories, tmp_path / "run")
    assert cfg.train.grad_accum is None
    resolve_grad_accum(cfg, 4, tmp_path / "run", resume=False)
    assert cfg.train.grad_accum == 4
    (tmp_path / "run").mkdir()
    cfg.save(tmp_path / "run" / "config.json")
    again = tiny_config(stories, tmp_path / "run")  # as an ablation rebuilds it, without the resolved value
    resolve_grad_accum(again, 2, tmp_path / "run", resume=True)
    assert again.train.grad_accum == 4
    with pytest.raises(UserError, match="resume on a number of processes that divides 4"):
        resolve_grad_accum(tiny_config(stories, tmp_path / "run"), 3, tmp_path / "run", resume=True)
    with pytest.raises(UserError, match="make --grad-accum a multiple of 3"):
        resolve_grad_accum(tiny_config(stories, tmp_path / "x", grad_accum=4), 3, tmp_path / "x", resume=False)


def test_learning_rate_schedules():
    cosine = TrainConfig(lr=1.0, schedule="cosine", warmup_steps=10, max_steps=110)
    assert learning_rate(cosine, 0, 110) == pytest.approx(0.1)
    assert learning_rate(cosine, 9, 110) == pytest.approx(1.0)
    assert learning_rate(cosine, 60, 110) == pytest.approx(0.55)
    assert learning_rate(cosine, 110, 110) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2, max_steps=110)
    assert learning_rate(wsd, 80, 110) == pytest.approx(1.0)
    assert learning_rate(wsd, 110, 110) == pytest.approx(0.1)
    assert learning_rate(TrainConfig(lr=0.5, max_steps=5), 3, 5) == 0.5


def test_refuses_to_overwrite_another_run(stories, tmp_path):
    train(tiny_config(stories, tmp_path / "run", max_steps=2), quiet=True)
    before = checkpoint.weights_path(tmp_path / "run").read_bytes()
    with pytest.raises(UserError, match="holds another run"):
        train(tiny_config(stories, tmp_path / "run", max_steps=2), quiet=True)
    assert checkpoint.weights_path(tmp_path / "run").read_bytes() == before


def test_bad_inputs_are_user_errors(stories, tmp_path):
    with pytest.raises(UserError, match="not found"):
        train(tiny_config(tmp_path / "missing.txt", tmp_path / "a"), quiet=True)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="empty"):
        train(tiny_config(empty, tmp_path / "b"), quiet=True)
    with pytest.raises(UserError, match="no budget"):
        tiny_config(stories, tmp_path / "c", max_steps=None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cpu_is_chosen_when_no_gpu(stories, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = train(tiny_config(stories, tmp_path / "run", max_steps=1), quiet=True)
    assert result.summary["device"] == "cpu"


def test_tensorboard_events_are_written_when_asked(stories, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(stories, tmp_path / "run", max_steps=4, tracker="tensorboard"), quiet=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("val_loss")]
    expected = [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert [s for s, _ in logged] == [s for s, _ in expected] == [0, 4]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)  # events hold float32


def test_a_vocabulary_larger_than_the_embedding_is_refused(stories, tmp_path):
    cfg = tiny_config(stories, tmp_path / "run", tokenizer="gpt2")
    cfg.model.vocab_size = 1000
    with pytest.raises(UserError, match="more than the model's embedding"):
        train(cfg, quiet=True)


def test_a_block_longer_than_the_data_is_refused(tmp_path):
    from conftest import write_stories

    small = write_stories(tmp_path / "small.txt", 25)
    cfg = tiny_config(small, tmp_path / "run")
    cfg.model.block_size = 4096
    with pytest.raises(UserError, match="fewer than one block"):
        train(cfg, quiet=True)
    assert not (tmp_path / "run").exists()


# --- the Trainer's parts, one at a time ---------------------------------------------------


def _weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_training_step_updates_the_weights_and_counts_its_tokens(stories, tmp_path):
    trainer = tiny_trainer(stories, tmp_path / "run")
    before = _weights_of(trainer.model)
    record = trainer.train_step()
    assert record["step"] == trainer.progress.step == 1
    assert record["tokens"] == trainer.progress.tokens == 4 * 64
    assert 0 < record["real_tokens"] <= record["tokens"]
    assert record["lr"] > 0 and record["grad_norm"] > 0 and 5.0 < record["train_loss"] < 8.0
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(p.grad is None for p in trainer.model.parameters())  # ready for the next step


def test_an_update_the_guard_refuses_leaves_the_weights_as_they_were(stories, tmp_path, monkeypatch):
    trainer = tiny_trainer(stories, tmp_path / "run", guard=True)
    monkeypatch.setattr(trainer.monitor, "allow_update", lambda step, loss, grad_norm: False)
    before = _weights_of(trainer.model)
    record = trainer.train_step()
    assert record["step"] == 1 and record["tokens"] == 4 * 64  # the step counts: its batch was seen
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_an_evaluation_is_kept_in_the_progress_and_judged_by_the_guard(stories, tmp_path):
    trainer = tiny_trainer(stories, tmp_path / "run", guard=True)
    losses = trainer.validate()
    val = losses["val_loss"]
    assert trainer.progress.val_losses == [(0, val)]
    assert trainer.progress.val_losses_doc == [(0, losses["val_loss_doc"])]
    assert trainer.monitor.state.best_val == val and trainer.monitor.state.good["step"] == 0


def test_a_checkpoint_carries_the_progress_and_the_whole_stability_state(stories, tmp_path):
    from dataclasses import fields

    from tinylm.stability import StabilityState

    trainer = tiny_trainer(stories, tmp_path / "run", guard=True)
    trainer.validate()
    trainer.train_step()
    trainer.maybe_checkpoint(final=True)
    saved = checkpoint.load(tmp_path / "run", trainer.model, trainer.optimizer)
    assert saved["step"] == 1 and saved["val_losses"] == trainer.progress.val_losses
    assert set(saved["stability"]) == {f.name for f in fields(StabilityState)}
    assert saved["stability"]["losses"] == trainer.monitor.state.losses and saved["stability"]["good"]["step"] == 0


def test_the_run_clock_adds_this_process_time_to_what_the_checkpoint_says(monkeypatch):
    import time

    from tinylm.trainer import RunClock

    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    clock = RunClock(earlier_s=5.0)
    assert clock.elapsed_s() == 5.0
    now[0] = 102.5
    assert clock.elapsed_s() == 7.5


def test_a_run_clock_with_no_earlier_time_counts_from_zero(monkeypatch):
    import time

    from tinylm.trainer import RunClock

    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    clock = RunClock()  # a fresh run: nothing trained before this process
    now[0] = 101.25
    assert clock.elapsed_s() == 1.25


def test_recorded_time_runs_on_across_a_resume_and_ends_in_the_summary(stories, tmp_path):
    cfg = tiny_config(stories, tmp_path / "run", checkpoint_every=2)
    train(cfg, quiet=True, interrupt_after=6)
    resumed = train(cfg, resume=True, quiet=True)
    times = [r["elapsed_s"] for r in read_metrics(resumed.run_dir) if "elapsed_s" in r]
    assert times[0] == 0.0 and times == sorted(times) and times[-1] > 0
    assert resumed.summary["train_time_s"] == round(times[-1], 3)


def test_a_stop_is_asked_by_a_signal_or_at_the_test_step():
    from tinylm.trainer import StopFlag

    assert not StopFlag().asked(100)
    assert StopFlag(interrupt_after=3).asked(3) and not StopFlag(interrupt_after=3).asked(2)
    flag = StopFlag()
    flag.requested = True
    assert flag.asked(0)


def test_a_run_whose_time_budget_is_spent_trains_no_further_step_on_resume(stories, tmp_path, monkeypatch):
    import tinylm.trainer

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    # Killed after its final checkpoint, before its summary: the study runner and the user resume it.
    cfg = tiny_config(stories, tmp_path / "run", max_steps=None, max_time=0.05, eval_every=1000)
    with monkeypatch.context() as m:
        m.setattr(tinylm.trainer, "write_summary", killed)
        with pytest.raises(Killed):
            train(cfg, quiet=True)
    steps = json.loads((tmp_path / "run" / checkpoint.POINTER_FILE).read_text())["step"]
    before = _without_time(read_metrics(tmp_path / "run"))
    resumed = train(cfg, resume=True, quiet=True)
    assert resumed.summary["steps"] == steps and resumed.summary["completed"]
    assert _without_time(read_metrics(resumed.run_dir)) == before
    assert train(cfg, resume=True, quiet=True).summary["steps"] == steps  # and so does a finished one


def test_resuming_a_run_whose_time_budget_is_spent_says_so(stories, tmp_path, capsys):
    # It trains no step more (above); without a word the user would not know that --max-time stopped it.
    cfg = tiny_config(stories, tmp_path / "run", max_steps=None, max_time=0.05, eval_every=1000)
    train(cfg, quiet=True)
    capsys.readouterr()
    train(cfg, resume=True)
    said = capsys.readouterr().out
    trained = read_metrics(tmp_path / "run")[-1]["elapsed_s"]
    assert (f"--max-time 0.05 s is spent ({trained:.1f} s trained): no step more; "
            "resume with a larger --max-time to train on") in said.splitlines()  # fmt: skip
