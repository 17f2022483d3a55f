"""Real-data checks (minutes on 2 cores): run with `pytest -m slow`."""

from pathlib import Path

import pytest

from tinylm.config import RunConfig, TrainConfig, preset
from tinylm.train import train

TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories-lc"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not TINYSTORIES.exists(), reason="../shared/data/tinystories-lc is not here"),
]


def test_basic_preset_on_tinystories_learns_in_200_steps(tmp_path):
    cfg = RunConfig(
        model=preset("basic"),
        train=TrainConfig(data=str(TINYSTORIES), max_steps=200, eval_every=50, out=str(tmp_path / "run")),
        preset="basic",
    )
    s = train(cfg, quiet=True).summary
    assert abs(s["start_val_loss"] - 10.825) < 0.15
    assert s["best_val_loss"] < s["start_val_loss"] - 5.0
