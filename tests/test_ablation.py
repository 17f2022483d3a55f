import csv
import json
import re

import pytest

import tinylm.train
from tinylm.config import RunConfig, TrainConfig
from tinylm.errors import UserError
from tinylm.report import write_report
from tinylm.study.runner import PHASES, ablate, parse_phases


def base(stories) -> TrainConfig:
    return TrainConfig(
        data=str(stories), max_steps=6, eval_every=3, batch_size=2, eval_tokens=256, lr=3e-3, device="cpu"
    )


@pytest.fixture(scope="module")
def ablation(stories, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    ablate(["tiny"], base(stories), out, parse_phases(None), quiet=True)
    write_report([out], out / "report.md")
    return out


def _config(out, phase) -> RunConfig:
    return RunConfig.load(out / "tiny" / phase / "config.json")


def _summary(out, phase) -> dict:
    return json.loads((out / "tiny" / phase / "summary.json").read_text())


def test_four_phases_differ_only_in_init_schedule_and_batching(ablation):
    configs = {name: _config(ablation, name) for name in PHASES}
    # one folder per phase; the study's claim and outcome files beside them are hidden
    assert set(p.name for p in (ablation / "tiny").iterdir() if not p.name.startswith(".")) == set(PHASES)
    for name, cfg in configs.items():
        phase = PHASES[name]
        assert (cfg.train.init, cfg.train.schedule, cfg.train.batching) == (phase.init, phase.schedule, phase.batching)
    reference = configs["baseline"].to_dict()
    for cfg in configs.values():
        d = cfg.to_dict()
        for key in ("init", "schedule", "batching", "out"):
            d["train"].pop(key)
            reference["train"].pop(key, None)
        assert d == reference  # same seed, budget, data, model


def test_phases_get_equal_token_slot_budgets(ablation):
    slots = {name: _summary(ablation, name)["tokens"] for name in PHASES}
    assert len(set(slots.values())) == 1
    assert _summary(ablation, "baseline")["start_val_loss"] > 15  # naive init starts far above ln V
    assert abs(_summary(ablation, "init")["start_val_loss"] - 10.825) < 0.15
    assert _summary(ablation, "packed")["utilisation"] == 1.0
    assert _summary(ablation, "cosine")["utilisation"] < 1.0


def _table(report: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after ``heading``."""
    lines = report.split(heading, 1)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first + 2 :]:  # skip the header and separator
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_report_numbers_equal_the_summaries(ablation):
    report = (ablation / "report.md").read_text()
    timeline = _table(report, "### Timeline of improvements")
    assert [row[0] for row in timeline] == list(PHASES)
    for row in timeline:
        start, best = re.match(r"([\d.]+) → \*\*([\d.]+)\*\*", row[2]).groups()
        s = _summary(ablation, row[0])
        assert float(start) == round(s["start_val_loss_doc"], 2)  # ranked by the per-document loss (default)
        assert float(best) == round(s["best_val_loss_doc"], 2)
    metrics = dict((r[0], r[1]) for r in _table(report, "### Final metrics"))
    summaries = [_summary(ablation, name) for name in PHASES]
    assert float(metrics["Worst val loss"]) == round(max(s["worst_val_loss_doc"] for s in summaries), 2)
    assert float(metrics["Best val loss"].split("**")[1]) == round(min(s["best_val_loss_doc"] for s in summaries), 2)
    comparison = _table(report, "## Final comparison table")
    assert comparison[0][0] == "**tiny**"
    assert comparison[0][1] == f"{summaries[0]['params'] / 1e6:.2f}M"
    assert float(comparison[0][2]) == round(max(s["worst_val_loss_doc"] for s in summaries), 2)
    assert "These effects are unreplicated: no step can be named the largest contributor" in report  # one seed
    assert (ablation / "report-seed-tiny-val-loss.png").stat().st_size > 1000  # named by the study
    assert (ablation / "report-seed-best-loss.png").stat().st_size > 1000


def test_results_csv_and_json_have_a_row_per_run(ablation):
    rows = list(csv.DictReader(open(ablation / "results.csv")))
    assert [r["phase"] for r in rows] == list(PHASES)
    as_json = json.loads((ablation / "results.json").read_text())
    for row, j in zip(rows, as_json):
        assert float(row["best_val_loss"]) == j["best_val_loss"] == _summary(ablation, row["phase"])["best_val_loss"]


def test_interrupted_ablation_resumes_and_skips_finished_phases(stories, tmp_path, monkeypatch):
    real_train = tinylm.train.train

    def interrupt_cosine(cfg, resume=False, quiet=False, interrupt_after=None):
        if cfg.train.schedule == "cosine" and cfg.train.batching == "padded" and not resume:
            interrupt_after = 3
        return real_train(cfg, resume=resume, quiet=quiet, interrupt_after=interrupt_after)

    monkeypatch.setattr(tinylm.train, "train", interrupt_cosine)
    with pytest.raises(KeyboardInterrupt):
        ablate(["tiny"], base(stories), tmp_path, parse_phases(None), quiet=True)
    assert not (tmp_path / "tiny" / "packed").exists()
    finished = {n: (tmp_path / "tiny" / n / "summary.json").stat().st_mtime_ns for n in ("baseline", "init")}

    ablate(["tiny"], base(stories), tmp_path, parse_phases(None), quiet=True)
    for name, stamp in finished.items():
        assert (tmp_path / "tiny" / name / "summary.json").stat().st_mtime_ns == stamp  # skipped
    resumed = _summary(tmp_path, "cosine")
    assert resumed["completed"] and resumed["steps"] == 6
    assert _summary(tmp_path, "packed")["completed"]


def test_rerun_with_other_settings_is_refused(stories, tmp_path, monkeypatch):
    real_train = tinylm.train.train
    monkeypatch.setattr(tinylm.train, "train", lambda cfg, **kw: real_train(cfg, **{**kw, "interrupt_after": 2}))
    with pytest.raises(KeyboardInterrupt):
        ablate(["tiny"], base(stories), tmp_path, parse_phases("init"), quiet=True)
    monkeypatch.undo()
    other = base(stories)
    other.lr = 1e-2
    with pytest.raises(UserError, match="other settings"):
        ablate(["tiny"], other, tmp_path, parse_phases("init"), quiet=True)


def test_phase_subset_and_unknown_phase():
    assert [p.name for p in parse_phases("packed,init")] == ["packed", "init"]
    with pytest.raises(UserError, match="unknown phase"):
        parse_phases("init,warmup")


def test_several_seeds_are_reported_as_mean_and_std(stories, tmp_path):
    settings = base(stories)
    settings.max_steps = 2
    settings.eval_every = 2
    ablate(["tiny"], settings, tmp_path, parse_phases("init"), seeds=2, quiet=True)
    runs = sorted(p.name for p in (tmp_path / "tiny").iterdir() if not p.name.startswith("."))  # not the claims
    assert runs == ["init-seed0", "init-seed1"]
    report = write_report([tmp_path], tmp_path / "report.md").read_text()
    best = [json.loads((tmp_path / "tiny" / f"init-seed{k}" / "summary.json").read_text())["best_val_loss_doc"]
            for k in range(2)]  # fmt: skip
    import statistics

    expected = f"{statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f}"
    assert f"**{expected}**" in report


def test_doc_mask_applies_to_the_packed_phase_only(tmp_path):
    from tinylm.study.runner import phase_config

    base_cfg = TrainConfig(doc_mask=True, max_steps=1)
    masks = {name: phase_config(base_cfg, "tiny", phase, 1, tmp_path).train.doc_mask for name, phase in PHASES.items()}
    assert masks == {"baseline": False, "init": False, "cosine": False, "packed": True}


def test_a_damaged_summary_is_one_line_for_ablate_and_report(stories, tmp_path):
    from tinylm.cli import main

    run_dir = tmp_path / "tiny" / "init"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"completed": tr')  # torn by a kill mid-write
    with pytest.raises(UserError, match=r"init/summary.json is damaged"):
        ablate(["tiny"], base(stories), tmp_path, parse_phases("init"), quiet=True)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report.md")]) == 2
