"""benchmarks/bench_levers.py's stand-ins for tinylm's code compute the same loss, so its ratios time like for like."""

import json
import subprocess
import sys

import torch
import torch.nn.functional as F

import tinylm.loss
from conftest import BENCHMARKS, load_script
from tinylm.loss import IGNORE_INDEX, linear_cross_entropy

SCRIPT = BENCHMARKS / "bench_levers.py"


def test_the_row_maxima_loss_chunk_stands_in_for_tinylms(monkeypatch):
    # The 'loss from target probability' row swaps this in for tinylm.loss._chunk_loss_and_grad:
    # it must keep that function's signature and results, or the row times a crash or other maths.
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (23,))
    targets[::4] = IGNORE_INDEX
    logits = hidden @ weight.t()
    ref = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    monkeypatch.setattr(tinylm.loss, "_chunk_loss_and_grad", load_script("bench_levers")._loss_from_row_maxima)
    loss, cross_entropy = linear_cross_entropy(hidden, weight, targets, 5, return_cross_entropy=True)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(cross_entropy, ref.detach())
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def run_script(*args, tmp_path):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path)


def test_only_runs_the_named_lever_and_refuses_unknown_ones(tmp_path):
    done = run_script(
        "--preset", "basic", "--repeats", "1", "--only", " batch,", "--json", "out.json", tmp_path=tmp_path
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["levers"] == [] and set(report["batch_ms"]) == {"packed", "padded"}
    refused = run_script("--only", "heap,warp-drive", tmp_path=tmp_path)
    assert refused.returncode == 2 and "unknown lever warp-drive" in refused.stderr
    empty = run_script("--only", ",", tmp_path=tmp_path)
    assert empty.returncode == 2 and "--only names no lever" in empty.stderr


def test_the_onednn_step_rows_switch_on_only_the_kernels_this_torch_has(monkeypatch):
    # Each row times its switch off against the build's own setting. Where PyTorch has no oneDNN (tinylm.loss._ONEDNN
    # False), tinylm never calls it; a row that set its switch to True would call a kernel the build lacks.
    script = load_script("bench_levers")
    settings = {}

    def record(preset_name, repeats, name, without, with_):
        settings[name] = (without, with_)
        return 1.0, 1.0

    monkeypatch.setattr(script, "step_with_loss_setting", record)
    monkeypatch.setattr(script, "onednn_logits_matmul", lambda preset_name, repeats: (1.0, 1.0))
    monkeypatch.setattr(script, "onednn_hidden_grad_matmul", lambda preset_name, repeats: (1.0, 1.0))
    for available in (True, False):
        monkeypatch.setattr(tinylm.loss, "_ONEDNN", available)
        script.time_levers({"onednn"}, "tiny", 1, False, lambda *row: None)
        assert settings == {"_ONEDNN": (False, available), "_ONEDNN_HIDDEN_GRAD": (False, available)}
