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
from dataclasses import asdict, dataclass, field, fields
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


@dataclass
class StabilityState:
    """Everything the monitor has learned so far; a checkpoint keeps it whole, so a resumed run
    judges and recovers exactly as an uninterrupted one would.

    The field names are the keys of the dict trainer_state.pt holds (see to_dict), so
    checkpoints written before this class existed load as they are.
    """

    lr_scale: float = 1.0  # the learning rate multiplier left by recoveries
    events: list[dict[str, Any]] = field(default_factory=list)
    # validation side
    best_val: float = math.inf
    last_val: float | None = None
    max_rise: float = 0.0
    max_rise_pct: float = 0.0
    val_rising: int = 0  # consecutive evaluations above the best by more than val_rise
    ema_at_best_val: float | None = None  # the smoothed train loss when the best val loss was measured
    overfitting: bool = False  # val has risen while train kept falling, and has not come back to its best
    # train side
    ema: float | None = None
    best_ema: float = math.inf
    train_rising: int = 0  # consecutive steps of the smoothed loss above its best by more than train_rise
    last_train_loss: float | None = None  # of the last update taken
    last_loss_finite: bool = True  # of the last step, taken or skipped
    losses: list[float] = field(default_factory=list)  # the spike window, oldest first
    norms: list[float] = field(default_factory=list)
    # skips, episodes and recoveries
    skipped: int = 0
    skip_streak: int = 0
    in_episode: bool = False  # a divergence was reported and the loss has not come back near its best
    rollback_wanted: bool = False
    recoveries: int = 0
    gave_up: bool = False
    good: dict[str, Any] | None = None  # the state to roll back to: step, val_loss, model and optimizer state dicts

    def to_dict(self) -> dict[str, Any]:
        """The saved form. Shallow on purpose: the snapshot's tensors are written, not copied first."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> StabilityState:
        """Accepts older checkpoints too: a field they lack starts at its default."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


