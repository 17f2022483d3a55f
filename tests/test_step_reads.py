"""The training step's host reads: once a step (its loss sums and gradient norm in one transfer), or, with
host_read_every N > 1, once every N steps, the guard's skip decisions made on the device meanwhile."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, tiny_trainer
from tinylm import checkpoint, loss
from tinylm.config import TrainConfig
from tinylm.distributed import Cluster
from tinylm.errors import UserError
from tinylm.metrics import read_metrics
from tinylm.model import GPT
from tinylm.train import train

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
"""The ways a tensor's value reaches the host (and a GPU's host waits for its queue of kernels)."""


@contextlib.contextmanager
def device_reads(monkeypatch):
    """The names of the host reads of tensors made inside the block, in order. The loss takes an accelerator's
    path: on a CPU it reads a flag per chunk on purpose (rows whose target probability underflows; a read
    costs nothing there), on an accelerator it reads nothing (loss._row_losses)."""
    row_losses = loss._row_losses
    monkeypatch.setattr(loss, "_row_losses", lambda *args, may_sync: row_losses(*args, may_sync=False))
    reads = []

    def counted(name):
        read = getattr(torch.Tensor, name)

        def counted_read(tensor, *args, **kwargs):
            reads.append(name)
            return read(tensor, *args, **kwargs)

        return counted_read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    try:
        yield reads
    finally:
        monkeypatch.undo()


def test_a_training_step_reads_the_device_once(stories, tmp_path, monkeypatch):
    trainer = tiny_trainer(stories, tmp_path / "run", max_steps=3)
    with device_reads(monkeypatch) as reads:
        record = trainer.train_step()
    assert reads == ["tolist"]  # a GPU waits for its queue here only; before, twice (.tolist, then .item)
    assert record["train_loss"] > 0 and record["grad_norm"] > 0


@pytest.mark.parametrize("settings", [{}, {"batching": "padded", "grad_accum": 2}, {"doc_mask": True, "z_loss": 1e-3},
                                      {"guard": False}])  # fmt: skip
def test_steps_inside_a_read_interval_do_not_read_the_device(stories, tmp_path, monkeypatch, settings):
    trainer = tiny_trainer(stories, tmp_path / "run", max_steps=8, host_read_every=4, **settings)
    assert (trainer.device_guard is not None) == trainer.t.guard  # guarded: the skip decisions are the device's
    with device_reads(monkeypatch) as reads:
        records = [trainer.train_step() for _ in range(3)]
    assert reads == [] and all("train_loss" not in r for r in records)
    with device_reads(monkeypatch) as reads:
        taken = trainer.read_steps()
    assert reads == ["tolist"]  # the three steps in one transfer
    assert [s.record["step"] for s in taken] == [1, 2, 3] and all(s.record["train_loss"] > 0 for s in taken)


def test_the_host_reads_at_each_interval_and_before_evaluations_checkpoints_and_the_end(stories, tmp_path, monkeypatch):
    trainer = tiny_trainer(stories, tmp_path / "run", max_steps=11, eval_every=6, checkpoint_every=5,
                           host_read_every=4)  # fmt: skip
    read_at, read_steps = [], trainer.read_steps
    monkeypatch.setattr(trainer, "read_steps", lambda: read_at.append(trainer.progress.step) or read_steps())
    trainer.fit()
    assert read_at == [4, 5, 6, 8, 10, 11]  # every 4th step, the checkpoints of 5 and 10, the evaluation of 6, the end


def _without_time(run_dir):
    """metrics.jsonl's records, each as its (key, value) pairs in order, the time's value left out."""
    return [[(k, "time" if k == "elapsed_s" else v) for k, v in r.items()] for r in read_metrics(run_dir)]


def _weights(run_dir):
    return load_file(checkpoint.weights_path(run_dir))


def _same_run(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    same_weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return same_weights and _without_time(a) == _without_time(b)


def test_reading_every_four_steps_trains_the_same_run(stories, tmp_path):
    runs = {n: train(tiny_config(stories, tmp_path / f"n{n}", max_steps=14, eval_every=6, z_loss=1e-3,
                                 host_read_every=n), quiet=True).run_dir for n in (1, 4)}  # fmt: skip
    assert _same_run(runs[1], runs[4])
    steps = [r for r in read_metrics(runs[4]) if "train_loss" in r]
    assert len(steps) == 14  # each step's record, its time that of its own step (read or not)
    assert all(0 < a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(steps, steps[1:]))


@pytest.fixture
def bad_batches(monkeypatch):
    """Training forwards (one a step) numbered from 1; the losses of those in ``nan`` are not finite, those in
    ``spike`` 50 times larger (its gradients too)."""
    real_forward, calls = GPT.forward, {"n": 0}
    bad = {"nan": set(), "spike": set()}

    def forward(self, idx, targets=None, doc_ids=None, **options):
        logits, *losses = real_forward(self, idx, targets, doc_ids, **options)
        if self.training:
            calls["n"] += 1
            factor = math.nan if calls["n"] in bad["nan"] else 50.0 if calls["n"] in bad["spike"] else None
            if factor is not None:
                losses = [loss * factor for loss in losses]
        return logits, *losses

    monkeypatch.setattr(GPT, "forward", forward)

    def inject(nan=(), spike=()):
        calls["n"] = 0
        bad["nan"], bad["spike"] = set(nan), set(spike)

    return inject


def test_reading_every_four_steps_skips_the_same_bad_steps_with_the_same_events(stories, tmp_path, bad_batches):
    runs = {}
    for n in (1, 4):
        bad_batches(nan=[3], spike=[26, 31])
        runs[n] = train(tiny_config(stories, tmp_path / f"n{n}", max_steps=34, eval_every=12, host_read_every=n),
                        quiet=True)  # fmt: skip
    events = [e for e in runs[1].summary["events"]]
    assert [(e["event"], e["step"], e["skipped"]) for e in events] == [
        ("nan", 3, True), ("loss_spike", 26, True), ("grad_spike", 26, True),
        ("loss_spike", 31, True), ("grad_spike", 31, True)]  # fmt: skip
    assert runs[1].summary["skipped_updates"] == runs[4].summary["skipped_updates"] == 3
    assert _same_run(runs[1].run_dir, runs[4].run_dir)


def test_a_train_side_divergence_rolls_back_at_the_next_read(stories, tmp_path, bad_batches):
    recoveries = {}
    for n in (1, 4):
        bad_batches(nan=[9, 10, 11])  # three skipped in a row: a divergence at step 11
        trainer = tiny_trainer(stories, tmp_path / f"n{n}", max_steps=14, eval_every=4, host_read_every=n)
        events = [r for r in read_metrics(trainer.fit().run_dir) if "event" in r]
        recoveries[n] = [(e["step"], e["restored_step"]) for e in events if e["event"] == "recovery"]
        assert [(e["event"], e["step"]) for e in events if e["event"] != "recovery"] == [
            ("nan", 9), ("nan", 10), ("nan", 11), ("divergence", 11)]  # fmt: skip
        assert events[-1]["event"] == "recovery"  # in the log after the step's own events
    assert recoveries == {1: [(11, 8)], 4: [(12, 8)]}
    # the roll-back cleared the device's spike windows with the monitor's: they hold the same steps since
    for row, history in enumerate((trainer.monitor.state.losses, trainer.monitor.state.norms)):
        assert trainer.device_guard.counts[row].item() == len(history) == 2
        assert trainer.device_guard.windows[row, -2:].tolist() == history


def test_a_run_stopped_mid_interval_resumes_as_the_uninterrupted_one(stories, tmp_path, bad_batches):
    # Stopped at step 7 with the roll-back its divergence wants still due (at the read of step 8), and at
    # step 30 with full spike windows, the spike of step 31 judged against them.
    cfg = dict(max_steps=34, eval_every=12, host_read_every=4)
    bad = dict(nan=[5, 6, 7], spike=[31])
    bad_batches(**bad)
    whole = train(tiny_config(stories, tmp_path / "whole", **cfg), quiet=True)
    assert [(e["event"], e["step"]) for e in whole.summary["events"] if e["event"] != "nan"] == [
        ("divergence", 7), ("recovery", 8), ("loss_spike", 31), ("grad_spike", 31)]  # fmt: skip
    bad_batches(**bad)
    split = tiny_config(stories, tmp_path / "split", **cfg)
    stopped = train(split, quiet=True, interrupt_after=7)
    assert stopped.interrupted and not any(e["event"] == "recovery" for e in stopped.summary["events"])
    assert train(split, resume=True, quiet=True, interrupt_after=30).summary["steps"] == 30
    resumed = train(split, resume=True, quiet=True)
    assert resumed.summary["skipped_updates"] == whole.summary["skipped_updates"] == 4
    assert _same_run(whole.run_dir, resumed.run_dir)


def test_the_device_decision_stands(stories, tmp_path, monkeypatch):
    trainer = tiny_trainer(stories, tmp_path / "run", max_steps=8, host_read_every=4)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    monkeypatch.setattr(trainer.device_guard, "judge", lambda loss, grad_norm: torch.ones((), dtype=torch.float32))
    for _ in range(2):
        trainer.train_step()
    trainer.read_steps()
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.monitor.skipped == 2 and trainer.monitor.events == []  # skipped, for no reason the host saw


def test_guarded_muon_runs_read_every_step(stories, tmp_path, capsys):
    trainer = tiny_trainer(stories, tmp_path / "muon", quiet=False, optimizer="muon", host_read_every=4)
    assert trainer.read_every == 1 and trainer.device_guard is None
    assert "--host-read-every 4: reading every step instead (a guarded run needs fused AdamW" in capsys.readouterr().out
    unguarded = tiny_trainer(stories, tmp_path / "unguarded", optimizer="muon", guard=False, host_read_every=4)
    assert unguarded.read_every == 4  # nothing to mask: every update is taken


def test_several_processes_read_every_step(stories, tmp_path, capsys):
    # they agree on stopping with an all-reduce each step, itself a host read
    trainer = tiny_trainer(stories, tmp_path / "run", quiet=False, host_read_every=4)
    assert trainer.read_every == 4
    trainer.cluster = Cluster(rank=0, world=2)
    assert trainer.host_read_interval() == 1
    assert "--host-read-every 4: reading every step instead (runs over several processes)" in capsys.readouterr().out


def test_a_run_reading_every_step_as_asked_is_told_nothing(stories, tmp_path, capsys):
    # the fall-back message is for a run that asked for more than 1 and cannot have it
    trainer = tiny_trainer(stories, tmp_path / "guarded", quiet=False, optimizer="muon")  # cannot mask an update
    trainer.cluster = Cluster(rank=0, world=2)  # nor read less often than every step
    assert trainer.host_read_interval() == 1
    assert "--host-read-every" not in capsys.readouterr().out


@pytest.mark.parametrize("value", [0, -3])
def test_a_read_interval_below_one_is_refused(value):
    with pytest.raises(UserError, match="^host_read_every .*at least 1"):
        TrainConfig(max_steps=1, host_read_every=value)


def test_a_run_saved_before_the_setting_existed_resumes_reading_every_step(stories, tmp_path, monkeypatch):
    # config.json and the checkpoint's settings as a tinylm without host_read_every wrote them: the resume
    # (config.json read back, as `tinylm train --resume` does) takes the default and trains the same run.
    from tinylm.cli import build_parser
    from tinylm.cli.settings import resume_config
    from tinylm.config import RunConfig

    whole = train(tiny_config(stories, tmp_path / "whole"), quiet=True)
    to_dict = RunConfig.to_dict

    def as_older_tinylm_saved_it(cfg):
        saved = to_dict(cfg)
        del saved["train"]["host_read_every"]
        return saved

    monkeypatch.setattr(RunConfig, "to_dict", as_older_tinylm_saved_it)
    assert train(tiny_config(stories, tmp_path / "split"), quiet=True, interrupt_after=6).interrupted
    monkeypatch.undo()
    assert "host_read_every" not in (tmp_path / "split" / "config.json").read_text()
    cfg = resume_config(build_parser().parse_args(["train", "--resume", str(tmp_path / "split")]))
    assert cfg.train.host_read_every == 1
    resumed = train(cfg, resume=True, quiet=True)
    assert resumed.summary["steps"] == 12 and _same_run(whole.run_dir, resumed.run_dir)
