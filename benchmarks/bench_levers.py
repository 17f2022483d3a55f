"""Measure each lever of the fast training step on its own: with and without, alternately.

Usage: .venv/bin/python benchmarks/bench_levers.py [--preset mid] [--repeats 6] [--compile] [--only LEVER,...] [--json FILE]

Every line compares two ways of doing the same work, timed alternately in one process (the
heap setting, which is process-wide, in two fresh processes), and prints the medians and the
ratio. `tinylm bench` gives the whole step against the textbook one; this says which parts pay.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tinylm.loss
from tinylm.bench import StepRunner
from tinylm.config import preset
from tinylm.data.batching import training_rows
from tinylm.data.prepare import TokenSplit
from tinylm.runtime import keep_freed_memory

CPU = torch.device("cpu")


def alternate(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of a and of b, run in turns after one warm-up call each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for f, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def step_with_loss_setting(preset_name: str, repeats: int, name: str, a: object, b: object) -> tuple[float, float]:
    """Training step seconds with tinylm.loss's ``name`` set to ``a``, then to ``b``, alternately;
    the module's own value is put back afterwards."""
    runner = StepRunner("tinylm", preset(preset_name), 8, CPU)
    own = getattr(tinylm.loss, name)

    def step_with(value: object) -> Callable[[], float]:
        def step() -> float:
            setattr(tinylm.loss, name, value)
            return runner.step()

        return step

    try:
        return alternate(step_with(a), step_with(b), repeats)
    finally:
        setattr(tinylm.loss, name, own)


def onednn_logits(preset_name: str, repeats: int) -> tuple[float, float]:
    available = tinylm.loss._ONEDNN
    return step_with_loss_setting(preset_name, repeats, "_ONEDNN", False, available)


def onednn_hidden_grad(preset_name: str, repeats: int) -> tuple[float, float]:
    """Step seconds with the hidden states' gradient on MKL, then on oneDNN where this PyTorch has it."""
    available = tinylm.loss._ONEDNN
    return step_with_loss_setting(preset_name, repeats, "_ONEDNN_HIDDEN_GRAD", False, available)


def onednn_logits_matmul(preset_name: str, repeats: int) -> tuple[float, float]:
    """The logits of one loss chunk, (rows, C) x (V, C)^T: the default BLAS vs oneDNN."""
    cfg = preset(preset_name)
    rows = tinylm.loss._CHUNK_ELEMENTS["cpu"] // cfg.vocab_size
    hidden, weight = torch.randn(rows, cfg.n_embd), torch.randn(cfg.vocab_size, cfg.n_embd)

    def blas():
        return hidden @ weight.t()

    return alternate(blas, lambda: tinylm.loss._logits(hidden, weight), repeats * 5)


def onednn_hidden_grad_matmul(preset_name: str, repeats: int) -> tuple[float, float]:
    """The hidden states' gradient of one loss chunk, (rows, V) x (V, C): the default BLAS vs oneDNN."""
    cfg = preset(preset_name)
    rows = tinylm.loss._CHUNK_ELEMENTS["cpu"] // cfg.vocab_size
    grad_logits, weight = torch.rand(rows, cfg.vocab_size), torch.randn(cfg.vocab_size, cfg.n_embd)
    weight_t = tinylm.loss._hidden_grad_weight(weight)  # made once per loss call, as tinylm does

    def blas():
        return grad_logits @ weight

    return alternate(blas, lambda: tinylm.loss._times_weight(grad_logits, weight, weight_t), repeats * 5)


STEPS_IN_A_FRESH_PROCESS = """
import resource, statistics, sys, time, torch
from tinylm.bench import StepRunner
from tinylm.config import preset
from tinylm.runtime import keep_freed_memory
if sys.argv[2] == "1":
    keep_freed_memory()
runner = StepRunner("tinylm", preset(sys.argv[1]), 8, torch.device("cpu"))
runner.step()
faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    runner.step()
    times.append(time.perf_counter() - start)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(times)
print(statistics.median(times), faults)
"""


