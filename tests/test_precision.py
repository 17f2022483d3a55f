"""--precision: what auto picks, bf16's numbers against fp32's, and a run keeping its precision.

bf16 runs on any CPU (emulated where it has no bf16 units, only slower), so these hold everywhere.
The suite sets TINYLM_CPU_BF16=0 (conftest); tests of auto set the detection themselves.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from tinylm import bench, runtime
from tinylm.cli import main
from tinylm.config import ModelConfig
from tinylm.errors import UserError
from tinylm.evaluate import evaluate_run
from tinylm.loss import linear_cross_entropy, textbook_loss
from tinylm.metrics import read_metrics
from tinylm.model import GPT
from tinylm.train import train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# --- what auto picks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, found",
    [
        ("fpu sse avx512f avx512_bf16 avx512_vnni", ("avx512_bf16",)),
        ("fpu avx512f amx_bf16 amx_tile avx512_bf16", ("amx_bf16", "avx512_bf16")),
        ("fpu sse avx2 avx512f avx512bw", ()),  # AVX-512 alone: bf16 only by conversion
    ],
)
def test_cpuinfo_flags_name_the_bf16_units(tmp_path, flags, found):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n")
    assert runtime.cpuinfo_bf16_flags(str(cpuinfo)) == found


def test_no_cpuinfo_means_no_bf16_units(tmp_path):
    assert runtime.cpuinfo_bf16_flags(str(tmp_path / "absent")) == ()


@pytest.mark.parametrize("units, chosen", [(("avx512_bf16",), "bf16"), ((), "fp32")])
def test_auto_follows_the_detected_cpu_units(monkeypatch, units, chosen):
    monkeypatch.delenv(runtime.CPU_BF16_ENV)
    monkeypatch.setattr(runtime, "cpuinfo_bf16_flags", lambda: units)
    assert runtime.resolve_precision("auto", CPU) == chosen
    assert runtime.resolve_precision("auto", CUDA) == "bf16"  # CUDA whatever the CPU
    line = runtime.describe_precision("auto", chosen, CPU)
    assert line.startswith(f"precision: {chosen} (auto: ") and ("avx512_bf16" in line) == bool(units)


@pytest.mark.parametrize("setting", ["fp32", "bf16"])
def test_an_explicit_precision_is_kept_on_any_device(monkeypatch, setting):
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")
    assert runtime.resolve_precision(setting, CPU) == runtime.resolve_precision(setting, CUDA) == setting


@pytest.mark.parametrize("units", [("avx512_bf16",), ()])
def test_bf16_asked_for_on_a_cpu_without_bf16_units_says_it_will_be_slow(monkeypatch, units):
    # on an AVX2-only CPU a bf16 matmul ran 44x slower than fp32: a user who asks for bf16 there is told
    monkeypatch.delenv(runtime.CPU_BF16_ENV)
    monkeypatch.setattr(runtime, "cpuinfo_bf16_flags", lambda: units)
    line = runtime.describe_precision("bf16", "bf16", CPU)
    assert line.startswith("precision: bf16 (--precision bf16)")
    assert ("no bf16 units" in line) == (not units)
    assert "no bf16 units" not in runtime.describe_precision("bf16", "bf16", CUDA)
    assert "no bf16 units" not in runtime.describe_precision("fp32", "fp32", CPU)


def test_the_environment_overrides_the_detection(monkeypatch):
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")
    assert runtime.resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "0")
    monkeypatch.setattr(runtime, "cpuinfo_bf16_flags", lambda: ("amx_bf16",))
    assert runtime.resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "yes")
    with pytest.raises(UserError, match="TINYLM_CPU_BF16 must be 0 or 1"):
        runtime.resolve_precision("auto", CPU)


def test_a_run_saved_before_precision_keeps_the_old_rule(monkeypatch):
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")
    assert runtime.resolve_precision("auto", CPU, saved_before_precision=True) == "fp32"
    assert runtime.resolve_precision("auto", CUDA, saved_before_precision=True) == "bf16"


def test_autocast_for_runs_bf16_on_the_cpu_too():
    a = torch.randn(4, 8)
    with runtime.autocast_for(CPU, "bf16"):
        assert (a @ a.t()).dtype == torch.bfloat16
    with runtime.autocast_for(CPU, "fp32"):
        assert (a @ a.t()).dtype == torch.float32
    with pytest.raises(ValueError, match="not resolved"):
        runtime.autocast_for(CPU, "auto")


# --- bf16 numbers against fp32 ------------------------------------------------------------------


def _loss_inputs(rows=300, width=32, vocab=1000, seed=0, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) * scale).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::7] = -1  # padding rows
    return hidden, weight, targets


def test_chunked_loss_under_cpu_autocast_multiplies_in_bf16_and_sums_in_fp32():
    hidden, weight, targets = _loss_inputs(scale=3.0)  # logits of about 17: bf16 rounds them by about 0.03
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=64)  # 5 chunks
    grads = torch.autograd.grad(loss, (hidden, weight))
    # the reference: bf16 operands and logits, the softmax, mean and gradient sums in fp32
    h16, w16 = (t.detach().bfloat16().float() for t in (hidden, weight))
    logits = (h16 @ w16.t()).bfloat16().float().requires_grad_()
    bf16_reference = F.cross_entropy(logits, targets, ignore_index=-1)
    grad_logits = torch.autograd.grad(bf16_reference, logits)[0]
    g16 = grad_logits.bfloat16().float()  # the gradient of the logits enters its matmuls in bf16
    reference_grads = (g16 @ w16, g16.t() @ h16)
    fp32_reference = F.cross_entropy(hidden.detach() @ weight.detach().t(), targets, ignore_index=-1)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - bf16_reference.item()) < 1e-5 * bf16_reference.item()  # the same arithmetic
    assert abs(loss.item() - fp32_reference.item()) > 1e-4 * fp32_reference.item()  # and not fp32 matmuls
    for g, r in zip(grads, reference_grads):
        assert g.dtype == torch.float32
        assert (g - r).norm() < 5e-3 * r.norm()  # each chunk's bf16 products are rounded (0.26% here)


def test_bf16_loss_and_gradients_stay_within_tolerance_of_fp32():
    hidden, weight, targets = _loss_inputs()
    ref, _ = textbook_loss(hidden @ weight.t(), targets)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=64, z_loss=1e-4)
    loss_z, _ = textbook_loss(hidden @ weight.t(), targets, z_loss=1e-4)
    grads = torch.autograd.grad(loss, (hidden, weight))
    # Tolerances: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%).
    assert abs(loss.item() - loss_z.item()) < 5e-3 * loss_z.item()
    assert abs(loss_z.item() - ref.item()) < 1e-2  # the z term is small here: the comparison is of the CE
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert (g - r).norm() < 0.02 * r.norm()
        assert F.cosine_similarity(g.flatten(), r.flatten(), dim=0) > 0.999


def test_a_bf16_model_step_stays_within_tolerance_of_fp32():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=500)
    model = GPT(cfg)
    model.init_weights("scaled", seed=0)
    x, y = torch.randint(0, 500, (4, 32)), torch.randint(0, 500, (4, 32))
    _, ref = model(x, y)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    with runtime.autocast_for(CPU, "bf16"):
        _, loss = model(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert abs(loss.item() - ref.item()) < 5e-3 * ref.item()
    total = torch.cat([g.flatten() for g in grads])
    ref_total = torch.cat([g.flatten() for g in ref_grads])
    assert (total - ref_total).norm() < 0.03 * ref_total.norm()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


# --- a run and its precision -------------------------------------------------------------------


def test_auto_is_saved_as_what_it_chose_and_said(stories, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")
    result = train(tiny_config(stories, tmp_path / "run", max_steps=2, eval_every=2))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["precision"] == "bf16" and result.summary["precision"] == "bf16"
    assert "precision: bf16 (auto: this CPU has bf16 units: TINYLM_CPU_BF16=1)" in capsys.readouterr().out


def test_a_bf16_run_resumes_as_bf16_to_the_uninterrupted_metrics(stories, tmp_path, monkeypatch):
    def without_time(run_dir):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_metrics(run_dir)]

    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")
    whole = train(tiny_config(stories, tmp_path / "whole", max_steps=6, eval_every=3), quiet=True)
    split = tiny_config(stories, tmp_path / "split", max_steps=6, eval_every=3)
    assert train(split, quiet=True, interrupt_after=3).interrupted
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "0")  # resumed where auto would pick fp32: it stays bf16
    code = main(["train", "--resume", str(tmp_path / "split"), "--quiet"])
    assert code == 0
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["precision"] == "bf16"
    assert without_time(whole.run_dir) == without_time(tmp_path / "split")
    fp32 = train(tiny_config(stories, tmp_path / "fp32", max_steps=6, eval_every=3, precision="fp32"), quiet=True)
    assert without_time(fp32.run_dir) != without_time(whole.run_dir)  # bf16 was really on


def test_a_resume_cannot_switch_precision(stories, tmp_path, capsys):
    cfg = tiny_config(stories, tmp_path / "run", max_steps=4, eval_every=2, precision="bf16")
    assert train(cfg, quiet=True, interrupt_after=2).interrupted
    code = main(["train", "--resume", str(tmp_path / "run"), "--precision", "fp32", "--quiet"])
    assert code == 2 and "with --resume only" in capsys.readouterr().err


def test_a_run_saved_before_precision_resumes_in_fp32_on_the_cpu(stories, tmp_path, monkeypatch):
    cfg = tiny_config(stories, tmp_path / "run", max_steps=4, eval_every=2, precision="fp32")
    assert train(cfg, quiet=True, interrupt_after=2).interrupted
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    del config["train"]["precision"]  # as a run of an older tinylm saved it
    path.write_text(json.dumps(config))
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")  # auto would pick bf16 for a new run here
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert json.loads(path.read_text())["train"]["precision"] == "fp32"
    said = runtime.describe_precision("auto", "fp32", torch.device("cpu"), saved_before_precision=True)
    assert "no bf16 units" not in said and "saved before" in said  # the reason, not this CPU's (it has them)


def test_eval_scores_in_the_runs_precision_or_the_one_asked(stories, tmp_path):
    cfg = tiny_config(stories, tmp_path / "run", max_steps=2, eval_every=2, precision="bf16")
    result = train(cfg, quiet=True)
    own = evaluate_run(tmp_path / "run", device_name="cpu")
    fp32 = evaluate_run(tmp_path / "run", device_name="cpu", precision="fp32")
    assert own["precision"] == "bf16" and own["loss"] == result.summary["final_val_loss"]
    assert own["loss_doc"] == result.summary["final_val_loss_doc"]  # the per-document score in bf16 too
    assert fp32["precision"] == "fp32" and fp32["loss"] != own["loss"] and abs(fp32["loss"] - own["loss"]) < 0.05
    assert fp32["loss_doc"] != own["loss_doc"] and abs(fp32["loss_doc"] - own["loss_doc"]) < 0.05


# --- bench per precision --------------------------------------------------------------------------


def test_bench_times_each_precision_alternately_against_its_own_peak(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--preset", "tiny", "--batch-size", "2", "--repeats", "2", "--warmup", "1", "--no-memory",
                 "--device", "cpu", "--precision", "fp32,bf16", "--compare-textbook", "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 0 and report["precisions"] == ["fp32", "bf16"]
    assert report["command"].startswith("tinylm bench --preset tiny") and report["cpu"] and report["repeats"] == 2
    assert [(r["name"], r["precision"]) for r in report["results"]] == [
        ("tinylm", "fp32"), ("textbook", "fp32"), ("tinylm", "bf16"), ("textbook", "bf16")]
    peaks = report["matmul_peaks"]
    assert re.fullmatch(r"measured: best (\d+)x\1 bf16 matmul", peaks["bf16"]["source"]) and peaks["fp32"]["gflops"] > 0
    for r in report["results"]:
        assert len(r["step_times_s"]) == 2
        assert r["mfu"] == pytest.approx(r["gflops"] / peaks[r["precision"]]["gflops"])
    assert set(report["speedup_vs_textbook_by_precision"]) == {"fp32", "bf16"}
    fp32, bf16 = (next(r for r in report["results"] if r["name"] == "tinylm" and r["precision"] == p)
                  for p in ("fp32", "bf16"))  # fmt: skip
    assert report["bf16_over_fp32"] == pytest.approx(fp32["median_s"] / bf16["median_s"])
    assert len(report["bf16_over_fp32_per_repeat"]) == 2


@pytest.mark.parametrize("budget_s, side", [(1e-12, 256), (1e12, 2048)])
def test_the_cpu_peak_is_measured_on_a_product_that_fits_the_time_budget(budget_s, side):
    # emulated bf16 (a CPU without bf16 units) took minutes for one 2048 x 2048 product: the side shrinks
    assert bench.peak_matmul_side(CPU, "bf16", budget_s) == bench.peak_matmul_side(CPU, "fp32", budget_s) == side
    assert bench.peak_matmul_side(CUDA, "bf16", budget_s) == 8192  # a GPU is never short of time for it


def test_one_slow_probe_does_not_shrink_the_cpu_peaks_product(monkeypatch):
    # A probe takes a fraction of a millisecond in fp32: one preemption on a loaded CPU made it look 10x
    # slower, the peak was then measured on a smaller product, and MFU moved with it. The best of several counts.
    durations = iter([1.0] + [1e-9] * 20)  # the first timed probe preempted, every later one fast
    clock = {"now": 0.0, "started": False}

    def perf_counter():
        if clock["started"]:
            clock["now"] += next(durations)
        clock["started"] = not clock["started"]
        return clock["now"]

    monkeypatch.setattr(bench.time, "perf_counter", perf_counter)
    assert bench.peak_matmul_side(CPU, "fp32", budget_s=1.0) == 2048


def test_bench_refuses_an_unknown_precision(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--precision", "fp32,fp16"])
    assert e.value.code == 2 and "fp16: choose from auto, fp32, bf16" in capsys.readouterr().err


@pytest.mark.parametrize("gpu, precision, tflops", [("NVIDIA H200", "bf16", 989.5), ("NVIDIA H100 PCIe", "fp32", 378.0),
                                                     ("NVIDIA A100-SXM4-80GB", "bf16", 312.0)])  # fmt: skip
def test_a_known_gpu_is_measured_against_its_data_sheet(monkeypatch, gpu, precision, tflops):

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    gflops, source = bench.peak_for(CUDA, precision)
    assert gflops == tflops * 1000 and source.startswith("data sheet: ") and f"{tflops:g} TFLOP/s" in source


def test_the_profile_names_where_a_cpu_step_spends_its_time():
    from tinylm.bench import StepRunner, format_profile, profile_step
    from tinylm.config import preset

    profile = profile_step(StepRunner("tinylm", preset("tiny"), 2, CPU, precision="bf16"), steps=2, top=5)
    assert profile["precision"] == "bf16" and profile["device_busy_ms_per_step"] is None  # no kernels on a CPU
    assert len(profile["top"]) == 5 and profile["top"][0]["ms_per_step"] >= profile["top"][-1]["ms_per_step"] > 0
    assert any(row["name"] == "_LinearCrossEntropy" or "mm" in row["name"] for row in profile["top"])
    table = format_profile(profile)
    assert table.startswith("profile (bf16, 2 steps): ") and "self CPU time" in table
