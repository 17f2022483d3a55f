"""Per-phase CPU step time: the baseline phase (naive init) against the init phase (scaled), same batches.

Usage: .venv/bin/python benchmarks/bench_phases.py [--data SPEC] [--preset basic] [--steps 4]
       [--processes 2] [--json results/bench/baseline-phase.json]

The two phases differ only in their init (N(0, 1) against GPT-2's), so any difference in step
time is a data-dependent slow path. A naive-init step produces subnormal floats (the loss
softmax of logits ~100 apart, the tiny gradients flowing back), so each process also runs the
step with subnormals flushed to zero (FTZ/DAZ, ``torch.set_flush_denormal``) to see whether
they cost anything here. That setting is per thread: it must be made before the first
parallel op or the intra-op worker threads keep the default, so each variant runs in fresh
processes, in turns; inside one process the two phases alternate step by step on the same
padded batches, with the phase's own optimizer, LR and clipping, as `tinylm train` runs them.

Also printed: what flushing changes in a first step's loss and gradients, how many subnormals
a naive step's loss softmax holds, and torch.exp on arguments whose result is subnormal
(the one data-dependent slow path found on this project's CPU; the step does not use it).
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tinystories import tinystories_or_exit

CHILD = r"""
import json, sys, time, torch
args = json.loads(sys.argv[1])
if args["ftz"]:
    torch.set_flush_denormal(True)  # before any parallel op, so the worker threads inherit it
from tinylm.study.runner import PHASES
from tinylm.config import RunConfig, TrainConfig, preset
from tinylm.data.batching import training_rows
from tinylm.distributed import Cluster
from tinylm.model import GPT
from tinylm.optim import build_optimizer
from tinylm.runtime import tune_for
from tinylm.train import prepare_data
from tinylm.trainer import accumulate_gradients, step_batches

cpu = torch.device("cpu")
tune_for(cpu)
runs, rows = {}, None
for name in ("baseline", "init"):
    phase = PHASES[name]
    cfg = RunConfig(model=preset(args["preset"]), train=TrainConfig(
        data=args["data"], init=phase.init, schedule=phase.schedule, batching=phase.batching,
        batch_size=args["batch_size"], grad_accum=1, max_steps=args["steps"] + 1, seed=0))
    if rows is None:
        data = prepare_data(cfg, quiet=True)
        rows = training_rows(data.split("train"), "padded", cfg.model.block_size, data.meta["eot_id"], 0, False)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.init_weights(phase.init, seed=0)
    model.train()
    runs[name] = (model, build_optimizer(model, cfg.train, cpu), cfg.train)

