"""Checkpoints lose no work: atomic saves, kills at any moment, full disks, damaged files, the old layout."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_config
from tinylm import checkpoint
from tinylm.cli import main
from tinylm.errors import UserError
from tinylm.evaluate import evaluate_run
from tinylm.metrics import read_metrics
from tinylm.train import train

# The CLI twin of tiny_config(..., checkpoint_every=2): the same run in a child process.
TINY = ["--preset", "tiny", "--device", "cpu", "--batch-size", "4", "--eval-tokens", "512", "--tokenizer", "bpe:512", "--lr", "3e-3",
        "--seed", "7", "--max-steps", "12", "--eval-every", "4", "--checkpoint-every", "2", "--quiet"]  # fmt: skip


def tinylm(*args, kill_at: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != checkpoint.KILL_ENV}
    if kill_at:
        env[checkpoint.KILL_ENV] = kill_at
    cmd = [sys.executable, "-m", "tinylm", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def losses(run_dir):
    """Every metrics record but its wall-clock time: steps, losses, LRs and events must match exactly."""
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_metrics(run_dir)]


def checkpoint_entries(run_dir):
    """What a run directory holds of checkpoints: one pointer and the one folder it names."""
    return sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name or p.name.endswith(".tmp"))


def test_a_save_switches_one_pointer_and_drops_the_previous_checkpoint(stories, tmp_path):
    result = train(tiny_config(stories, tmp_path / "run", checkpoint_every=4), quiet=True)
    assert checkpoint_entries(result.run_dir) == ["checkpoint-000012", "checkpoint.json"]
    assert checkpoint.weights_path(result.run_dir) == result.run_dir / "checkpoint-000012" / "model.safetensors"


FRESH, RESUME = "fresh", "resume"
KILLS = [
    (FRESH, "checkpoint:between-files:step=2"),  # inside the first save: no checkpoint, the same command again
    (FRESH, "checkpoint:before-pointer:step=4"),  # a complete folder, not yet pointed to
    (RESUME, "checkpoint:after-pointer:step=6"),  # switched; the previous folder not yet deleted
    (RESUME, "train:after-metrics:step=9"),  # metrics past the checkpoint were written
]
MORE_KILLS = [
    (FRESH, "train:after-metrics:step=1"),  # before the first checkpoint
    *KILLS[:2],
    (RESUME, "checkpoint:between-files:step=6"),
    *KILLS[2:],
    (RESUME, "checkpoint:before-pointer:step=10"),
    (RESUME, "checkpoint:between-files:step=12"),  # inside the final save
]


@pytest.mark.parametrize("kills", [KILLS, pytest.param(MORE_KILLS, marks=pytest.mark.slow)], ids=["4", "8"])
def test_sigkill_at_any_moment_resumes_to_the_uninterrupted_metrics(stories, tmp_path, kills):
    whole = train(tiny_config(stories, tmp_path / "whole", checkpoint_every=2), quiet=True).run_dir
    run = tmp_path / "run"
    commands = {FRESH: ["train", *TINY, "--data", stories, "--out", run], RESUME: ["train", "--resume", run, "--quiet"]}
    for command, moment in kills:
        killed = tinylm(*commands[command], kill_at=moment)
        assert killed.returncode == -signal.SIGKILL, (moment, killed.stderr)
    done = tinylm(*commands[RESUME])
    assert done.returncode == 0, done.stderr
    config = [(d / "config.json").read_text().replace(str(d), "OUT") for d in (run, whole)]
    assert config[0] == config[1]  # the CLI ran the very run train() ran in-process
    assert losses(run) == losses(whole)
    assert [r["step"] for r in read_metrics(run) if "train_loss" in r] == list(range(1, 13))
    assert checkpoint_entries(run) == ["checkpoint-000012", "checkpoint.json"]  # the leftovers are gone


def _last_step(run_dir) -> int:
    """The last step metrics.jsonl shows so far (a line being written may be torn)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max([int(m.group(1)) for m in map(re.compile(r'"step": (\d+)').search, lines) if m], default=0)


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_metrics(stories, tmp_path):
    args = [*TINY, "--data", stories, "--max-steps", "80"]
    whole = tmp_path / "whole"
    assert tinylm("train", *args, "--out", whole).returncode == 0
    run, rng, kills = tmp_path / "run", random.Random(0), 0
    command = ["train", *args, "--out", run]
    while True:
        proc = subprocess.Popen([sys.executable, "-m", "tinylm", *map(str, command)], stderr=subprocess.PIPE)
        before = _last_step(run)
        while proc.poll() is None and _last_step(run) <= before:  # kill only once training moves on
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        proc.kill()
        _, err = proc.communicate()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err
        kills += 1
        if checkpoint.exists(run):
            command = ["train", "--resume", run, "--quiet"]
    assert kills >= 5
    assert losses(run) == losses(whole)


