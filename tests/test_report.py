"""The report's claims, checked on small synthetic run directories (no training)."""

import csv
import json

import pytest

from tinylm.cli import main
from tinylm.config import TrainConfig
from tinylm.errors import UserError
from tinylm.report import find_runs, group, write_report
from tinylm.stability import StabilityMonitor
from tinylm.study.runner import PHASES, phase_config

VERY_STABLE = {"label": "very stable", "reason": "no divergence, tight train/val gap", "train_val_gap": 0.02}


def make_run(root, name, phase="packed", preset="basic", seed=1337, best=6.0, **summary):
    """A finished run directory as `tinylm train` leaves it: config.json, summary.json, metrics.jsonl."""
    run_dir = root / preset / name
    run_dir.mkdir(parents=True)
    lr = summary.pop("lr", 1e-3)
    cfg = phase_config(TrainConfig(max_steps=40, lr=lr), preset, PHASES[phase], seed, run_dir)
    cfg.save(run_dir / "config.json")
    start = 47.55 if phase == "baseline" else 10.83
    values = {
        "params": 7291776, "start_val_loss": start, "best_val_loss": best, "best_step": 40, "worst_val_loss": start,
        "final_val_loss": best, "final_train_loss": best - 0.02, "train_time_s": 120.0, "steps": 40,
        "tokens": 163840, "real_tokens": 163840, "utilisation": 1.0, "stability": VERY_STABLE, "events": [],
        "interrupted": False, "completed": True, "skipped_updates": 0,
    }  # fmt: skip
    values.update(summary)
    (run_dir / "summary.json").write_text(json.dumps(values))
    records = [{"step": 0, "tokens": 0, "val_loss": start}, {"step": 40, "tokens": 163840, "val_loss": best}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def report_of(root) -> str:
    return write_report([root], root / "report.md").read_text()


def test_an_effect_names_every_setting_that_changed(tmp_path):
    make_run(tmp_path, "baseline", "baseline", best=34.56)
    make_run(tmp_path, "packed", "packed", best=6.88)
    report = report_of(tmp_path)
    changes = "init naive→scaled, schedule constant→cosine, batching padded→packed"
    assert f"**packed** against **baseline** ({changes}): best val loss 34.56 → 6.88, -27.680 over 1 paired seed: " \
           "unreplicated" in report  # fmt: skip
    assert "single contributor" not in report  # one seed: no verdict, no contributor
    assert "Packed sequences" not in report


def test_a_clear_gain_of_several_settings_at_once_credits_none_of_them(tmp_path):
    for k, (before, after) in enumerate([(34.5, 6.88), (34.6, 6.9), (34.58, 6.86)]):
        make_run(tmp_path, f"baseline-seed{k}", "baseline", seed=1337 + k, best=before)
        make_run(tmp_path, f"packed-seed{k}", "packed", seed=1337 + k, best=after)
    report = report_of(tmp_path)
    assert "single contributor" not in report
    assert "which changed 3 settings at once: these runs cannot say which of them gave it" in report


def test_one_setting_changed_is_named_the_single_contributor(tmp_path):
    for k, (init, cosine, packed) in enumerate([(6.02, 6.99, 6.88), (6.03, 7.0, 6.90), (6.01, 6.98, 6.86)]):
        make_run(tmp_path, f"init-seed{k}", "init", seed=1337 + k, best=init)
        make_run(tmp_path, f"cosine-seed{k}", "cosine", seed=1337 + k, best=cosine)
        make_run(tmp_path, f"packed-seed{k}", "packed", seed=1337 + k, best=packed)
    report = report_of(tmp_path)
    # packed - cosine per seed: -0.11, -0.10, -0.12: mean -0.110, sd 0.01, t(0.975, 2) 4.3027 -> ±0.025
    assert "The largest single contributor here was **packed** (batching padded→packed, -0.110 ± 0.025 best val loss)" \
        in report  # fmt: skip
    assert "**cosine** against **init** (schedule constant→cosine): best val loss 6.02 → 6.99, +0.970 ± 0.000 over " \
           "3 paired seeds: regression" in report  # fmt: skip
    ranked = report.split("### What changed the result")[1]
    assert ranked.index("**packed** against") < ranked.index("**cosine** against")  # improvements first


def test_the_contributor_is_named_from_the_measured_effects_not_the_markdown(tmp_path):
    from tinylm.report import measure_effects

    make_run(tmp_path, "init", "init", best=6.02)
    make_run(tmp_path, "cosine", "cosine", best=5.5)
    (arms,) = group(find_runs([tmp_path])).values()
    (effect,) = measure_effects(arms)
    assert (effect.arm.name, effect.before.name, effect.changes) == ("cosine", "init", ["schedule constant→cosine"])
    assert effect.d_best == pytest.approx(-0.52)


def test_other_seeds_are_shown_but_not_counted_as_a_changed_setting(tmp_path):
    make_run(tmp_path, "init", "init", best=6.02)
    make_run(tmp_path, "cosine-seed0", "cosine", best=5.5)
    make_run(tmp_path, "cosine-seed1", "cosine", seed=1338, best=5.7)
    report = report_of(tmp_path)
    # only seed 1337 ran in both arms: the effect is its difference, 5.5 - 6.02, and seed 1338 is named unpaired
    assert "**cosine** against **init** (schedule constant→cosine, seed 1337→1337+1338): best val loss 6.02 → 5.60, " \
           "-0.520 over 1 paired seed (unpaired: seed 1338): unreplicated" in report  # fmt: skip
    assert "single contributor" not in report


def test_runs_with_different_settings_are_not_pooled_as_seeds(tmp_path):
    make_run(tmp_path, "packed-lr1", lr=1e-3, best=6.0)
    make_run(tmp_path, "packed-lr3", lr=3e-3, best=9.0)
    make_run(tmp_path, "packed-lr3-seed1", lr=3e-3, seed=1338, best=8.0)
    report = report_of(tmp_path)
    assert "7.67" not in report  # the mean over the three runs mixes two learning rates
    assert "| packed (lr 0.001) |" in report
    assert "| packed (lr 0.003) | init scaled, schedule cosine, batching packed" not in report
    assert "**8.50 ± 0.71**" in report  # the two seeds at lr 3e-3 are pooled, and only they
    assert "**packed (lr 0.003)** against **packed (lr 0.001)** (lr 0.001→0.003, seed 1337→1337+1338)" in report
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["arm"] for r in rows] == ["packed (lr 0.001)", "packed (lr 0.003)", "packed (lr 0.003)"]


