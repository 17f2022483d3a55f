"""Stability: detect NaN/Inf, spikes and divergence; label the run; recover when guarded.

Detection is always on. With the guard on, an update whose loss or gradient is not finite,
or whose spike is beyond the hard threshold, is skipped; a divergence episode rolls the
model and optimizer back to the last good evaluation and lowers the learning rate. Skipping
is the remedy for an outlier batch; several skips in a row mean the weights themselves are
bad, and count as a divergence. The last good state is part of the monitor's saved state,
so a resumed run recovers exactly as an uninterrupted one would.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Thresholds:
    """Defaults chosen so healthy runs of the presets raise no event."""

    spike_window: int = 50
    """Recent steps the z-scores are measured against."""
    spike_min_history: int = 20
    """Steps of history before spikes are judged."""
    spike_z: float = 6.0
    """A train loss or gradient norm this many standard deviations above the window is a spike."""
    loss_spike_ratio: float = 1.2
    """... and a train loss spike is also at least this multiple of the window's mean ..."""
    grad_spike_ratio: float = 2.5
    """... and a gradient-norm spike at least this multiple (noisy small norms are not spikes)."""
    hard_spike_z: float = 12.0
    """Guarded runs skip the update of a spike this large."""
    val_rise: float = 0.10
    """Validation loss this fraction above its running best counts as a rise ..."""
    val_patience: int = 2
    """... and this many consecutive rising evaluations make a divergence episode."""
    val_hard_rise: float = 0.5
    """A single evaluation this fraction above the best is a divergence episode at once."""
    ema_decay: float = 0.9
    """Smoothing of the train loss for the train-side divergence check."""
    train_rise: float = 0.25
    """Smoothed train loss this fraction above its running best ..."""
    train_patience: int = 10
    """... for this many consecutive steps is a divergence episode."""
    lr_factor: float = 0.5
    """Learning rate multiplier applied on each recovery."""
    max_recoveries: int = 3
    """After this many roll-backs the run stops with the last good weights it kept."""
    max_skip_streak: int = 3
    """This many updates skipped in a row are a divergence episode, not a run of bad batches."""
    gap_tight: float = 0.2
    """A final train/val gap up to this size is tight (the run can be very stable) ..."""
    gap_wide: float = 0.5
    """... above this it is wide (the run is at best ok); in between it is moderate (at best stable)."""


# Labels, most stable first; _label() holds the limits that earn each.
LABELS = ("very stable", "stable", "ok", "unstable")


def gap_wording(gap: float, th: Thresholds = Thresholds()) -> str:
    """'tight', 'moderate' or 'wide': how the label judges a final train/val gap."""
    return "wide" if abs(gap) > th.gap_wide else "moderate" if abs(gap) > th.gap_tight else "tight"


