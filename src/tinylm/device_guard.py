"""The stability guard's skip decision made on the device, so that a step need not wait for a host read.

StabilityMonitor.allow_update judges each step on the host: it skips an update whose loss or gradient
norm is not finite, or whose z-score against the window of the last accepted values is beyond the hard
spike threshold. DeviceGuard makes the same decision with tensor operations only (no value leaves the
device), and the update is masked rather than skipped: fused AdamW leaves parameters, moments and step
count untouched when its ``found_inf`` tensor is 1 (the mechanism torch.amp.GradScaler uses).

The host still replays the monitor over every step when it reads (events, smoothed loss, divergence,
roll-back), taking the device's decisions as given; the two windows hold the same values after each
replay, so the device's are derived from the monitor's state (losses, norms) when a run starts or
resumes and after a roll-back clears them: a checkpoint needs no second copy.
"""

from __future__ import annotations

import torch

from tinylm.stability import StabilityState, Thresholds


def masks_updates(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a ``found_inf`` tensor: torch's own flag for it, which GradScaler
    reads too (fused Adam/AdamW). Muon has no such hook, nor does tinylm's Optimizers (Muon + AdamW)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def step_masked(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step(), changing nothing where ``skip`` is 1 (a 0-dim float32 tensor, on the device; fused
    AdamW subtracts it from each step count, whose shape it must have). The flag is taken off the optimizer
    afterwards, as torch's GradScaler does: a later step, or another optimizer's, must not inherit it."""
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class DeviceGuard:
    """The spike windows of StabilityMonitor as device tensors (float64), and its skip decision from them.

    judge() returns what allow_update would for the same sequence of values, on a guarded run: 1 for a
    non-finite loss or gradient norm, or a z-score above hard_spike_z (with the ratio filter and the minimum
    history); only accepted values enter the windows. The sums run in another order than the host's, so a
    z-score within rounding of the threshold may be judged the other way; the replay follows the device.
    """

    def __init__(self, state: StabilityState, device: torch.device, thresholds: Thresholds = Thresholds()):
        self.th, self.device = thresholds, device
        width = thresholds.spike_window
        self._slots = torch.arange(width, device=device)
        # row 0 judges the train loss, row 1 the gradient norm
        self._ratios = torch.tensor([thresholds.loss_spike_ratio, thresholds.grad_spike_ratio],
                                    dtype=torch.float64, device=device)  # fmt: skip
        self.load(state)

    def load(self, state: StabilityState) -> None:
        """Take the monitor's windows (oldest first): at the start, on resume and after a roll-back."""
        width = self.th.spike_window
        windows = torch.zeros(2, width, dtype=torch.float64)
        counts = torch.zeros(2, dtype=torch.int64)
        for row, history in enumerate((state.losses, state.norms)):
            kept = history[-width:]
            if kept:
                windows[row, width - len(kept) :] = torch.tensor(kept, dtype=torch.float64)
            counts[row] = len(kept)
        self.windows, self.counts = windows.to(self.device), counts.to(self.device)

    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """This step's decision, 1.0 to skip its update, as a 0-dim float32 tensor (no host read); an accepted
        step's values enter the windows."""
        th = self.th
        values = torch.stack([loss.double().reshape(()), grad_norm.double().reshape(())])
        valid = self._slots >= (th.spike_window - self.counts)[:, None]  # the last `count` slots of each row
        count = self.counts.clamp(min=1).double()
        mean = torch.where(valid, self.windows, 0.0).sum(1) / count
        deviation = torch.where(valid, self.windows - mean[:, None], 0.0)
        std = ((deviation * deviation).sum(1) / count).sqrt()
        z = (values - mean) / torch.maximum(std, (1e-3 * mean.abs()).clamp(min=1e-8))
        z = torch.where(self.counts < th.spike_min_history, 0.0, z)
        z = torch.where((z > th.spike_z) & (values < self._ratios * mean), 0.0, z)  # unusual but small
        skip = ~torch.isfinite(values).all() | (z.max() > th.hard_spike_z)
        self._remember(values, ~skip)
        return skip.float()

    def _remember(self, values: torch.Tensor, accepted: torch.Tensor) -> None:
        shifted = torch.cat([self.windows[:, 1:], values[:, None]], dim=1)
        self.windows = torch.where(accepted, shifted, self.windows)
        self.counts = torch.where(accepted, (self.counts + 1).clamp(max=self.th.spike_window), self.counts)