def test_seeds_pool_whatever_the_run_folder(tmp_path):
    make_run(tmp_path, "a", seed=1, best=6.0)
    make_run(tmp_path, "b", seed=2, best=6.2)
    (arms,) = group(find_runs([tmp_path])).values()
    assert [(a.name, len(a.runs)) for a in arms] == [("packed", 2)]


def test_an_interrupted_run_is_not_pooled_as_a_seed(tmp_path):
    # Ctrl-C writes a summary too: a partial run's best loss would enter the arm's mean and its paired effect.
    make_run(tmp_path, "init", "init", best=6.0)
    make_run(tmp_path, "init-seed1", "init", seed=1338, best=6.0)
    make_run(tmp_path, "cosine", "cosine", best=5.5)
    make_run(tmp_path, "cosine-seed1", "cosine", seed=1338, best=9.0, steps=12, interrupted=True, completed=False)
    report = report_of(tmp_path)
    assert "best val loss 6.00 → 5.50, -0.500 over 1 paired seed (unpaired: seed 1338): unreplicated" in report
    assert "9.00" not in report and "7.25" not in report  # neither the partial run's loss nor the mean with it
    assert f"Interrupted, left out (resume them with tinylm train --resume): {tmp_path / 'basic' / 'cosine-seed1'}." \
        in report  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["arm"], r["seed"]) for r in rows] == [("init", "1337"), ("init", "1338"), ("cosine", "1337")]


def test_only_interrupted_runs_are_a_one_line_error(tmp_path):
    make_run(tmp_path, "cosine", "cosine", interrupted=True, completed=False)
    with pytest.raises(UserError, match="interrupted before the end of their budget"):
        report_of(tmp_path)


