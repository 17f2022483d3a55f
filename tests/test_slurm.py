"""--launcher slurm (tinylm.study.slurm): its settings, its one-line errors, how it submits and follows
tasks, and the requeue of a task stopped by its time limit. The fast tests fake Slurm's commands with
small scripts on PATH; the slow one runs a study on a real Slurm cluster (scripts/slurm_cluster.sh)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tinylm.cli.flags import Parser, add_settings_flags
from tinylm.errors import UserError
from tinylm.study import slurm
from tinylm.study.executor import TASKS_FILE, Outcome, Task, outcome_path
from tinylm.trainer import StopFlag

ROOT = Path(__file__).resolve().parent.parent


def flags(*argv: str) -> argparse.Namespace:
    parser = Parser(prog="tinylm ablate")
    slurm.add_flags(parser, add_settings_flags)
    return parser.parse_args(list(argv))


def fake_commands(tmp_path: Path, monkeypatch, **scripts: str) -> Path:
    """A PATH holding only these commands (bash scripts), so the real Slurm is out of reach; every
    call is appended to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f'#!/bin/bash\necho "{name} $*" >> {tmp_path}/calls.log\n{body}\n')
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    for tool in ("bash", "sleep", "cat"):  # what the scripts themselves run
        (bin_dir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bin_dir))
    return tmp_path / "calls.log"


SLURM_OK = {name: "exit 0" for name in ("sbatch", "squeue", "scontrol", "srun")}


# --- settings ----------------------------------------------------------------------------------


def test_flags_win_over_the_launch_block_and_sbatch_options_merge():
    launch = {"slurm": {"partition": "cpu", "time": 30, "sbatch": {"qos": "low", "constraint": "a100"}}}
    args = flags("--slurm-time", "90", "--slurm-gpus-per-task", "1", "--slurm-sbatch", "qos=high",
                 "--slurm-sbatch", "exclusive=")  # fmt: skip
    options = slurm.read_options(args, launch)
    assert (options.partition, options.time, options.gpus_per_task) == ("cpu", 90, 1)
    assert options.sbatch == {"qos": "high", "constraint": "a100", "exclusive": ""}


def test_options_become_submitit_parameters():
    options = slurm.SlurmOptions(partition="gpu", time=2, cpus_per_task=4, mem_gb=1.5, account="lab",
                                 sbatch={"mail_type": "END"})  # fmt: skip
    params = slurm.read_options(None, {"slurm": {"max_parallel": 3}}).submitit_parameters("x")
    assert params["array_parallelism"] == 3 and params["time"] == 60
    params = options.submitit_parameters("tinylm-study")
    assert params["partition"] == "gpu" and params["cpus_per_task"] == 4 and params["account"] == "lab"
    assert params["mem"] == "1536MB" and params["job_name"] == "tinylm-study"
    assert params["signal_delay_s"] == 30  # a quarter of a 2-minute limit, not submitit's 90 s
    assert params["additional_parameters"] == {"mail-type": "END"}
    assert "gpus_per_task" not in params  # unset: Slurm's default, not a request for 0 GPUs


@pytest.mark.parametrize(
    ("argv", "launch", "message"),
    [
        (["--slurm-time", "0"], None, "--slurm-time must be at least 1, got 0"),
        (["--slurm-sbatch", "qos"], None, "--slurm-sbatch takes KEY=VALUE"),
        ([], {"slurm": {"tme": 5}}, "launch: slurm: unknown setting(s): tme"),
        ([], {"slurm": {"time": "soon"}}, "launch: slurm: time must be a number, got 'soon'"),
        ([], {"slurm": {"sbatch": ["qos=high"]}}, "launch: slurm: sbatch must map sbatch option names to values"),
    ],
)
def test_bad_settings_are_one_line_naming_the_flag_or_the_key(argv, launch, message):
    with pytest.raises(UserError) as e:
        slurm.read_options(flags(*argv), launch)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_flag_value_is_argparses_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        flags("--slurm-cpus-per-task", "two")
    assert e.value.code == 2
    assert "--slurm-cpus-per-task" in capsys.readouterr().err


