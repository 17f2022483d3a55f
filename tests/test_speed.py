"""The fast step's process settings and the `tinylm bench` command."""

import itertools
import json
import os
import platform
import subprocess
import sys
import types

import pytest
import torch

MINOR_FAULTS_OF_REPEATED_16MB_TENSORS = """
import resource, torch
from tinylm.runtime import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(4 << 20).fill_(1.0)  # 16 MB, freed at once, as a step's activations are
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
assert keep_freed_memory()
faults()
print(default, faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_freed_step_memory_is_reused_instead_of_faulted_in_again():
    done = subprocess.run([sys.executable, "-c", MINOR_FAULTS_OF_REPEATED_16MB_TENSORS],
                          capture_output=True, text=True, check=True)  # fmt: skip
    default, tuned = map(int, done.stdout.split())
    pages_per_tensor = (16 << 20) // 4096
    if default <= 5 * pages_per_tensor:  # seen on the GPU check's machine (another glibc and kernel)
        pytest.skip(f"this machine's default heap already keeps freed memory ({default} page faults)")
    assert tuned < pages_per_tensor // 10


def test_bench_times_both_steps_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "tinylm", "bench", "--preset", "tiny", "--batch-size", "4", "--repeats", "2",
         "--warmup", "1", "--compare-textbook", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "tinylm / textbook tokens/s" in done.stdout
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["tinylm", "textbook"]
    assert report["matmul_peak_gflops"] > 0
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # the CPU the figures are from
    for r in report["results"]:
        assert r["tokens_per_s"] == pytest.approx(4 * 64 / r["median_s"])
        assert 0 < r["mfu"] and r["peak_memory_mb"] > 0
    ratio = report["results"][0]["tokens_per_s"] / report["results"][1]["tokens_per_s"]
    assert report["speedup_vs_textbook"] == pytest.approx(ratio)
    if sys.platform.startswith("linux"):  # getrusage's counts; the textbook maps its 51 MB of logits afresh each step
        tinylm, textbook = report["results"]
        assert tinylm["page_faults_per_step"] >= 0 and tinylm["system_s_per_step"] >= 0
        assert textbook["page_faults_per_step"] >= 1 and textbook["system_s_per_step"] >= 0
        assert "faults/step" in done.stdout


@pytest.mark.parametrize("has_getrusage", [True, False], ids=["getrusage", "no-getrusage"])
def test_bench_counts_each_variants_faults_and_kernel_seconds_over_its_timed_steps(monkeypatch, has_getrusage):
    # Each variant's counts are its own steps' (they alternate), without the warm-up steps, per timed step;
    # where the platform has no getrusage (Windows) they are None and the table shows '-'.
    import tinylm.bench as bench_module

    usage = types.SimpleNamespace(ru_minflt=0, ru_stime=0.0)
    per_step = {"tinylm": (3, 0.25), "textbook": (100, 1.0)}  # faults, kernel seconds

    class FakeRunner:
        def __init__(self, variant, *args, **kwargs):
            self.variant, self.steps = variant, 0

        def step(self):
            self.steps += 1
            faults, system_s = per_step[self.variant]
            warm_up = 10 if self.steps <= 2 else 1  # the warm-up steps fault the most, as real ones do
            usage.ru_minflt += warm_up * faults
            usage.ru_stime += warm_up * system_s
            return 0.0

    fake_resource = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: usage)
    ticks = itertools.count()
    monkeypatch.setattr(bench_module, "resource", fake_resource if has_getrusage else None)
    monkeypatch.setattr(bench_module, "StepRunner", FakeRunner)
    monkeypatch.setattr(bench_module, "matmul_peak_gflops", lambda *args, **kwargs: 100.0)
    monkeypatch.setattr(bench_module, "tune_for", lambda device: None)
    monkeypatch.setitem(bench_module.CLOCKS, "wall", lambda: next(ticks))
    report = bench_module.bench("tiny", batch_size=2, repeats=4, warmup=2, compare_textbook=True,
                                device_name="cpu", measure_memory=False)  # fmt: skip
    counted = {r["name"]: (r["page_faults_per_step"], r["system_s_per_step"]) for r in report["results"]}
    assert counted == (per_step if has_getrusage else {"tinylm": (None, None), "textbook": (None, None)})
    rows = bench_module.format_report(report).splitlines()[3:5]
    assert [row.split()[-2:] for row in rows] == (
        [["3", "0.250"], ["100", "1.000"]] if has_getrusage else [["-", "-"], ["-", "-"]]
    )


def test_bench_json_alone_goes_to_stdout():
    done = subprocess.run(
        [sys.executable, "-m", "tinylm", "bench", "--preset", "tiny", "--batch-size", "2", "--repeats", "1",
         "--warmup", "1", "--no-memory", "--device", "cpu", "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["preset"] == "tiny" and [r["name"] for r in report["results"]] == ["tinylm"]
    assert report["results"][0]["peak_memory_mb"] is None


def test_bench_times_the_mechanics_it_is_given(tmp_path):
    from tinylm.config import ModelConfig, preset
    from tinylm.costs import model_costs

    done = subprocess.run(
        [sys.executable, "-m", "tinylm", "bench", "--preset", "tiny", "--batch-size", "2", "--repeats", "1",
         "--warmup", "1", "--device", "cpu", "--position", "rope", "--mlp", "swiglu", "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["model"]["position"], report["model"]["mlp"]) == ("rope", "swiglu")
    shape = {k: v for k, v in vars(preset("tiny")).items()}
    expected = model_costs(ModelConfig(**{**shape, "position": "rope", "mlp": "swiglu"}), 2)
    assert report["params"] == expected.params and report["flops_per_token"] == expected.flops_per_token_train
    assert report["results"][0]["peak_memory_mb"] > 0  # the fresh process built the same model


def test_bench_on_cpu_time_says_so():
    done = subprocess.run(
        [sys.executable, "-m", "tinylm", "bench", "--preset", "tiny", "--batch-size", "2", "--repeats", "1",
         "--warmup", "1", "--no-memory", "--device", "cpu", "--clock", "cpu", "--compare-textbook", "--json"],
        capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["clock"] == "cpu" and report["threads"] == 1 and report["matmul_peak_gflops"] > 0
    assert all(r["median_s"] > 0 and r["mfu"] > 0 for r in report["results"])
    from tinylm.bench import format_report

    assert "CPU time" in format_report(report)


def test_bench_refuses_cpu_time_on_several_threads():
    # CPU time sums over threads (and counts workers spinning at barriers), so with two threads a
    # step's "seconds" and tokens/s are not the step's; the figures would mislead, so none are made.
    import torch

    from tinylm.bench import bench
    from tinylm.errors import UserError

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(UserError, match="OMP_NUM_THREADS=1"):
            bench("tiny", batch_size=2, repeats=1, warmup=0, device_name="cpu", measure_memory=False, clock="cpu")
    finally:
        torch.set_num_threads(threads)


def test_bench_times_the_optimizer_and_z_loss_it_is_given():
    done = subprocess.run(
        [sys.executable, "-m", "tinylm", "bench", "--preset", "tiny", "--batch-size", "2", "--repeats", "1",
         "--warmup", "1", "--no-memory", "--device", "cpu", "--compare-textbook", "--optimizer", "muon",
         "--muon-lr", "0.01", "--z-loss", "1e-4", "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    named = {k: report[k] for k in ("optimizer", "muon_lr", "muon_momentum", "z_loss")}
    assert named == {"optimizer": "muon", "muon_lr": 0.01, "muon_momentum": 0.95, "z_loss": 1e-4}
    assert [r["name"] for r in report["results"]] == ["tinylm", "textbook"]
    from tinylm.bench import format_report

    assert "tinylm step: muon (lr 0.01, momentum 0.95) + adamw, z-loss 0.0001" in format_report(report)
    assert "textbook step: AdamW (torch defaults), the same z-loss" in format_report(report)


def test_bench_steps_use_the_runs_optimizer_and_z_loss():
    # the tinylm step builds its optimizer as training does, and both steps add the same z-loss term
    from tinylm.bench import BENCH_TRAIN, StepRunner
    from tinylm.config import TrainConfig, preset
    from tinylm.optim import Optimizers

    cfg, cpu = preset("tiny"), torch.device("cpu")
    muon_z = TrainConfig(**BENCH_TRAIN, optimizer="muon", z_loss=0.1)
    tinylm = StepRunner("tinylm", cfg, 2, cpu, train=muon_z)
    textbook = StepRunner("textbook", cfg, 2, cpu, train=muon_z)
    plain = StepRunner("tinylm", cfg, 2, cpu)
    assert isinstance(tinylm.optimizer, Optimizers)
    assert [type(o).__name__ for o in tinylm.optimizer.optimizers] == ["AdamW", "Muon"]
    assert isinstance(textbook.optimizer, torch.optim.AdamW) and isinstance(plain.optimizer, torch.optim.AdamW)
    with_z, textbook_z, without = tinylm.step(), textbook.step(), plain.step()  # the same model and batch
    assert with_z == pytest.approx(textbook_z, rel=1e-5) and with_z > without + 1e-3


def test_bench_refuses_a_bad_training_setting_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "tinylm", "bench", "--preset", "tiny", "--device", "cpu", "--z-loss", "-1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["tinylm: error: z_loss must be at least 0, got -1.0"]
