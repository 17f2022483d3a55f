import math

import pytest
import torch

from conftest import tiny_config
from tinylm.evaluate import evaluate_run
from tinylm.metrics import read_metrics
from tinylm.model import GPT
from tinylm.stability import StabilityMonitor, Thresholds
from tinylm.train import train

TOO_HIGH_LR = 1.0  # for the tiny model, as 0.5 is for basic: the loss jumps from 10.8 to over 40


def test_a_healthy_run_is_stable_with_no_events(stories, tmp_path):
    result = train(tiny_config(stories, tmp_path / "run", max_steps=40, eval_every=10), quiet=True)
    stability = result.summary["stability"]
    assert stability["label"] in ("very stable", "stable")
    assert result.summary["events"] == []
    assert stability["spikes"] == 0 and stability["nan_count"] == 0 and not stability["divergence"]


@pytest.fixture(scope="module")
def high_lr_runs(stories, tmp_path_factory):
    root = tmp_path_factory.mktemp("high-lr")
    runs = {}
    for guard in (False, True):
        cfg = tiny_config(stories, root / f"guard-{guard}", max_steps=40, eval_every=5, lr=TOO_HIGH_LR, guard=guard)
        runs[guard] = train(cfg, quiet=True)
    return runs


def test_unguarded_high_lr_run_is_unstable_with_a_named_divergence(high_lr_runs):
    s = high_lr_runs[False].summary
    assert s["stability"]["label"] == "unstable"
    assert s["stability"]["divergence"]
    step = s["stability"]["divergence_steps"][0]
    assert f"divergence at step {step}" == s["stability"]["reason"]
    events = [r for r in read_metrics(high_lr_runs[False].run_dir) if r.get("event") == "divergence"]
    assert events and events[0]["step"] == step
    assert s["stability"]["recoveries"] == 0


def test_guarded_high_lr_run_recovers_and_ends_lower(high_lr_runs):
    guarded, raw = high_lr_runs[True].summary, high_lr_runs[False].summary
    assert guarded["stability"]["recoveries"] >= 1
    assert guarded["final_val_loss"] < raw["final_val_loss"]
    logged = [r for r in read_metrics(high_lr_runs[True].run_dir) if r.get("event") == "recovery"]
    assert logged and logged[0]["lr_scale"] == 0.5
    lrs = [r["lr"] for r in read_metrics(high_lr_runs[True].run_dir) if "lr" in r]
    assert min(lrs) < TOO_HIGH_LR  # the learning rate was lowered after the roll-back


def test_a_nan_loss_is_skipped_without_killing_the_run(stories, tmp_path, monkeypatch):
    real_forward = GPT.forward
    calls = {"n": 0}

    def forward_with_one_nan(self, idx, targets=None, doc_ids=None, **options):
        logits, *losses = real_forward(self, idx, targets, doc_ids, **options)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # the loss and the cross-entropy logged beside it
                losses = [loss * float("nan") for loss in losses]
        return logits, *losses

    monkeypatch.setattr(GPT, "forward", forward_with_one_nan)
    result = train(tiny_config(stories, tmp_path / "run", max_steps=12), quiet=True)
    s = result.summary
    assert s["completed"] and s["steps"] == 12
    assert math.isfinite(s["final_val_loss"]) and s["final_val_loss"] < s["start_val_loss"]
    assert s["stability"]["nan_count"] == 1
    assert s["skipped_updates"] == 1  # the report tells an arm that trained on fewer steps
    nan_events = [e for e in s["events"] if e["event"] == "nan"]
    assert nan_events[0]["step"] == 5 and nan_events[0]["skipped"]


def test_spike_detector_flags_an_outlier_and_guard_skips_a_huge_one():
    monitor = StabilityMonitor(guard=True)
    for i in range(30):
        assert monitor.allow_update(i, 3.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i % 2))
    assert not monitor.allow_update(30, 3.0, 500.0)  # a gradient norm far beyond the hard threshold
    kinds = [e["event"] for e in monitor.events]
    assert kinds == ["grad_spike"] and monitor.events[0]["skipped"]
    unguarded = StabilityMonitor(guard=False)
    for i in range(30):
        unguarded.allow_update(i, 3.0 + 0.01 * (i % 3), 1.0)
    assert unguarded.allow_update(30, 3.0, 500.0)  # detected, not skipped
    assert unguarded.report(3.1)["spikes"] == 1


