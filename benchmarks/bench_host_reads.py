"""The training step reading the device every step against every N steps (train's --host-read-every N).

Usage: python benchmarks/bench_host_reads.py --data SPEC [--preset basic] [--batch-size 32] [--every 10]
       [--steps 60] [--repeats 3] [--warmup 5] [--device auto] [--tokenizer gpt2] [--json FILE]

Two Trainers built as `tinylm train` builds them, the same seed and data, one reading every step (the
guard deciding on the host) and one every N steps (the guard deciding on the device, the update masked);
each repeat times --steps steps of each, in turns, from the first launch to the last read. No evaluation,
metrics or checkpoint runs in the timed loop: only the steps and their reads. On a CPU reading less
often saves nothing (a read costs nothing there) and the device's decision costs a little; what a GPU
may save is one wait for its queue per step, against the decision's extra kernel launches.

The printed JSON also holds the largest difference of the two variants' train losses over the same
steps: 0 on a CPU (the same arithmetic), within a GPU's run-to-run rounding there.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tinylm.config import RunConfig, TrainConfig, preset
from tinylm.distributed import Cluster
from tinylm.runtime import select_device, tune_for
from tinylm.train import build_trainer


def trainer_reading_every(n: int, args: argparse.Namespace, device: torch.device, out: Path):
    train = TrainConfig(data=args.data, tokenizer=args.tokenizer, batch_size=args.batch_size, max_steps=10**9,
                        eval_every=10**9, eval_tokens=args.batch_size * 64, host_read_every=n, device=str(device),
                        precision=args.precision, out=str(out / f"every-{n}"), seed=0)  # fmt: skip
    return build_trainer(RunConfig(model=preset(args.preset), train=train, preset=args.preset), resume=False,
                         quiet=True, cluster=Cluster(), device=device)  # fmt: skip


def wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer, steps: int, device: torch.device) -> tuple[float, list[float]]:
    """Seconds for ``steps`` steps and their reads; and the steps' train losses."""
    wait_for(device)
    start = time.perf_counter()
    read = []
    for _ in range(steps):
        trainer.train_step()
        if trainer.progress.step % trainer.read_every == 0:
            read += trainer.read_steps()
    read += trainer.read_steps() if trainer.taken else []
    wait_for(device)
    return time.perf_counter() - start, [step.record["train_loss"] for step in read]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="training text, as train's --data")
    parser.add_argument("--preset", default="basic")
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--every", type=int, default=10, help="N of the second variant (default 10)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.every < 2 or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--every must be at least 2, --steps and --repeats at least 1, --warmup at least 0")
    device = select_device(args.device)
    tune_for(device)  # as tinylm train sets the device up
    with tempfile.TemporaryDirectory(prefix="bench_host_reads-") as tmp:
        trainers = {n: trainer_reading_every(n, args, device, Path(tmp)) for n in (1, args.every)}
        if trainers[args.every].read_every != args.every:
            sys.exit(f"bench_host_reads: this run cannot read every {args.every} steps (see the line above)")
        losses = {n: timed_steps(t, args.warmup, device)[1] for n, t in trainers.items()} if args.warmup else {}
        seconds = {n: [] for n in trainers}
        for _ in range(args.repeats):
            for n, trainer in trainers.items():  # in turns: drift on a shared machine hits both alike
                elapsed, step_losses = timed_steps(trainer, args.steps, device)
                seconds[n].append(elapsed / args.steps)
                losses.setdefault(n, []).extend(step_losses)
    ms = {n: 1000 * statistics.median(s) for n, s in seconds.items()}
    given = argv if argv is not None else sys.argv[1:]
    figures = {
        "command": " ".join(["python", "benchmarks/bench_host_reads.py", *given]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "precision": trainers[1].t.precision,
        "every": args.every,
        "ms_per_step": {f"every-{n}": round(v, 3) for n, v in ms.items()},
        "ms_per_step_per_repeat": {f"every-{n}": [round(1000 * s, 3) for s in v] for n, v in seconds.items()},
        "speedup": round(ms[1] / ms[args.every], 4),
        "max_train_loss_difference": max(abs(a - b) for a, b in zip(losses[1], losses[args.every])),
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return figures


if __name__ == "__main__":
    main()
