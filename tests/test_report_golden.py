"""The report of a fixed set of synthetic runs, byte for byte as the code before the report package wrote it.

tests/golden/ holds report.md, results.csv and results.json as written by report.py on main before it
was split (plots excluded; run directories written relative to the root). To regenerate after an
intended change of the report's text: `PYTHONPATH=src python tests/test_report_golden.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
FILES = ("report.md", "results.csv", "results.json")

GAP = "no divergence, tight train/val gap"


def _curve(values: list[float], steps: int, tokens_per_step: int = 4096) -> list[dict]:
    every = steps // (len(values) - 1)
    records = []
    for i, v in enumerate(values):
        step = i * every
        records.append({"step": step, "tokens": step * tokens_per_step, "train_loss": v + 0.05, "val_loss": v})
    return records


def _run(root: Path, path: str, phase: str, preset: str | None, curve: list, summary: dict, seed=1337, lr=1e-3):
    from tinylm.config import TrainConfig
    from tinylm.study.runner import PHASES, phase_config

    run_dir = root / path
    run_dir.mkdir(parents=True)
    cfg = phase_config(TrainConfig(max_steps=40, lr=lr), preset or "basic", PHASES[phase], seed, run_dir)
    cfg.preset = preset
    cfg.save(run_dir / "config.json")
    vals = [r["val_loss"] for r in curve if isinstance(r.get("val_loss"), float)]
    values = {
        "params": 7291776, "start_val_loss": vals[0], "best_val_loss": min(vals), "best_step": 40,
        "worst_val_loss": max(vals), "final_val_loss": vals[-1], "final_train_loss": vals[-1] + 0.05,
        "train_time_s": 120.0, "steps": 40, "tokens": 163840, "real_tokens": 163840, "utilisation": 1.0,
        "stability": {"label": "very stable", "reason": GAP, "train_val_gap": 0.02}, "events": [],
        "interrupted": False, "completed": True, "skipped_updates": 0,
    }  # fmt: skip
    values.update(summary)
    (run_dir / "summary.json").write_text(json.dumps(values))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    return run_dir


def build_runs(root: Path) -> None:
    """Runs that reach every branch of the report: seeds, settings outside the phases, old summaries,
    divergence, recovery, skipped updates, a run without a finite loss, three presets."""
    unstable = {"label": "unstable", "reason": "diverged at step 20", "train_val_gap": 0.7,
                "thresholds": {"gap_tight": 0.1, "gap_wide": 0.3, "retired_knob": 1}}  # fmt: skip
    events = [
        {"event": "divergence", "step": 20, "value": 61.2},
        {"event": "recovery", "step": 20, "lr_scale": 0.5},
        {"event": "divergence", "step": 30, "value": "nan"},
    ]
    _run(root, "basic/baseline", "baseline", "basic", _curve([47.55, 30.1, 34.56, 40.2, 38.0, 36.0], 40),
         {"best_step": 8, "stability": unstable, "events": events, "skipped_updates": 3, "train_time_s": 45.0})  # fmt: skip
    init = _run(root, "basic/init", "init", "basic", _curve([10.83, 6.05, 6.04, 6.03, 6.02, 6.01], 40),
                {"best_step": 40, "utilisation": 0.41, "train_time_s": 59.6})  # fmt: skip
    summary = json.loads((init / "summary.json").read_text())  # as the first released version wrote it
    del summary["skipped_updates"]
    summary["stability"] = {"label": "very stable", "reason": GAP}
    (init / "summary.json").write_text(json.dumps(summary))
    config = json.loads((init / "config.json").read_text())
    del config["train"]["compile"]
    (init / "config.json").write_text(json.dumps(config))
    moderate = {"label": "stable", "reason": "moderate train/val gap (+0.30)", "train_val_gap": 0.3}
    for k, (best, skipped) in enumerate([(5.5, 0), (5.71, 12)]):
        _run(root, f"basic/cosine-seed{k}", "cosine", "basic", _curve([10.83, 8.0, 6.5, best, best + 0.01], 40),
             {"best_step": 30, "utilisation": 0.43, "skipped_updates": skipped, "stability": moderate,
              "train_time_s": 130.5 + k}, seed=1337 + k)  # fmt: skip
    _run(root, "basic/packed-lr1", "packed", "basic", _curve([10.83, 8.0, 6.0, 5.4, 5.1], 40),
         {"train_time_s": 7300.0}, lr=1e-3)  # fmt: skip
    nan_curve = [{"step": 0, "tokens": 0, "val_loss": 10.83}, {"step": 10, "tokens": 40960, "val_loss": "nan"}]
    _run(root, "basic/packed-lr3", "packed", "basic", nan_curve,
         {"best_val_loss": None, "best_step": None, "worst_val_loss": None, "final_val_loss": "nan",
          "stability": {"label": "unstable", "reason": "NaN at step 10"}, "steps": 10}, lr=3e-3)  # fmt: skip

    big = {"params": 12417216, "train_time_s": 30.0}
    _run(root, "mid/baseline", "baseline", "mid", _curve([60.2, 20.0, 12.5, 12.4], 30), {**big, "best_step": 30})
    _run(root, "mid/packed", "packed", "mid", _curve([10.85, 13.0, 12.6, 12.95], 30),
         {**big, "params": 12417217, "best_step": 20, "stability": moderate})  # fmt: skip

    _run(root, "elsewhere/one", "init", None, _curve([10.9, 8.0, 7.5, 7.25], 30), {"best_step": 40})
    _run(root, "elsewhere/two", "cosine", None, _curve([10.9, 8.0, 7.4, 7.3], 30), {"best_step": 40})


def _relative(text: str, root: Path) -> str:
    return text.replace(json.dumps(str(root))[1:-1] + "/", "").replace(str(root) + "/", "")


def written(root: Path) -> dict[str, str]:
    from tinylm.report import write_report

    build_runs(root / "runs")
    write_report([root / "runs"], root / "out" / "report.md")
    return {name: _relative((root / "out" / name).read_text(), root / "runs") for name in FILES}


def test_the_report_of_fixed_runs_is_unchanged(tmp_path):
    for name, text in written(tmp_path).items():
        assert text == (GOLDEN / name).read_text(), name


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.mkdir(exist_ok=True)
        for name, text in written(Path(tmp)).items():
            (GOLDEN / name).write_text(text)
    print(f"wrote {', '.join(FILES)} to {GOLDEN}", file=sys.stderr)