def test_divergence_rolls_back_to_the_last_good_state():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = StabilityMonitor(guard=True)
    monitor.observe_val(0, 5.0)
    monitor.remember_good(model, opt, 0)
    good = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(10.0)
    monitor.observe_val(10, 9.0)  # 80% above the best: an episode at once
    assert monitor.rollback_wanted
    monitor.rollback(model, opt, 10)
    assert torch.equal(model.weight, good)
    assert monitor.lr_scale == 0.5
    assert [e["event"] for e in monitor.events] == ["divergence", "recovery"]


def _without_time(run_dir):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_metrics(run_dir)]


def test_a_run_resumed_during_recovery_continues_as_the_uninterrupted_one(high_lr_runs, stories, tmp_path):
    whole = high_lr_runs[True]
    recoveries = [e["step"] for e in whole.summary["events"] if e["event"] == "recovery"]
    assert len(recoveries) >= 2  # stopping between two roll-backs: the second needs the saved good state
    cfg = tiny_config(stories, tmp_path / "split", max_steps=40, eval_every=5, lr=TOO_HIGH_LR, guard=True)
    train(cfg, quiet=True, interrupt_after=recoveries[0] + 2)
    resumed = train(cfg, resume=True, quiet=True)
    assert _without_time(resumed.run_dir) == _without_time(whole.run_dir)


def test_giving_up_keeps_the_last_good_weights_and_says_so(stories, tmp_path, capsys):
    result = train(tiny_config(stories, tmp_path / "run", max_steps=24, eval_every=4, lr=30.0, guard=True), quiet=True)
    s = result.summary
    assert s["stability"]["gave_up"] and not s["completed"] and s["final_val_loss"] > 2 * s["best_val_loss"]
    saved = evaluate_run(result.run_dir, device_name="cpu")["loss"]  # what sample/export would use
    assert saved == pytest.approx(s["best_val_loss"], rel=1e-5)
    kept = s["stability"]["kept_weights"]
    assert kept["val_loss"] == s["best_val_loss"] and s["stability"]["label"] == "unstable"
    assert f"kept the weights of step {kept['step']}" in s["stability"]["reason"]
    said = (f"the stability guard gave up at step {s['steps']} after {Thresholds().max_recoveries} recoveries; the "
            f"saved weights are the last good ones, from step {kept['step']} (val loss {kept['val_loss']:.4f})")  # fmt: skip
    assert said in capsys.readouterr().out.splitlines()


def test_a_non_finite_learning_rate_is_never_better_than_unstable(stories, tmp_path):
    cfg = tiny_config(stories, tmp_path / "run", max_steps=12, lr=1.0)
    cfg.train.lr = math.inf  # past the config's own check: the label must not depend on it
    s = train(cfg, quiet=True).summary
    assert s["stability"]["label"] == "unstable"
    monitor = StabilityMonitor(guard=True)
    monitor.allow_update(0, 3.0, 1.0)
    assert monitor.report(math.nan)["label"] == "unstable"


def test_a_streak_of_skipped_updates_is_a_divergence_that_rolls_back():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = StabilityMonitor(guard=True)
    monitor.observe_val(0, 3.0)
    monitor.remember_good(model, opt, 0)
    for i in range(30):
        assert monitor.allow_update(i, 3.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i % 2))
    assert not monitor.allow_update(30, 3.0, 100.0)  # one outlier batch: skipped, no more
    assert monitor.allow_update(31, 3.0, 1.0) and not monitor.rollback_wanted
    for i in range(32, 35):  # bad weights: every gradient is huge, three in a row
        assert not monitor.allow_update(i, 3.0, 100.0)
    assert monitor.rollback_wanted
    assert monitor.events[-1]["event"] == "divergence" and "skipped in a row" in monitor.events[-1]["why"]
    monitor.rollback(model, opt, 35)
    assert monitor.lr_scale == 0.5 and monitor.skipped == 4
    assert monitor.report(3.0)["label"] == "ok"


