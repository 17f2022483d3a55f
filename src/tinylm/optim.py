"""The optimizers (AdamW with decay / no-decay groups, or Muon + AdamW) and the learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tinylm.config import TrainConfig
from tinylm.errors import UserError


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over every parameter, or Muon over the blocks' weight matrices and AdamW over the rest.

    Weight decay on weight matrices only: never on biases, norm gains or position embeddings.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return _adamw(named, cfg)
    if not hasattr(torch.optim, "Muon"):
        raise UserError(
            f"--optimizer muon needs torch.optim.Muon (torch 2.9 or later); this is torch {torch.__version__}"
        )
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    # Muon decays decoupled, p *= 1 - lr * wd, with its own lr (20x AdamW's at the defaults):
    # scaled so that a step shrinks the weights as much as AdamW's does at the same weight_decay.
    decay = cfg.weight_decay * cfg.lr / cfg.muon_lr
    muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, weight_decay=decay, momentum=cfg.muon_momentum)
    for group in muon.param_groups:
        group[LR_RATIO] = cfg.muon_lr / cfg.lr
    return Optimizers(_adamw([(n, p) for n, p in named if not is_hidden_matrix(n, p)], cfg), muon)


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (attention, MLP): what Muon updates. Embeddings and
    the output layer are not: Muon's orthogonalised step suits maps between hidden spaces only.
    The fused matrices (c_attn: q, k, v stacked; SwiGLU's c_fc: gate and up) are orthogonalised
    as one, and torch's Muon scales their step by sqrt(rows / cols); reference Muon code splits q, k, v."""
    return name.startswith("transformer.h.") and param.dim() == 2


def _adamw(named: list[tuple[str, torch.Tensor]], cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in named:
        (decay if param.dim() >= 2 and "wpe" not in name else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused kernel: on CPU too, about 3x faster than the multi-tensor path (measured on quality)
    fast = {"fused": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fast)


LR_RATIO = "lr_ratio"
"""Param-group key: the group's peak LR over ``lr`` (Muon's groups), so one schedule drives every group."""


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the scheduled LR on every group, scaled by the group's ratio to ``lr`` if it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group[LR_RATIO] if LR_RATIO in group else lr


class Optimizers:
    """Several optimizers over disjoint parameters, stepped, cleared, saved and restored as one.

    The trainer, the checkpoint and the guard's roll-back use only these methods, so they treat
    Muon + AdamW as they treat AdamW alone (whose state_dict keeps its old layout on disk).
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise UserError("the checkpoint's optimizer state is from another --optimizer; cannot resume")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)


def learning_rate(cfg: TrainConfig, step: int, total_steps: int | None, time_fraction: float = 0.0) -> float:
    """Learning rate for ``step`` (0-based).

    With a step budget the schedule is laid out over ``total_steps``; with only a time
    budget, progress is the fraction of the time used.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    floor = cfg.lr * cfg.min_lr_ratio
    if total_steps is not None:
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total_steps))
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
    else:
        warmup_fraction = 0.05
        if time_fraction < warmup_fraction:
            return cfg.lr * max(time_fraction / warmup_fraction, 1e-3)
        progress = (time_fraction - warmup_fraction) / (1 - warmup_fraction)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly over the final decay_fraction of the run
    stable = 1.0 - cfg.decay_fraction
    if progress <= stable:
        return cfg.lr
    return cfg.lr - (cfg.lr - floor) * (progress - stable) / cfg.decay_fraction


SCHEDULE_EXTENSION_RULE = "hold: steps past the original budget keep the schedule's last LR"
"""How a resumed run with a longer budget continues its schedule (recorded in summary.json)."""


@dataclass
class ScheduleSpan:
    """The budget a run's LR schedule is laid out over: fixed when the run starts, kept on resume.

    A resumed run given a longer budget does not re-lay the schedule (that would make the LR
    jump back up mid-run); the added steps keep the last LR of the original schedule.
    """

    steps: int | None
    """Optimizer steps, when the run has a step or token budget."""
    time_s: float | None
    """Seconds, when the run has only a time budget."""

    def lr(self, cfg: TrainConfig, step: int, elapsed_s: float) -> float:
        if self.steps is not None:
            return learning_rate(cfg, min(step, self.steps - 1), self.steps)
        time_fraction = min(elapsed_s / self.time_s, 1.0) if self.time_s else 0.0
        return learning_rate(cfg, step, None, time_fraction)

    def extension(self, steps_budget: int | None, max_time: float | None) -> dict | None:
        """How a budget larger than this span extends the schedule, or None if it does not."""
        if self.steps is not None and steps_budget is not None and steps_budget > self.steps:
            return {"from_steps": self.steps, "to_steps": steps_budget, "rule": SCHEDULE_EXTENSION_RULE}
        if self.steps is None and self.time_s and max_time and max_time > self.time_s:
            return {"from_time_s": self.time_s, "to_time_s": max_time, "rule": SCHEDULE_EXTENSION_RULE}
        return None


def describe_extension(extended: dict) -> str:
    if "from_steps" in extended:
        span, added = f"{extended['from_steps']} steps", f"steps {extended['from_steps'] + 1}-{extended['to_steps']}"
    else:
        span, added = f"{extended['from_time_s']:g} s", f"the time up to {extended['to_time_s']:g} s"
    return f"the schedule spans the first {span}; {added} keep its last LR"