def heap(preset_name: str, repeats: int) -> tuple[float, float, float, float]:
    """Step seconds and page faults per step with glibc's default heap and with the kept heap.

    The setting is process-wide, so each variant runs in fresh processes, in turns.
    """
    results: dict[str, list[list[float]]] = {"0": [], "1": []}
    for _ in range(max(2, repeats // 2)):
        for tuned in ("0", "1"):
            cmd = [sys.executable, "-c", STEPS_IN_A_FRESH_PROCESS, preset_name, tuned, "2"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[tuned].append([float(v) for v in done.stdout.split()])
    default, kept = ([statistics.median(column) for column in zip(*results[k])] for k in ("0", "1"))
    return default[0], kept[0], default[1], kept[1]


def adamw(preset_name: str, repeats: int) -> tuple[float, float, float]:
    """optimizer.step() seconds: for-loop (AdamW's CPU default), multi-tensor, fused."""
    model = StepRunner("tinylm", preset(preset_name), 1, CPU).model
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opts = [torch.optim.AdamW(model.parameters(), lr=1e-4, **kw) for kw in ({}, {"foreach": True}, {"fused": True})]
    loop, foreach = alternate(opts[0].step, opts[1].step, repeats)
    _, fused = alternate(opts[1].step, opts[2].step, repeats)
    return loop, foreach, fused


def _loss_from_row_maxima(logits, t, softcap, z_loss):
    """The loss chunk before the target-probability loss (default switches only): two passes for row maxima.
    Returns what tinylm.loss._chunk_loss_and_grad does: without the z-loss the cross-entropy is the loss."""
    keep = t != tinylm.loss.IGNORE_INDEX
    safe_t = torch.where(keep, t, 0)
    row_max = logits.amax(dim=1)
    target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
    probs = torch.softmax(logits, dim=-1)
    log_sum_exp = row_max - probs.amax(dim=1).log()
    total = ((log_sum_exp - target_logit) * keep).sum()
    probs[torch.arange(len(t)), safe_t] -= 1.0
    return total, total, probs, keep


def step_with_chunk_function(preset_name: str, repeats: int, other: Callable) -> tuple[float, float]:
    """Training step seconds with ``other`` as the loss chunk's function, then with tinylm's."""
    own = tinylm.loss._chunk_loss_and_grad
    return step_with_loss_setting(preset_name, repeats, "_chunk_loss_and_grad", other, own)


def compiled_loss_chunk(preset_name: str, repeats: int) -> tuple[float, float, float]:
    """Step seconds with the loss chunk's elementwise work compiled (inductor) vs eager; compile seconds."""
    compiled = torch.compile(tinylm.loss._chunk_loss_and_grad, dynamic=False)
    runner = StepRunner("tinylm", preset(preset_name), 8, CPU)
    own = tinylm.loss._chunk_loss_and_grad
    tinylm.loss._chunk_loss_and_grad = compiled
    start = time.perf_counter()
    runner.step()  # compiles: one graph for the full chunks, one for the last
    compile_s = time.perf_counter() - start
    tinylm.loss._chunk_loss_and_grad = own
    compiled_s, eager_s = step_with_chunk_function(preset_name, repeats, compiled)
    return eager_s, compiled_s, compile_s


def chunk_size(preset_name: str, repeats: int, factor: float) -> tuple[float, float]:
    """Training step seconds with the CPU loss chunk scaled by ``factor``, then at the default size."""
    runner = StepRunner("tinylm", preset(preset_name), 8, CPU)
    default = tinylm.loss._CHUNK_ELEMENTS["cpu"]

    def step_with(elements: int) -> Callable[[], float]:
        def step() -> float:
            tinylm.loss._CHUNK_ELEMENTS["cpu"] = elements
            return runner.step()

        return step

    try:
        return alternate(step_with(int(default * factor)), step_with(default), repeats)
    finally:
        tinylm.loss._CHUNK_ELEMENTS["cpu"] = default


def softmax_passes(preset_name: str, repeats: int) -> tuple[float, float]:
    """One loss chunk: log_softmax then exp (two exponentials per logit) vs max + softmax + max."""
    cfg = preset(preset_name)
    rows = tinylm.loss._CHUNK_ELEMENTS["cpu"] // cfg.vocab_size
    logits = torch.randn(rows, cfg.vocab_size)

    def log_softmax_exp():
        return torch.log_softmax(logits, dim=-1).exp_()

    def softmax_and_maxima():
        logits.amax(dim=1)
        probs = torch.softmax(logits, dim=-1)
        probs.amax(dim=1)
        return probs

    return alternate(log_softmax_exp, softmax_and_maxima, repeats * 5)


def attention(preset_name: str, repeats: int) -> tuple[float, float]:
    """Causal attention forward + backward of one layer: SDPA's math backend vs its flash kernel."""
    cfg = preset(preset_name)
    shape = (8, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))

    def run(backend):
        def f():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        return f

    return alternate(run(SDPBackend.MATH), run(SDPBackend.FLASH_ATTENTION), repeats)


def batch_building(block_size: int, repeats: int) -> dict[str, float]:
    """Milliseconds to build one batch of 8 rows from memory-mapped tokens, packed and padded.

    This is host work a GPU step could wait on; if it is tiny, a background loader buys nothing.
    """
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.memmap(Path(tmp) / "train.bin", dtype=np.uint16, mode="w+", shape=(20_000_000,))
        tokens[:] = rng.integers(0, 50257, len(tokens), dtype=np.uint16)
        offsets = np.arange(0, len(tokens) + 1, 200, dtype=np.int64)  # 200-token documents
        split = TokenSplit(tokens, offsets)
        out = {}
        for batching in ("packed", "padded"):
            rows = training_rows(split, batching, block_size, eot_id=50256, seed=0, doc_mask=False)
            starts = rng.integers(0, rows.n_rows - 8, repeats * 50)
            start = time.perf_counter()
            for first in starts:
                rows.batch(int(first), 8)
            out[batching] = (time.perf_counter() - start) / len(starts) * 1e3
        del tokens
    return out


def compiled_blocks(preset_name: str, repeats: int) -> tuple[float, float, float]:
    """Step seconds eager vs with torch.compile on every transformer block, and the compile time."""
    eager = StepRunner("tinylm", preset(preset_name), 8, CPU)
    compiled = StepRunner("tinylm", preset(preset_name), 8, CPU)
    for block in compiled.model.transformer.h:
        block.compile()
    start = time.perf_counter()
    compiled.step()
    compile_s = time.perf_counter() - start
    eager_s, compiled_s = alternate(eager.step, compiled.step, repeats)
    return eager_s, compiled_s, compile_s


LEVER_NAMES = ("heap", "onednn", "softmax", "target-prob", "chunk-size", "adamw", "attention", "batch")
"""What --only picks from; --compile adds the torch.compile rows."""


def time_levers(chosen: set[str], p: str, n: int, compile: bool, row: Callable[..., None]) -> None:
    """The rows of the chosen levers (and, with compile, torch.compile's), each printed as it is timed."""
    if "heap" in chosen:
        default_s, kept_s, default_faults, kept_faults = heap(p, n)
        row("heap keeps freed memory", "training step", default_s, kept_s,
            f"page faults per step {default_faults:,.0f} -> {kept_faults:,.0f}")  # fmt: skip
    if "onednn" in chosen:
        row("oneDNN for the logits", "one chunk's logits matmul", *onednn_logits_matmul(p, n))
        row("oneDNN for the logits", "training step", *onednn_logits(p, n))
        row("oneDNN for d hidden", "one chunk's d hidden matmul", *onednn_hidden_grad_matmul(p, n))
        row("oneDNN for d hidden", "training step", *onednn_hidden_grad(p, n), "vs MKL")
    if "softmax" in chosen:
        row("softmax + maxima", "one loss chunk", *softmax_passes(p, n), "vs log_softmax + exp")
    if "target-prob" in chosen:
        row("loss from target probability", "training step", *step_with_chunk_function(p, n, _loss_from_row_maxima),
            "vs log-sum-exp from two row maxima")  # fmt: skip
    if "chunk-size" in chosen:
        for factor in (0.5, 2.0):
            row("loss chunk rows (default)", "training step", *chunk_size(p, n, factor), f"vs {factor:g}x the rows")
    if "adamw" in chosen:
        loop, foreach, fused = adamw(p, n)
        row("multi-tensor AdamW", "optimizer step", loop, foreach, "vs the for-loop default")
        row("fused AdamW", "optimizer step", foreach, fused, "vs multi-tensor")
    if "attention" in chosen:
        row("flash SDPA", "attention fwd+bwd, 1 layer", *attention(p, n), "vs SDPA math")
    if compile:
        eager_s, compiled_s, compile_s = compiled_blocks(p, n)
        row(
            "torch.compile on blocks", "training step", eager_s, compiled_s, f"first step (compiling) {compile_s:.0f} s"
        )
        eager_s, compiled_s, compile_s = compiled_loss_chunk(p, n)
        row("torch.compile, loss chunk", "training step", eager_s, compiled_s, f"compiling {compile_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--compile", action="store_true", help="also try torch.compile (about a minute)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--only", metavar="LEVER[,LEVER]", help=f"run these alone: {', '.join(LEVER_NAMES)}")
    args = parser.parse_args()
    chosen = {name.strip() for name in args.only.split(",") if name.strip()} if args.only else set(LEVER_NAMES)
    if not chosen:
        parser.error(f"--only names no lever; choose from {', '.join(LEVER_NAMES)}")
    if unknown := chosen - set(LEVER_NAMES):
        parser.error(f"unknown lever {', '.join(sorted(unknown))}; choose from {', '.join(LEVER_NAMES)}")
    keep_freed_memory()
    p, n = args.preset, args.repeats
    rows = []

    def row(lever, what, without, with_, note=""):
        rows.append({"lever": lever, "timed": what, "without_s": without, "with_s": with_, "note": note})
        print(f"{lever:<28} {what:<26} {without:>9.4f} s {with_:>9.4f} s  {without / with_:>5.2f}x  {note}", flush=True)

    print(f"{p} on {torch.get_num_threads()} CPU threads, batch 8 x block {preset(p).block_size}; medians of {n}")
    print(f"{'lever':<28} {'timed':<26} {'without':>11} {'with':>11}  ratio")
    time_levers(chosen, p, n, args.compile, row)
    build_ms = batch_building(preset(p).block_size, n) if "batch" in chosen else None
    if build_ms:
        print(f"building one batch of 8 rows from memory-mapped tokens: packed {build_ms['packed']:.3f} ms, "
              f"padded {build_ms['padded']:.3f} ms")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            report = {
                "preset": p,
                "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "repeats": n,
                "levers": rows,
                "batch_ms": build_ms,
            }
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
