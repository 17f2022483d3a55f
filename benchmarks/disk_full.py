"""A full disk, tried as a new user meets it: the tiny preset trains into a small tmpfs, checkpointing
every 5 steps, until the disk fills. Every size must end in one `tinylm: error:` line (no traceback),
leave no temporary folder, and resume, once the disk is enlarged, to metrics identical to a run that
never met a full disk (so they are neither ahead of nor behind the checkpoint it resumed from).

Needs root (it mounts tmpfs) and Linux. Usage:

    sudo python benchmarks/disk_full.py [--sizes 3 6 10 14 24 34] [--steps 40] [--json results/...json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = ["--preset", "tiny", "--device", "cpu", "--checkpoint-every", "5", "--eval-every", "5", "--eval-tokens", "4096",
         "--batch-size", "4", "--quiet"]  # fmt: skip


def tinylm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinylm", *args], capture_output=True, text=True, timeout=1800)


def losses(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines if line.strip()]


def one_size(size_mb: int, steps: int, reference: list[dict], root: Path) -> dict:
    mount = root / f"tmpfs-{size_mb}mb"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)], check=True)
    run = mount / "run"
    try:
        started = time.perf_counter()
        full = tinylm("train", *TRAIN, "--max-steps", str(steps), "--out", str(run))
        errors = [line for line in full.stderr.splitlines() if line.startswith("tinylm: error:")]
        leftovers = sorted(p.name for p in run.iterdir() if ".tmp" in p.name) if run.exists() else []
        pointer = run / "checkpoint.json"
        last_good = json.loads(pointer.read_text())["step"] if pointer.exists() else None
        subprocess.run(["mount", "-o", "remount,size=512m", str(mount)], check=True)  # space freed
        resumed = tinylm("train", "--resume", str(run), "--quiet")
        same = resumed.returncode == 0 and losses(run) == reference
        return {
            "size_mb": size_mb,
            "exit_code": full.returncode,
            "error_lines": errors,
            "traceback": "Traceback" in full.stderr,
            "temporary_files_left": leftovers,
            "last_good_step": last_good,
            "resume_exit_code": resumed.returncode,
            "resume_stderr_tail": resumed.stderr.strip().splitlines()[-1:] if resumed.returncode else [],
            "metrics_equal_uninterrupted": same,
            "seconds": round(time.perf_counter() - started, 1),
            "ok": full.returncode == 2 and len(errors) == 1 and "Traceback" not in full.stderr and not leftovers
            and same,
        }  # fmt: skip
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 6, 10, 14, 24, 34], help="tmpfs sizes, MB")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("disk_full.py mounts tmpfs: run it as root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        whole = root / "whole"
        done = tinylm("train", *TRAIN, "--max-steps", str(args.steps), "--out", str(whole))
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return 1
        reference = losses(whole)
        results = []
        for size in args.sizes:
            result = one_size(size, args.steps, reference, root)
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{sum(r['ok'] for r in results)} of {len(results)} sizes ok")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
