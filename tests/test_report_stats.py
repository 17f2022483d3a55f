"""The report's statistics (paired differences, intervals, verdicts, noise floor, contributor) and its
reading of study.json, checked by hand-computed numbers on fixture run directories (no training)."""

import csv
import dataclasses
import json
import math

import pytest

from tinylm.cli import main
from tinylm.config import ModelConfig, RunConfig, TrainConfig
from tinylm.errors import UserError
from tinylm.report import load_studies, write_report
from tinylm.report.stats import (
    Interval,
    clear_leader,
    half_width,
    pair_by_seed,
    seed_plan,
    seeds_needed,
    spread,
    t_interval,
    verdict,
)

STABLE = {"label": "very stable", "reason": "no divergence, tight train/val gap", "train_val_gap": 0.02}


def fixture_run(out, rel, seed, best, doc=None, lr=1e-3, study=None, **model):
    """A finished run as a study leaves it under OUT: config.json, summary.json (with the per-document keys
    when doc is given), metrics.jsonl with both validation curves."""
    run_dir = out / rel
    run_dir.mkdir(parents=True)
    train = TrainConfig(max_steps=40, lr=lr, seed=seed, init="scaled", schedule="cosine", batching="packed")
    RunConfig(model=dataclasses.replace(ModelConfig(), **model), train=train, preset="basic").save(
        run_dir / "config.json"
    )
    summary = {
        "params": 7291776, "start_val_loss": 10.8, "best_val_loss": best, "best_step": 40, "worst_val_loss": 10.8,
        "final_val_loss": best, "train_time_s": 60.0, "steps": 40, "tokens": 163840, "real_tokens": 163840,
        "utilisation": 1.0, "stability": STABLE, "events": [], "skipped_updates": 0,
    }  # fmt: skip
    if doc is not None:
        summary.update(start_val_loss_doc=11.0, best_val_loss_doc=doc, worst_val_loss_doc=11.0, final_val_loss_doc=doc,
                       flops_per_token=4.4e7, train_flops=4.4e7 * 163840)  # fmt: skip
    if study is not None:
        summary["study"] = study
    (run_dir / "summary.json").write_text(json.dumps(summary))
    records = [{"step": s, "tokens": s * 4096, "val_loss": v, **({"val_loss_doc": v + 0.2} if doc else {})}
               for s, v in ((0, 10.8), (20, (10.8 + best) / 2), (40, best))]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def write_study(out, arms, mode="cumulative", rank_by="val_loss_doc", seeds=3):
    """OUT/study.json as the study runner writes it, for arms given as (name, change, compare_to, bests,
    doc bests); runs are OUT/basic/<arm>-seed<k> with train seed 1337 + k, their model changed by change."""
    entries = []
    for name, change, compare_to, bests, docs in arms:
        runs = []
        for k, best in enumerate(bests):
            rel = f"basic/{name}-seed{k}"
            tag = {"name": "demo", "arm": name, "lr_factor": None}
            fixture_run(out, rel, 1337 + k, best, docs[k] if docs else None, study=tag, **change)
            runs.append(rel)
        entries.append({"name": name, "note": f"note of {name}", "key_change": f"key {name}", "change": change,
                        "compare_to": compare_to, "runs": {"basic": runs}, "lr": {"basic": 0.001}, "trials": {}})  # fmt: skip
    info = {"study": "demo", "mode": mode, "rank_by": rank_by, "seeds": seeds, "budget": {"tokens": 163840},
            "lr_tune": None, "lr_tune_share": 0.2, "presets": ["basic"], "arms": entries}  # fmt: skip
    (out / "study.json").write_text(json.dumps(info))
    return info


# --- the arithmetic ---------------------------------------------------------------------------------------


