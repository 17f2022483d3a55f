"""Training-step benchmark: tokens/s, GFLOP/s and MFU against this machine's measured matmul peak.

The tinylm step (chunked linear cross-entropy, the run's optimizer from build_optimizer, the
z-loss passed to the model as the trainer passes it) and, with ``compare_textbook``, the textbook
step (full logits + F.cross_entropy, default AdamW) are timed alternately in one process on the
same model and batch, so the ratio is fair on a noisy machine. Peak memory is measured in a fresh
subprocess per variant.

The training settings that change a step's cost are the optimizer (Muon's orthogonalisation) and
the z-loss; the textbook step adds the same z-loss term on its full logits (loss.textbook_loss),
so the ratio compares the same loss computed two ways, but keeps AdamW under ``--optimizer muon``:
it is the plain step a user would write, and the ratio then includes Muon's own cost.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

try:
    import resource
except ImportError:  # Windows: no page-fault counts
    resource = None

from tinylm.config import ModelConfig, TrainConfig, preset
from tinylm.costs import model_costs
from tinylm.errors import UserError
from tinylm.model import GPT
from tinylm.optim import build_optimizer
from tinylm.runtime import autocast_for, cpuinfo_bf16_flags, resolve_precision, select_device, tune_for


@dataclass
class StepTiming:
    name: str
    median_s: float
    tokens_per_s: float
    gflops: float
    mfu: float
    peak_memory_mb: float | None
    page_faults_per_step: float | None = None
    """Minor page faults per timed step (the whole process; None without getrusage): memory the step
    maps afresh, e.g. the textbook's 823 MB logits, which glibc serves from new mappings every step."""
    system_s_per_step: float | None = None
    """Kernel CPU seconds per timed step, all threads: mostly those page faults; it varies with the
    machine's memory state, and with it the steps that fault."""
    precision: str = "fp32"
    """The arithmetic of the step ('fp32', or 'bf16': bf16 autocast); MFU is against that precision's peak."""
    step_times_s: list[float] = field(default_factory=list)
    """Every timed step, in order: the spread behind the median."""


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""How steps and the peak are timed. 'cpu' is this process's CPU time, on one thread only: on a CPU
shared with other work it leaves out the time the process waits for a core, so ratios in one run
hold still, and it is the wall time of a quiet machine. With several threads CPU time sums over
them and counts workers spinning at barriers while another waits for a core, so a step's CPU
seconds would be neither its time nor steady; bench refuses that."""


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

DATASHEET_DENSE_TFLOPS = {
    "H200": {"bf16": 989.5, "fp32": 494.5},
    "H100 80GB HBM3": {"bf16": 989.5, "fp32": 494.5},  # the SXM H100's name
    "H100 PCIe": {"bf16": 756.5, "fp32": 378.0},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}
"""Dense tensor-core TFLOP/s of NVIDIA's data sheets (half their 'with sparsity' figures), by a part of the
device's name. fp32 is TF32: on CUDA, fp32 matmuls run in TF32 (runtime.tune_for)."""


PEAK_PRODUCT_S = 2.0
"""The longest one timed product of the peak measurement may take on a CPU: one where bf16 is emulated (no bf16
units) multiplies it many times slower than fp32, and a 2048 x 2048 bf16 product took minutes on an AVX2 Zen 3."""


PEAK_PROBES = 3
"""Timed 256 x 256 probes peak_matmul_side takes the fastest of. One takes under a millisecond in fp32 on a
CPU: a single preemption on a loaded one made it several times slower (6 ms against 0.4 ms here), enough to
halve the side, and the peak, hence MFU, moved with the side (2048: 54, 1024: 63 GFLOP/s on one Zen 3 thread)."""


def peak_matmul_side(device: torch.device, precision: str, budget_s: float = PEAK_PRODUCT_S) -> int:
    """The side of the square matmul the peak is measured with: 8192 on a GPU; on a CPU 2048, halved (down to 256)
    while one product, at the speed of the fastest of PEAK_PROBES 256 x 256 ones, would take longer than budget_s."""
    if device.type != "cpu":
        return 8192
    side, dtype = 256, _DTYPES[precision]
    a = torch.randn(side, side, dtype=dtype)
    a @ a  # the first product pays for the kernels' set-up
    fastest = float("inf")
    for _ in range(PEAK_PROBES):
        start = time.perf_counter()
        a @ a
        fastest = min(fastest, time.perf_counter() - start)
    seconds_per_flop = max(fastest, 1e-9) / (2 * side**3)
    n = 2048
    while n > side and 2 * n**3 * seconds_per_flop > budget_s:
        n //= 2
    return n