def test_a_good_state_at_the_checkpoint_step_is_saved_once_and_restored_on_resume():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = StabilityMonitor(guard=True)
    monitor.observe_val(10, 5.0)
    monitor.remember_good(model, opt, 10)
    saved = monitor.state_dict(10)
    assert saved["good"]["model"] is None  # the checkpoint of step 10 holds these weights already
    assert monitor.state_dict(11)["good"]["model"] is not None
    good = model.weight.detach().clone()
    resumed = StabilityMonitor(guard=True, state=saved)
    resumed.resume_from(model, opt)  # model and opt as loaded from that checkpoint
    with torch.no_grad():
        model.weight.add_(10.0)
    resumed.observe_val(20, 9.0)
    resumed.rollback(model, opt, 20)
    assert torch.equal(model.weight, good)


def test_a_second_roll_back_to_the_same_good_state_restores_its_optimizer_state_too():
    # torch's load_state_dict keeps the tensors it is given: a roll-back that hands it the snapshot's
    # own would let the next updates move the snapshot, and the next roll-back would not go back.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # as build_optimizer makes it

    def update():
        model(torch.randn(2, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()

    update()
    monitor = StabilityMonitor(guard=True)
    monitor.observe_val(5, 5.0)
    monitor.remember_good(model, opt, 5)
    good = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    for step in (10, 20):  # the second evaluation rises again: no new good state in between
        update()
        update()
        monitor.observe_val(step, 9.0)
        monitor.rollback(model, opt, step)
        restored = opt.state_dict()["state"][0]
        assert all(torch.equal(restored[k], good[k]) for k in good), step
    assert monitor.state.recoveries == 2


# What main's StabilityMonitor.state() wrote into trainer_state.pt before StabilityState existed.
SAVED_BEFORE_THE_DATACLASS = {
    "lr_scale": 0.5,
    "events": [
        {"event": "divergence", "step": 5, "value": 9.1, "why": "val loss 9.100 vs best 5.940", "best_val": 5.94},
        {"event": "recovery", "step": 5, "restored_step": 0, "lr_scale": 0.5},
    ],
    "best_val": 5.94,
    "max_rise": 3.16,
    "max_rise_pct": 53.2,
    "val_rising": 0,
    "ema": 6.3,
    "best_ema": 6.1,
    "train_rising": 1,
    "recoveries": 1,
    "in_episode": False,
    "gave_up": False,
    "last_train_loss": 6.2,
    "last_loss_finite": True,
    "last_val": 9.1,
    "skipped": 0,
    "skip_streak": 0,
    "losses": [6.4, 6.2],
    "norms": [1.5, 1.2],
    "good": {"step": 0, "val_loss": 5.94, "model": None, "optimizer": None},
}


def test_a_stability_state_saved_before_the_dataclass_loads_whole():
    monitor = StabilityMonitor(guard=True, state=SAVED_BEFORE_THE_DATACLASS)
    added_since = {"rollback_wanted": False, "ema_at_best_val": None, "overfitting": False}  # at their defaults
    assert monitor.state_dict(7) == {**SAVED_BEFORE_THE_DATACLASS, **added_since}
    assert monitor.lr_scale == 0.5 and monitor.report(9.1)["recoveries"] == 1
    assert StabilityMonitor(guard=True, state={}).state_dict(0) == StabilityMonitor(guard=True).state_dict(0)


def test_a_monitor_restored_from_its_saved_state_judges_as_the_uninterrupted_one():
    def feed(monitor, steps):
        for i in steps:
            loss = 3.0 + 0.01 * (i % 3) + (2.0 if i == 70 else 0.0)  # one spike past the window's fill
            monitor.allow_update(i, loss, 1.0 + 0.01 * (i % 2))
            if i % 10 == 9:
                monitor.observe_val(i + 1, 3.0 - 0.001 * i)

    whole, first = StabilityMonitor(guard=False), StabilityMonitor(guard=False)
    feed(whole, range(100))
    feed(first, range(60))
    assert len(first.state.losses) == first.th.spike_window  # the window keeps its last steps only
    resumed = StabilityMonitor(guard=False, state=first.state_dict(60))
    feed(resumed, range(60, 100))
    assert resumed.state == whole.state and [e["event"] for e in whole.events] == ["loss_spike"]