LAUNCH_STUDY = """
name: pair
base: {preset: tiny}
mode: each
steps:
  - {name: qk, change: {qk_norm: true}}
"""


def test_a_study_files_launch_block_is_read_and_checked(tmp_path):
    from tinylm.study.spec import load_study

    path = tmp_path / "study.yaml"
    path.write_text(LAUNCH_STUDY + "launch: {launcher: slurm, slurm: {partition: gpu, time: 120}}\n")
    study = load_study(str(path))
    assert study.launch == {"launcher": "slurm", "slurm": {"partition": "gpu", "time": 120}}
    assert "launch" not in study.to_dict()  # where runs train does not make the study another one
    assert slurm.read_options(flags("--slurm-time", "30"), study.launch).partition == "gpu"
    for block, message in [
        ("{launcher: pbs}", "launch.launcher must be one of local, slurm, got 'pbs'"),
        ("{slurm: {partion: gpu}}", "launch: slurm: unknown setting(s): partion"),
        ("{jobs: 2}", "launch has unknown key(s) jobs; it holds launcher and slurm"),
        ("slurm", "launch must be a mapping"),
    ]:
        path.write_text(LAUNCH_STUDY + f"launch: {block}\n")
        with pytest.raises(UserError) as e:
            load_study(str(path))
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_the_launch_block_chooses_slurm_and_the_flag_wins(tmp_path, monkeypatch, capsys):
    """launch: {launcher: slurm} makes `tinylm ablate` use Slurm (here: missing, so it says so);
    --launcher local over it trains here."""
    from tinylm.cli import main

    path = tmp_path / "study.yaml"
    path.write_text(LAUNCH_STUDY + "launch: {launcher: slurm, slurm: {time: 5}}\n")
    fake_commands(tmp_path, monkeypatch, squeue="exit 0")
    assert main(["ablate", "--study", str(path), "--max-steps", "2", "--out", str(tmp_path / "a")]) == 2
    assert "--launcher slurm needs Slurm's commands" in capsys.readouterr().err
    calls = []
    import tinylm.study.local as local

    monkeypatch.setattr(local, "make_executor", lambda args, **kw: calls.append(kw) or (_ for _ in ()).throw(
        UserError("local chosen")))  # fmt: skip
    assert main(["ablate", "--study", str(path), "--max-steps", "2", "--out", str(tmp_path / "b"),
                 "--launcher", "local"]) == 2  # fmt: skip
    assert "local chosen" in capsys.readouterr().err and calls == [{}]


# --- is there a cluster? -----------------------------------------------------------------------


def test_without_sbatch_on_path_the_launcher_says_so(tmp_path, monkeypatch):
    fake_commands(tmp_path, monkeypatch, squeue="exit 0", scontrol="exit 0", srun="exit 0")
    with pytest.raises(UserError, match="needs Slurm's commands, and sbatch is not on PATH"):
        slurm.make_executor(flags())


def test_without_submitit_the_launcher_names_the_extra(monkeypatch):
    real = slurm.importlib.util.find_spec
    monkeypatch.setattr(slurm.importlib.util, "find_spec", lambda name: None if name == "submitit" else real(name))
    with pytest.raises(UserError, match=r"needs the submitit package: pip install 'tinylm\[slurm\]'"):
        slurm.make_executor(flags())


def test_a_controller_that_does_not_answer_is_one_line(tmp_path, monkeypatch):
    down = 'echo "slurm_load_jobs error: Unable to contact slurm controller (connect failure)" >&2; exit 1'
    fake_commands(tmp_path, monkeypatch, **{**SLURM_OK, "squeue": down})
    with pytest.raises(UserError) as e:
        slurm.make_executor(flags())
    assert str(e.value) == ("--launcher slurm: the Slurm controller does not answer (squeue: slurm_load_jobs error: "
                            "Unable to contact slurm controller (connect failure)); check that the cluster is up "
                            "with: sinfo")  # fmt: skip


