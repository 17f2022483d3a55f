"""Data parallelism on PyTorch's own engine: torchrun sets the environment, DDP syncs gradients.

A run started by ``torchrun --nproc-per-node N`` has WORLD_SIZE = N; every rank calls the
same ``train(cfg)``. gloo is used on CPU, nccl on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import BinaryIO

import torch
import torch.distributed as dist

from tinylm.errors import UserError


@dataclass
class Cluster:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (identity on one process)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        return [v > 0 for v in self.sum([float(f) for f in flags], device)]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def check_same(self, what: str, payload: dict, device: torch.device) -> None:
        """Every rank must hold the same config and data, or all of them stop with the same error."""
        if not self.active:
            return
        digest = int(hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12], 16)
        t = torch.tensor([digest, -digest], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t[0].item() != digest or -t[1].item() != digest:
            raise UserError(f"the ranks disagree on the {what}; start every rank with the same command and data")


def init_cluster(device_name: str) -> tuple[Cluster, str]:
    """Join the process group torchrun describes; returns the cluster and the device this rank uses."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Cluster(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if use_cuda and local_rank >= torch.cuda.device_count():  # NCCL cannot put two ranks on one GPU
        gpus = torch.cuda.device_count()
        raise UserError(f"process {local_rank} of this node has no GPU of its own ({gpus} here): "
                        f"use --nproc-per-node {gpus}, or --device cpu")  # fmt: skip
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    else:
        device_name = "cpu"
    return Cluster(rank, world, local_rank), device_name


def shutdown(cluster: Cluster) -> None:
    if cluster.active and dist.is_initialized():
        dist.destroy_process_group()


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``tinylm <argv>`` under torchrun with nproc processes on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tinylm", *argv]  # fmt: skip
    child = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    errors: list[str] = []
    reader = threading.Thread(target=_pass_stderr_until_an_error, args=(child.stderr, errors), daemon=True)
    reader.start()

    # Ctrl-C or SIGTERM here goes on to torchrun, which stops the ranks gracefully (they
    # checkpoint); this process waits for them instead of dying first.
    signalled = []

    def forward(signum, frame):
        signalled.append(signum)
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
        reader.join()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if errors and not signalled:  # the ranks' one line, once, instead of torchrun's ChildFailedError report
        sys.stderr.write("".join(errors))
        sys.stderr.flush()
        return 2
    return 130 if signalled and code != 0 else code


_ERROR_MARK = b"tinylm: error:"


def _pass_stderr_until_an_error(pipe: BinaryIO, errors: list[str]) -> None:
    """Copy the ranks' stderr (progress bars, warnings) through as it comes, until a rank's one-line
    error; what follows is the other ranks' copies of it and torchrun's report of a failed child, and
    only the distinct error lines of it are kept, in ``errors``, for the caller to print once."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    held, failed = b"", False
    while chunk := os.read(pipe.fileno(), 1 << 16):
        held += chunk
        if failed:
            continue
        at = held.find(_ERROR_MARK)
        if at >= 0:
            failed = True
            passed, held = held[:at], held[at:]
        else:  # keep back a tail that may be the start of the mark
            cut = max(len(held) - len(_ERROR_MARK) + 1, 0)
            passed, held = held[:cut], held[cut:]
        if passed and out is not None:
            out.write(passed)
            out.flush()
    if not failed:
        if out is not None:
            out.write(held)
            out.flush()
        return
    lines = held.decode(errors="replace").splitlines()
    errors.extend(dict.fromkeys(line + "\n" for line in lines if line.startswith(_ERROR_MARK.decode())))
