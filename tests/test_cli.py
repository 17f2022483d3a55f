"""The command line, end to end in subprocesses."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY_CLI_FLAGS

TINY = TINY_CLI_FLAGS


def tinylm(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "tinylm", *map(str, args)], capture_output=True, text=True, **kwargs)


def test_train_end_to_end(stories, tmp_path):
    out = tmp_path / "run"
    done = tinylm("train", *TINY, "--data", stories, "--max-steps", 8, "--eval-every", 4, "--out", out,
                  "--schedule", "cosine", "--lr", "3e-3")  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["best_val_loss"] < summary["start_val_loss"]
    assert "val loss start -> best" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["schedule"] == "cosine" and config["preset"] == "tiny"


def test_yaml_recipe_and_flag_override(stories, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"preset: tiny\nmodel:\n  n_layer: 1\ntrain:\n  lr: 0.002\n  max_steps: 3\n  data: {stories}\n")
    out = tmp_path / "run"
    done = tinylm("train", "--config", recipe, "--lr", "0.004", "--out", out, "--batch-size", 2, "--quiet",
                  "--eval-tokens", 256)  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_layer"] == 1 and config["train"]["lr"] == 0.004 and config["train"]["max_steps"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "huge"], "invalid choice"),
        (["--data", "/no/such/file.txt"], "not found"),
        (["--n-head", "3"], "divisible"),
        (["--max-steps", "abc"], "must be a number"),
        (["--tokenizer", "wordpiece"], "unknown tokenizer"),
        (["--host-read-every", "0"], "host_read_every"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(stories, tmp_path, args, message):
    base = ["--data", stories, "--out", tmp_path / "run"]
    done = tinylm("train", *TINY, *base, *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_out_holding_another_run_is_refused(stories, tmp_path):
    out = tmp_path / "run"
    assert tinylm("train", *TINY, "--data", stories, "--max-steps", 2, "--out", out).returncode == 0
    again = tinylm("train", *TINY, "--data", stories, "--max-steps", 2, "--out", out)
    assert again.returncode == 2 and "holds another run" in again.stderr


def test_ctrl_c_checkpoints_and_resume_finishes(stories, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tinylm", "train", *TINY, "--data", str(stories), "--max-steps", "400",
           "--eval-every", "1000", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stdout
    stopped = json.loads((out / "summary.json").read_text())
    assert stopped["interrupted"] and 3 <= stopped["steps"] < 400
    done = tinylm("train", "--resume", out, "--max-steps", stopped["steps"] + 5, "--quiet")
    assert done.returncode == 0, done.stderr
    final = json.loads((out / "summary.json").read_text())
    assert final["steps"] == stopped["steps"] + 5 and final["completed"]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_info_json():
    done = tinylm("info", "--preset", "basic", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["params"] == 7_291_776 and info["params_non_embedding"] == 7_291_776 - 50257 * 128 - 512 * 128
    assert info["flops_per_token_train"] > 6 * info["params"]


def test_module_and_console_script_agree():
    exe = os.path.join(os.path.dirname(sys.executable), "tinylm")
    done = subprocess.run([exe, "info", "--preset", "mid", "--json"], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)["params"] == 12_417_216


def test_every_command_prints_its_help(capsys):
    from tinylm.cli import build_parser, main

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in commands:
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        assert f"usage: tinylm {command}" in capsys.readouterr().out
