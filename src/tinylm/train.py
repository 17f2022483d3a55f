"""Training: ``train(cfg) -> TrainResult``; the CLI is a thin layer over it.

This module sets a run up (its folder, the data every rank agrees on, the model, the optimizer
and, on resume, their saved state); trainer.Trainer runs its loop.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tinylm import checkpoint
from tinylm.config import RunConfig
from tinylm.data.batching import document_validation_batches, training_rows, validation_batches
from tinylm.data.prepare import PreparedData, PrepareOptions, prepare
from tinylm.distributed import Cluster, init_cluster, shutdown
from tinylm.errors import UserError
from tinylm.metrics import truncate_metrics
from tinylm.model import GPT
from tinylm.optim import build_optimizer
from tinylm.paths import DirLock, check_writable_dir, disk_full_is_one_line, is_temporary
from tinylm.rundir import CONFIG_FILE, METRICS_FILE, RUN_LOG_FILE, SUMMARY_FILE, read_config
from tinylm.runtime import describe_precision, resolve_precision, select_device, tune_for
from tinylm.tracking import check_tracker
from tinylm.trainer import Progress, RunData, Trainer, TrainResult, checkpoint_settings


def train(
    cfg: RunConfig,
    resume: bool = False,
    quiet: bool = False,
    interrupt_after: int | None = None,
) -> TrainResult:
    """Train (or, with ``resume``, continue) the run described by cfg in ``cfg.train.out``.

    Under torchrun every rank calls this; rank 0 alone writes files and progress.
    interrupt_after: behave as if Ctrl-C came during that step (for tests).
    """
    cluster, device_name = init_cluster(cfg.train.device)
    run_dir = Path(cfg.train.out)
    try:
        # held by rank 0, the one that writes, to the end of the run
        with disk_full_is_one_line(run_dir, lambda: disk_full_advice(run_dir)), \
                DirLock(run_dir, lock_busy_message(run_dir)) as lock:  # fmt: skip
            device = select_device(device_name)
            trainer = build_trainer(cfg, resume, quiet or not cluster.is_main, cluster, device,
                                    lock if cluster.is_main else None)  # fmt: skip
            return trainer.fit(interrupt_after)
    finally:
        shutdown(cluster)


def disk_full_advice(run_dir: Path) -> str:
    """What a run stopped by a full disk keeps, and how it goes on."""
    return f"{checkpoint.last_good(run_dir)}: make room and continue with tinylm train --resume {run_dir}"


def lock_busy_message(run_dir: Path) -> str:
    return f"{run_dir} is in use: another tinylm process is training it; wait for it to end or choose another --out"


def build_trainer(cfg: RunConfig, resume: bool, quiet: bool, cluster: Cluster, device: torch.device,
                  lock: DirLock | None = None) -> Trainer:  # fmt: skip
    """Everything before the first step. Nothing is written before the data and its batches are
    known to be usable: a refused run leaves no folder behind. ``lock``: taken before the run's
    folder is read or changed, so that a second process in it is refused."""
    run_dir = Path(cfg.train.out)
    check_tracker(cfg.train.tracker)  # a missing package: one line before minutes of data preparation
    lock_on_every_rank(lock, run_dir, cluster, device)
    resolve_grad_accum(cfg, cluster.world, run_dir, resume)
    if not resume:
        check_fresh_run_dir(run_dir)
    elif not checkpoint.exists(run_dir):  # killed before its first checkpoint: start it again
        resume = False
    fix_precision(cfg, device, resume, quiet)
    prepared = prepare_data_on_every_rank(cfg, quiet, cluster, device)
    fit_vocabulary(cfg, prepared)
    cluster.check_same("config", cfg.to_dict(), device)
    cluster.check_same("data", prepared.meta["cache_key"], device)
    data = run_data(cfg, prepared, cluster)
    model, optimizer = build_model(cfg, device)
    if resume:
        progress = resume_progress(cfg, run_dir, model, optimizer, cluster, prepared)
    else:
        if cluster.is_main:
            start_run_dir(cfg, run_dir, prepared, lock)
        progress = Progress()
    cluster.barrier()
    return Trainer(cfg, data, model, optimizer, progress, cluster, device, total_steps(cfg), quiet)


def prepare_data(cfg: RunConfig, quiet: bool = False) -> PreparedData:
    return prepare(PrepareOptions.from_config(cfg.train), quiet=quiet)


def fit_vocabulary(cfg: RunConfig, data: PreparedData) -> None:
    """A trained BPE shrinks the embedding to its size; a vocabulary that does not fit is an error."""
    vocab = data.meta["vocab_size"]
    if data.meta["tokenizer"].startswith("bpe:"):
        cfg.model.vocab_size = vocab
    elif vocab > cfg.model.vocab_size:
        raise UserError(
            f"the {data.meta['tokenizer']} vocabulary has {vocab} tokens, more than the model's "
            f"embedding ({cfg.model.vocab_size}); raise --vocab-size"
        )


def resolve_grad_accum(cfg: RunConfig, world: int, run_dir: Path, resume: bool) -> None:
    """Fix the number of micro-batches per optimizer step for the whole run.

    Without --grad-accum every process takes one micro-batch per step: the global batch
    grows with the processes. The value is then saved in config.json, and a resumed run
    keeps it, so it trains the same model on any number of processes. An explicit value is
    shared out over the processes: any count that divides it trains the same model.
    """
    t = cfg.train
    if t.grad_accum is None and resume and (run_dir / CONFIG_FILE).exists():
        t.grad_accum = RunConfig.load(run_dir / CONFIG_FILE).train.grad_accum
    if t.grad_accum is None:
        t.grad_accum = world
    if t.grad_accum % world:
        if resume:
            fix = f"resume on a number of processes that divides {t.grad_accum}"
        else:
            fix = f"make --grad-accum a multiple of {world}, or leave it out for one micro-batch per process"
        raise UserError(f"{world} processes cannot share {t.grad_accum} micro-batches per step; {fix}")


def fix_precision(cfg: RunConfig, device: torch.device, resume: bool, quiet: bool) -> None:
    """Replace --precision auto by what it chooses here, so config.json and every checkpoint hold it and
    a resume keeps it, on any machine. A resume cannot change it (config.RESUMABLE): mixing two
    arithmetics in one run would make its loss curve neither arm's. A resumed run that holds 'auto' was
    saved before tinylm kept its precision and keeps the one it had then."""
    setting, old = cfg.train.precision, resume and cfg.train.precision == "auto"
    cfg.train.precision = resolve_precision(setting, device, saved_before_precision=old)
    if not quiet:
        print(describe_precision(setting, cfg.train.precision, device, saved_before_precision=old), flush=True)


def total_steps(cfg: RunConfig) -> int | None:
    t = cfg.train
    per_step = t.batch_size * t.grad_accum * cfg.model.block_size
    limits = [t.max_steps] if t.max_steps else []
    if t.max_tokens:
        limits.append(math.ceil(t.max_tokens / per_step))
    return min(limits) if limits else None


def check_fresh_run_dir(run_dir: Path) -> None:
    """A fresh run may use a new or empty folder, or reclaim one whose tinylm run was killed
    before its first checkpoint; anything else in --out is not ours to delete."""
    if checkpoint.exists(run_dir) or (run_dir / SUMMARY_FILE).exists():
        raise UserError(f"{run_dir} holds another run; resume it with --resume {run_dir} or choose another --out")
    # A killed first write of config.json leaves only its temporary file: still ours to reclaim.
    # So does a study's log of this run, which its executor opened before the run started.
    others = (
        [e for e in run_dir.iterdir() if not is_temporary(e.name, CONFIG_FILE) and e.name != RUN_LOG_FILE]
        if run_dir.is_dir()
        else []
    )
    if others and not started_by_tinylm(run_dir):
        raise UserError(f"--out {run_dir} holds other files; choose a new or empty folder")
    check_writable_dir(run_dir, "--out")  # before the data is prepared: no minutes of tokenising first


def started_by_tinylm(run_dir: Path) -> bool:
    """Whether the folder's config.json is a tinylm run's: other tools' folders (a Hugging Face model's)
    hold a config.json too, and a fresh run overwrites the one it reclaims."""
    try:
        read_config(run_dir)
    except UserError:
        return False
    return True


def start_run_dir(cfg: RunConfig, run_dir: Path, data: PreparedData, lock: DirLock | None = None) -> None:
    """Write what a fresh run starts with; what a run killed before its first checkpoint left goes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if lock is not None:
        lock.acquire()
        check_fresh_run_dir(run_dir)  # again, now under the lock: a run may have started here meanwhile
    checkpoint.discard_leftovers(run_dir)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)
    cfg.save(run_dir / CONFIG_FILE)
    data.tokenizer.save(run_dir)  # sampling and export need it with the weights


