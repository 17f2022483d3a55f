"""The device a command runs on, its precision, and the process-wide settings that make a step fast there."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
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


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; fp32 elsewhere (this project's CPUs have no bf16 units)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
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