def test_a_run_killed_before_its_first_checkpoint_starts_again(stories, tmp_path, monkeypatch):
    whole = train(tiny_config(stories, tmp_path / "whole"), quiet=True)
    cfg = tiny_config(stories, tmp_path / "run")

    class Killed(BaseException):
        pass

    def die(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", die)
        with pytest.raises(Killed):
            train(cfg, quiet=True)
    assert (tmp_path / "run" / "config.json").exists() and not checkpoint.exists(tmp_path / "run")
    again = train(cfg, quiet=True)  # the same command, no folder deleted by hand
    assert losses(again.run_dir) == losses(whole.run_dir)
    with monkeypatch.context() as m:  # --resume works too: it starts from step 0
        m.setattr(checkpoint, "save", die)
        with pytest.raises(Killed):
            train(tiny_config(stories, tmp_path / "run2"), quiet=True)
    resumed = train(tiny_config(stories, tmp_path / "run2"), resume=True, quiet=True)
    assert losses(resumed.run_dir) == losses(whole.run_dir)


def test_a_full_disk_keeps_the_previous_checkpoint_and_is_one_line(stories, tmp_path, monkeypatch):
    whole = train(tiny_config(stories, tmp_path / "whole", checkpoint_every=4), quiet=True)
    cfg = tiny_config(stories, tmp_path / "run", checkpoint_every=4)
    write = checkpoint._write_file

    def disk_full_in_step_8(path, writer):
        if "000008" in path.parent.name and path.name == checkpoint.STATE_FILE:  # the weights are already written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(path, writer)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_write_file", disk_full_in_step_8)
        with pytest.raises(UserError, match="No space left on device") as e:
            train(cfg, quiet=True)
    assert "\n" not in str(e.value) and "--resume" in str(e.value)
    assert checkpoint_entries(tmp_path / "run") == ["checkpoint-000004", "checkpoint.json"]
    resumed = train(cfg, resume=True, quiet=True)
    assert losses(resumed.run_dir) == losses(whole.run_dir)


def _to_old_layout(run_dir):
    """What tinylm wrote before checkpoints had a pointer: both files directly in the run directory."""
    files = checkpoint.locate(run_dir)
    shutil.move(files.model, run_dir / checkpoint.MODEL_FILE)
    shutil.move(files.state, run_dir / checkpoint.STATE_FILE)
    shutil.rmtree(files.model.parent)
    (run_dir / checkpoint.POINTER_FILE).unlink()


def test_a_run_in_the_old_layout_still_resumes_samples_and_evaluates(stories, tmp_path):
    whole = train(tiny_config(stories, tmp_path / "whole"), quiet=True)
    cfg = tiny_config(stories, tmp_path / "old")
    train(cfg, quiet=True, interrupt_after=8)
    _to_old_layout(tmp_path / "old")
    val_at_8 = [r["val_loss"] for r in read_metrics(tmp_path / "old") if r["step"] == 8 and "val_loss" in r]
    assert evaluate_run(tmp_path / "old", device_name="cpu")["loss"] == pytest.approx(val_at_8[0], rel=1e-5)
    resumed = train(cfg, resume=True, quiet=True)
    assert losses(resumed.run_dir) == losses(whole.run_dir)
    assert checkpoint_entries(resumed.run_dir) == ["checkpoint-000012", "checkpoint.json"]
    assert not (resumed.run_dir / checkpoint.MODEL_FILE).exists()  # replaced by the first new save


@pytest.fixture(scope="module")
def finished(stories, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(stories, run, max_steps=2), quiet=True)
    return run


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_state(run):
    """A readable trainer_state.pt that is not one (another tool's file under its name), sizes updated."""
    path = checkpoint.locate(run).state
    torch.save({"progress": {"step": 2}}, path)
    pointer = json.loads((run / checkpoint.POINTER_FILE).read_text())
    pointer["files"][checkpoint.STATE_FILE] = path.stat().st_size
    (run / checkpoint.POINTER_FILE).write_text(json.dumps(pointer))


DAMAGE = {
    "truncated weights": (lambda run: _truncate(checkpoint.locate(run).model), "model.safetensors"),
    "empty trainer state": (lambda run: checkpoint.locate(run).state.write_bytes(b""), "trainer_state.pt"),
    "damaged pointer": (lambda run: (run / checkpoint.POINTER_FILE).write_text('{"dir": '), "checkpoint.json"),
    "another trainer state": (_other_state, "trainer_state.pt"),
    "old layout, truncated weights": (
        lambda run: (_to_old_layout(run), _truncate(run / "model.safetensors")),
        "model.safetensors",
    ),  # fmt: skip
    "old layout, truncated state": (
        lambda run: (_to_old_layout(run), _truncate(run / "trainer_state.pt")),
        "trainer_state.pt",
    ),  # fmt: skip
}


def _damaged_copy(finished, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    do, file_name = DAMAGE[damage]
    do(run)
    return run, file_name


def _commands(run, damage):
    commands = [["train", "--resume", run, "--quiet"]]
    if "state" not in damage:  # sampling reads the weights alone
        commands.append(["sample", run, "--max-new-tokens", "5"])
    return commands


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_a_one_line_error(finished, tmp_path, damage, capsys):
    run, file_name = _damaged_copy(finished, tmp_path, damage)
    for command in _commands(run, damage):
        assert main([str(a) for a in command]) == 2, command
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and file_name in lines[0] and "damaged" in lines[0], lines


def test_a_damaged_checkpoint_exits_with_code_2_and_no_traceback(finished, tmp_path):
    run, file_name = _damaged_copy(finished, tmp_path, "truncated weights")
    for command in _commands(run, "truncated weights"):
        done = tinylm(*command)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (command, done.stderr)
        assert file_name in done.stderr


def test_a_failed_resume_leaves_the_config_as_it_was(finished, tmp_path):
    run, _ = _damaged_copy(finished, tmp_path, "truncated weights")
    before = (run / "config.json").read_bytes()
    assert main(["train", "--resume", str(run), "--max-steps", "10", "--quiet"]) == 2
    assert (run / "config.json").read_bytes() == before


def test_a_fresh_run_never_deletes_files_it_did_not_write(stories, tmp_path):
    out = tmp_path / "hf-out"
    (out / "checkpoint-500").mkdir(parents=True)  # another tool's layout, e.g. the HF Trainer's
    (out / "checkpoint-500" / "pytorch_model.bin").write_text("precious")
    with pytest.raises(UserError, match="holds other files"):
        train(tiny_config(stories, out, max_steps=1), quiet=True)
    assert (out / "checkpoint-500" / "pytorch_model.bin").read_text() == "precious"


def test_a_fresh_run_never_takes_over_another_tools_folder_that_holds_a_config_json(stories, tmp_path):
    out = tmp_path / "hf-model"  # a Hugging Face model folder: its config.json is not a tinylm run's
    out.mkdir()
    files = {"config.json": '{"model_type": "gpt2", "n_layer": 12}', "tokenizer.json": "{}", "model.safetensors": "w"}
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(UserError, match="holds other files"):
        train(tiny_config(stories, out, max_steps=1), quiet=True)
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_a_second_process_cannot_train_in_a_run_directory_in_use(stories, tmp_path, monkeypatch):
    whole = train(tiny_config(stories, tmp_path / "whole"), quiet=True)
    cfg, run = tiny_config(stories, tmp_path / "run"), tmp_path / "run"
    save, tries = checkpoint.save, {}

    def others_try_first(*args, **kwargs):  # while the first run trains, before its first checkpoint
        if not tries:
            tries["started"] = True
            with pytest.raises(UserError, match="in use") as fresh:  # the same command again, in this process
                train(tiny_config(stories, run), quiet=True)
            tries["fresh"] = str(fresh.value)
            tries["resume"] = tinylm("train", "--resume", run, "--quiet")  # and from another process
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", others_try_first)
    train(cfg, quiet=True)
    assert "\n" not in tries["fresh"] and str(run) in tries["fresh"]
    assert tries["resume"].returncode == 2 and "in use" in tries["resume"].stderr, tries["resume"].stderr
    assert losses(run) == losses(whole.run_dir)  # the first run's work is whole


def test_a_full_disk_outside_a_save_is_one_line_and_loses_nothing(stories, tmp_path, monkeypatch, capsys):
    from tinylm.metrics import MetricsLog

    whole = train(tiny_config(stories, tmp_path / "whole", checkpoint_every=2), quiet=True)
    run = tmp_path / "run"
    write = MetricsLog.write

    def disk_full_at_step_7(log, record):
        if record.get("step") == 7:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(log.path))
        return write(log, record)

    with monkeypatch.context() as m:
        m.setattr(MetricsLog, "write", disk_full_at_step_7)
        assert main(["train", *TINY, "--data", str(stories), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tinylm: error")]  # not the BPE's warning
    assert len(lines) == 1 and "No space left on device" in lines[0] and "--resume" in lines[0], err
    assert "Traceback" not in err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert losses(run) == losses(whole.run_dir)