def step(name, i, keep=None):
    model, optimizer, t = runs[name]
    for group in optimizer.param_groups:
        group["lr"] = t.lr  # both phases use a constant LR
    batches, real = step_batches(rows, t, i, Cluster())
    loss_sum = accumulate_gradients(model, batches, real, Cluster(), cpu)
    if keep is not None:
        keep[name] = {"loss": loss_sum.item() / real,
                      "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

first = {}
for name in runs:  # warm-up step, kept for the arithmetic comparison
    step(name, 0, first)
torch.save(first, args["grads_out"])
times = {name: [] for name in runs}
for i in range(1, args["steps"] + 1):
    for name in runs:
        start = time.perf_counter()
        step(name, i)
        times[name].append(time.perf_counter() - start)
print(json.dumps(times))
"""


def run_child(args: argparse.Namespace, ftz: bool, grads_out: Path) -> dict[str, list[float]]:
    spec = {"ftz": ftz, "preset": args.preset, "data": args.data, "batch_size": args.batch_size,
            "steps": args.steps, "grads_out": str(grads_out)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def flush_difference(plain: dict, flushed: dict) -> dict[str, dict[str, float]]:
    """What FTZ/DAZ changed in each phase's first step: the loss and the gradients."""
    out = {}
    for phase in plain:
        a, b = plain[phase], flushed[phase]
        diffs = [(a["grads"][n] - b["grads"][n]).abs().max().item() for n in a["grads"]]
        scale = max(g.abs().max().item() for g in a["grads"].values())
        out[phase] = {
            "loss": a["loss"],
            "loss_abs_diff": abs(a["loss"] - b["loss"]),
            "grad_max_abs_diff": max(diffs),
            "grad_max_abs": scale,
            "bit_identical": a["loss"] == b["loss"]
            and all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"]),
        }
    return out


def exp_slow_path(repeats: int) -> dict[str, float]:
    """Milliseconds of torch.exp on 4M arguments in [-1, 0) and in [-100, -99) (subnormal results)."""
    u = torch.rand(1 << 22)
    normal, subnormal = u - 1, u - 100
    torch.exp(normal), torch.exp(subnormal)
    tn, ts = [], []
    for _ in range(repeats):
        for x, times in ((normal, tn), (subnormal, ts)):
            start = time.perf_counter()
            torch.exp(x)
            times.append((time.perf_counter() - start) * 1e3)
    return {"normal_result_ms": statistics.median(tn), "subnormal_result_ms": statistics.median(ts)}


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"cpu": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "torch": torch.__version__}


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="data spec, as `tinylm train --data` (default: the TinyStories slice)")
    parser.add_argument("--preset", default="basic")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per phase in each process")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per variant, in turns")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    args.data = args.data or str(tinystories_or_exit())

    times = {v: {"baseline": [], "init": []} for v in ("default", "ftz")}
    per_process = {v: [] for v in times}
    with tempfile.TemporaryDirectory() as tmp:
        firsts = {}
        for i in range(args.processes):
            for variant in times:
                grads = Path(tmp) / f"{variant}.pt"
                got = run_child(args, variant == "ftz", grads)
                if i == 0:
                    firsts[variant] = torch.load(grads)
                for phase, ts in got.items():
                    times[variant][phase] += ts
                per_process[variant].append({p: statistics.median(ts) for p, ts in got.items()})
                print(f"{variant:>7} process {i}: " + ", ".join(f"{p} {statistics.median(t):.3f} s" for p, t in got.items()),
                      flush=True)  # fmt: skip
        flush = flush_difference(firsts["default"], firsts["ftz"])

    subnormal = naive_softmax_subnormals(args)
    exp = exp_slow_path(7)
    info = cpu_info()
    results = {v: {p: summary(ts) for p, ts in phases.items()} for v, phases in times.items()}
    print(f"\n{args.preset}, batch {args.batch_size}, padded, fp32 on {torch.get_num_threads()} threads; {info['cpu']} "
          f"(AVX2 {info['avx2']}, AVX-512 {info['avx512f']}); torch {info['torch']}")  # fmt: skip
    print(f"{'variant':<8} {'phase':<9} {'median s':>9} {'min s':>7} {'max s':>7}  steps")
    for v, phases in results.items():
        for p, s in phases.items():
            print(f"{v:<8} {p:<9} {s['median_s']:>9.3f} {s['min_s']:>7.3f} {s['max_s']:>7.3f}  {s['n']}")
    for v in results:
        ratios = [r["baseline"] / r["init"] for r in per_process[v]]
        print(f"{v}: baseline / init step time {results[v]['baseline']['median_s'] / results[v]['init']['median_s']:.2f}x "
              f"(per process {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    for p, d in flush.items():
        print(f"FTZ/DAZ on {p}'s first step: loss {d['loss']:.6f} changes by {d['loss_abs_diff']:.3g}, gradients by at most "
              f"{d['grad_max_abs_diff']:.3g} (largest {d['grad_max_abs']:.3g}); bit-identical: {d['bit_identical']}")  # fmt: skip
    print(
        f"naive-init loss softmax, first chunk: {subnormal['subnormal']:,} of {subnormal['elements']:,} "
        f"probabilities subnormal ({subnormal['subnormal'] / subnormal['elements']:.2e})"
    )
    print(
        f"torch.exp, 4M arguments: result in [0.37, 1) {exp['normal_result_ms']:.1f} ms, "
        f"subnormal result {exp['subnormal_result_ms']:.1f} ms"
    )
    if args.json:
        report = {
            "preset": args.preset, "batch_size": args.batch_size, "batching": "padded", "dtype": "fp32",
            "data": args.data, "threads": torch.get_num_threads(), **info,
            "steps_per_process": args.steps, "processes_per_variant": args.processes,
            "step_time": results, "per_process_median_s": per_process,
            "ftz_changes_first_step": flush, "naive_softmax_subnormals": subnormal, "torch_exp_ms": exp,
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def naive_softmax_subnormals(args: argparse.Namespace) -> dict[str, int]:
    """Subnormal probabilities in the first loss chunk of a naive-init model on a real padded batch."""
    from tinylm.config import RunConfig, TrainConfig, preset
    from tinylm.data.batching import training_rows
    from tinylm.loss import _CHUNK_ELEMENTS, _logits
    from tinylm.model import GPT
    from tinylm.train import prepare_data

    cfg = RunConfig(model=preset(args.preset), train=TrainConfig(data=args.data, max_steps=1))
    data = prepare_data(cfg, quiet=True)
    batch = training_rows(data.split("train"), "padded", cfg.model.block_size, data.meta["eot_id"], 0, False)
    batch = batch.batch(0, args.batch_size)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.init_weights("naive", seed=0)
    hidden = {}
    model.transformer.ln_f.register_forward_hook(lambda m, i, out: hidden.setdefault("h", out.detach()))
    with torch.no_grad():
        model(batch.x, batch.y)
        h = hidden["h"].reshape(-1, cfg.model.n_embd)
        w = model.transformer.wte.weight
        probs = torch.softmax(_logits(h[: _CHUNK_ELEMENTS["cpu"] // w.shape[0]], w), dim=-1)
    magnitude = probs.abs()
    count = int(((magnitude > 0) & (magnitude < torch.finfo(torch.float32).tiny)).sum())
    return {"subnormal": count, "elements": probs.numel()}


if __name__ == "__main__":
    main()