def matmul_peak_gflops(device: torch.device, repeats: int = 10, clock: str = "wall", precision: str | None = None,
                       side: int | None = None) -> float:  # fmt: skip
    """Best observed GFLOP/s of a large square matmul in ``precision`` (default: fp32 on CPU, bf16 on GPU);
    side: the matrices' (default: peak_matmul_side's)."""
    precision = precision or ("fp32" if device.type == "cpu" else "bf16")
    n, dtype = side or peak_matmul_side(device, precision), _DTYPES[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, now = float("inf"), CLOCKS[clock]
    for _ in range(repeats + 1):
        _sync(device)
        start = now()
        a @ b
        _sync(device)
        best = min(best, now() - start)
    return 2 * n**3 / best / 1e9


def peak_for(device: torch.device, precision: str, clock: str = "wall") -> tuple[float, str]:
    """(GFLOP/s, where the figure comes from) that MFU in ``precision`` is measured against: the data
    sheet's dense figure for a GPU it names, else the best square matmul measured here."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, figures in DATASHEET_DENSE_TFLOPS.items():
            if part in name:
                kind = "BF16" if precision == "bf16" else "TF32"
                return figures[precision] * 1000, f"data sheet: {part} dense {kind} {figures[precision]:g} TFLOP/s"
    n = peak_matmul_side(device, precision)
    gflops = matmul_peak_gflops(device, clock=clock, precision=precision, side=n)
    return gflops, f"measured: best {n}x{n} {precision} matmul"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _kernel_counts() -> tuple[int, float]:
    """This process's minor page faults and kernel CPU seconds so far ((0, 0.0) without getrusage)."""
    if resource is None:
        return 0, 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


BENCH_TRAIN = {"lr": 1e-4, "max_steps": 1}
"""The TrainConfig fields bench sets itself (a step's cost does not depend on them); the CLI's
BENCH_TRAIN_SETTINGS are the ones it takes from flags."""


class StepRunner:
    """One training step of one variant on a fixed batch."""

    def __init__(
        self,
        variant: str,
        cfg: ModelConfig,
        batch_size: int,
        device: torch.device,
        seed: int = 0,
        compile: bool = False,
        train: TrainConfig | None = None,
        precision: str = "fp32",
    ):
        torch.manual_seed(seed)
        self.precision = precision
        self.model = GPT(cfg).to(device)
        self.model.init_weights("scaled", seed=seed)
        self.textbook = variant == "textbook"
        if compile and not self.textbook:
            self.model.compile_blocks()
        train = train or TrainConfig(**BENCH_TRAIN)
        self.z_loss = train.z_loss
        if self.textbook:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train.lr)
        else:
            self.optimizer = build_optimizer(self.model, train, device)
        gen = torch.Generator().manual_seed(seed)
        shape = (batch_size, cfg.block_size)
        self.x = torch.randint(0, cfg.vocab_size, shape, generator=gen).to(device)
        self.y = torch.randint(0, min(cfg.vocab_size, 50257), shape, generator=gen).to(device)
        self.device = device

    def step(self) -> float:
        with autocast_for(self.device, self.precision):
            _, loss = self.model(self.x, self.y, full_logits=self.textbook, z_loss=self.z_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        return loss.item()


def peak_memory_mb(variant: str, cfg: ModelConfig, batch_size: int, device: torch.device, compile: bool,
                   train: TrainConfig, precision: str = "fp32") -> float:  # fmt: skip
    """Peak memory of a few steps of one variant, in a fresh process (RSS on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        runner = StepRunner(variant, cfg, batch_size, device, compile=compile, train=train, precision=precision)
        for _ in range(2):
            runner.step()
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        del runner
        torch.cuda.empty_cache()
        return peak
    code = (
        "import torch; from tinylm.bench import StepRunner, own_peak_rss_kib; "
        "from tinylm.config import ModelConfig, TrainConfig; "
        "from tinylm.runtime import tune_for; tune_for(torch.device('cpu')); "
        f"r = StepRunner({variant!r}, ModelConfig(**{asdict(cfg)!r}), {batch_size}, torch.device('cpu'), "
        f"compile={compile}, train=TrainConfig(**{asdict(train)!r}), precision={precision!r}); "
        "[r.step() for _ in range(2)]; "
        "print(own_peak_rss_kib())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024


def own_peak_rss_kib() -> int:
    """This process's peak resident memory in KiB.

    Linux's VmHWM starts afresh at exec; ru_maxrss would carry over the peak of the parent
    that forked us (here, a benchmark holding several models).
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def check_clock(clock: str, device: torch.device) -> None:
    if clock == "cpu" and device.type != "cpu":
        raise UserError(f"--clock cpu times CPU steps; on {device} the step's work is not this process's CPU time")
    if clock == "cpu" and torch.get_num_threads() != 1:
        raise UserError(f"--clock cpu needs one thread (OMP_NUM_THREADS=1): CPU time sums over this process's "
                        f"{torch.get_num_threads()} threads, so it is not the step's time")  # fmt: skip


def bench(
    preset_name: str = "basic",
    batch_size: int = 8,
    repeats: int = 5,
    warmup: int = 2,
    compare_textbook: bool = False,
    device_name: str = "auto",
    measure_memory: bool = True,
    compile: bool = False,
    model: ModelConfig | None = None,
    clock: str = "wall",
    train: TrainConfig | None = None,
    precisions: list[str] | None = None,
    profile: bool = False,
) -> dict:
    """Time the step of ``model`` (default: the preset's shape, GPT-2 mechanics) trained with
    ``train``'s optimizer and z-loss (default: AdamW, no z-loss), in each of ``precisions`` ('fp32',
    'bf16', 'auto'; default: what train's --precision auto picks here); see the module doc."""
    device = select_device(device_name)
    check_clock(clock, device)
    tune_for(device)  # the same process settings as training, for both steps
    precisions = list(dict.fromkeys(resolve_precision(p, device) for p in (precisions or ["auto"])))
    peaks = {p: peak_for(device, p, clock) for p in precisions}
    now = CLOCKS[clock]
    cfg = model or preset(preset_name)
    train = train or TrainConfig(**BENCH_TRAIN)
    flops_per_token = model_costs(cfg, batch_size).flops_per_token_train
    tokens = batch_size * cfg.block_size
    steps = ["tinylm"] + (["textbook"] if compare_textbook else [])
    variants = [(step, p) for p in precisions for step in steps]
    runners = {v: StepRunner(v[0], cfg, batch_size, device, compile=compile, train=train, precision=v[1])
               for v in variants}  # fmt: skip
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    kernel = {v: [0, 0.0] for v in variants}  # page faults, system seconds over the timed steps
    for i in range(warmup + repeats):
        for v in variants:  # alternate, so drift on a shared machine hits every variant alike
            before = _kernel_counts()
            start = now()
            runners[v].step()
            if i >= warmup:
                times[v].append(now() - start)
                kernel[v] = [a + b - c for a, b, c in zip(kernel[v], _kernel_counts(), before)]
    profiles = {p: profile_step(runners["tinylm", p]) for p in precisions} if profile else None
    del runners
    results = {}
    for v in variants:
        median = statistics.median(times[v])
        tps = tokens / median
        gflops = tps * flops_per_token / 1e9
        memory = peak_memory_mb(v[0], cfg, batch_size, device, compile, train, v[1]) if measure_memory else None
        faults, system_s = (x / repeats if resource else None for x in kernel[v])
        results[v] = StepTiming(v[0], median, tps, gflops, gflops / peaks[v[1]][0], memory, faults, system_s,
                                precision=v[1], step_times_s=times[v])  # fmt: skip
    first = precisions[0]
    report = {
        "preset": preset_name,
        "model": asdict(cfg),
        "params": model_costs(cfg, batch_size).params,
        **train_settings(train),
        "batch_size": batch_size,
        "block_size": cfg.block_size,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precisions": precisions,
        "dtype": ", ".join("bf16 autocast" if p == "bf16" else "fp32" for p in precisions),
        "threads": torch.get_num_threads(),
        "compiled_blocks": compile,
        "clock": clock,
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_name(),
        "cpu_bf16_flags": list(cpuinfo_bf16_flags()),  # the bf16 units --precision auto looks for
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector width ATen's kernels use
        "torch": torch.__version__,
        "matmul_peak_gflops": peaks[first][0],  # the first precision's, as before bench took several
        "matmul_peaks": {p: {"gflops": g, "source": source} for p, (g, source) in peaks.items()},
        "flops_per_token": flops_per_token,
        "repeats": repeats,
        "warmup": warmup,
        "results": [asdict(r) for r in results.values()],
    }
    if compare_textbook:
        by_precision = {p: results["tinylm", p].tokens_per_s / results["textbook", p].tokens_per_s for p in precisions}
        report["speedup_vs_textbook"] = by_precision[first]
        report["speedup_vs_textbook_by_precision"] = by_precision
    if profiles:
        report["profiles"] = profiles
    if {"fp32", "bf16"} <= set(precisions):
        fp32, bf16 = times["tinylm", "fp32"], times["tinylm", "bf16"]
        report["bf16_over_fp32"] = statistics.median(fp32) / statistics.median(bf16)
        report["bf16_over_fp32_per_repeat"] = [a / b for a, b in zip(fp32, bf16)]  # paired: timed one after the other
    return report


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
"""CUDA runtime calls that make the host wait for the GPU: cudaMemcpy (not ...Async) is what .item()
and .tolist() of a device tensor end in."""


def profile_step(runner: StepRunner, steps: int = 3, top: int = 15) -> dict:
    """Where a step's time goes, from torch.profiler over ``steps`` steps (after one unprofiled one).

    Per step: the wall time (with the profiler's own cost), the time the device was running kernels
    (CUDA; its share of the wall time is how little of the step is launch overhead, host waits and
    Python), kernel launches, host synchronisations, and the top operators: by time in kernels on a
    GPU, by self CPU time on a CPU.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    runner.step()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step()
    wall_ms = (time.perf_counter() - start) * 1000 / steps
    events = prof.key_averages()

    def per_step(e, attribute):
        return getattr(e, attribute, 0.0) / 1000 / steps  # profiler times are microseconds

    kernels = [e for e in events if cuda and per_step(e, "self_device_time_total") > 0]
    device_ms = sum(per_step(e, "self_device_time_total") for e in kernels)
    launch_calls = [e for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")]
    syncs = [e for e in events if e.key in SYNC_CALLS]
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ranked = sorted(kernels if cuda else events, key=lambda e: -getattr(e, key, 0.0))[:top]
    total = device_ms if cuda else sum(per_step(e, "self_cpu_time_total") for e in events)
    return {
        "precision": runner.precision,
        "steps": steps,
        "wall_ms_per_step": wall_ms,
        "device_busy_ms_per_step": device_ms if cuda else None,
        "device_busy_share": device_ms / wall_ms if cuda else None,
        "kernel_launches_per_step": sum(e.count for e in launch_calls) / steps if cuda else None,
        "launch_cpu_ms_per_step": sum(per_step(e, "self_cpu_time_total") for e in launch_calls) if cuda else None,
        "host_syncs_per_step": sum(e.count for e in syncs) / steps if cuda else None,
        "ranked_by": "time in kernels" if cuda else "self CPU time",
        "top": [
            {"name": e.key, "calls_per_step": e.count / steps, "ms_per_step": per_step(e, key),
             "share": per_step(e, key) / total if total else 0.0}
            for e in ranked
        ],  # fmt: skip
    }


def format_profile(p: dict) -> str:
    """The profile as a table: the step's totals, then its top operators."""
    head = f"profile ({p['precision']}, {p['steps']} steps): {p['wall_ms_per_step']:.1f} ms a step (profiled)"
    if p["device_busy_ms_per_step"] is not None:
        head += (f"; kernels {p['device_busy_ms_per_step']:.1f} ms ({100 * p['device_busy_share']:.0f}% of it), "
                 f"{p['kernel_launches_per_step']:.0f} launches ({p['launch_cpu_ms_per_step']:.1f} ms of CPU), "
                 f"{p['host_syncs_per_step']:.0f} host syncs a step")  # fmt: skip
    lines = [head, f"{'operator (by ' + p['ranked_by'] + ')':<60} {'calls':>6} {'ms/step':>9} {'share':>6}"]
    for row in p["top"]:
        lines.append(f"{row['name'][:60]:<60} {row['calls_per_step']:>6.0f} {row['ms_per_step']:>9.2f} "
                     f"{100 * row['share']:>5.1f}%")  # fmt: skip
    return "\n".join(lines)


def train_settings(train: TrainConfig) -> dict:
    """What the report says of the training settings: the optimizer (Muon's LR and momentum with it)
    and the z-loss coefficient."""
    named = {"optimizer": train.optimizer, "z_loss": train.z_loss}
    if train.optimizer == "muon":
        named.update(muon_lr=train.muon_lr, muon_momentum=train.muon_momentum)
    return named


def describe_steps(report: dict) -> str:
    """The report's optimizer and z-loss in words; reports from before bench took them were AdamW without."""
    optimizer, z = report.get("optimizer", "adamw"), report.get("z_loss", 0.0)
    if optimizer == "muon":
        optimizer += f" (lr {report['muon_lr']:g}, momentum {report['muon_momentum']:g}) + adamw"
    line = f"tinylm step: {optimizer}, z-loss {z:g}"
    if "speedup_vs_textbook" in report:
        line += "; textbook step: AdamW (torch defaults)" + (", the same z-loss" if z else "")
    return line


def format_report(report: dict) -> str:
    compiled = ", compiled blocks" if report.get("compiled_blocks") else ""
    compiled += ", CPU time" if report.get("clock") == "cpu" else ""
    peaks = report.get("matmul_peaks") or {report.get("precisions", ["fp32"])[0]: {"gflops": report["matmul_peak_gflops"]}}
    peak_text = "; ".join(f"{p} {v['gflops']:.1f} GFLOP/s" + (f" ({v['source']})" if "source" in v else "")
                          for p, v in peaks.items())  # fmt: skip
    header = (
        f"{report['preset']}, batch {report['batch_size']} x block {report['block_size']} on {report['device']} "
        f"({report['dtype']}, {report['threads']} threads{compiled}); matmul peak {peak_text}"
    )
    lines = [
        header,
        describe_steps(report),
        f"{'step':<10} {'precision':<9} {'median s':>9} {'min-max s':>13} {'tokens/s':>10} {'GFLOP/s':>9} "
        f"{'MFU':>6} {'peak MB':>8} {'faults/step':>12} {'kernel s':>9}",
    ]
    for r in report["results"]:
        mem = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        faults = "-" if r.get("page_faults_per_step") is None else f"{r['page_faults_per_step']:,.0f}"
        system_s = "-" if r.get("system_s_per_step") is None else f"{r['system_s_per_step']:.3f}"
        spread = f"{min(r['step_times_s']):.3f}-{max(r['step_times_s']):.3f}" if r.get("step_times_s") else "-"
        lines.append(f"{r['name']:<10} {r.get('precision', 'fp32'):<9} {r['median_s']:>9.3f} {spread:>13} "
                     f"{r['tokens_per_s']:>10,.0f} {r['gflops']:>9.1f} {100 * r['mfu']:>5.1f}% {mem:>8} "
                     f"{faults:>12} {system_s:>9}")  # fmt: skip
    for p, ratio in report.get("speedup_vs_textbook_by_precision", {}).items():
        lines.append(f"tinylm / textbook tokens/s, {p}: {ratio:.2f}x")
    if "speedup_vs_textbook" in report and "speedup_vs_textbook_by_precision" not in report:
        lines.append(f"tinylm / textbook tokens/s: {report['speedup_vs_textbook']:.2f}x")
    for p in report.get("profiles", {}).values():
        lines += ["", format_profile(p)]
    if "bf16_over_fp32" in report:
        paired = report["bf16_over_fp32_per_repeat"]
        lines.append(f"tinylm bf16 / fp32 tokens/s: {report['bf16_over_fp32']:.2f}x "
                     f"(each repeat's pair: {min(paired):.2f}-{max(paired):.2f}x)")  # fmt: skip
    return "\n".join(lines)