def test_the_interval_matches_a_hand_computed_example():
    iv = t_interval([-0.10, -0.12, -0.08])
    # mean -0.10, sd 0.02, t(0.975, 2) = 4.3027: half-width 4.3027 * 0.02 / sqrt(3) = 0.04968
    assert iv.mean == pytest.approx(-0.10)
    assert iv.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert iv.half_width == pytest.approx(0.0497, abs=5e-5)
    assert (iv.low, iv.high, iv.n) == (pytest.approx(-0.1497, abs=5e-5), pytest.approx(-0.0503, abs=5e-5), 3)


def test_the_half_width_is_students_t_on_n_minus_1_degrees_with_the_sample_sd():
    from scipy.stats import t

    # sd 0.02 over 3 seeds: t(0.975, 2) = 4.3027 -> 0.04968; z (1.96) would give 0.02263, t on 3 degrees 0.03675
    assert half_width(0.02, 3) == pytest.approx(0.049682, rel=1e-4)
    assert half_width(0.02, 3) == pytest.approx(float(t.ppf(0.975, 2)) * 0.02 / math.sqrt(3), rel=1e-12)
    plan = seed_plan([-0.10, -0.12, -0.08])
    assert plan.sd == pytest.approx(0.02)  # the sample sd (n - 1); the population sd would be 0.01633
    assert plan.detectable == pytest.approx(0.049682, rel=1e-4) == t_interval([-0.10, -0.12, -0.08]).half_width


@pytest.mark.parametrize("sd, target, needed", [
    (0.02, 0.10, 3),   # z: 2 seeds; t on n - 1 degrees: 2 give ±0.180, 3 give ±0.0497
    (0.02, 0.03, 5),   # z: 2; t on n degrees: 4; t on n - 1: 4 give ±0.0318, 5 give ±0.0248
    (0.02, 0.01, 18),  # z: 16; 17 seeds give ±0.01028, 18 give ±0.00995
    (0.01, 0.01, 7),
    (0.0, 0.01, 2),    # no spread at all: the fewest seeds an interval has
])  # fmt: skip
def test_the_seeds_needed_are_the_fewest_whose_t_half_width_is_below_the_target(sd, target, needed):
    from scipy.stats import t

    assert seeds_needed(sd, target) == needed

    def exact(n):  # scipy's t, independently of the code under test
        return float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)

    assert exact(needed) < target and (needed == 2 or exact(needed - 1) >= target)


def test_the_seed_plan_targets_the_measured_effect_or_the_half_width_asked_for():
    diffs = [-0.10, -0.12, -0.08]  # mean -0.10, sd 0.02
    assert (seed_plan(diffs).target, seed_plan(diffs).needed) == (pytest.approx(0.10), 3)
    assert (seed_plan(diffs, 0.01).target, seed_plan(diffs, 0.01).needed) == (0.01, 18)
    one, none = seed_plan([-0.1]), seed_plan([])
    assert (one.sd, one.detectable, one.needed) == (None, None, None) and "one paired seed" in one.reason
    assert none.needed is None and none.reason == "no seed in common"
    flat = seed_plan([0.1, -0.1])  # an effect of exactly 0 has no size to resolve
    assert flat.sd == pytest.approx(0.1414, abs=1e-4) and flat.needed is None and "effect is 0" in flat.reason
    with pytest.raises(ValueError):
        seeds_needed(0.02, 0.0)


