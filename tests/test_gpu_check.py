"""scripts/gpu_check.sh end to end on the CPU (smoke sizes), so the GPU check cannot rot unseen."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_part_and_names_what_needs_cuda(stories, tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--data", str(stories), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    parts = {p["name"]: p for p in summary["parts"]}
    assert summary["failed_parts"] == []
    assert parts["environment"]["figures"]["torch"] == torch.__version__
    assert parts["bench-tiny"]["status"] == "passed"
    assert parts["bench-tiny"]["figures"]["tinylm_tokens_per_s"] > 0
    assert parts["ablation"]["status"] == "passed"
    assert parts["profile-tiny"]["status"] == "passed"
    assert parts["profile-tiny"]["figures"]["fp32"]["top"][0]["ms_per_step"] > 0  # the CPU profile of the step
    host_reads = parts["host-reads"]
    if torch.cuda.is_available():  # beyond a GPU's default budget, as the study parts: it runs when named in --only
        assert host_reads["status"] == "skipped" and "--only" in host_reads["why"], host_reads
    else:  # the step reading every step against every 2: the same losses on a CPU
        assert host_reads["status"] == "passed" and host_reads["figures"]["max_train_loss_difference"] == 0.0
        assert all(ms > 0 for ms in host_reads["figures"]["ms_per_step"].values())
    assert set(parts["ablation"]["figures"]["phases"]) == {"baseline", "init", "cosine", "packed"}
    assert (out / "ablation-report.md").exists() and (out / "summary.md").exists()
    if not torch.cuda.is_available():
        for name in ("tests", "bench-tiny-compile"):
            assert parts[name]["status"] == "skipped" and "no CUDA" in parts[name]["why"], parts[name]
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most eight files


def test_gpu_check_names_a_failed_part_and_exits_non_zero(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    missing = tmp_path / "no-such-data.txt"
    missing.write_text("")  # exists, but empty: the ablation part fails, the others still run
    # the ablation and one bench: every part runs in the test above, this one is about a failure's record
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--only", "ablation,bench-tiny",
                           "--data", str(missing), str(out)], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode != 0
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["failed_parts"] == ["ablation"]
    assert {p["name"]: p["status"] for p in summary["parts"]}["bench-tiny"] == "passed"  # the others: passed
    assert "FAILED: ablation" in (out / "summary.md").read_text()


def test_gpu_check_smoke_runs_its_few_cuda_tests_in_one_process(tmp_path):
    # The suite's addopts spread it over every core (-n auto): on the GPU machine's 16 cores, 16 processes
    # importing torch (and each making a CUDA context) for the smoke run's handful of tests.
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    missing = tmp_path / "unused.txt"
    missing.write_text("")
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--only", "tests",
                           "--data", str(missing), str(out)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "parts.log").read_text()
    assert "tests/test_cuda.py" in log and "[gw0]" not in log, log[-3000:]


def test_gpu_check_counts_a_part_it_had_no_time_for_as_not_proven(stories, tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--budget-s", "1", "--data",
                           str(stories), str(out)], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 1
    summary = json.loads((out / "gpu_check.json").read_text())
    assert {p["status"] for p in summary["parts"] if "no CUDA" not in p["why"]} == {"not run"}
    assert "ablation" in summary["failed_parts"]


def test_gpu_check_refuses_an_unknown_part(tmp_path):
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--only", "bench-huge", str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert done.returncode == 2 and "unknown part(s) bench-huge" in done.stderr


def test_prepare_finds_the_slice_through_tinylm_tinystories(tmp_path, monkeypatch):
    """--prepare copies the slice named by the one setting the benchmarks and tests read, not a fixed folder."""
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check

    (tmp_path / "train.txt").write_text("a")
    monkeypatch.setenv("TINYLM_TINYSTORIES", str(tmp_path))
    assert gpu_check.tinystories_slice() == tmp_path
    monkeypatch.setenv("TINYLM_TINYSTORIES", str(tmp_path / "absent"))
    with pytest.raises(SystemExit, match="set TINYLM_TINYSTORIES"):
        gpu_check.tinystories_slice()
