"""How fast tinylm's step could be against the textbook's on this machine: the output layer alone.

Usage: .venv/bin/python benchmarks/bench_bound.py [--preset mid] [--batch-size 8] [--repeats 5] [--clock wall|cpu] [--json FILE]

The two steps of `tinylm bench --compare-textbook` run the same blocks; they differ in the output
layer (the logits, the cross-entropy and their gradients) and in the optimizer (the textbook's is
torch's default AdamW, tinylm's the fused one build_optimizer makes), which the textbook's "rest of
the step" includes. This times both steps and both output layers on their own, the four in turn
after a warm-up (the same rows), and prints the ratio a perfect output layer would give: one that
spends exactly its three matmuls' FLOPs (logits, d hidden, d weight; 3 x 2 N C V) at the matmul
peak measured in the same run, with the rest of tinylm's step as measured. A change to the loss alone
takes the step ratio past that bound only by running its matmuls above that measured (square-matmul)
peak or by making the rest of the step faster.
"""

import argparse
import json
import statistics

import torch

from tinylm.bench import CLOCKS, StepRunner, check_clock, matmul_peak_gflops
from tinylm.config import preset
from tinylm.errors import UserError
from tinylm.loss import linear_cross_entropy, textbook_loss
from tinylm.runtime import tune_for

CPU = torch.device("cpu")


class OutputLayer:
    """The output layer's forward and backward on its own, for one variant: rows of hidden states
    shaped like the step's, the (tied) output matrix, random targets."""

    def __init__(self, variant: str, n_rows: int, n_embd: int, vocab_size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.hidden = torch.randn(n_rows, n_embd, generator=gen, requires_grad=True)
        self.weight = (torch.randn(vocab_size, n_embd, generator=gen) * 0.02).requires_grad_()
        self.targets = torch.randint(0, vocab_size, (n_rows,), generator=gen)
        self.textbook = variant == "textbook"

    def step(self) -> None:
        self.hidden.grad = self.weight.grad = None
        if self.textbook:
            loss, _ = textbook_loss(self.hidden @ self.weight.t(), self.targets)
        else:
            loss = linear_cross_entropy(self.hidden, self.weight, self.targets)
        loss.backward()


def median_seconds(runs: dict, repeats: int, clock: str) -> dict:
    """Median seconds of each callable, run in turns after one warm-up call each."""
    now = CLOCKS[clock]
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = now()
            run()
            times[name].append(now() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(preset_name: str, batch_size: int, repeats: int, clock: str) -> dict:
    check_clock(clock, CPU)
    tune_for(CPU)
    peak = matmul_peak_gflops(CPU, clock=clock)
    cfg = preset(preset_name)
    n_rows = batch_size * cfg.block_size
    variants = ("tinylm", "textbook")
    runs = {("step", v): StepRunner(v, cfg, batch_size, CPU).step for v in variants}
    runs |= {("layer", v): OutputLayer(v, n_rows, cfg.n_embd, cfg.vocab_size).step for v in variants}
    timed = median_seconds(runs, repeats, clock)  # all four in turn: a load that comes and goes hits each alike
    step_s, head_s = ({v: timed[(kind, v)] for v in variants} for kind in ("step", "layer"))
    head_gflop = 3 * 2 * n_rows * cfg.n_embd * cfg.vocab_size / 1e9
    perfect_head_s = head_gflop / peak
    rest_s = {v: step_s[v] - head_s[v] for v in variants}
    return {
        "preset": preset_name,
        "batch_size": batch_size,
        "block_size": cfg.block_size,
        "threads": torch.get_num_threads(),
        "clock": clock,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "repeats": repeats,
        "matmul_peak_gflops": peak,
        "step_s": step_s,
        "output_layer_s": head_s,
        "rest_of_step_s": rest_s,
        "output_layer_gflop": head_gflop,
        "output_layer_gflops": {v: head_gflop / s for v, s in head_s.items()},
        "perfect_output_layer_s": perfect_head_s,
        "step_ratio": step_s["textbook"] / step_s["tinylm"],
        "bound_on_step_ratio": step_s["textbook"] / (rest_s["tinylm"] + perfect_head_s),
    }


def format_report(r: dict) -> str:
    s, h, rest, gf = r["step_s"], r["output_layer_s"], r["rest_of_step_s"], r["output_layer_gflops"]
    peak = r["matmul_peak_gflops"]
    return "\n".join([
        f"{r['preset']}, batch {r['batch_size']} x {r['block_size']}, {r['threads']} thread(s), {r['clock']} clock, "
        f"ATen {r['cpu_capability']}; matmul peak {peak:.1f} GFLOP/s; medians of {r['repeats']}",
        f"{'':<28}{'tinylm':>10}{'textbook':>10}",
        f"{'step':<28}{s['tinylm']:>9.3f}s{s['textbook']:>9.3f}s   ratio {r['step_ratio']:.2f}x",
        f"{'output layer alone':<28}{h['tinylm']:>9.3f}s{h['textbook']:>9.3f}s",
        f"{'  as GFLOP/s (% of peak)':<28}{gf['tinylm']:>10.1f}{gf['textbook']:>10.1f}"
        f"   ({gf['tinylm'] / peak:.0%}, {gf['textbook'] / peak:.0%})",
        f"{'rest of the step':<28}{rest['tinylm']:>9.3f}s{rest['textbook']:>9.3f}s",
        f"perfect output layer: {r['output_layer_gflop']:.1f} GFLOP at the peak = {r['perfect_output_layer_s']:.3f} s",
        f"bound on the step ratio: {s['textbook']:.3f} / ({rest['tinylm']:.3f} + {r['perfect_output_layer_s']:.3f})"
        f" = {r['bound_on_step_ratio']:.2f}x",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    try:
        report = measure(args.preset, args.batch_size, args.repeats, args.clock)
    except UserError as e:  # --clock cpu on several threads
        parser.error(str(e))
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