def test_the_effects_table_says_how_many_seeds_each_effect_needs(tmp_path, capsys):
    three_arms(tmp_path)
    report = write_report([tmp_path], tmp_path / "report.md").read_text()
    assert "| Paired sd | Smallest detectable | Seeds for half-width < \\|Δ\\| |" in report
    # rope - base: -0.10, -0.12, -0.08 (sd 0.020, ±0.050): 3 seeds resolve 0.10. swiglu - rope: 0.05, 0.03, 0.04
    assert "| rope | base | 3 paired seeds | -0.100 ± 0.050 | improvement | 0.020 | 0.050 | 3 (have 3) |" in report
    assert "| swiglu | rope | 3 paired seeds | +0.040 ± 0.025 | regression | 0.010 | 0.025 | 3 (have 3) |" in report
    out = tmp_path / "target" / "report.md"
    assert main(["report", str(tmp_path), "--out", str(out), "--target-halfwidth", "0.01"]) == 0
    report = out.read_text()
    assert "Seeds for half-width < 0.01 |" in report
    assert "| improvement | 0.020 | 0.050 | 18 (15 more) |" in report
    assert "| regression | 0.010 | 0.025 | 7 (4 more) |" in report
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["report", str(tmp_path), "--out", str(out), "--target-halfwidth", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--target-halfwidth: must be a positive number, got 0" in err


def test_the_verdict_follows_the_interval():
    assert verdict(t_interval([-0.10, -0.12, -0.08])) == "improvement"
    assert verdict(t_interval([0.10, 0.12, 0.08])) == "regression"
    assert verdict(t_interval([-0.10, 0.05, -0.02])) == "within noise (±0.186)"  # sd 0.0751 · 4.3027 / √3
    assert verdict(Interval(-0.5, 0.5, 3)) == "within noise (±0.500)"  # touching zero is not excluding it
    assert verdict(t_interval([-0.3])) == "unreplicated"
    assert verdict(Interval(-0.3, None, 0)) == "unreplicated"


def test_pairing_by_seed_leaves_out_unpaired_seeds():
    pairing = pair_by_seed({1337: 6.0, 1338: 6.2, 1339: 6.1}, {1338: 6.0, 1339: 5.8, 1340: 1.0})
    assert pairing.diffs == {1338: pytest.approx(-0.2), 1339: pytest.approx(-0.3)}
    assert pairing.unpaired == [1337, 1340]


def test_the_noise_floor_is_the_spread_across_seeds():
    s = spread([5.5, 5.7, 5.6])
    assert (s.n, s.mean, s.std, s.low, s.high) == (3, pytest.approx(5.6), pytest.approx(0.1), 5.5, 5.7)
    assert spread([5.5]).std is None
    assert spread([]) is None


def test_a_contributor_is_named_only_when_clear_of_every_other_effect():
    big, small = Interval(-0.5, 0.1, 3), Interval(-0.1, 0.05, 3)
    assert clear_leader([small, big]) == 1
    assert clear_leader([small, Interval(-0.5, 0.45, 3)]) is None  # overlaps the smaller effect
    assert clear_leader([big, Interval(-0.1, None, 1)]) is None  # an unreplicated effect cannot be cleared
    assert clear_leader([Interval(-0.5, 0.6, 3), small]) is None  # the largest is not itself beyond noise
    assert clear_leader([]) is None


# --- study.json and the report -------------------------------------------------------------------------------


def three_arms(out, mode="cumulative", **study):
    """base; rope (-0.10 ± 0.05 per-document against base); swiglu (+0.04 ± 0.025 against rope, -0.06 ± 0.066
    against base)."""
    base, rope, swiglu = "base", "rope", "swiglu"
    return write_study(out, [
        (base, {}, None, [6.0, 6.1, 6.2], [6.30, 6.40, 6.50]),
        (rope, {"position": "rope"}, base, [5.9, 6.0, 6.1], [6.20, 6.28, 6.42]),
        (swiglu, {"position": "rope", "mlp": "swiglu"}, rope if mode == "cumulative" else base,
         [5.95, 5.95, 6.15], [6.25, 6.31, 6.46]),
    ], mode=mode, **study)  # fmt: skip


def test_study_json_names_and_orders_the_arms_and_trials_are_not_arms(tmp_path):
    three_arms(tmp_path)
    info = json.loads((tmp_path / "study.json").read_text())
    info["arms"] = [info["arms"][0], info["arms"][2], info["arms"][1]]  # the study's order, not the recipes'
    info["arms"][0]["trials"] = {"basic": {"0.5": "trials/basic/base-lr0.5", "2": "trials/basic/base-lr2"}}
    (tmp_path / "study.json").write_text(json.dumps(info))
    fixture_run(tmp_path, "trials/basic/base-lr0.5", 1337, 7.5, 7.7, lr=5e-4)  # "2" is not finished yet

    (study,) = load_studies([tmp_path])
    arms = study.groups["basic"]
    assert [(a.name, a.compare_to, len(a.runs)) for a in arms] == [("base", None, 3), ("swiglu", "rope", 3),
                                                                   ("rope", "base", 3)]  # fmt: skip
    report = write_report([tmp_path], tmp_path / "out" / "report.md").read_text()
    assert "## Study `demo`" in report
    assert "| swiglu | key swiglu |" in report and "note of swiglu" in report
    assert "| base | 7.700 | not run | 0.001 |" in report  # the trial's loss, in its own table
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert len(rows) == 9 and not any("trials" in r["run_dir"] for r in rows)
    assert {r["study"] for r in rows} == {"demo"}


def test_the_trials_table_ranks_an_arms_trials_by_one_loss_as_the_lr_pick_does(tmp_path):
    # One trial finished by an older tinylm lacks the per-document loss: the pick ranked all of that arm's trials
    # by the packed one (ablation._ranked_losses), while the table showed the other's per-document loss beside a
    # "diverged" for the trial that merely lacked it.
    three_arms(tmp_path)
    info = json.loads((tmp_path / "study.json").read_text())
    info["arms"][0]["trials"] = {"basic": {"0.5": "trials/basic/base-lr0.5", "2": "trials/basic/base-lr2"}}
    (tmp_path / "study.json").write_text(json.dumps(info))
    fixture_run(tmp_path, "trials/basic/base-lr0.5", 1337, 7.5, 7.7, lr=5e-4)
    fixture_run(tmp_path, "trials/basic/base-lr2", 1337, 7.4, lr=2e-3)  # no per-document loss

    report = write_report([tmp_path], tmp_path / "out" / "report.md").read_text()
    assert "| base (packed loss) | 7.500 | 7.400 | 0.001 |" in report
    assert "diverged" not in report


def test_an_interrupted_run_of_a_study_is_left_out_as_unfinished(tmp_path):
    """Ctrl-C writes a summary too; a partial run's best loss must not enter the paired effects."""
    three_arms(tmp_path)
    summary_path = tmp_path / "basic" / "rope-seed2" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(interrupted=True, completed=False, best_val_loss_doc=1.0)  # far off: would swamp the effect
    summary_path.write_text(json.dumps(summary))

    (study,) = load_studies([tmp_path])
    rope = study.groups["basic"][1]
    assert rope.seeds == [1337, 1338] and study.unfinished == ["basic/rope-seed2"]
    report = write_report([tmp_path], tmp_path / "report.md").read_text()
    assert "Not finished yet, left out: basic/rope-seed2." in report
    assert "| rope | base | 2 paired seeds (unpaired: seed 1339) | -0.110 ± 0.127 | within noise (±0.127) |" in report


def test_an_interrupted_run_beside_a_study_is_named_too(tmp_path):
    """`tinylm report STUDY RUN`, RUN stopped by Ctrl-C: with no finished run outside the study it was
    dropped without a word (the README says interrupted runs are left out and named, in a study or not)."""
    three_arms(tmp_path / "study")
    loose = fixture_run(tmp_path, "loose/cosine", 1337, 5.0, 5.2)
    summary = json.loads((loose / "summary.json").read_text())
    (loose / "summary.json").write_text(json.dumps({**summary, "interrupted": True, "completed": False}))

    report = write_report([tmp_path / "study", loose], tmp_path / "out" / "report.md").read_text()
    assert f"Interrupted, left out (resume them with tinylm train --resume): {loose}." in report
    assert report.count("## Final comparison table") == 1  # the study's; none for runs that are all left out
    assert len(list(csv.DictReader(open(tmp_path / "out" / "results.csv")))) == 9  # the study's runs alone
    assert not (tmp_path / "out" / "report-best-loss.png").exists()  # no empty plot for them either


def test_effects_intervals_verdicts_and_noise_floor_in_the_report(tmp_path):
    three_arms(tmp_path)
    report = write_report([tmp_path], tmp_path / "report.md").read_text()
    assert "Ranked by the per-document best validation loss" in report
    # rope - base, per-document: -0.10, -0.12, -0.08 -> -0.100 ± 0.050
    assert "| rope | base | 3 paired seeds | -0.100 ± 0.050 | improvement |" in report
    # swiglu - rope: +0.05, +0.03, +0.04 -> +0.040 ± 0.025 (sd 0.01)
    assert "| swiglu | rope | 3 paired seeds | +0.040 ± 0.025 | regression |" in report
    assert "| base | 3 | 6.400 | 0.100 | 6.300–6.500 |" in report  # the noise floor
    assert "The largest single contributor here was **rope** (position learned→rope, -0.100 ± 0.050" in report
    assert (tmp_path / "report-demo-basic-effects.png").stat().st_size > 0
    assert (tmp_path / "report-demo-basic-val-loss.png").stat().st_size > 0


def test_two_folders_of_one_study_name_keep_their_own_plots(tmp_path):
    """`tinylm report runs/modern-a runs/modern-b`: both studies are named demo; each section must show its
    own plots, not the second's written over the first's."""
    three_arms(tmp_path / "a")
    three_arms(tmp_path / "b", mode="each")
    report = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report.md").read_text()
    effect_plots = [line for line in report.splitlines() if line.startswith("![effect of each step")]
    assert effect_plots == ["![effect of each step, basic](report-demo-basic-effects.png)",
                            "![effect of each step, basic](report-demo-2-basic-effects.png)"]  # fmt: skip
    assert all((tmp_path / name).stat().st_size > 0 for name in ("report-demo-basic-effects.png",
                                                                "report-demo-2-basic-effects.png"))  # fmt: skip


def test_mode_each_compares_every_step_to_the_base(tmp_path):
    three_arms(tmp_path, mode="each")
    report = write_report([tmp_path], tmp_path / "report.md").read_text()
    # swiglu - base: -0.05, -0.09, -0.04 -> -0.060 ± 0.066 (sd 0.0265): overlaps rope's interval
    assert "| swiglu | base | 3 paired seeds | -0.060 ± 0.066 | within noise (±0.066) |" in report
    assert "No single contributor is clear: the largest gain, **rope** (-0.100 ± 0.050), is not clear of **swiglu**" \
        in report  # fmt: skip


def test_rank_by_packed_and_the_fallback_for_runs_without_per_document_losses(tmp_path):
    three_arms(tmp_path, rank_by="val_loss")
    report = write_report([tmp_path], tmp_path / "report.md").read_text()
    assert "Ranked by the packed best validation loss." in report
    assert "| rope | base | 3 paired seeds | -0.100 ± 0.000 | improvement |" in report  # 5.9-6.0, 6.0-6.1, 6.1-6.2

    # the flag overrides the study's own rank_by
    report = write_report([tmp_path], tmp_path / "doc.md", rank_by="doc").read_text()
    assert "| rope | base | 3 paired seeds | -0.100 ± 0.050 | improvement |" in report

    old = tmp_path / "basic" / "base-seed0" / "summary.json"  # one run from before per-document validation
    summary = json.loads(old.read_text())
    for key in ("start_val_loss_doc", "best_val_loss_doc", "worst_val_loss_doc", "final_val_loss_doc"):
        del summary[key]
    old.write_text(json.dumps(summary))
    report = write_report([tmp_path], tmp_path / "fallback.md", rank_by="doc").read_text()
    assert "Ranked by the packed validation loss: 1 of 9 runs lack the per-document one" in report
    assert "### Effects (packed best val loss" in report


def test_one_seed_is_unreplicated_and_carries_no_verdict_words(tmp_path):
    write_study(tmp_path, [("base", {}, None, [6.0], [6.3]), ("rope", {"position": "rope"}, "base", [5.0], [5.3])],
                seeds=1)  # fmt: skip
    report = write_report([tmp_path], tmp_path / "report.md").read_text()
    assert "| rope | base | 1 paired seed | -1.000 | unreplicated | n/a | n/a | n/a (one paired seed" in report
    effects = report.split("### Effects")[1]
    for word in ("improvement", "regression", "within noise", "single contributor"):
        assert word not in effects
    assert "These effects are unreplicated: no step can be named the largest contributor" in report


def test_results_gain_the_study_columns(tmp_path):
    (tmp_path / "study").mkdir()
    three_arms(tmp_path / "study")
    fixture_run(tmp_path / "loose", "basic/packed", 1337, 6.5)  # an old run: no per-document loss, no FLOPs
    paths = [str(tmp_path / "study"), str(tmp_path / "loose")]
    assert main(["report", *paths, "--out", str(tmp_path / "out" / "report.md"), "--rank-by", "doc"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    for column in ("study", "arm", "lr", "lr_factor", "flops_per_token", "train_flops", "best_val_loss_doc",
                   "final_val_loss_doc", "best_val_loss", "final_val_loss"):  # fmt: skip
        assert column in rows[0]
    first = rows[0]
    assert (first["study"], first["arm"], first["lr"], first["lr_factor"]) == ("demo", "base", "0.001", "")
    assert float(first["train_flops"]) == pytest.approx(4.4e7 * 163840)
    assert (first["best_val_loss_doc"], first["final_val_loss_doc"]) == ("6.3", "6.3")
    old = [r for r in rows if "loose" in r["run_dir"]]
    assert len(old) == 1 and old[0]["study"] == "" and old[0]["best_val_loss_doc"] == "" and old[0]["train_flops"] == ""
    loaded = json.loads((tmp_path / "out" / "results.json").read_text())
    assert loaded[-1]["best_val_loss_doc"] is None


def test_results_name_runs_relative_to_their_study_folder_not_the_machine(tmp_path):
    three_arms(tmp_path / "study")  # study.json lists runs as basic/<arm>-seed<k> under an absolute folder
    fixture_run(tmp_path / "loose", "basic/packed", 1337, 6.5)
    write_report([tmp_path / "study", tmp_path / "loose"], tmp_path / "out" / "report.md")
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    in_study = [r["run_dir"] for r in rows if r["study"] == "demo"]
    assert in_study[0] == "basic/base-seed0" and all(d.startswith("basic/") for d in in_study)
    assert [r["run_dir"] for r in rows if r["study"] is None] == ["loose/basic/packed"]  # from the paths' shared folder
    csv_dirs = [r["run_dir"] for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))]
    assert not any(str(tmp_path) in d for d in csv_dirs)


def test_a_damaged_study_json_is_one_line_naming_it(tmp_path):
    three_arms(tmp_path)
    info = json.loads((tmp_path / "study.json").read_text())
    (tmp_path / "study.json").write_text(json.dumps({**info, "rank_by": "val_acc"}))
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 2
    (tmp_path / "study.json").write_text("{")
    with pytest.raises(UserError, match=r"study\.json is damaged \(no list of named arms\)"):
        load_studies([tmp_path])


def test_no_contributor_when_no_interval_lies_below_zero(tmp_path):
    write_study(tmp_path, [("base", {}, None, [6.0, 6.1, 6.2], [6.3, 6.4, 6.5]),
                           ("rope", {"position": "rope"}, "base", [5.9, 6.1, 6.2], [6.2, 6.45, 6.48])])  # fmt: skip
    report = write_report([tmp_path], tmp_path / "report.md").read_text()
    assert "| rope | base | 3 paired seeds | -0.023 ± 0.186 | within noise (±0.186) |" in report
    assert "No step's interval lies wholly below zero: none improved the best loss beyond noise." in report