class StabilityMonitor:
    def __init__(self, guard: bool, state: dict[str, Any] | None = None, thresholds: Thresholds = Thresholds()):
        self.guard = guard
        self.th = thresholds
        s = state or {}
        self.lr_scale: float = s.get("lr_scale", 1.0)
        self.events: list[dict[str, Any]] = s.get("events", [])
        self.best_val: float = s.get("best_val", math.inf)
        self.max_rise: float = s.get("max_rise", 0.0)
        self.max_rise_pct: float = s.get("max_rise_pct", 0.0)
        self.val_rising: int = s.get("val_rising", 0)
        self.ema: float | None = s.get("ema")
        self.best_ema: float = s.get("best_ema", math.inf)
        self.train_rising: int = s.get("train_rising", 0)
        self.recoveries: int = s.get("recoveries", 0)
        self.in_episode: bool = s.get("in_episode", False)
        self.gave_up: bool = s.get("gave_up", False)
        self.last_train_loss: float | None = s.get("last_train_loss")
        self.last_loss_finite: bool = s.get("last_loss_finite", True)
        self.last_val: float | None = s.get("last_val")
        self.skipped: int = s.get("skipped", 0)
        self.skip_streak: int = s.get("skip_streak", 0)
        self._losses: deque[float] = deque(s.get("losses", []), maxlen=self.th.spike_window)
        self._norms: deque[float] = deque(s.get("norms", []), maxlen=self.th.spike_window)
        self._pending: list[dict[str, Any]] = []
        self._good: dict[str, Any] | None = s.get("good")  # step, val_loss, model and optimizer state dicts
        self._rollback_wanted = False

    # --- what the training loop calls ---

    def allow_update(self, step: int, loss: float, grad_norm: float) -> bool:
        """Record the step's loss and gradient norm; False means skip this update."""
        step += 1  # events are named by the step number the update would produce
        self.last_loss_finite = math.isfinite(loss)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._event("nan", step, loss=loss, grad_norm=grad_norm, skipped=self.guard)
            return self._skip(step, loss) if self.guard else True
        worst_z = 0.0
        checks = (
            ("loss_spike", loss, self._losses, self.th.loss_spike_ratio),
            ("grad_spike", grad_norm, self._norms, self.th.grad_spike_ratio),
        )
        for kind, value, history, ratio in checks:
            z = _zscore(value, history, self.th.spike_min_history)
            if z > self.th.spike_z and value < ratio * sum(history) / len(history):
                z = 0.0  # statistically unusual but small: not a spike
            if z > self.th.spike_z:
                self._event(kind, step, value=value, z=round(z, 2), skipped=self.guard and z > self.th.hard_spike_z)
            worst_z = max(worst_z, z)
        if self.guard and worst_z > self.th.hard_spike_z:
            return self._skip(step, loss)  # keep the spike out of the history too
        self.skip_streak = 0
        self._losses.append(loss)
        self._norms.append(grad_norm)
        self.last_train_loss = loss
        self._observe_train(step, loss)
        return True

    def observe_val(self, step: int, val: float) -> None:
        self.last_val = val
        if not math.isfinite(val):
            self._event("nan", step, val_loss=val)
            self._diverged(step, val, "validation loss is not finite")
            return
        if val < self.best_val:
            self.best_val = val
            self.val_rising = 0
            self.in_episode = False
            return
        rise = val - self.best_val
        self.max_rise = max(self.max_rise, rise)
        self.max_rise_pct = max(self.max_rise_pct, 100.0 * rise / self.best_val)
        if rise > self.th.val_rise * self.best_val:
            self.val_rising += 1
            if self.val_rising >= self.th.val_patience or rise > self.th.val_hard_rise * self.best_val:
                self._diverged(step, val, f"val loss {val:.3f} vs best {self.best_val:.3f}")
        else:
            self.val_rising = 0
            self.in_episode = False

    @property
    def rollback_wanted(self) -> bool:
        return self._rollback_wanted

    def remember_good(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Keep a copy of a state to return to (taken right after an evaluation that shows no rise)."""
        if self.guard and self.val_rising == 0 and self.train_rising == 0 and not self._rollback_wanted:
            self._good = _snapshot(step, self.last_val, model, optimizer)

    def resume_from(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After a checkpoint is loaded: a good state that state() marked as the checkpoint's own is copied."""
        if self._good is not None and self._good["model"] is None:
            self._good = _snapshot(self._good["step"], self._good["val_loss"], model, optimizer)

    def rollback(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Return to the last good state: with a lower LR, or for good once recoveries run out."""
        self._rollback_wanted = False
        self.recoveries += 1
        restored_from = None
        if self._good is not None:
            restored_from = self._good["step"]
            model.load_state_dict(self._good["model"])
            optimizer.load_state_dict(self._good["optimizer"])
        if self.recoveries > self.th.max_recoveries:
            self.gave_up = True
            kept = {} if self._good is None else {"val_loss": self._good["val_loss"]}
            self._event("gave_up", step, recoveries=self.recoveries - 1, restored_step=restored_from, **kept)
            return
        self.lr_scale *= self.th.lr_factor
        self.val_rising = self.train_rising = self.skip_streak = 0
        self.in_episode = False
        self.ema, self.best_ema = None, math.inf
        self._losses.clear()
        self._norms.clear()
        self._event("recovery", step, restored_step=restored_from, lr_scale=self.lr_scale)

    def drain_events(self) -> list[dict[str, Any]]:
        pending, self._pending = self._pending, []
        return pending

    def state(self, step: int) -> dict[str, Any]:
        """What the checkpoint of ``step`` keeps, the good state to roll back to included.

        A good state taken at that very step is the checkpoint's own weights and optimizer state:
        it is marked, not stored twice, and resume_from() copies it back from the loaded checkpoint.
        """
        good = self._good
        if good is not None and good["step"] == step:
            good = {**good, "model": None, "optimizer": None}
        return {
            "lr_scale": self.lr_scale,
            "events": self.events,
            "best_val": self.best_val,
            "max_rise": self.max_rise,
            "max_rise_pct": self.max_rise_pct,
            "val_rising": self.val_rising,
            "ema": self.ema,
            "best_ema": self.best_ema,
            "train_rising": self.train_rising,
            "recoveries": self.recoveries,
            "in_episode": self.in_episode,
            "gave_up": self.gave_up,
            "last_train_loss": self.last_train_loss,
            "last_loss_finite": self.last_loss_finite,
            "last_val": self.last_val,
            "skipped": self.skipped,
            "skip_streak": self.skip_streak,
            "losses": list(self._losses),
            "norms": list(self._norms),
            "good": good,
        }

    @property
    def kept_weights(self) -> dict[str, Any] | None:
        """Step and val loss of the weights the run ends with when the guard gave up."""
        if not self.gave_up or self._good is None:
            return None
        return {"step": self._good["step"], "val_loss": self._good["val_loss"]}

    # --- the label ---

    def report(self, final_val: float | None) -> dict[str, Any]:
        counts = {k: sum(e["event"] == k for e in self.events) for k in ("loss_spike", "grad_spike", "nan")}
        divergences = [e for e in self.events if e["event"] == "divergence"]
        gap = None
        if final_val is not None and self.last_train_loss is not None and math.isfinite(final_val):
            gap = final_val - self.last_train_loss
        label, reason = _label(self, counts, divergences, gap, final_val)
        return {
            "label": label,
            "reason": reason,
            "guard": self.guard,
            "max_val_rise": round(self.max_rise, 4),
            "max_val_rise_pct": round(self.max_rise_pct, 2),
            "spikes": counts["loss_spike"] + counts["grad_spike"],
            "nan_count": counts["nan"],
            "train_val_gap": None if gap is None else round(gap, 4),
            "divergence": bool(divergences),
            "divergence_steps": [e["step"] for e in divergences],
            "recoveries": sum(e["event"] == "recovery" for e in self.events),
            "gave_up": self.gave_up,
            "kept_weights": self.kept_weights,
            "thresholds": asdict(self.th),
        }

    # --- internals ---

    def _observe_train(self, step: int, loss: float) -> None:
        d = self.th.ema_decay
        self.ema = loss if self.ema is None else d * self.ema + (1 - d) * loss
        if self.ema < self.best_ema:
            self.best_ema = self.ema
            self.train_rising = 0
        elif self.ema > (1 + self.th.train_rise) * self.best_ema:
            self.train_rising += 1
            if self.train_rising == self.th.train_patience:
                self._diverged(step, self.ema, f"smoothed train loss {self.ema:.3f} vs best {self.best_ema:.3f}")
        else:
            self.train_rising = 0

    def _skip(self, step: int, loss: float) -> bool:
        """Count a skipped update; a streak of them is a divergence (the weights, not a batch, are bad)."""
        self.skipped += 1
        self.skip_streak += 1
        if self.skip_streak >= self.th.max_skip_streak:
            self._diverged(step, loss, f"{self.skip_streak} updates skipped in a row")
        return False

    def _diverged(self, step: int, value: float, why: str) -> None:
        if self._rollback_wanted or self.in_episode:
            return  # one event per episode: it ends when the loss comes back near its best
        self.in_episode = True
        self._event("divergence", step, value=value, why=why, best_val=_finite(self.best_val))
        if self.guard:
            self._rollback_wanted = True

    def _event(self, kind: str, step: int, **values: Any) -> None:
        event = {"event": kind, "step": step, **values}
        self.events.append(event)
        self._pending.append(event)


def _snapshot(step: int, val: float | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "step": step,
        "val_loss": val,
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _zscore(value: float, history: deque[float], min_history: int) -> float:
    if len(history) < min_history:
        return 0.0
    mean = sum(history) / len(history)
    var = sum((h - mean) ** 2 for h in history) / len(history)
    std = math.sqrt(var)
    return (value - mean) / max(std, 1e-3 * abs(mean), 1e-8)


def _label(
    m: StabilityMonitor, counts: dict[str, int], divergences: list, gap: float | None, final_val: float | None
) -> tuple[str, str]:
    """very stable / stable / ok / unstable, with the reason a reader sees in brackets."""
    if final_val is not None and not math.isfinite(final_val):
        return "unstable", f"final val loss is {final_val}"
    if not m.last_loss_finite:
        return "unstable", "final train loss is not finite"
    if m.gave_up:
        kept = m.kept_weights
        where = f"; kept the weights of step {kept['step']}" if kept else ""
        return "unstable", f"gave up after {m.th.max_recoveries} recoveries{where}"
    if divergences:
        first = divergences[0]
        if m.recoveries and not m.gave_up and m.guard:
            return "ok", f"divergence at step {first['step']}, recovered with LR x {m.lr_scale:g}"
        return "unstable", f"divergence at step {first['step']}"
    if counts["nan"]:
        return "unstable", f"{counts['nan']} non-finite losses"
    if m.max_rise_pct > 10:
        return "unstable", f"val loss rose {m.max_rise_pct:.1f}% above its best"
    spikes = counts["loss_spike"] + counts["grad_spike"]
    if spikes or m.max_rise_pct > 2 or (gap is not None and gap_wording(gap, m.th) == "wide"):
        if spikes:
            return "ok", f"{spikes} spike{'s' if spikes != 1 else ''}"
        if m.max_rise_pct > 2:
            return "ok", f"val loss rose {m.max_rise_pct:.1f}% above its best"
        return "ok", f"wide train/val gap ({gap:+.2f})"
    if m.max_rise_pct > 0.5 or (gap is not None and gap_wording(gap, m.th) != "tight"):
        return "stable", "small val rises" if m.max_rise_pct > 0.5 else f"moderate train/val gap ({gap:+.2f})"
    return "very stable", "no divergence, tight train/val gap"
