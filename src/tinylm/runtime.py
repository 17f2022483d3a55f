"""The device a command runs on, its precision, and the process-wide settings that make a step fast there."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform

import torch

from tinylm.errors import UserError

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}") from e


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of the x86 units that multiply bf16 natively (Intel AMX; AVX512-BF16 on recent
Intel and AMD Zen 4+). Without them torch still computes in bf16, by conversion, slower than in fp32.
torch's own checks do not tell the two apart: torch.ops.mkldnn._is_mkldnn_bf16_supported() is true on
any AVX-512 CPU and torch.backends.cpu.get_cpu_capability() names the vector width only."""


CPU_BF16_ENV = "TINYLM_CPU_BF16"
"""Environment variable that overrides the detection: 1 (the CPU has bf16 units), 0 (it has none).
The test suite sets 0, so that its runs compute the same on every CPU."""


def cpu_bf16_units() -> tuple[str, ...]:
    """What makes --precision auto pick bf16 on this CPU: its bf16 unit flags, or the override; empty: none."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise UserError(f"{CPU_BF16_ENV} must be 0 or 1, not {forced!r}")
        return (f"{CPU_BF16_ENV}=1",) if forced == "1" else ()
    return cpuinfo_bf16_flags()


@functools.cache
def cpuinfo_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The bf16 unit flags this CPU reports (empty where none, or without /proc/cpuinfo: not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in BF16_CPU_FLAGS if flag in flags)
    except OSError:
        pass
    return ()


def resolve_precision(setting: str, device: torch.device, *, saved_before_precision: bool = False) -> str:
    """'fp32' or 'bf16' for a --precision setting on ``device``.

    saved_before_precision: the setting is the default 'auto' of a run saved before tinylm kept its
    precision; such a run keeps what tinylm used then, bf16 autocast on CUDA and fp32 elsewhere.
    """
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu" and not saved_before_precision and cpu_bf16_units():
        return "bf16"
    return "fp32"


def describe_precision(setting: str, chosen: str, device: torch.device, *, saved_before_precision: bool = False) -> str:
    """One line saying which precision a run uses and, for auto, why (saved_before_precision: as resolve_precision)."""
    if setting != "auto":
        line = f"precision: {chosen} (--precision {setting})"
        if chosen == "bf16" and device.type == "cpu" and not cpu_bf16_units():
            # measured on an AVX2-only Zen 3: a bf16 matmul ran 44x slower than the fp32 one
            line += "; this CPU has no bf16 units: its bf16 matmuls are emulated, slower than fp32 (far slower without AVX-512)"
        return line
    if saved_before_precision:
        why = "a run saved before tinylm kept its precision resumes in what it used then, on this device"
    elif device.type == "cuda":
        why = "CUDA"
    elif chosen == "bf16":
        why = f"this CPU has bf16 units: {', '.join(cpu_bf16_units())}"
    else:
        why = f"no bf16 units on this {device.type}"
    return f"precision: {chosen} (auto: {why})"


def autocast_for(device: torch.device, precision: str):
    """The context the forward pass runs in: bf16 autocast for 'bf16' (on CPU too), none for 'fp32'."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision {precision!r} is not resolved to fp32 or bf16")
    return contextlib.nullcontext()


def tune_for(device: torch.device) -> None:
    """TF32 matmuls on CUDA; on CPU, a heap that keeps freed memory for the next step.

    Subnormals are deliberately not flushed to zero on CPU. A naive-init (baseline phase) step
    makes them: 4.7e-4 of its loss softmax probabilities, 0.7% of the gradients at its blocks'
    linear outputs. But they cost nothing measurable here: the baseline phase's step took
    1.00x the scaled phase's, with and without FTZ/DAZ, and FTZ/DAZ left both phases' first
    step bit-identical (AMD EPYC Zen 4, AVX-512; benchmarks/bench_phases.py,
    results/bench/baseline-phase.json). Also, ``torch.set_flush_denormal`` sets only the calling
    thread and threads started after it, so made here it would miss intra-op workers already
    running. The one slow path for tiny values found was ``torch.exp`` with a subnormal
    result (15-30x per element); the training step does not call it.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside bf16 autocast
    else:
        keep_freed_memory()


@functools.cache
def keep_freed_memory() -> bool:
    """Stop glibc returning freed activation memory to the OS after every step.

    By default malloc serves large blocks with fresh mmaps and trims the heap when its top
    is free, so every step page-faults its activations in again: about 200k faults (0.8 GB)
    per `mid` CPU step here. Blocks up to 32 MB (glibc's limit) now come from the heap and
    stay mapped: the `mid` step ran up to 1.2x faster and its peak RSS rose about 6%
    (benchmarks/bench_levers.py, tinylm bench). Returns whether it applied (glibc only).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
