"""The training loop: ``train(cfg) -> TrainResult``; the CLI is a thin layer over it."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tinylm import checkpoint
from tinylm.config import CONFIG_FILE, RunConfig, TrainConfig
from tinylm.data.batching import Batch, RowSource, training_rows, validation_batches
from tinylm.data.prepare import PreparedData, PrepareOptions, prepare
from tinylm.distributed import Cluster, init_cluster, shutdown
from tinylm.errors import UserError
from tinylm.evaluate import autocast_for, validation_loss_sum
from tinylm.metrics import METRICS_FILE, MetricsLog, truncate_metrics
from tinylm.model import GPT
from tinylm.optim import ScheduleSpan, build_optimizer, describe_extension
from tinylm.paths import check_writable_dir
from tinylm.runtime import tune_for
from tinylm.stability import StabilityMonitor
from tinylm.summary import SUMMARY_FILE, write_summary


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    interrupted: bool = False


@dataclass
class Progress:
    """Everything about where a run stands that a checkpoint must carry."""

    step: int = 0
    tokens: int = 0  # token slots trained on
    real_tokens: int = 0  # slots holding a real (non-pad) target
    elapsed_s: float = 0.0
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    stability: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)  # the ScheduleSpan fixed at the start; {} before


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}") from e


def prepare_data(cfg: RunConfig, quiet: bool = False) -> PreparedData:
    t = cfg.train
    options = PrepareOptions(t.data, t.tokenizer, t.val_fraction, t.text_field, t.doc_sep)
    return prepare(options, quiet=quiet)


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


def step_batches(rows: RowSource, t: TrainConfig, step: int, cluster: Cluster) -> tuple[list[Batch], int]:
    """This rank's micro-batches of optimizer step ``step``, and the real targets of the whole step.

    The step's micro-batches are numbered 0 .. grad_accum - 1; rank r takes r, r + world, ...
    Rows are a pure function of the step, so each rank counts the whole step's real targets
    itself (a few small host arrays) instead of waiting on an all-reduce before its backward.
    """
    mine, step_real = [], 0
    for micro in range(t.grad_accum):
        batch = rows.batch((step * t.grad_accum + micro) * t.batch_size, t.batch_size)
        step_real += batch.real_tokens
        if micro % cluster.world == cluster.rank:
            mine.append(batch)
    return mine, step_real


def accumulate_gradients(trainable: torch.nn.Module, batches: list[Batch], step_real: int, cluster: Cluster,
                         device: torch.device) -> torch.Tensor:  # fmt: skip
    """Forward and backward of this rank's micro-batches; returns their summed target losses (on the device).

    The step's gradient is the mean over all its real targets, whatever the split over
    micro-batches and ranks: the model's loss is a mean over one micro-batch's real targets,
    so each is weighted by its share of the step's, times the world size that DDP's gradient
    average divides by. (A mean of micro-batch means would weight padded rows unevenly.)
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: one sync per step
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        last = i == len(batches) - 1
        with trainable.no_sync() if cluster.active and not last else contextlib.nullcontext():
            with autocast_for(device):
                _, loss = trainable(batch.x, batch.y, batch.doc_ids)
            # A divisor rather than a factor: with packed rows it is this rank's number of
            # micro-batches exactly, as it always was. Every row has a real target (a document's EOT).
            (loss / (step_real / (batch.real_tokens * cluster.world))).backward()
        loss_sum += loss.detach().double() * batch.real_tokens
    return loss_sum


def total_steps(cfg: RunConfig) -> int | None:
    t = cfg.train
    per_step = t.batch_size * t.grad_accum * cfg.model.block_size
    limits = [t.max_steps] if t.max_steps else []
    if t.max_tokens:
        limits.append(math.ceil(t.max_tokens / per_step))
    return min(limits) if limits else None


