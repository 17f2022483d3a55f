"""Measure `tinylm prepare` throughput (MB of text per second, and per core) on a text corpus.

Usage: .venv/bin/python benchmarks/bench_prepare.py [PATH] [--tokenizer gpt2]
PATH defaults to train.txt of the TinyStories slice (TINYLM_TINYSTORIES, see tinystories.py).
Prepares into a fresh temporary directory each repeat (no cache) and prints the median.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from tinystories import tinystories_or_exit

from tinylm.data.prepare import PrepareOptions, prepare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", nargs="?", help="a text corpus (default: the TinyStories slice's train.txt)")
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.path = args.path or str(tinystories_or_exit() / "train.txt")
    size = Path(args.path).stat().st_size
    prepare(PrepareOptions(args.path, args.tokenizer), out=Path(tempfile.mkdtemp()) / "warm", quiet=True)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        data = prepare(PrepareOptions(args.path, args.tokenizer), out=Path(tempfile.mkdtemp()) / "p", quiet=True)
        times.append(time.perf_counter() - start)
    cores = os.cpu_count() or 1
    rate = size / statistics.median(times) / 1e6
    tokens = sum(s["tokens"] for s in data.meta["splits"].values())
    print(f"{args.path}: {size / 1e6:.1f} MB, {tokens:,} tokens with {args.tokenizer}")
    print(
        f"median {statistics.median(times):.2f} s over {args.repeats} runs: {rate:.1f} MB/s, "
        f"{rate / cores:.1f} MB/s per core ({cores} cores)"
    )


if __name__ == "__main__":
    main()
