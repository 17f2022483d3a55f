"""The training step reads from the device once: its loss sums and gradient norm in one transfer."""

from __future__ import annotations

import torch

from conftest import tiny_config
from tinylm.distributed import Cluster
from tinylm.train import build_trainer


def test_a_training_step_reads_the_device_once(stories, tmp_path, monkeypatch):
    cfg = tiny_config(stories, tmp_path / "run", max_steps=3)
    trainer = build_trainer(cfg, resume=False, quiet=True, cluster=Cluster(), device=torch.device("cpu"))
    reads = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: reads.append(_n) or _o(self))
    record = trainer.train_step()
    monkeypatch.undo()
    assert reads == ["tolist"]  # a GPU waits for its queue here only; before, twice (.tolist, then .item)
    assert record["train_loss"] > 0 and record["grad_norm"] > 0
