"""Data parallelism: torchrun with two CPU processes (gloo) against one process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

# --device cpu: these tests are about gloo on CPU processes, also on a machine with one GPU
ARGS = "--preset tiny --batch-size 2 --grad-accum 2 --eval-tokens 512 --lr 3e-3 --tokenizer bpe:512 --quiet --device cpu".split()


def torchrun(*args, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tinylm", *map(str, args)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


def tinylm(*args):
    return subprocess.run(
        [sys.executable, "-m", "tinylm", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curves(a, b, tolerance=1e-4, keys=("train_loss", "val_loss", "val_loss_doc", "grad_norm")):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in keys:
            if key in x or key in y:
                assert y[key] == pytest.approx(x[key], abs=tolerance), (x["step"], key)
        assert x.get("tokens") == y.get("tokens")


def test_two_processes_train_the_same_model_as_one(stories, tmp_path):
    common = [*ARGS, "--data", stories, "--max-steps", 8, "--eval-every", 4, "--schedule", "cosine"]
    two = torchrun("train", *common, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-2000:]
    one = tinylm("train", *common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert_same_curves(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_two_processes_train_the_same_model_as_one_with_the_mechanics_switched_on(stories, tmp_path):
    # Muon's momentum and orthogonalised step, the untied head and the z-loss's extra output all
    # pass through DDP's gradient average as AdamW and the GPT-2 model do.
    switches = ["--position", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--qk-norm", "--no-bias",
                "--no-tie-embeddings", "--optimizer", "muon", "--z-loss", "1e-3"]  # fmt: skip
    common = [*ARGS, *switches, "--data", stories, "--max-steps", 4, "--eval-every", 2]
    two = torchrun("train", *common, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-2000:]
    one = tinylm("train", *common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    one_metrics = metrics(tmp_path / "one")
    assert_same_curves(
        one_metrics, metrics(tmp_path / "two"), keys=("train_loss", "train_z_loss", "val_loss", "grad_norm")
    )
    assert one_metrics[-1]["val_loss"] < one_metrics[0]["val_loss"]  # it trained
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["model"]["qk_norm"] and config["train"]["optimizer"] == "muon"


def test_padded_two_processes_train_the_same_model_as_one_with_their_whole_batch(stories, tmp_path):
    # Each rank's padded rows hold their own number of real targets; the step's loss and gradient
    # are still the mean over all of the step's real targets, as one process with all rows has it.
    common = [*ARGS, "--data", stories, "--max-steps", 6, "--eval-every", 3, "--batching", "padded"]
    two = torchrun("train", *common, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-2000:]
    one = tinylm("train", *common, "--batch-size", 4, "--grad-accum", 1, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert_same_curves(metrics(tmp_path / "one"), metrics(tmp_path / "two"), tolerance=1e-5)


def test_the_readme_commands_run_as_written_without_grad_accum(stories, tmp_path):
    # The README's `tinylm train --nproc-per-node 4 --preset quality --data ... --out runs/q` and its
    # torchrun form, on a tiny preset: without --grad-accum each process takes one micro-batch.
    small = [
        "--preset",
        "tiny",
        "--data",
        stories,
        "--tokenizer",
        "bpe:512",
        "--batch-size",
        2,
        "--eval-tokens",
        512,
        "--device",
        "cpu",
    ]
    launcher = tinylm("train", "--nproc-per-node", 2, *small, "--max-steps", 2, "--out", tmp_path / "launcher")
    assert launcher.returncode == 0, launcher.stderr[-2000:]
    assert "global batch: 4 rows per step" in launcher.stdout
    ran = torchrun("train", *small, "--max-steps", 2, "--out", tmp_path / "torchrun")
    assert ran.returncode == 0, ran.stderr[-2000:]
    for name in ("launcher", "torchrun"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert (summary["world_size"], summary["grad_accum"], summary["global_batch_rows"]) == (2, 2, 4), name
        assert summary["tokens"] == 2 * 4 * 64
    assert_same_curves(metrics(tmp_path / "launcher"), metrics(tmp_path / "torchrun"))
    # The resolved value is saved: resumed on one process, the run trains the same model as one
    # started on one process with --grad-accum 2.
    resumed = tinylm("train", "--resume", tmp_path / "launcher", "--max-steps", 4)
    assert resumed.returncode == 0, resumed.stderr
    assert "global batch: 4 rows per step" in resumed.stdout
    summary = json.loads((tmp_path / "launcher" / "summary.json").read_text())
    assert (summary["world_size"], summary["grad_accum"], summary["steps"]) == (1, 2, 4)
    one = tinylm("train", *small, "--max-steps", 4, "--grad-accum", 2, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    steps = [r for r in metrics(tmp_path / "one") if "train_loss" in r]
    resumed_steps = [r for r in metrics(tmp_path / "launcher") if "train_loss" in r]
    assert_same_curves(steps, resumed_steps, keys=("train_loss",))


def test_world_size_must_divide_the_micro_batches(stories, tmp_path):
    done = torchrun("train", *ARGS, "--grad-accum", "3", "--data", stories, "--max-steps", 2, "--out", tmp_path / "r")
    assert done.returncode != 0
    assert "make --grad-accum a multiple of 2" in done.stderr
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_interrupted_on_two_processes_resumes_on_one(stories, tmp_path):
    common = [*ARGS, "--data", stories, "--max-steps", 100, "--eval-every", 50]
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "tinylm", "train", "--nproc-per-node", "2", *map(str, common), "--out", str(out)]
    # A new session, so that the Ctrl-C below reaches the whole process group, as a terminal's does.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not (out / "metrics.jsonl").exists() or len(metrics(out)) < 6):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    stopped = json.loads((out / "summary.json").read_text())
    assert stopped["interrupted"] and stopped["steps"] < 100
    resumed = tinylm("train", "--resume", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 100
    one = tinylm("train", *common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    # Sums reduced in another order differ in the last bits; 100 steps of training amplify that
    # a little (gradient norms most), so this longer run compares the losses at a looser tolerance.
    assert_same_curves(metrics(tmp_path / "one"), metrics(out), tolerance=2e-3, keys=("train_loss", "val_loss"))


def _check_agreement(rank: int, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from tinylm.distributed import Cluster
    from tinylm.errors import UserError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cluster, outcome = Cluster(rank, 2), {}
    for case, payload in (("same", {"lr": 0.001}), ("different", {"lr": 0.001 * (rank + 1)})):
        try:
            cluster.check_same("config", payload, torch.device("cpu"))
            outcome[case] = "agreed"
        except UserError as e:
            outcome[case] = str(e)
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(outcome, f)


def test_ranks_with_different_configs_all_stop_with_the_same_error(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_check_agreement, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    outcomes = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert [o["same"] for o in outcomes] == ["agreed", "agreed"]
    assert outcomes[0]["different"] == outcomes[1]["different"]
    assert "ranks disagree on the config" in outcomes[0]["different"]


def test_a_process_without_a_gpu_of_its_own_is_one_line_before_nccl_starts(monkeypatch):
    import torch

    from tinylm.distributed import init_cluster
    from tinylm.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # two processes, one GPU: NCCL cannot share it
    with pytest.raises(UserError, match=r"no GPU of its own \(1 here\).*--nproc-per-node 1, or --device cpu"):
        init_cluster("auto")


def test_a_run_directory_in_use_stops_every_rank_with_its_one_line(stories, tmp_path):
    # Rank 0 alone takes the folder's lock; if another process holds it, the other ranks must stop
    # with the same line, not run on into a collective rank 0 never joins (a connection error).
    from tinylm.paths import DirLock

    out = tmp_path / "busy"
    out.mkdir()
    with DirLock(out, "held by the test") as lock:
        lock.acquire()
        done = torchrun("train", *ARGS, "--data", stories, "--max-steps", 2, "--out", out)
    assert done.returncode != 0
    assert done.stderr.count("is in use: another tinylm process is training it") == 2, done.stderr[-3000:]
    assert list(out.iterdir()) == []
