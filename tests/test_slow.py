"""Real-data checks (minutes on 2 cores): run with `pytest -m slow`."""

import pytest

from tinylm.config import RunConfig, TrainConfig, preset
from tinylm.train import train

pytestmark = pytest.mark.slow  # the TinyStories slice comes from the `tinystories` fixture (skips when absent)


def test_basic_preset_on_tinystories_learns_in_200_steps(tmp_path, tinystories):
    cfg = RunConfig(
        model=preset("basic"),
        train=TrainConfig(data=str(tinystories), max_steps=200, eval_every=50, out=str(tmp_path / "run")),
        preset="basic",
    )
    s = train(cfg, quiet=True).summary
    assert abs(s["start_val_loss"] - 10.825) < 0.15
    assert s["best_val_loss"] < s["start_val_loss"] - 5.0
