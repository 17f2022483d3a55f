"""SIGKILL a run while its checkpoints are being written, again and again, with checksums on; count
the resumes that fail and the checkpoints falsely called damaged.

Each round starts the run (or resumes it), waits until a save is under way (its temporary
`.checkpoint-*` folder appears), sleeps a random 0-30 ms so the kill lands anywhere inside the save,
and kills the process. The next round's resume is the check: a resume that fails is unresumable, and
one whose error says "damaged" is a false damaged report (nothing but kills touched the folder). At
the end the run finishes and its metrics are compared with an uninterrupted run's. Usage:

    python benchmarks/kill_checkpoints.py [--kills 20] [--seed 0] [--json results/...json]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = ["--preset", "tiny", "--device", "cpu", "--checkpoint-every", "1", "--eval-every", "5", "--eval-tokens", "4096",
         "--batch-size", "4", "--max-steps", "60",
         "--quiet"]  # fmt: skip


def command(run: Path) -> list[str]:
    if (run / "checkpoint.json").exists():
        return [sys.executable, "-m", "tinylm", "train", "--resume", str(run), "--quiet"]
    return [sys.executable, "-m", "tinylm", "train", *TRAIN, "--out", str(run)]


def saving(run: Path) -> bool:
    return run.is_dir() and any(p.name.startswith(".checkpoint-") for p in run.iterdir())


def losses(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    counts = {"kills": 0, "kills_inside_a_save": 0, "unresumable": 0, "false_damaged": 0, "rounds": 0}
    with tempfile.TemporaryDirectory() as tmp:
        whole, run = Path(tmp) / "whole", Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "tinylm", "train", *TRAIN, "--out", str(whole)], check=True)
        while counts["kills"] < args.kills:
            counts["rounds"] += 1
            proc = subprocess.Popen(command(run), stderr=subprocess.PIPE, text=True)
            while proc.poll() is None and not saving(run):
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.03))
            inside = saving(run)
            proc.kill()
            _, err = proc.communicate()
            if proc.returncode == -signal.SIGKILL:
                counts["kills"] += 1
                counts["kills_inside_a_save"] += inside
            elif proc.returncode != 0:  # it ended by itself before the kill: a failed start or resume
                counts["unresumable"] += 1
                counts["false_damaged"] += "damaged" in err
                print(err.strip().splitlines()[-1:], file=sys.stderr)
            else:
                break  # the run finished before the kill landed
        done = subprocess.run(command(run), capture_output=True, text=True)
        if done.returncode:
            counts["unresumable"] += 1
            counts["false_damaged"] += "damaged" in done.stderr
        counts["metrics_equal_uninterrupted"] = done.returncode == 0 and losses(run) == losses(whole)
    print(json.dumps(counts))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(counts, indent=2) + "\n")
    return 0 if counts["unresumable"] == 0 and counts["false_damaged"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