def test_a_controller_that_hangs_is_one_line(tmp_path, monkeypatch):
    fake_commands(tmp_path, monkeypatch, **{**SLURM_OK, "squeue": "sleep 5"})
    with pytest.raises(UserError, match="did not answer within 0.5 s"):
        slurm.check_cluster(timeout_s=0.5)


def test_ablate_with_launcher_slurm_and_no_sbatch_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from tinylm.cli import main

    fake_commands(tmp_path, monkeypatch, squeue="exit 0")
    out = tmp_path / "study"
    assert main(["ablate", "--preset", "tiny", "--max-steps", "2", "--out", str(out), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tinylm: error: --launcher slurm needs Slurm's commands, and sbatch, scontrol, srun are not on "
                   "PATH; run tinylm on a machine of the cluster (a login node)"]  # fmt: skip
    assert not out.exists()


def test_a_cluster_that_answers_gives_the_executor(tmp_path, monkeypatch):
    calls = fake_commands(tmp_path, monkeypatch, **SLURM_OK)
    executor = slurm.make_executor(flags("--slurm-partition", "debug"))
    assert executor.describe()["partition"] == "debug" and executor.describe()["name"] == "slurm"
    assert calls.read_text().startswith("squeue -h -u ")


# --- the task's side -----------------------------------------------------------------------------


def test_a_task_that_cannot_use_the_study_folder_fails_with_one_line(tmp_path, capsys):
    """A node that does not share OUT finds no tasks.json there: the task exits 2 saying why."""
    with pytest.raises(SystemExit) as e:
        slurm.run_task(str(tmp_path / "not-shared"), "tiny/base", ["tiny/base"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinylm: error: the study folder ")
    assert "must be on a filesystem every node shares and can write" in err[0]


def test_a_read_only_study_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / TASKS_FILE).write_text("{}")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(slurm.tempfile, "TemporaryFile", refuse)  # root writes anywhere: make the write fail
    with pytest.raises(UserError, match=r"cannot be written here \(Permission denied\)"):
        slurm.check_shared(tmp_path)


def test_sigusr2_stops_the_run_and_the_task_requeues_itself(tmp_path, monkeypatch):
    """Slurm's warning before the time limit becomes the stop a run checkpoints on, then a requeue."""
    calls = fake_commands(tmp_path, monkeypatch, scontrol="exit 0")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    stop, requeue = StopFlag(), slurm._RequeueOnTimeout(requeues=2)
    with stop.installed(), requeue.installed():
        os.kill(os.getpid(), signal.SIGUSR2)
    assert stop.requested and requeue.timed_out
    requeue.after_stop("tiny/base")
    assert calls.read_text().splitlines() == ["scontrol requeue 41_3"]


def test_no_requeue_after_a_cancel_or_past_the_requeue_limit(tmp_path, monkeypatch, capsys):
    calls = fake_commands(tmp_path, monkeypatch, scontrol="exit 0")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    slurm._RequeueOnTimeout(requeues=2).after_stop("tiny/base")  # SIGTERM alone: scancel or pre-emption
    assert "resumes from its checkpoint when requeued (scontrol requeue 41_3)" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    timed_out = slurm._RequeueOnTimeout(requeues=2)
    timed_out.timed_out = True
    timed_out.after_stop("tiny/base")
    assert "reached its time limit 3 times; give it more with --slurm-time" in capsys.readouterr().out
    assert not calls.exists()


# --- the launcher's side -------------------------------------------------------------------------


class FakeJob:
    def __init__(self, job_id: str, folder: Path):
        self.job_id = job_id
        self.paths = argparse.Namespace(stdout=folder / f"{job_id}_0_log.out")


class FakeSubmitit:
    """submitit.SlurmExecutor's two calls the launcher makes, recorded; arrays numbered from 100."""

    arrays: list[tuple[dict, list[str]]] = []

    def __init__(self, folder, max_num_timeout):
        self.folder, self.params = Path(folder), {}

    def update_parameters(self, **params):
        self.params = params

    def map_array(self, fn, outs, keys, launches, requeues):
        array = 100 + len(FakeSubmitit.arrays)
        FakeSubmitit.arrays.append((dict(self.params), list(keys)))
        assert fn is slurm.run_task and set(launches[0]) >= set(keys)
        return [FakeJob(f"{array}_{i}", self.folder) for i in range(len(keys))]


def test_trials_go_first_and_each_arms_runs_wait_for_its_own_trials(tmp_path, monkeypatch):
    import submitit

    FakeSubmitit.arrays = []
    monkeypatch.setattr(submitit, "SlurmExecutor", FakeSubmitit)
    tasks = [Task("trials/tiny/a-lr0.5", "tiny", "a", "trial"), Task("trials/tiny/a-lr1", "tiny", "a", "trial"),
             Task("trials/tiny/b-lr0.5", "tiny", "b", "trial"), Task("trials/tiny/b-lr1", "tiny", "b", "trial")]
    tasks += [Task(f"tiny/{arm}-seed{k}", "tiny", arm, "run", (f"trials/tiny/{arm}-lr0.5", f"trials/tiny/{arm}-lr1"))
              for arm in "ab" for k in range(2)]  # fmt: skip
    submitted = slurm.SlurmExecutor(slurm.SlurmOptions(time=5)).submit(tmp_path, tasks)
    (first, trials), (second, a_runs), (third, b_runs) = FakeSubmitit.arrays
    assert trials == [t.key for t in tasks[:4]] and first["dependency"] is None
    assert a_runs == ["tiny/a-seed0", "tiny/a-seed1"] and second["dependency"] == "afterany:100_0:100_1"
    assert b_runs == ["tiny/b-seed0", "tiny/b-seed1"] and third["dependency"] == "afterany:100_2:100_3"
    assert submitted["tiny/b-seed1"].job_id == "102_1" and first["time"] == 5


def test_a_task_waits_only_for_tasks_of_this_launch(tmp_path, monkeypatch):
    """An arm's trials finished by an earlier command are not submitted, nor waited for."""
    import submitit

    FakeSubmitit.arrays = []
    monkeypatch.setattr(submitit, "SlurmExecutor", FakeSubmitit)
    tasks = [Task("tiny/a-seed1", "tiny", "a", "run", ("trials/tiny/a-lr1",))]
    slurm.SlurmExecutor(slurm.SlurmOptions()).submit(tmp_path, tasks)
    assert [(params["dependency"], keys) for params, keys in FakeSubmitit.arrays] == [(None, ["tiny/a-seed1"])]


def submitted_task(tmp_path: Path, key: str, job_id: str) -> slurm.Submitted:
    return slurm.Submitted(key, job_id, tmp_path / ".slurm" / f"{job_id}_0_log.out")


def test_follow_takes_each_tasks_outcome_and_waits_while_it_is_queued(tmp_path, monkeypatch):
    states = iter([{"7_0": "RUNNING", "7_1": "PENDING"}, {"7_1": "RUNNING"}, {}, {}])
    monkeypatch.setattr(slurm, "queue_states", lambda arrays: next(states))
    (tmp_path / "tiny").mkdir()
    outcome_path(tmp_path, "tiny/a").write_text(Outcome("tiny/a", "done").to_json())
    seen = []

    def on_outcome(outcome):
        seen.append(outcome)
        outcome_path(tmp_path, "tiny/b").write_text(Outcome("tiny/b", "failed", "boom").to_json())

    tasks = {k: submitted_task(tmp_path, k, j) for k, j in (("tiny/a", "7_0"), ("tiny/b", "7_1"))}
    slurm.SlurmExecutor(slurm.SlurmOptions(), quiet=True, poll_s=0).follow(tmp_path, tasks, on_outcome)
    assert seen == [Outcome("tiny/a", "done"), Outcome("tiny/b", "failed", "boom")]


def test_follow_returns_once_the_tasks_with_an_outcome_have_left_the_queue(tmp_path, monkeypatch):
    """The last task writes the report after its outcome: the command waits for it to end. A task that
    failed without an outcome (cancelled) is not waited for, even when requeued by hand."""
    answers = [{"7_0": "RUNNING", "7_1": "PENDING"}] * 3 + [{"7_1": "PENDING"}]
    calls = []
    monkeypatch.setattr(slurm, "queue_states", lambda arrays: calls.append(arrays) or answers[min(len(calls), 4) - 1])
    monkeypatch.setattr(slurm, "GRACE_S", 0.0)
    monkeypatch.setattr(slurm, "lost_task", lambda task: "cancelled")
    (tmp_path / "tiny").mkdir()
    outcome_path(tmp_path, "tiny/a").write_text(Outcome("tiny/a", "done").to_json())
    seen = []
    tasks = {k: submitted_task(tmp_path, k, j) for k, j in (("tiny/a", "7_0"), ("tiny/b", "7_1"))}
    monkeypatch.setattr(slurm, "ALIVE", {"RUNNING"})  # 7_1 PENDING counts as gone: failed without an outcome
    slurm.SlurmExecutor(slurm.SlurmOptions(), quiet=True, poll_s=0).follow(tmp_path, tasks, seen.append)
    assert seen == [Outcome("tiny/a", "done"), Outcome("tiny/b", "failed", "cancelled")]
    assert len(calls) == 4  # one round for the outcomes, then until 7_0 has left the queue


def test_a_task_gone_from_the_queue_without_an_outcome_fails_with_its_logs_error(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm, "queue_states", lambda arrays: {})
    monkeypatch.setattr(slurm, "GRACE_S", 0.0)
    monkeypatch.setattr(slurm, "_final_state", lambda job_id: "FAILED")
    log = tmp_path / ".slurm" / "7_0_0_log.out"
    log.parent.mkdir()
    log.write_text("starting\ntinylm: error: the study folder /x is not usable on node n1: it does not hold "
                   "tasks.json here; ...\n")  # fmt: skip
    seen = []
    tasks = {"tiny/a": submitted_task(tmp_path, "tiny/a", "7_0"), "tiny/b": submitted_task(tmp_path, "tiny/b", "7_1")}
    slurm.SlurmExecutor(slurm.SlurmOptions(), quiet=True, poll_s=0).follow(tmp_path, tasks, seen.append)
    assert seen[0] == Outcome("tiny/a", "failed", "Slurm task 7_0 ended FAILED: the study folder /x is not usable "
                              "on node n1: it does not hold tasks.json here; ...")  # fmt: skip
    assert seen[1].status == "failed" and seen[1].error.startswith("Slurm task 7_1 ended FAILED and wrote no outcome")
    assert "scontrol requeue 7_1" in seen[1].error and "filesystem every node shares" in seen[1].error


def test_an_unanswered_squeue_ends_no_task(tmp_path, monkeypatch):
    """squeue timing out (a busy controller) is not a task gone: it is asked again."""
    (tmp_path / "tiny").mkdir()
    calls = []

    def states(arrays):
        calls.append(arrays)
        if len(calls) < 3:
            return None
        outcome_path(tmp_path, "tiny/a").write_text(Outcome("tiny/a", "done").to_json())
        return {}

    monkeypatch.setattr(slurm, "queue_states", states)
    monkeypatch.setattr(slurm, "GRACE_S", 0.0)
    seen = []
    slurm.SlurmExecutor(slurm.SlurmOptions(), quiet=True, poll_s=0).follow(
        tmp_path, {"tiny/a": submitted_task(tmp_path, "tiny/a", "7_0")}, seen.append
    )
    assert seen == [Outcome("tiny/a", "done")]


def test_queue_states_reads_squeue_one_task_a_line(tmp_path, monkeypatch):
    fake_commands(tmp_path, monkeypatch, squeue='printf "7_0 RUNNING\\n7_2 PENDING\\n"')
    assert slurm.queue_states({"7"}) == {"7_0": "RUNNING", "7_2": "PENDING"}
    fake_commands(tmp_path / "x", monkeypatch, squeue='echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    assert slurm.queue_states({"7"}) == {}
    fake_commands(tmp_path / "y", monkeypatch, squeue='echo "Socket timed out" >&2; exit 1')
    assert slurm.queue_states({"7"}) is None


# --- a real cluster --------------------------------------------------------------------------------


def slurm_cluster() -> str | None:
    """None when a Slurm cluster answers here (started by scripts/slurm_cluster.sh where it can be),
    else why not."""
    script = ROOT / "scripts" / "slurm_cluster.sh"
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (try: sudo scripts/slurm_cluster.sh)"
    if subprocess.run([str(script), "status"], capture_output=True).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "no Slurm cluster answers, and starting one needs root (sudo scripts/slurm_cluster.sh)"
    started = subprocess.run([str(script)], capture_output=True, text=True)
    return None if started.returncode == 0 else f"scripts/slurm_cluster.sh failed: {started.stderr.strip()}"


STUDY = """
name: pair
base: {preset: tiny, schedule: cosine}
mode: each
seeds: 2
steps:
  - {name: qk, change: {qk_norm: true}}
"""


@pytest.mark.slow
def test_a_study_runs_as_a_slurm_job_array(tmp_path, stories):
    """A 2-arm x 2-seed study with --launcher slurm on the one-node cluster: every run trains in an
    array task, each run's config is the sequential path's, and the report is written."""
    if why := slurm_cluster():
        pytest.skip(why)
    from tinylm.study.plan import Plan
    from tinylm.study.spec import load_study

    study_file = tmp_path / "study.yaml"
    study_file.write_text(STUDY)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    train = ["--data", str(stories), "--tokenizer", "bpe:512", "--batch-size", "2", "--eval-every", "4",
             "--eval-tokens", "256", "--device", "cpu", "--max-steps", "8"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "tinylm", "ablate", "--study", str(study_file), "--out", str(out),
                           "--launcher", "slurm", "--slurm-time", "10", *train],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "task(s) submitted as job array(s)" in done.stdout
    assert (out / "report.md").exists() and "| qk |" in (out / "report.md").read_text()
    plan = Plan(load_study(str(study_file)), ["tiny"], {"train": {"data": str(stories), "tokenizer": "bpe:512",
                "batch_size": 2, "eval_every": 4, "eval_tokens": 256, "device": "cpu", "max_steps": 8}}, out,
                load_study(str(study_file)).arms, seeds=2)  # fmt: skip
    for arm in plan.arms:
        for k in range(2):
            run_dir = plan.run_dir("tiny", arm, k)
            assert json.loads((run_dir / "summary.json").read_text())["completed"]
            saved = json.loads((run_dir / "config.json").read_text())
            assert saved["train"]["seed"] == plan.config("tiny", arm, k).train.seed
    logs = sorted((out / ".slurm").glob("*_log.out"))
    assert len(logs) == 4  # one array task per run


def test_a_task_that_found_its_run_held_elsewhere_waits_for_that_process_not_fails(tmp_path, monkeypatch):
    """A rerun while another launch trains the study: this launch's task finds the run claimed and ends
    without an outcome (busy). The launcher follows the run until the other process ends, then takes
    what it left (done here), instead of listing a run that trains fine as failed."""
    import threading
    import time

    from tinylm.paths import DirLock
    from tinylm.study.executor import claim_path

    monkeypatch.setattr(slurm, "queue_states", lambda arrays: {})  # the task has ended
    monkeypatch.setattr(slurm, "GRACE_S", 0.0)
    monkeypatch.setattr(slurm, "lost_task", lambda task: "lost")
    run_dir = tmp_path / "tiny" / "a"
    run_dir.mkdir(parents=True)
    other = DirLock(claim_path(tmp_path, "tiny/a"), file=True)
    other.acquire()

    def other_finishes():
        time.sleep(0.3)
        (run_dir / "summary.json").write_text(json.dumps({"completed": True}))
        other.release()

    finisher = threading.Thread(target=other_finishes)
    finisher.start()
    seen = []
    executor = slurm.SlurmExecutor(slurm.SlurmOptions(), quiet=True, poll_s=0.05)
    executor.follow(tmp_path, {"tiny/a": submitted_task(tmp_path, "tiny/a", "7_0")}, seen.append)
    finisher.join()
    assert seen == [Outcome("tiny/a", "done")]
