"""benchmarks/bench_bound.py: the output layers it times alone are the steps' own losses, and its bound
is the arithmetic its docstring states."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "bench_bound.py"


def test_both_output_layers_compute_the_same_loss_and_gradients():
    script = load_script("bench_bound")
    grads = {}
    for variant in ("tinylm", "textbook"):
        layer = script.OutputLayer(variant, n_rows=37, n_embd=16, vocab_size=101)
        layer.step()
        grads[variant] = (layer.hidden.grad, layer.weight.grad)
    for ours, textbook in zip(grads["tinylm"], grads["textbook"]):
        assert ours.abs().sum() > 0
        torch.testing.assert_close(ours, textbook)


def test_bound_is_the_textbook_step_over_the_rest_plus_a_perfect_output_layer():
    script = load_script("bench_bound")
    r = script.measure("basic", batch_size=1, repeats=3, clock="wall")  # medians: a load spike moves no one time
    rows, c, v = 512, 128, 50257
    assert r["output_layer_gflop"] == pytest.approx(6 * rows * c * v / 1e9)
    assert r["perfect_output_layer_s"] == pytest.approx(r["output_layer_gflop"] / r["matmul_peak_gflops"])
    for variant in ("tinylm", "textbook"):
        assert 0 < r["output_layer_s"][variant] < r["step_s"][variant]
        assert r["rest_of_step_s"][variant] == pytest.approx(r["step_s"][variant] - r["output_layer_s"][variant])
    expected = r["step_s"]["textbook"] / (r["rest_of_step_s"]["tinylm"] + r["perfect_output_layer_s"])
    assert r["bound_on_step_ratio"] == pytest.approx(expected)
    assert "bound on the step ratio" in script.format_report(r)


def test_cpu_clock_on_several_threads_is_a_one_line_refusal():
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--clock", "cpu"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert "needs one thread" in done.stderr and "Traceback" not in done.stderr


def test_steps_and_output_layers_are_timed_in_one_alternation(monkeypatch):
    # "rest of the step" is a step's median less its output layer's: timed one after the other (the steps, then
    # the layers), a load that changes between the two on a shared machine would go into the difference.
    script = load_script("bench_bound")
    calls, ticks = [], iter(range(10_000))

    class Timed:
        def __init__(self, name):
            self.name = name

        def step(self):
            calls.append(self.name)

    monkeypatch.setattr(script, "StepRunner", lambda variant, *args, **kwargs: Timed(f"step {variant}"))
    monkeypatch.setattr(script, "OutputLayer", lambda variant, *args, **kwargs: Timed(f"layer {variant}"))
    monkeypatch.setattr(script, "matmul_peak_gflops", lambda *args, **kwargs: 100.0)
    monkeypatch.setattr(script, "tune_for", lambda device: None)
    monkeypatch.setattr(script, "CLOCKS", {"wall": lambda: next(ticks)})
    script.measure("basic", batch_size=1, repeats=3, clock="wall")
    rounds = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    assert len(rounds) == 4 and all(len(set(r)) == 4 for r in rounds), calls  # a warm-up, then 3 rounds of all four