def lock_on_every_rank(lock: DirLock | None, run_dir: Path, cluster: Cluster, device: torch.device) -> None:
    """Rank 0 (the one given the lock) locks an existing run folder; a new one is locked once made
    (start_run_dir). If another process holds it, every rank stops with that line: the others would
    otherwise run on into a collective rank 0 never joins."""
    refused = None
    if lock is not None and run_dir.is_dir():
        try:
            lock.acquire()
        except UserError as e:
            refused = e
    if cluster.any([refused is not None], device)[0]:
        raise refused or UserError(lock_busy_message(run_dir))


def prepare_data_on_every_rank(cfg: RunConfig, quiet: bool, cluster: Cluster, device: torch.device) -> PreparedData:
    """Rank 0 tokenises; the others then find the result in the cache. A failure stops every rank."""
    failure, data = None, None
    if cluster.is_main:
        try:
            data = prepare_data(cfg, quiet=quiet)
        except UserError as e:
            failure = e
    if cluster.any([failure is not None], device)[0]:  # also a barrier: no rank waits on a failed one
        raise failure or UserError("rank 0 could not prepare the data (its error says why)")
    return data if cluster.is_main else prepare_data(cfg, quiet=True)


def run_data(cfg: RunConfig, data: PreparedData, cluster: Cluster) -> RunData:
    t, block_size, eot = cfg.train, cfg.model.block_size, data.meta["eot_id"]
    rows = training_rows(data.split("train"), t.batching, block_size, eot, t.seed, t.doc_mask)
    val_split = data.split("val")
    val_batches = validation_batches(val_split, block_size, t.batch_size, t.eval_tokens, eot, t.doc_mask)
    doc_batches = document_validation_batches(val_split, block_size, t.batch_size, t.eval_tokens, eot)
    mine = slice(cluster.rank, None, cluster.world)  # each rank a share; their loss sums add up
    return RunData(rows, val_batches[mine], doc_batches[mine], data.meta)


def build_model(cfg: RunConfig, device: torch.device) -> tuple[GPT, torch.optim.Optimizer]:
    t = cfg.train
    tune_for(device)
    torch.manual_seed(t.seed)
    model = GPT(cfg.model)
    model.init_weights(t.init, seed=t.seed)
    model.to(device)
    if t.compile:
        model.compile_blocks()
    return model, build_optimizer(model, t, device)


def resume_progress(cfg: RunConfig, run_dir: Path, model: GPT, optimizer: torch.optim.Optimizer,
                    cluster: Cluster, data: PreparedData) -> Progress:  # fmt: skip
    """Load the checkpoint into model and optimizer; returns where the run stands."""
    if cluster.is_main:  # under the lock: what a killed process left (a save's temporary folder) fills no disk
        checkpoint.discard_leftovers(run_dir)
    progress = Progress(**checkpoint.load(run_dir, model, optimizer, checkpoint_settings(cfg, data.meta)))
    if cluster.is_main:  # only now that the checkpoint loaded: a failed resume changes nothing
        cfg.save(run_dir / CONFIG_FILE)  # the budget or device this resume was given
        truncate_metrics(run_dir, progress.step)
    return progress
