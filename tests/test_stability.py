import math

import pytest
import torch

from conftest import tiny_config
from tinylm.metrics import read_metrics
from tinylm.model import GPT
from tinylm.stability import StabilityMonitor
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

    def forward_with_one_nan(self, idx, targets=None, doc_ids=None, full_logits=False):
        logits, loss = real_forward(self, idx, targets, doc_ids, full_logits)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward_with_one_nan)
    result = train(tiny_config(stories, tmp_path / "run", max_steps=12), quiet=True)
    s = result.summary
    assert s["completed"] and s["steps"] == 12
    assert math.isfinite(s["final_val_loss"]) and s["final_val_loss"] < s["start_val_loss"]
    assert s["stability"]["nan_count"] == 1
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