class StabilityMonitor:
    """Judges each step and evaluation against the state; the training loop calls, in this order,
    allow_update (each step), observe_val and remember_good (each evaluation), then rollback when
    rollback_wanted."""

    def __init__(
        self,
        guard: bool,
        state: StabilityState | dict[str, Any] | None = None,
        thresholds: Thresholds = Thresholds(),
    ):
        self.guard = guard
        self.th = thresholds
        if not isinstance(state, StabilityState):
            state = StabilityState.from_dict(state or {})
        self.state = state
        self._pending: list[dict[str, Any]] = []  # events not yet written to the metrics

    # --- the figures the summary and the loop read ---

    @property
    def lr_scale(self) -> float:
        return self.state.lr_scale

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.state.events

    @property
    def skipped(self) -> int:
        return self.state.skipped

    @property
    def last_train_loss(self) -> float | None:
        return self.state.last_train_loss

    @property
    def gave_up(self) -> bool:
        return self.state.gave_up

    @property
    def rollback_wanted(self) -> bool:
        return self.state.rollback_wanted

    @property
    def kept_weights(self) -> dict[str, Any] | None:
        """Step and val loss of the weights the run ends with when the guard gave up."""
        good = self.state.good
        if not self.state.gave_up or good is None:
            return None
        return {"step": good["step"], "val_loss": good["val_loss"]}

    # --- what the training loop calls ---

    def allow_update(self, step: int, loss: float, grad_norm: float, skipped: bool | None = None) -> bool:
        """Record the step's loss and gradient norm; False means skip this update.

        skipped: the decision already taken on the device (DeviceGuard, when the host reads the steps
        later): it stands, and the monitor records the step as it would have judged it.
        """
        s = self.state
        step += 1  # events are named by the step number the update would produce
        s.last_loss_finite = math.isfinite(loss)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._event("nan", step, loss=loss, grad_norm=grad_norm, skipped=self.guard)
            return self._skip(step, loss) if self.guard else True
        worst_z = max(
            self._spike_z("loss_spike", step, loss, s.losses, self.th.loss_spike_ratio),
            self._spike_z("grad_spike", step, grad_norm, s.norms, self.th.grad_spike_ratio),
        )
        hard_spike = worst_z > self.th.hard_spike_z if skipped is None else skipped
        if self.guard and hard_spike:
            return self._skip(step, loss)  # keep the spike out of the history too
        s.skip_streak = 0
        self._remember(s.losses, loss)
        self._remember(s.norms, grad_norm)
        s.last_train_loss = loss
        self._observe_train(step, loss)
        return True

    def observe_val(self, step: int, val: float) -> None:
        s = self.state
        s.last_val = val
        if not math.isfinite(val):
            self._event("nan", step, val_loss=val)
            self._diverged(step, val, "validation loss is not finite")
            return
        if val < s.best_val:
            s.best_val, s.ema_at_best_val = val, s.ema
            s.val_rising = 0
            s.in_episode = s.overfitting = False
            return
        rise = val - s.best_val
        s.max_rise = max(s.max_rise, rise)
        s.max_rise_pct = max(s.max_rise_pct, 100.0 * rise / s.best_val)
        if rise > self.th.val_rise * s.best_val:
            # the model fits its training data better and generalises worse; a jump past the hard rise
            # from near the best is not that (overfitting creeps up), but weights the last update broke
            # before the train loss, measured before each update, has seen them
            creeping = s.overfitting or rise <= self.th.val_hard_rise * s.best_val
            if creeping and self._train_still_falling():
                s.val_rising = 0
                if not s.overfitting:
                    s.overfitting = True
                    self._event("overfitting", step, val_loss=val, best_val=s.best_val,
                                train_ema=s.ema, train_ema_at_best_val=s.ema_at_best_val)  # fmt: skip
                return
            s.val_rising += 1
            if s.val_rising >= self.th.val_patience or rise > self.th.val_hard_rise * s.best_val:
                self._diverged(step, val, f"val loss {val:.3f} vs best {s.best_val:.3f}")
        else:
            s.val_rising = 0
            s.in_episode = False

    def remember_good(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Keep a copy of a state to return to (taken right after an evaluation that shows no rise: not
        while overfitting, whose weights score worse than the ones kept at the best val loss)."""
        s = self.state
        if self.guard and s.val_rising == 0 and s.train_rising == 0 and not s.rollback_wanted and not s.overfitting:
            s.good = _snapshot(step, s.last_val, model, optimizer)

    def resume_from(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After a checkpoint is loaded: a good state that state_dict() marked as the checkpoint's own is copied."""
        good = self.state.good
        if good is not None and good["model"] is None:
            self.state.good = _snapshot(good["step"], good["val_loss"], model, optimizer)

    def rollback(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Return to the last good state: with a lower LR, or for good once recoveries run out."""
        s = self.state
        s.rollback_wanted = False
        s.recoveries += 1
        restored_from = None
        if s.good is not None:
            restored_from = s.good["step"]
            model.load_state_dict(s.good["model"])
            # A copy: the optimizer keeps the tensors it loads and updates them in place, which would
            # move the snapshot too, and a second roll-back to it would leave the optimizer where it is.
            optimizer.load_state_dict(copy.deepcopy(s.good["optimizer"]))
        if s.recoveries > self.th.max_recoveries:
            s.gave_up = True
            kept = {} if s.good is None else {"val_loss": s.good["val_loss"]}
            self._event("gave_up", step, recoveries=s.recoveries - 1, restored_step=restored_from, **kept)
            return
        s.lr_scale *= self.th.lr_factor
        s.val_rising = s.train_rising = s.skip_streak = 0
        s.in_episode = False
        s.ema, s.best_ema = None, math.inf
        s.losses.clear()
        s.norms.clear()
        self._event("recovery", step, restored_step=restored_from, lr_scale=s.lr_scale)

    def drain_events(self) -> list[dict[str, Any]]:
        pending, self._pending = self._pending, []
        return pending

    def state_dict(self, step: int) -> dict[str, Any]:
        """What the checkpoint of ``step`` keeps: the whole state, the good state to roll back to included.

        A good state taken at that very step is the checkpoint's own weights and optimizer state:
        it is marked, not stored twice, and resume_from() copies it back from the loaded checkpoint.
        """
        saved = self.state.to_dict()
        good = saved["good"]
        if good is not None and good["step"] == step:
            saved["good"] = {**good, "model": None, "optimizer": None}
        return saved

    # --- the label ---

    def report(self, final_val: float | None) -> dict[str, Any]:
        s = self.state
        counts = {k: sum(e["event"] == k for e in s.events) for k in ("loss_spike", "grad_spike", "nan")}
        divergences = [e for e in s.events if e["event"] == "divergence"]
        gap = None
        if final_val is not None and s.last_train_loss is not None and math.isfinite(final_val):
            gap = final_val - s.last_train_loss
        label, reason = _label(self, counts, divergences, gap, final_val)
        return {
            "label": label,
            "reason": reason,
            "guard": self.guard,
            "max_val_rise": round(s.max_rise, 4),
            "max_val_rise_pct": round(s.max_rise_pct, 2),
            "spikes": counts["loss_spike"] + counts["grad_spike"],
            "nan_count": counts["nan"],
            "train_val_gap": None if gap is None else round(gap, 4),
            "divergence": bool(divergences),
            "overfitting_steps": [e["step"] for e in s.events if e["event"] == "overfitting"],
            "divergence_steps": [e["step"] for e in divergences],
            "recoveries": sum(e["event"] == "recovery" for e in s.events),
            "gave_up": s.gave_up,
            "kept_weights": self.kept_weights,
            "thresholds": asdict(self.th),
        }

    # --- internals ---

    def _spike_z(self, kind: str, step: int, value: float, history: list[float], ratio: float) -> float:
        """The value's z-score against its window, 0 when it is not a spike; a spike is an event."""
        z = _zscore(value, history, self.th.spike_min_history)
        if z > self.th.spike_z and value < ratio * sum(history) / len(history):
            z = 0.0  # statistically unusual but small: not a spike
        if z > self.th.spike_z:
            self._event(kind, step, value=value, z=round(z, 2), skipped=self.guard and z > self.th.hard_spike_z)
        return z

    def _remember(self, history: list[float], value: float) -> None:
        history.append(value)
        del history[: -self.th.spike_window]

    def _train_still_falling(self) -> bool:
        """Whether the smoothed train loss is below where it stood at the best val loss, and not rising:
        a val rise then is overfitting, not divergence (in which train loss rises too), and is reported
        without a roll-back: going back would only repeat the same descent."""
        s = self.state
        return s.ema is not None and s.ema_at_best_val is not None and s.ema < s.ema_at_best_val and not s.train_rising

    def _observe_train(self, step: int, loss: float) -> None:
        s, d = self.state, self.th.ema_decay
        s.ema = loss if s.ema is None else d * s.ema + (1 - d) * loss
        if s.ema < s.best_ema:
            s.best_ema = s.ema
            s.train_rising = 0
        elif s.ema > (1 + self.th.train_rise) * s.best_ema:
            s.train_rising += 1
            if s.train_rising == self.th.train_patience:
                self._diverged(step, s.ema, f"smoothed train loss {s.ema:.3f} vs best {s.best_ema:.3f}")
        else:
            s.train_rising = 0

    def _skip(self, step: int, loss: float) -> bool:
        """Count a skipped update; a streak of them is a divergence (the weights, not a batch, are bad)."""
        s = self.state
        s.skipped += 1
        s.skip_streak += 1
        if s.skip_streak >= self.th.max_skip_streak:
            self._diverged(step, loss, f"{s.skip_streak} updates skipped in a row")
        return False

    def _diverged(self, step: int, value: float, why: str) -> None:
        s = self.state
        if s.rollback_wanted or s.in_episode:
            return  # one event per episode: it ends when the loss comes back near its best
        s.in_episode = True
        self._event("divergence", step, value=value, why=why, best_val=_finite(s.best_val))
        if self.guard:
            s.rollback_wanted = True

    def _event(self, kind: str, step: int, **values: Any) -> None:
        event = {"event": kind, "step": step, **values}
        self.state.events.append(event)
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


def _zscore(value: float, history: list[float], min_history: int) -> float:
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
    s = m.state
    if final_val is not None and not math.isfinite(final_val):
        return "unstable", f"final val loss is {final_val}"
    if not s.last_loss_finite:
        return "unstable", "final train loss is not finite"
    if s.gave_up:
        kept = m.kept_weights
        where = f"; kept the weights of step {kept['step']}" if kept else ""
        return "unstable", f"gave up after {m.th.max_recoveries} recoveries{where}"
    if divergences:
        first = divergences[0]
        if s.recoveries and not s.gave_up and m.guard:
            return "ok", f"divergence at step {first['step']}, recovered with LR x {s.lr_scale:g}"
        return "unstable", f"divergence at step {first['step']}"
    if counts["nan"]:
        return "unstable", f"{counts['nan']} non-finite losses"
    overfit = [e for e in s.events if e["event"] == "overfitting"]
    if overfit:  # a rise of val alone, train falling: the training is sound, the data too small for it
        return "ok", f"overfitting from step {overfit[0]['step']} (val rose {s.max_rise_pct:.1f}% while train fell)"
    if s.max_rise_pct > 10:
        return "unstable", f"val loss rose {s.max_rise_pct:.1f}% above its best"
    spikes = counts["loss_spike"] + counts["grad_spike"]
    if spikes or s.max_rise_pct > 2 or (gap is not None and gap_wording(gap, m.th) == "wide"):
        if spikes:
            return "ok", f"{spikes} spike{'s' if spikes != 1 else ''}"
        if s.max_rise_pct > 2:
            return "ok", f"val loss rose {s.max_rise_pct:.1f}% above its best"
        return "ok", f"wide train/val gap ({gap:+.2f})"
    if s.max_rise_pct > 0.5 or (gap is not None and gap_wording(gap, m.th) != "tight"):
        return "stable", "small val rises" if s.max_rise_pct > 0.5 else f"moderate train/val gap ({gap:+.2f})"
    return "very stable", "no divergence, tight train/val gap"
