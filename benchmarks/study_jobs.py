"""A tiny study trained with --jobs 1 and with --jobs 2: wall-clock time of each and the ratio.

    python benchmarks/study_jobs.py [--repeats 3] [--steps 40] [--seeds 2]

Prints its figures (it is not a test). Each repeat trains the same study (the seed study's four
arms x 2 seeds on the tiny preset, a trained 512-token BPE) into fresh folders, alternating the
order of the two settings so that a drift of the machine's load does not favour one. The data is
the tinystories slice (environment variable TINYLM_TINYSTORIES, by default
../shared/data/tinystories-lc beside the repository), else the embedded Shakespeare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def data_path() -> str:
    slice_dir = Path(os.environ.get("TINYLM_TINYSTORIES", REPO.parent / "shared" / "data" / "tinystories-lc"))
    return str(slice_dir) if slice_dir.exists() else "shakespeare"


def one_study(jobs: int, steps: int, seeds: int, data: str, out: Path) -> float:
    argv = [sys.executable, "-m", "tinylm", "ablate", "--preset", "tiny", "--seeds", str(seeds), "--data", data,
            "--tokenizer", "bpe:512", "--batch-size", "8", "--max-steps", str(steps), "--eval-every", str(steps),
            "--eval-tokens", "4096", "--device", "cpu", "--jobs", str(jobs), "--out", str(out), "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="steps per run")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per arm (4 arms)")
    args = parser.parse_args()
    data = data_path()
    print(f"data {data}, {os.cpu_count()} CPUs, {4 * args.seeds} runs of {args.steps} steps per study")
    with tempfile.TemporaryDirectory() as tmp:
        one_study(1, 1, 1, data, Path(tmp) / "warm")  # tokenise once: no repeat pays for it
        times: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.repeats):
            for jobs in (1, 2) if r % 2 == 0 else (2, 1):
                times[jobs].append(one_study(jobs, args.steps, args.seeds, data, Path(tmp) / f"r{r}-j{jobs}"))
                print(f"repeat {r}: --jobs {jobs}: {times[jobs][-1]:.1f} s", flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"median wall-clock: --jobs 1 {one:.1f} s, --jobs 2 {two:.1f} s, ratio {one / two:.2f}x")


if __name__ == "__main__":
    main()
