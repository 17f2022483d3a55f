"""Studies through executors: several runs at once, claims, failures, kills, growing a study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tinylm.train
from tinylm.cli import main
from tinylm.study.local import LocalExecutor
from tinylm.study.runner import StudyFailed, run_study
from tinylm.study.spec import load_study
from tinylm.study.status import study_status

STUDY = """
name: pair
base: {preset: tiny, schedule: cosine, warmup_steps: 1}
mode: each
steps:
  - {name: qk, change: {qk_norm: true}}
"""
TIMING = {"elapsed_s", "tokens_per_s", "time", "step_time_s", "wall_s", "train_time_s", "eval_time_s"}


@pytest.fixture
def study(tmp_path):
    path = tmp_path / "pair.yaml"
    path.write_text(STUDY)
    return load_study(str(path))


def flags(stories, **train) -> dict:
    values = dict(data=str(stories), tokenizer="bpe:512", batch_size=2, eval_every=2, eval_tokens=256, lr=3e-3,
                  device="cpu", max_steps=4)  # fmt: skip
    values.update(train)
    return {"train": values}


def losses(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its clock readings."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING and "time" not in k} for r in records]


def config(run_dir: Path) -> dict:
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["train"].pop("out")
    return cfg


def test_two_jobs_train_the_same_runs_as_one_after_another(study, stories, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the two jobs gets on two cores
    try:
        alone = run_study(study, ["tiny"], flags(stories), tmp_path / "alone", seeds=2, quiet=True)
    finally:
        torch.set_num_threads(threads)
    both = run_study(study, ["tiny"], flags(stories), tmp_path / "both", seeds=2, quiet=True,
                     executor=LocalExecutor(jobs=2, threads=1, quiet=True))  # fmt: skip
    assert [d.relative_to(tmp_path / "both") for d in both] == [d.relative_to(tmp_path / "alone") for d in alone]
    for a, b in zip(alone, both):
        assert config(a) == config(b)
        assert losses(a) == losses(b) and len(losses(a)) > 2
        assert (b / "train.log").stat().st_size > 0  # its own output, not the terminal's
    assert json.loads((tmp_path / "both" / "study.json").read_text())["executor"]["jobs"] == 2


def test_a_failed_run_does_not_stop_the_others_and_a_rerun_retries_only_it(study, stories, tmp_path, monkeypatch):
    real_train = tinylm.train.train

    def broken_qk(cfg, **kw):
        if cfg.model.qk_norm:
            raise RuntimeError("boom\nsecond line")
        return real_train(cfg, **kw)

    monkeypatch.setattr(tinylm.train, "train", broken_qk)
    with pytest.raises(StudyFailed) as failed:
        run_study(study, ["tiny"], flags(stories), tmp_path, quiet=True)
    assert [(o.key, o.error) for o in failed.value.failed] == [("tiny/qk", "RuntimeError: boom")]
    assert "tiny/qk: RuntimeError: boom" in str(failed.value)
    base_stamp = (tmp_path / "tiny" / "base" / "summary.json").stat().st_mtime_ns
    status = study_status(tmp_path)
    assert "tiny/qk: RuntimeError: boom" in status
    assert [line.split()[2:] for line in status.splitlines() if line.startswith("tiny ")] == [
        ["1", "0", "0", "0"], ["0", "0", "1", "0"]]  # fmt: skip

    monkeypatch.undo()
    run_study(study, ["tiny"], flags(stories), tmp_path, quiet=True)
    assert (tmp_path / "tiny" / "base" / "summary.json").stat().st_mtime_ns == base_stamp  # not trained again
    assert json.loads((tmp_path / "tiny" / "qk" / "summary.json").read_text())["completed"]
    assert "every run is done" in study_status(tmp_path)


def test_more_seeds_train_only_the_new_ones(study, stories, tmp_path):
    run_study(study, ["tiny"], flags(stories), tmp_path, seeds=2, quiet=True)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny").glob("*/summary.json")}
    assert len(stamps) == 4
    run_study(study, ["tiny"], flags(stories), tmp_path, seeds=3, quiet=True)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert sorted(p.parent.name for p in (tmp_path / "tiny").glob("*/summary.json")) == [
        "base-seed0", "base-seed1", "base-seed2", "qk-seed0", "qk-seed1", "qk-seed2"]  # fmt: skip
    manifest = json.loads((tmp_path / "study.json").read_text())
    assert manifest["seeds"] == 3
    assert all(len(arm["runs"]["tiny"]) == 3 for arm in manifest["arms"])


def test_a_step_added_to_the_study_trains_only_its_runs(study, stories, tmp_path):
    run_study(study, ["tiny"], flags(stories), tmp_path, quiet=True)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "tiny").glob("*/summary.json")}
    grown = tmp_path / "grown.yaml"
    grown.write_text(STUDY + "  - {name: rms, change: {norm: rmsnorm}}\n")
    run_study(load_study(str(grown)), ["tiny"], flags(stories), tmp_path, quiet=True)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert (tmp_path / "tiny" / "rms" / "summary.json").exists()
    assert [a["name"] for a in json.loads((tmp_path / "study.json").read_text())["arms"]] == ["base", "qk", "rms"]


def test_bad_launcher_input_is_one_line(tmp_path, capsys):
    common = ["ablate", "--preset", "tiny", "--max-steps", "1", "--device", "cpu"]
    assert main([*common, "--jobs", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*common, "--runs-per-gpu", "2", "--out", str(tmp_path / "b")]) == 2
        assert "--runs-per-gpu needs CUDA" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([*common, "--out", str(blocker / "study")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinylm: error: --out") and len(err.strip().splitlines()) == 1


# --- several processes ------------------------------------------------------------------------


def ablate_argv(stories, study_file: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "tinylm", "ablate", "--study", str(study_file), "--out", str(out), "--seeds", "2",
            "--data", str(stories), "--tokenizer", "bpe:512", "--batch-size", "2", "--eval-tokens", "256",
            "--device", "cpu", *more]  # fmt: skip


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}


@pytest.mark.slow
def test_two_launchers_at_once_train_each_run_once(stories, tmp_path):
    study_file = tmp_path / "pair.yaml"
    study_file.write_text(STUDY)
    argv = ablate_argv(stories, study_file, tmp_path / "out", "--max-steps", "6", "--eval-every", "3")
    launchers = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
                 for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs
    said = "".join(o for o, _ in outputs)
    for key in ("tiny/base-seed0", "tiny/base-seed1", "tiny/qk-seed0", "tiny/qk-seed1"):
        assert said.count(f"[{key}] training") == 1, said  # trained by one launcher, skipped by the other
    assert "resuming" not in said, said  # nor taken over midway by the other (a resume from its checkpoint)


@pytest.mark.slow
def test_a_killed_study_resumes_each_run_and_reports_as_an_uninterrupted_one(stories, tmp_path):
    study_file = tmp_path / "pair.yaml"
    study_file.write_text(STUDY)
    more = ("--max-steps", "60", "--eval-every", "10", "--checkpoint-every", "10", "--jobs", "2", "--quiet")
    whole = subprocess.run(ablate_argv(stories, study_file, tmp_path / "whole", *more), env=env(), timeout=900)
    assert whole.returncode == 0
    out = tmp_path / "killed"
    launcher = subprocess.Popen(ablate_argv(stories, study_file, out, *more), env=env(), start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(out.glob("tiny/*/checkpoint.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and its workers, at once
    launcher.wait()
    time.sleep(0.5)
    checkpointed = {p.parent.name for p in out.glob("tiny/*/checkpoint.json")}
    unfinished = {p.parent.name for p in out.glob("tiny/*/checkpoint.json") if not (p.parent / "summary.json").exists()}
    assert checkpointed
    assert subprocess.run(ablate_argv(stories, study_file, out, *more), env=env(), timeout=900).returncode == 0
    for name in unfinished:
        rerun = (out / "tiny" / name / "train.log").read_text().split("--- tinylm study worker")[-1]
        assert "resuming" in rerun and "training:" not in rerun, rerun  # none restarted from step 0
    for name in ("base-seed0", "base-seed1", "qk-seed0", "qk-seed1"):
        steps = [r["step"] for r in losses(out / "tiny" / name) if "train_loss" in r]
        assert steps == sorted(set(steps)), name  # each step trained (and logged) once
    rows = {r["run_dir"]: r["best_val_loss"] for r in json.loads((out / "results.json").read_text())}
    expected = {r["run_dir"]: r["best_val_loss"] for r in json.loads((tmp_path / "whole" / "results.json").read_text())}
    assert {Path(k).name: v for k, v in rows.items()} == {Path(k).name: v for k, v in expected.items()}


def test_seed_zero_keeps_its_folder_when_a_one_seed_study_grows(study, stories, tmp_path):
    from tinylm.study.plan import Plan

    one = Plan(study, ["tiny"], flags(stories), tmp_path, study.arms, seeds=1)
    assert one.run_dir("tiny", study.arms[0], 0) == tmp_path / "tiny" / "base"
    (tmp_path / "tiny" / "base").mkdir(parents=True)
    (tmp_path / "tiny" / "base" / "config.json").write_text("{}")  # a run of the one-seed study
    two = Plan(study, ["tiny"], flags(stories), tmp_path, study.arms, seeds=2)
    assert [two.run_dir("tiny", study.arms[0], k).name for k in (0, 1)] == ["base", "base-seed1"]
    assert [two.run_dir("tiny", study.arms[1], k).name for k in (0, 1)] == ["qk-seed0", "qk-seed1"]


def test_ablate_lists_failed_runs_and_exits_non_zero(stories, tmp_path, monkeypatch, capsys):
    real_train = tinylm.train.train
    monkeypatch.setattr(tinylm.train, "train", lambda cfg, **kw: 1 / 0 if cfg.model.qk_norm else real_train(cfg, **kw))
    study_file = tmp_path / "pair.yaml"
    study_file.write_text(STUDY)
    argv = ["ablate", "--study", str(study_file), "--out", str(tmp_path / "out"), "--data", str(stories),
            "--tokenizer", "bpe:512", "--batch-size", "2", "--eval-tokens", "256", "--max-steps", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "2 runs, " in captured.out and "tokens per run" in captured.out  # said before it started
    assert "report of the finished runs written to" in captured.out
    assert captured.err.splitlines()[-1] == "  tiny/qk: ZeroDivisionError: division by zero"


def test_a_run_failed_for_its_lr_trial_shows_as_failed_in_status(tmp_path):
    """The launcher fails an arm's run, untrained, when its LR trial failed: tinylm status (which reads the
    study folder alone) must say failed with that reason, not pending."""
    from tinylm.study.executor import Task
    from tinylm.study.local import Scheduler
    from tinylm.study.status import run_state

    run = Task("tiny/base-seed0", "tiny", "base", "run", ("trials/tiny/base-lr0.5",))
    outcomes = []
    Scheduler(LocalExecutor(jobs=1, quiet=True), tmp_path, [run], outcomes.append).run()
    assert [(o.key, o.status) for o in outcomes] == [("tiny/base-seed0", "failed")]
    assert run_state(tmp_path, "tiny/base-seed0") == ("failed", "its LR trial trials/tiny/base-lr0.5 failed")


def test_a_finished_run_gets_no_worker_process_on_a_rerun(tmp_path, monkeypatch):
    """With --jobs 2 a rerun of a finished study starts no process per finished run (each would load torch
    for seconds to say done, and those seconds would count in the ETA as a run's training time)."""
    from tinylm.study.executor import Task
    from tinylm.study.local import Scheduler

    (tmp_path / "tiny" / "base").mkdir(parents=True)
    (tmp_path / "tiny" / "base" / "summary.json").write_text(json.dumps({"completed": True}))
    spawned = []
    monkeypatch.setattr(Scheduler, "spawn", lambda self, task: spawned.append(task.key))
    outcomes = []
    scheduler = Scheduler(LocalExecutor(jobs=2, threads=1, quiet=True), tmp_path,
                          [Task("tiny/base", "tiny", "base", "run")], outcomes.append)  # fmt: skip
    scheduler.run()
    assert spawned == [] and [(o.key, o.status) for o in outcomes] == [("tiny/base", "done")]
    assert scheduler.eta_s() is None  # no run trained here, so no time to go by


def test_a_worker_that_dies_without_an_outcome_shows_as_failed_in_status(tmp_path, monkeypatch):
    """A worker killed before it wrote its outcome (out of memory, SIGKILL) fails in the launcher's list, and
    tinylm status says failed too, with the same line, not pending."""
    import tinylm.study.local as local
    from tinylm.study.executor import Task
    from tinylm.study.status import run_state

    monkeypatch.setattr(local.sys, "executable", "false")  # a worker that ends with code 1 and writes nothing
    outcomes = []
    local.Scheduler(LocalExecutor(jobs=2, threads=1, quiet=True), tmp_path,
                    [Task("tiny/base", "tiny", "base", "run")], outcomes.append).run()  # fmt: skip
    [outcome] = outcomes
    assert outcome.status == "failed" and "exit code 1" in outcome.error
    assert run_state(tmp_path, "tiny/base") == ("failed", outcome.error)


def test_a_run_another_process_holds_gets_no_worker_process_until_it_is_free(tmp_path, monkeypatch):
    """With --jobs 2, a run another launcher trains is tried again later without a process per try (each
    would load torch for seconds, every 2 s, beside the training), and found done once the other finished."""
    import threading

    from tinylm.paths import DirLock
    from tinylm.study.executor import Task, claim_path
    from tinylm.study.local import Scheduler

    run_dir = tmp_path / "tiny" / "base"
    run_dir.mkdir(parents=True)
    other = DirLock(claim_path(tmp_path, "tiny/base"), file=True)
    other.acquire()

    def other_finishes():
        time.sleep(0.5)
        (run_dir / "summary.json").write_text(json.dumps({"completed": True}))
        other.release()

    spawned = []
    monkeypatch.setattr(Scheduler, "spawn", lambda self, task: spawned.append(task.key))
    monkeypatch.setattr("tinylm.study.local.RETRY_BUSY_S", 0.2)
    outcomes = []
    finisher = threading.Thread(target=other_finishes)
    finisher.start()
    Scheduler(LocalExecutor(jobs=2, threads=1, quiet=True), tmp_path, [Task("tiny/base", "tiny", "base", "run")],
              outcomes.append).run()  # fmt: skip
    finisher.join()
    assert spawned == [] and [(o.key, o.status) for o in outcomes] == [("tiny/base", "done")]
