"""The training loop: a Trainer steps a run that train.py has set up, from its progress to its budget.

Each step is ``batch -> forward/backward -> clip -> guarded update``, then maybe an evaluation
(the guard judges it and may roll back), the metrics, and maybe a checkpoint. With host_read_every N > 1
the guard decides on the device and the host reads the steps' values N at a time (see TakenStep).
"""

from __future__ import annotations

import contextlib
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
from tinylm.config import RunConfig, TrainConfig
from tinylm.costs import model_costs
from tinylm.data.batching import Batch, RowSource
from tinylm.device_guard import DeviceGuard, masks_updates, step_masked
from tinylm.distributed import Cluster
from tinylm.evaluate import validation_loss_sum
from tinylm.metrics import MetricsLog
from tinylm.model import GPT
from tinylm.optim import ScheduleSpan, describe_extension, set_lr
from tinylm.runtime import autocast_for
from tinylm.stability import StabilityMonitor
from tinylm.summary import write_summary
from tinylm.tracking import open_tracking


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
    elapsed_s: float = 0.0  # training time, as RunClock counts it, at the end of the last step
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses_doc: list[tuple[int, float]] = field(default_factory=list)  # per-document; [] in older checkpoints
    stability: dict[str, Any] = field(default_factory=dict)  # StabilityMonitor.state_dict() at the checkpoint
    schedule: dict[str, Any] = field(default_factory=dict)  # the ScheduleSpan fixed at the start; {} before


@dataclass
class RunData:
    """What a run steps over, fixed before its first step."""

    rows: RowSource  # training rows: those of any step can be rebuilt from the step number
    val_batches: list[Batch]  # this rank's share of the fixed (packed) validation batches
    val_doc_batches: list[Batch]  # this rank's share of the per-document validation batches
    meta: dict[str, Any]  # the prepared data's: source, tokenizer, vocab_size ...


@dataclass
class TakenStep:
    """A step whose update is done. Its record (step, tokens, real_tokens, lr) gets the step's losses and
    gradient norm once the host has read them: in the step itself when it reads every step (the guard
    decides there), else at the next read, from ``unread``: [loss sum, z-loss sum, grad norm, skip] on the
    device, the skip decided there (DeviceGuard)."""

    record: dict[str, Any]
    step_real: int  # the step's real targets, the losses' divisor
    unread: torch.Tensor | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # the guard's, about this step
    elapsed_s: float = 0.0


class RunClock:
    """The run's training time: what earlier processes trained (saved in the checkpoint) plus the
    wall time since this process's loop started.

    Everything in the loop counts (evaluations, metrics, checkpoints): this is the time --max-time
    spends and a time-based schedule follows. Time before the loop (data, model, resume) does not.
    """

    def __init__(self, earlier_s: float = 0.0):
        self._earlier_s = earlier_s
        self._start = time.perf_counter()

    def elapsed_s(self) -> float:
        return self._earlier_s + (time.perf_counter() - self._start)


class StopFlag:
    """Set by Ctrl-C / SIGTERM: the loop finishes the step, checkpoints and returns.

    A second signal more than two seconds later stops at once. Closer repeats are the same
    request arriving twice (under torchrun a terminal's Ctrl-C reaches the ranks both
    directly and as torchrun's SIGTERM). interrupt_after: behave as if the signal came during
    that step (for tests).
    """

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.requested = False
        self.interrupt_after = interrupt_after
        self._first = 0.0

    def asked(self, step: int) -> bool:
        return self.requested or (self.interrupt_after is not None and step >= self.interrupt_after)

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


