"""What a checkpoint's checksums cost: the time to hash its files, beside the time to write them.

For the tiny, basic and quality presets (GPT-2 vocabulary, AdamW, the guard's roll-back snapshot as a
run at an evaluation holds it) it saves a checkpoint into a temporary folder and times the save, then
hashes the files as a reader (resume, sample, eval, export) does. A save hashes its bytes as they are
written; the figure here for that share is the reader's, an upper bound. SHA-256 is timed on the same
files for comparison (it was the first choice). Usage:

    python benchmarks/bench_checksums.py [--presets tiny basic quality] [--repeat 3] [--dir /tmp] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tinylm import checkpoint
from tinylm.config import RunConfig, TrainConfig, preset
from tinylm.model import GPT
from tinylm.optim import build_optimizer
from tinylm.stability import _snapshot


def measure(name: str, repeat: int, folder: Path) -> dict:
    cfg = RunConfig(model=preset(name), train=TrainConfig(max_steps=1))
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()  # Adam's moments exist, as in any checkpoint after the first step
    good = _snapshot(0, 5.0, model, optimizer)  # the guard's last good state, taken at an earlier evaluation
    saves, hashes, sha256s, sizes = [], [], [], 0
    for i in range(repeat):
        run = Path(tempfile.mkdtemp(dir=folder))
        progress = {"step": i + 1, "stability": {"good": good}}
        started = time.perf_counter()
        checkpoint.save(run, model, optimizer, progress, cfg.fixed_settings())
        saves.append(time.perf_counter() - started)
        files = checkpoint.locate(run)
        started = time.perf_counter()
        for path in (files.model, files.state):
            checkpoint.file_checksum(path)
        hashes.append(time.perf_counter() - started)
        started = time.perf_counter()
        for path in (files.model, files.state):
            hashlib.sha256(path.read_bytes()).hexdigest()
        sha256s.append(time.perf_counter() - started)
        sizes = files.model.stat().st_size + files.state.stat().st_size
    save_s, hash_s, sha_s = statistics.median(saves), statistics.median(hashes), statistics.median(sha256s)
    return {"preset": name, "params": model.num_params(), "checkpoint_mb": round(sizes / 1e6, 1),
            "save_s_median": round(save_s, 3), "checksum": checkpoint.CHECKSUM, "checksum_s_median": round(hash_s, 3),
            "checksum_share_of_save": round(hash_s / save_s, 3), "sha256_s_median": round(sha_s, 3),
            "sha256_share_of_save": round(sha_s / save_s, 3), "repeat": repeat}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "basic", "quality"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: the temp folder)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name in args.presets:
            rows.append(measure(name, args.repeat, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