class _StopFlag:
    """Set by Ctrl-C / SIGTERM: the loop finishes the step, checkpoints and returns.

    A second signal more than two seconds later stops at once. Closer repeats are the same
    request arriving twice (under torchrun a terminal's Ctrl-C reaches the ranks both
    directly and as torchrun's SIGTERM).
    """

    def __init__(self) -> None:
        self.requested = False
        self._first = 0.0

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            now = time.monotonic()
            if self.requested and now - self._first > 2.0:
                raise KeyboardInterrupt
            if not self.requested:
                self.requested, self._first = True, now

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def check_fresh_run_dir(run_dir: Path) -> None:
    """A fresh run may use a new or empty folder, or reclaim one whose tinylm run was killed
    before its first checkpoint; anything else in --out is not ours to delete."""
    if checkpoint.exists(run_dir) or (run_dir / SUMMARY_FILE).exists():
        raise UserError(f"{run_dir} holds another run; resume it with --resume {run_dir} or choose another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / CONFIG_FILE).exists():
        raise UserError(f"--out {run_dir} holds other files; choose a new or empty folder")
    check_writable_dir(run_dir, "--out")  # before the data is prepared: no minutes of tokenising first


def start_run_dir(cfg: RunConfig, run_dir: Path, data: PreparedData) -> None:
    """Write what a fresh run starts with; what a run killed before its first checkpoint left goes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.discard_leftovers(run_dir)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)
    cfg.save(run_dir / CONFIG_FILE)
    data.tokenizer.save(run_dir)  # sampling and export need it with the weights


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
    t = cfg.train
    cluster, device_name = init_cluster(t.device)
    try:
        return _train(cfg, resume, quiet or not cluster.is_main, interrupt_after, cluster, select_device(device_name))
    finally:
        shutdown(cluster)


def _train(cfg: RunConfig, resume: bool, quiet: bool, interrupt_after: int | None, cluster: Cluster,
           device: torch.device) -> TrainResult:  # fmt: skip
    t = cfg.train
    run_dir = Path(t.out)
    resolve_grad_accum(cfg, cluster.world, run_dir, resume)
    if not resume:
        check_fresh_run_dir(run_dir)
    elif not checkpoint.exists(run_dir):  # killed before its first checkpoint: start it again
        resume = False
    failure = None
    if cluster.is_main:  # one rank tokenises; the others then find it in the cache
        try:
            data = prepare_data(cfg, quiet=quiet)
        except UserError as e:
            failure = e
    if cluster.any([failure is not None], device)[0]:  # also a barrier: no rank waits on a failed one
        raise failure or UserError("rank 0 could not prepare the data (its error says why)")
    if not cluster.is_main:
        data = prepare_data(cfg, quiet=True)
    fit_vocabulary(cfg, data)
    cluster.check_same("config", cfg.to_dict(), device)
    cluster.check_same("data", data.meta["cache_key"], device)
    T = cfg.model.block_size
    eot = data.meta["eot_id"]
    rows = training_rows(data.split("train"), t.batching, T, eot, t.seed, t.doc_mask)
    val_batches = validation_batches(data.split("val"), T, t.batch_size, t.eval_tokens, eot, t.doc_mask)
    my_val_batches = val_batches[cluster.rank :: cluster.world]

    tune_for(device)
    torch.manual_seed(t.seed)
    model = GPT(cfg.model)
    model.init_weights(t.init, seed=t.seed)
    model.to(device)
    if t.compile:
        model.compile_blocks()
    optimizer = build_optimizer(model, t, device)

    if resume:
        progress = Progress(**checkpoint.load(run_dir, model, optimizer))
        if cluster.is_main:  # only now that the checkpoint loaded: a failed resume changes nothing
            cfg.save(run_dir / CONFIG_FILE)  # the budget or device this resume was given
            truncate_metrics(run_dir, progress.step)
    else:
        if cluster.is_main:
            start_run_dir(cfg, run_dir, data)
        progress = Progress()
    cluster.barrier()
    trainable = DistributedDataParallel(model) if cluster.active else model

    steps_budget = total_steps(cfg)
    if not progress.schedule:  # a fresh run (or a checkpoint from before spans were kept)
        progress.schedule = {"steps": steps_budget, "time_s": t.max_time}
    schedule = ScheduleSpan(**progress.schedule)
    schedule_extended = schedule.extension(steps_budget, t.max_time)
    slots_per_micro = t.batch_size * T
    monitor = StabilityMonitor(t.guard, progress.stability)
    monitor.resume_from(model, optimizer)
    log = MetricsLog(run_dir, t.tensorboard) if cluster.is_main else None
    stop = _StopFlag()
    context = {
        "params": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "device": str(device),
        "world_size": cluster.world,
        "grad_accum": t.grad_accum,
        "global_batch_rows": t.grad_accum * t.batch_size,
        "schedule_extended": schedule_extended,
        "data": data.meta["source"],
        "tokenizer": data.meta["tokenizer"],
        "batching": t.batching,
    }
    if t.batching == "padded":
        context["truncated_docs"] = rows.truncated_docs

    def evaluate() -> float:
        loss_sum, tokens = validation_loss_sum(model, my_val_batches, device, data.meta["vocab_size"])
        loss_sum, tokens = cluster.sum([loss_sum, tokens], device)
        loss = loss_sum / max(tokens, 1)
        progress.val_losses.append((progress.step, loss))
        return loss

    def write(record: dict) -> None:
        if log is not None:
            log.write(record)

    if not quiet:
        print(
            f"global batch: {t.grad_accum * t.batch_size} rows per step (--grad-accum {t.grad_accum} x --batch-size "
            f"{t.batch_size}; {cluster.world} process(es), {t.grad_accum // cluster.world} micro-batch(es) each)",
            flush=True,
        )
        if schedule_extended:
            print(f"budget extended past the LR schedule's span: {describe_extension(schedule_extended)}", flush=True)
    bar = tqdm(total=steps_budget, initial=progress.step, unit="step", disable=True if quiet else None)
    interrupted = False
    budget_done = steps_budget is not None and progress.step >= steps_budget
    model.train()
    with stop.installed():
        clock = time.perf_counter()
        if progress.step == 0 and not progress.val_losses:
            val = evaluate()
            write({"step": 0, "tokens": 0, "val_loss": val, "elapsed_s": 0.0})
            monitor.observe_val(0, val)
            monitor.remember_good(model, optimizer, 0)
        while not budget_done and not monitor.gave_up:
            lr = schedule.lr(t, progress.step, progress.elapsed_s) * monitor.lr_scale
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches, step_real = step_batches(rows, t, progress.step, cluster)
            loss_sum = accumulate_gradients(trainable, batches, step_real, cluster, device)
            train_loss = cluster.sum([loss_sum.item()], device)[0] / step_real
            clip = t.grad_clip if t.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
            if monitor.allow_update(progress.step, train_loss, grad_norm):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            progress.step += 1
            progress.tokens += slots_per_micro * t.grad_accum
            progress.real_tokens += step_real
            now = time.perf_counter()
            progress.elapsed_s += now - clock
            clock = now
            record = {
                "step": progress.step,
                "tokens": progress.tokens,
                "real_tokens": progress.real_tokens,
                "lr": lr,
                "train_loss": train_loss,
                "grad_norm": grad_norm,
            }
            # Every rank must agree on stopping, or the next all-reduce would hang.
            out_of_time = t.max_time is not None and progress.elapsed_s >= t.max_time
            stop_asked = stop.requested or (interrupt_after is not None and progress.step >= interrupt_after)
            out_of_time, stop_asked = cluster.any([out_of_time, stop_asked], device)
            budget_done = out_of_time or (steps_budget is not None and progress.step >= steps_budget)
            if budget_done or progress.step % t.eval_every == 0:
                record["val_loss"] = evaluate()
                monitor.observe_val(progress.step, record["val_loss"])
                monitor.remember_good(model, optimizer, progress.step)
            if monitor.rollback_wanted:
                monitor.rollback(model, optimizer, progress.step)
            progress.elapsed_s += time.perf_counter() - clock
            clock = time.perf_counter()
            record["elapsed_s"] = progress.elapsed_s
            for event in monitor.drain_events():
                write(event)
            if "val_loss" in record or progress.step % t.log_every == 0:
                write(record)
            checkpoint.kill_point("train:after-metrics", progress.step)
            bar.update(1)
            tokens_per_s = progress.tokens / max(progress.elapsed_s, 1e-9)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            if "val_loss" in record and bar.disable and not quiet:
                print(f"step {progress.step}: train {train_loss:.4f} val {record['val_loss']:.4f}", flush=True)
            ckpt_every = t.checkpoint_every or t.eval_every
            final = budget_done or stop_asked or monitor.gave_up
            if cluster.is_main and (final or progress.step % ckpt_every == 0):
                progress.stability = monitor.state_dict(progress.step)
                checkpoint.save(run_dir, model, optimizer, progress.__dict__)
            if stop_asked and not budget_done:
                interrupted = True
                break
    bar.close()
    kept = monitor.kept_weights
    if kept and log is not None:  # the terminal says it too, not only summary.json
        print(
            f"the stability guard gave up at step {progress.step} after {monitor.th.max_recoveries} recoveries; "
            f"the saved weights are the last good ones, from step {kept['step']} (val loss {kept['val_loss']:.4f})",
            flush=True,
        )
    summary = {}
    if log is not None:
        log.close()
        summary = write_summary(run_dir, progress, context, monitor, interrupted, steps_budget)
    cluster.barrier()  # no rank leaves before the checkpoint and summary are written
    return TrainResult(run_dir, summary, interrupted)