def checkpoint_settings(cfg: RunConfig, data_meta: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of the run's settings, and a resume must match: the fixed ones
    (RunConfig.fixed_settings), plus the data's path and content hash: a resume may move the data
    (another path, the same prepared content), not change it."""
    return {**cfg.fixed_settings(), "train.data": cfg.train.data, "data.content": data_meta["cache_key"]}


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
                         device: torch.device, z_loss: float = 0.0, vocab_size: int | None = None,
                         precision: str = "fp32") -> torch.Tensor:  # fmt: skip
    """Forward and backward of this rank's micro-batches; returns (summed target cross-entropies, summed
    z-loss terms) on the device. The gradients are of their sum; the cross-entropy alone is what is logged
    and judged as train_loss, so a z-loss arm's train loss and train/val gap compare with any other's.
    vocab_size: the tokenizer's; a padded vocabulary's extra rows stay out of the softmax (GPT.forward).

    The step's gradient is the mean over all its real targets, whatever the split over
    micro-batches and ranks: the model's loss is a mean over one micro-batch's real targets,
    so each is weighted by its share of the step's, times the world size that DDP's gradient
    average divides by. (A mean of micro-batch means would weight padded rows unevenly.)
    """
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # on the device: one sync per step
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        last = i == len(batches) - 1
        with trainable.no_sync() if cluster.active and not last else contextlib.nullcontext():
            with autocast_for(device, precision):
                _, loss, cross_entropy = trainable(batch.x, batch.y, batch.doc_ids, z_loss=z_loss,
                                                   return_cross_entropy=True, vocab_size=vocab_size)  # fmt: skip
            # A divisor rather than a factor: with packed rows it is this rank's number of
            # micro-batches exactly, as it always was. Every row has a real target (a document's EOT).
            (loss / (step_real / (batch.real_tokens * cluster.world))).backward()
        cross_entropy = cross_entropy.double()
        sums += torch.stack([cross_entropy, loss.detach().double() - cross_entropy]) * batch.real_tokens
    return sums


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to max_norm (0: no clipping); returns the norm before clipping, which the guard judges, on the
    device (clipping itself needs no host read)."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))


class Trainer:
    """Steps one run; train.build_trainer() makes it from the run's data, model, optimizer and progress.

    Under torchrun every rank runs one; rank 0 alone writes metrics, checkpoints and the summary.
    """

    def __init__(self, cfg: RunConfig, data: RunData, model: GPT, optimizer: torch.optim.Optimizer,
                 progress: Progress, cluster: Cluster, device: torch.device, steps_budget: int | None,
                 quiet: bool = False):  # fmt: skip
        self.cfg, self.t = cfg, cfg.train
        self.run_dir = Path(cfg.train.out)
        self.data, self.model, self.optimizer, self.progress = data, model, optimizer, progress
        self.cluster, self.device, self.quiet = cluster, device, quiet
        self.trainable = DistributedDataParallel(model) if cluster.active else model
        self.steps_budget = steps_budget
        if not progress.schedule:  # a fresh run (or a checkpoint from before spans were kept)
            progress.schedule = {"steps": steps_budget, "time_s": self.t.max_time}
        self.schedule = ScheduleSpan(**progress.schedule)
        self.schedule_extended = self.schedule.extension(steps_budget, self.t.max_time)
        self.monitor = StabilityMonitor(self.t.guard, progress.stability)
        self.monitor.resume_from(model, optimizer)
        self.read_every = self.host_read_interval()
        self.device_guard = (
            DeviceGuard(self.monitor.state, device, self.monitor.th) if self.read_every > 1 and self.t.guard else None
        )
        self.taken: list[TakenStep] = []  # the steps since the host last read
        self.log = None
        if cluster.is_main:
            resuming = bool(progress.val_losses)  # metrics.jsonl holds an earlier process's records
            self.log = MetricsLog(self.run_dir, open_tracking(cfg, self.run_dir, resuming, quiet))

    # --- the loop ---

    def fit(self, interrupt_after: int | None = None) -> TrainResult:
        """Step until the budget is spent, the guard gives up or a stop is asked for; then write the summary."""
        self.announce()
        self.bar = tqdm(total=self.steps_budget, initial=self.progress.step, unit="step", disable=self.quiet or None)
        stop = StopFlag(interrupt_after)
        self.model.train()
        with stop.installed():
            self.clock = RunClock(self.progress.elapsed_s)  # the run's time counts from here on
            if self.progress.step == 0 and not self.progress.val_losses:
                self.write({"step": 0, "tokens": 0, **self.validate(), "elapsed_s": 0.0})
            interrupted = self.run_steps(stop)
        self.bar.close()
        return self.finish(interrupted)

    def run_steps(self, stop: StopFlag) -> bool:
        """The steps of this process; returns whether a stop request ended them before the budget."""
        p, max_time = self.progress, self.t.max_time
        # A resumed run may have spent its time already (killed after its last checkpoint): no step more.
        out_of_time = max_time is not None and p.elapsed_s >= max_time
        budget_spent = out_of_time or (self.steps_budget is not None and p.step >= self.steps_budget)
        if out_of_time and not self.quiet:
            print(f"--max-time {max_time:g} s is spent ({p.elapsed_s:.1f} s trained): no step more; "
                  "resume with a larger --max-time to train on", flush=True)  # fmt: skip
        while not budget_spent and not self.monitor.gave_up:
            self.train_step()
            budget_spent, stop_asked = self.agree_to_stop(stop)
            evaluate, at_read = budget_spent or p.step % self.t.eval_every == 0, p.step % self.read_every == 0
            final = budget_spent or stop_asked
            if not (at_read or evaluate or final or self.checkpoint_due()):
                p.elapsed_s = self.taken[-1].elapsed_s = self.clock.elapsed_s()
                continue  # nothing of this step is read yet: the device goes on without the host
            *earlier, last = self.read_steps()
            for step in earlier:
                step.record["elapsed_s"] = step.elapsed_s
                self.log_step(step)
            if evaluate:
                last.record.update(self.validate())
            # A roll-back comes at a read the step number fixes (not at a stop's, or a checkpoint's, which a
            # resume may move): wanted at a stop, it is saved and comes at the resumed run's next such read.
            if self.monitor.rollback_wanted and (at_read or evaluate):
                self.roll_back()
            p.elapsed_s = last.record["elapsed_s"] = self.clock.elapsed_s()  # the step's time, evaluation included
            self.log_step(last)
            self.maybe_checkpoint(final=final or self.monitor.gave_up)
            if stop_asked and not budget_spent:
                return True
        return False

    # --- its parts ---

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: batch, forward/backward, clip, guarded update. It joins self.taken; returns its
        metrics record (whose losses and gradient norm wait for the next read when the host reads less often)."""
        t, p = self.t, self.progress
        lr = self.schedule.lr(t, p.step, p.elapsed_s) * self.monitor.lr_scale
        set_lr(self.optimizer, lr)
        batches, step_real = step_batches(self.data.rows, t, p.step, self.cluster)
        sums = accumulate_gradients(self.trainable, batches, step_real, self.cluster, self.device, t.z_loss,
                                    self.data.meta["vocab_size"], t.precision)  # fmt: skip
        grad_norm = clip_gradients(self.model, t.grad_clip)
        values = torch.cat([sums, grad_norm.double().view(1)])
        read, unread = None, None
        if self.read_every == 1:
            read = self.update_judged_on_host(values, step_real)
        else:
            unread = torch.cat([values, self.update_judged_on_device(values[0] / step_real, grad_norm)])
        self.optimizer.zero_grad(set_to_none=True)
        p.step += 1
        p.tokens += t.grad_accum * t.batch_size * self.cfg.model.block_size
        p.real_tokens += step_real
        record = {"step": p.step, "tokens": p.tokens, "real_tokens": p.real_tokens, "lr": lr}
        step = TakenStep(record, step_real, unread)
        if read is not None:
            self.complete_record(step, *read)
        self.taken.append(step)
        return step.record

    def update_judged_on_host(self, values: torch.Tensor, step_real: int) -> tuple[float, float, float]:
        """The guard decides on this step's update from its loss and gradient norm: the one host read of the
        step, both values at once (on a GPU, the one wait for its queue of kernels). Returns (train loss,
        z-loss term, gradient norm)."""
        *loss_sums, grad_norm = values.tolist()
        train_loss, z_term = (s / step_real for s in self.cluster.sum(loss_sums, self.device))
        if self.monitor.allow_update(self.progress.step, train_loss, grad_norm):
            self.optimizer.step()
        return train_loss, z_term, grad_norm

    def update_judged_on_device(self, train_loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """The update, masked where the device's guard skips it; returns that decision (1: skipped), unread."""
        if self.device_guard is None:  # an unguarded run takes every update
            self.optimizer.step()
            return torch.zeros(1, dtype=torch.float64, device=self.device)
        skip = self.device_guard.judge(train_loss, grad_norm)
        step_masked(self.optimizer, skip)
        return skip.double().view(1)

    def read_steps(self) -> list[TakenStep]:
        """The steps since the last read, their values read from the device in one transfer and replayed through
        the guard in order, each with its events; the device's skip decisions stand."""
        taken, self.taken = self.taken, []
        unread = [step.unread for step in taken if step.unread is not None]
        for step, (loss_sum, z_sum, grad_norm, skip) in zip(taken, torch.stack(unread).tolist() if unread else []):
            train_loss, z_term = loss_sum / step.step_real, z_sum / step.step_real
            self.monitor.allow_update(step.record["step"] - 1, train_loss, grad_norm, skipped=bool(skip))
            self.complete_record(step, train_loss, z_term, grad_norm)
        return taken

    def complete_record(self, step: TakenStep, train_loss: float, z_term: float, grad_norm: float) -> None:
        """The step's losses and gradient norm into its record, and the guard's events about it beside it."""
        step.record.update(train_loss=train_loss, grad_norm=grad_norm)
        if self.t.z_loss:
            step.record["train_z_loss"] = z_term  # the term backpropagated beside train_loss
        step.events = self.monitor.drain_events()

    def roll_back(self) -> None:
        """Back to the guard's last good state; the device's spike windows are cleared with the monitor's."""
        self.monitor.rollback(self.model, self.optimizer, self.progress.step)
        if self.device_guard is not None:
            self.device_guard.load(self.monitor.state)

    def agree_to_stop(self, stop: StopFlag) -> tuple[bool, bool]:
        """(budget spent, stop asked), the same on every rank: one stopping alone would hang the next all-reduce."""
        p, max_time = self.progress, self.t.max_time
        out_of_time = max_time is not None and self.clock.elapsed_s() >= max_time
        out_of_time, stop_asked = self.cluster.any([out_of_time, stop.asked(p.step)], self.device)
        return out_of_time or (self.steps_budget is not None and p.step >= self.steps_budget), stop_asked

    def validate(self) -> dict[str, float]:
        """Both validation losses over every rank's share: {"val_loss": packed, "val_loss_doc": per-document}.

        The guard judges the packed one (as it always has) and may keep this state as good.
        """
        p, monitor, vocab = self.progress, self.monitor, self.data.meta["vocab_size"]
        packed = validation_loss_sum(self.model, self.data.val_batches, self.device, vocab, self.t.precision)
        per_doc = validation_loss_sum(self.model, self.data.val_doc_batches, self.device, vocab, self.t.precision)
        loss_sum, tokens, doc_sum, doc_tokens = self.cluster.sum([*packed, *per_doc], self.device)
        loss, loss_doc = loss_sum / max(tokens, 1), doc_sum / max(doc_tokens, 1)
        p.val_losses.append((p.step, loss))
        p.val_losses_doc.append((p.step, loss_doc))
        monitor.observe_val(p.step, loss)
        monitor.remember_good(self.model, self.optimizer, p.step)
        return {"val_loss": loss, "val_loss_doc": loss_doc}

    def log_step(self, step: TakenStep) -> None:
        """The guard's events and the step's metrics to the log; then the progress bar (or a line per evaluation)."""
        p, record = self.progress, step.record
        for event in step.events + self.monitor.drain_events():  # the step's, then the evaluation's and roll-back's
            self.write(event)
        if "val_loss" in record or record["step"] % self.t.log_every == 0:
            self.write(record)
        checkpoint.kill_point("train:after-metrics", record["step"])
        self.bar.update(1)
        tokens_per_s = p.tokens / max(p.elapsed_s, 1e-9)
        self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if "val_loss" in record and self.bar.disable and not self.quiet:
            print(
                f"step {record['step']}: train {record['train_loss']:.4f} val {record['val_loss']:.4f} "
                f"(per-document {record['val_loss_doc']:.4f})",
                flush=True,
            )

    def checkpoint_due(self) -> bool:
        return self.progress.step % (self.t.checkpoint_every or self.t.eval_every) == 0

    def maybe_checkpoint(self, final: bool) -> None:
        p = self.progress
        if self.cluster.is_main and (final or self.checkpoint_due()):
            p.stability = self.monitor.state_dict(p.step)
            self.log.sync()  # the metrics this checkpoint covers are on disk before it is committed
            checkpoint.save(self.run_dir, self.model, self.optimizer, vars(p),  # vars: the snapshot is not copied
                            checkpoint_settings(self.cfg, self.data.meta))  # fmt: skip

    def write(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(record)

    # --- before and after ---

    def host_read_interval(self) -> int:
        """host_read_every, or 1 where reading less often is not possible: a guarded run needs an optimizer that
        can mask an update (fused AdamW, not Muon), and several processes agree on stopping each step anyway."""
        wanted = self.t.host_read_every
        if wanted == 1:
            return 1
        why = ("runs over several processes" if self.cluster.active
               else "a guarded run needs fused AdamW to skip an update on the device"
               if self.t.guard and not masks_updates(self.optimizer) else None)  # fmt: skip
        if why is None:
            return wanted
        if not self.quiet:
            print(f"--host-read-every {wanted}: reading every step instead ({why})", flush=True)
        return 1

    def announce(self) -> None:
        t, world = self.t, self.cluster.world
        if self.quiet:
            return
        print(
            f"global batch: {t.grad_accum * t.batch_size} rows per step (--grad-accum {t.grad_accum} x --batch-size "
            f"{t.batch_size}; {world} process(es), {t.grad_accum // world} micro-batch(es) each)",
            flush=True,
        )
        if self.schedule_extended:
            print(
                f"budget extended past the LR schedule's span: {describe_extension(self.schedule_extended)}", flush=True
            )

    def finish(self, interrupted: bool) -> TrainResult:
        """Rank 0 writes the summary (and says when the guard gave up); every rank waits for it."""
        summary = {}
        if self.log is not None:
            kept = self.monitor.kept_weights
            if kept:  # the terminal says it too, not only summary.json
                print(
                    f"the stability guard gave up at step {self.progress.step} after {self.monitor.th.max_recoveries} "
                    f"recoveries; the saved weights are the last good ones, from step {kept['step']} "
                    f"(val loss {kept['val_loss']:.4f})",
                    flush=True,
                )
            summary = write_summary(self.run_dir, self.progress, self.run_facts(), self.monitor, interrupted,
                                    self.steps_budget)  # fmt: skip
            self.log.close(summary)
        self.cluster.barrier()  # no rank leaves before the checkpoint and summary are written
        return TrainResult(self.run_dir, summary, interrupted)

    def run_facts(self) -> dict[str, Any]:
        """What the summary records about how the run was made, beside its results."""
        t = self.t
        flops_per_token = model_costs(self.cfg.model).flops_per_token_train  # the cost model of info and bench
        facts = {
            "params": self.model.num_params(),
            "params_non_embedding": self.model.num_params(non_embedding=True),
            "device": str(self.device),
            "precision": t.precision,  # as resolved: fp32 or bf16
            "world_size": self.cluster.world,
            "grad_accum": t.grad_accum,
            "global_batch_rows": t.grad_accum * t.batch_size,
            "schedule_extended": self.schedule_extended,
            "data": self.data.meta["source"],
            "tokenizer": self.data.meta["tokenizer"],
            "batching": t.batching,
            "flops_per_token": flops_per_token,
            "train_flops": flops_per_token * self.progress.tokens,  # every token slot, padding included
        }
        if t.batching == "padded":
            facts["truncated_docs"] = self.data.rows.truncated_docs
        return facts