def test_the_comparison_table_names_the_metric_where_presets_are_ranked_by_different_ones(tmp_path):
    # basic's runs have the per-document loss, mid's (older) only the packed one: each preset is ranked by its own,
    # so the table across presets must not set the two side by side as one "best loss".
    doc = {"start_val_loss_doc": 11.0, "best_val_loss_doc": 6.3, "worst_val_loss_doc": 11.0, "final_val_loss_doc": 6.3}
    basic = make_run(tmp_path, "packed", best=6.0, **doc)
    curve = [{"step": 0, "tokens": 0, "val_loss": 10.83, "val_loss_doc": 11.0},
             {"step": 40, "tokens": 163840, "val_loss": 6.0, "val_loss_doc": 6.3}]  # fmt: skip
    (basic / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    make_run(tmp_path, "packed", preset="mid", best=5.0)
    comparison = report_of(tmp_path).split("## Final comparison table")[1]
    assert "| **basic** (per-document loss) | 7.29M | 11.00 | **6.30** |" in comparison
    assert "| **mid** (packed loss) | 7.29M | 10.83 | **5.00** |" in comparison


def test_the_stability_row_is_the_least_stable_arm(tmp_path):
    wide = {"label": "ok", "reason": "wide train/val gap (-0.90)", "train_val_gap": -0.9}
    make_run(tmp_path, "baseline", "baseline", best=34.56, stability=wide)
    make_run(tmp_path, "init", "init", best=6.02)
    report = report_of(tmp_path)
    assert "Very stable" not in report.split("### Final metrics")[1]
    assert "| Stability | 🟡 Ok (baseline: wide train/val gap (-0.90)) |" in report
    assert report.rstrip().splitlines()[-3].endswith("| 🟡 Ok (baseline: wide train/val gap (-0.90)) |")


def test_the_stability_row_names_every_arm_at_the_worst_label(tmp_path):
    spikes = {"label": "ok", "reason": "1 spike", "train_val_gap": 0.1}
    wide = {"label": "ok", "reason": "wide train/val gap (+0.87)", "train_val_gap": 0.87}
    make_run(tmp_path, "baseline", "baseline", best=6.04, stability=spikes)
    make_run(tmp_path, "init", "init", best=3.95, stability=wide)
    make_run(tmp_path, "cosine", "cosine", best=3.99)
    expected = "🟡 Ok (baseline: 1 spike; init: wide train/val gap (+0.87))"
    assert f"| Stability | {expected} |" in report_of(tmp_path)


def test_every_arm_alike_says_so(tmp_path):
    make_run(tmp_path, "init", "init", best=6.02)
    make_run(tmp_path, "cosine", "cosine", best=6.99)
    assert "| Stability | 🟢 Very stable (every arm: no divergence, tight train/val gap) |" in report_of(tmp_path)


@pytest.mark.parametrize("gap", [0.05, 0.15, -0.19, 0.25, -0.45, 0.6, -0.9])
def test_gap_wording_and_label_use_the_same_limits(gap):
    from tinylm.stability import gap_wording

    monitor = StabilityMonitor(guard=True)
    monitor.state.last_train_loss = 3.0
    label = monitor.report(3.0 + gap)["label"]
    assert {"tight": "very stable", "moderate": "stable", "wide": "ok"}[gap_wording(gap)] == label


def test_the_notes_word_the_gap_as_the_label_does(tmp_path):
    make_run(tmp_path, "baseline", "baseline", best=24.1, stability={**VERY_STABLE, "train_val_gap": -0.13})
    assert "tight train/val gap (-0.13)" in report_of(tmp_path)


def test_skipped_updates_are_shown_per_run(tmp_path):
    make_run(tmp_path, "init", "init", best=6.02)
    for k, skipped in enumerate([0, 21, 0]):
        make_run(tmp_path, f"packed-seed{k}", seed=1337 + k, best=6.5, skipped_updates=skipped)
    report = report_of(tmp_path)
    assert "| Skipped updates | init: 0; packed: 0, 21, 0 |" in report
    assert "seed 1338 skipped 21 of 40 updates: trained on 21 fewer updates than its peers" in report
    assert "skipped updates 0 → 7" in report
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["skipped_updates"] for r in rows] == ["0", "0", "21", "0"]
    assert [r["skipped_updates"] for r in json.loads((tmp_path / "results.json").read_text())] == [0, 0, 21, 0]


def test_runs_from_before_skipped_updates_and_compile_still_report(tmp_path, capsys):
    """A run directory as the first released version wrote it."""
    old = make_run(tmp_path, "init", "init", best=6.02)
    make_run(tmp_path, "packed", "packed", best=5.7)
    summary = json.loads((old / "summary.json").read_text())
    del summary["skipped_updates"]
    summary["stability"] = {"label": "very stable", "reason": "no divergence, tight train/val gap"}  # no gap saved
    (old / "summary.json").write_text(json.dumps(summary))
    config = json.loads((old / "config.json").read_text())
    del config["train"]["compile"]
    (old / "config.json").write_text(json.dumps(config))

    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report.md")]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| Skipped updates | init: unknown; packed: 0 |" in report
    assert "**packed** against **init** (schedule constant→cosine, batching padded→packed)" in report
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["skipped_updates"] for r in rows] == ["", "0"]


def test_a_run_without_its_config_is_a_one_line_error(tmp_path):
    run_dir = make_run(tmp_path, "init", "init")
    (run_dir / "config.json").write_text("{")
    with pytest.raises(UserError, match="config.json"):
        find_runs([tmp_path])


def test_a_run_without_a_config_is_named(tmp_path):
    run_dir = make_run(tmp_path, "init", "init")
    (run_dir / "config.json").unlink()
    with pytest.raises(UserError, match=r"not a run directory \(no config.json\)"):
        find_runs([tmp_path])


def test_one_log_scale_rule_for_every_plot():
    from tinylm.report.plots import wants_log_scale

    assert not wants_log_scale([], [])
    assert not wants_log_scale([2.0, 3.0], [10.0, 4.0])  # a factor of five exactly stays linear
    assert wants_log_scale([2.0], [10.5])
    assert wants_log_scale([0.0], [1.0])  # a zero loss is not a division by zero
