"""The guard's skip decision on the device (DeviceGuard) and the masked update it drives."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tinylm.device_guard import DeviceGuard, masks_updates, step_masked
from tinylm.stability import StabilityMonitor, Thresholds


def noisy_steps(seed: int, n: int):
    """(loss, grad norm) pairs around a slow descent, with non-finite values (three in a row mid-way), hard
    spikes of either, moderate ones, and small ones the ratio filter lets pass."""
    rng = random.Random(seed)
    for i in range(n):
        loss, norm = 4.0 - i / n + rng.gauss(0, 0.02), 1.0 + rng.gauss(0, 0.05)
        kind = rng.random()
        if kind < 0.03 or n // 2 <= i < n // 2 + 3:  # a streak of three mid-way: a roll-back clears the windows
            loss = rng.choice([math.nan, math.inf, -math.inf])
        elif kind < 0.06:
            norm = rng.choice([math.nan, math.inf])
        elif kind < 0.10:
            norm *= rng.uniform(3, 50)  # a gradient spike, hard or not
        elif kind < 0.14:
            loss += rng.uniform(0.2, 5.0)  # a loss spike, hard, moderate or under the ratio
        yield loss, norm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_device_decides_every_skip_as_the_monitor_does(seed):
    monitor = StabilityMonitor(guard=True)
    guard = DeviceGuard(monitor.state, torch.device("cpu"))
    skips = rollbacks = 0
    for step, (loss, norm) in enumerate(noisy_steps(seed, 600)):
        norm = torch.tensor(norm, dtype=torch.float32)  # as clip_grad_norm_ returns it; the loss sums are float64
        decided = guard.judge(torch.tensor(loss, dtype=torch.float64), norm)
        allowed = monitor.allow_update(step, loss, norm.item())
        assert decided.dtype == torch.float32 and decided.shape == ()
        assert decided.item() == (0.0 if allowed else 1.0), (step, loss, norm)
        skips += not allowed
        if step == 400:  # a resumed run's: from the monitor's saved state, its windows full
            guard = DeviceGuard(StabilityMonitor(guard=True, state=monitor.state_dict(step)).state, torch.device("cpu"))
        if monitor.rollback_wanted and not monitor.state.recoveries == monitor.th.max_recoveries:
            monitor.rollback(torch.nn.Linear(1, 1), None, step)  # no good state kept: the windows are cleared
            guard.load(monitor.state)
            rollbacks += 1
        width = monitor.th.spike_window
        for row, history in enumerate((monitor.state.losses, monitor.state.norms)):
            assert guard.counts[row].item() == len(history)
            assert guard.windows[row, width - len(history) :].tolist() == history
    spikes = [e for e in monitor.events if e["event"] in ("loss_spike", "grad_spike")]
    # the sequence tried every branch: non-finite, hard spikes skipped, moderate ones kept, roll-backs
    assert any(e["event"] == "nan" for e in monitor.events)
    assert any(e["skipped"] for e in spikes) and any(not e["skipped"] for e in spikes)
    assert skips > len([e for e in monitor.events if e["event"] == "nan"]) and rollbacks >= 1


# Edge cases the random sequences above never land on: each a history of accepted (loss, grad norm) steps,
# then one step, and whether it is skipped, worked out by hand from allow_update's rule.
EDGES = {
    # a constant window of small norms (std 0): the floor under the std is 1e-3 of the mean, so a norm of
    # 0.05 against 0.01 is z = 4000, a hard spike
    "floor_under_a_zero_spread": (Thresholds(), [(1.0, 0.01)] * 20, (1.0, 0.05), True),
    # a loss exactly loss_spike_ratio (1.2) times the window's mean is not "small": z = 200, skipped
    "loss_at_exactly_the_ratio": (Thresholds(), [(1.0, 1.0)] * 20, (1.2, 1.0), True),
    # losses 1 and 3 (mean 2, std 1): a loss of 14 is z = 12 exactly, not beyond hard_spike_z
    "z_at_exactly_the_hard_threshold": (Thresholds(), [(1.0, 1.0), (3.0, 1.0)] * 10, (14.0, 1.0), False),
    # one step of history judged: its mean is that step's value, a norm 3x it (ratio 2.5) a hard spike
    "history_of_one": (Thresholds(spike_min_history=1), [(1.0, 1.0)], (1.0, 3.0), True),
    # a hard threshold below 1: nothing in the warm-up, nor an unusual but small loss, may reach it
    "warm_up_under_a_low_hard_threshold": (Thresholds(hard_spike_z=0.5), [], (1.0, 1.0), False),
    "small_loss_under_a_low_hard_threshold": (Thresholds(hard_spike_z=0.5), [(1.0, 1.0)] * 20, (1.1, 1.0), False),
    # z exactly spike_z (losses 1 and 3, a loss of 2.25: z = 0.25) is not a spike, so the ratio filter does not
    # zero it, and it is beyond a hard threshold set lower still
    "z_at_exactly_the_spike_threshold": (
        Thresholds(spike_z=0.25, hard_spike_z=0.1),
        [(1.0, 1.0), (3.0, 1.0)] * 10,
        (2.25, 1.0),
        True,
    ),
}


@pytest.mark.parametrize("case", EDGES)
def test_the_device_decides_the_edge_cases_as_the_monitor_does(case):
    thresholds, history, (loss, norm), skipped = EDGES[case]
    monitor = StabilityMonitor(guard=True, thresholds=thresholds)
    guard = DeviceGuard(monitor.state, torch.device("cpu"), thresholds)
    for step, (h_loss, h_norm) in enumerate(history):
        assert guard.judge(torch.tensor(h_loss, dtype=torch.float64), torch.tensor(h_norm)).item() == 0.0
        assert monitor.allow_update(step, h_loss, h_norm)
    decided = guard.judge(torch.tensor(loss, dtype=torch.float64), torch.tensor(norm))
    assert monitor.allow_update(len(history), loss, norm) is not skipped
    assert decided.item() == float(skipped)


def test_a_masked_fused_adamw_step_leaves_weights_moments_and_step_count_bitwise_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    groups = [{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=0.1, fused=True)  # as build_optimizer makes it
    assert masks_updates(optimizer)

    def step(skip: float, grad_scale: float = 1.0) -> None:
        model(torch.randn(4, 8)).pow(2).sum().mul(grad_scale).backward()
        step_masked(optimizer, torch.tensor(skip))
        assert not hasattr(optimizer, "found_inf")  # no later step inherits the decision
        optimizer.zero_grad()

    step(0.0)
    step(0.0)
    weights = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
    step(1.0)
    step(1.0, grad_scale=math.nan)  # a NaN gradient, as the guard skips it
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[i][k], v) for i in state for k, v in state[i].items())
    assert after[0]["step"].item() == 2  # skipped steps do not count in Adam's bias correction
    step(0.0)
    assert not torch.equal(model.weight, weights[0]) and after[0]["step"].item() == 3


def test_an_unmasked_step_is_bitwise_the_plain_step():
    def trained(masked: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=True)
        for _ in range(3):
            model(torch.randn(4, 8)).pow(2).sum().backward()
            if masked:
                step_masked(optimizer, torch.tensor(0.0))
            else:
                optimizer.step()
            optimizer.zero_grad()
        return [p.detach() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(trained(True), trained(False)))


def test_muon_and_unfused_adamw_cannot_mask_an_update():
    weights = [torch.nn.Parameter(torch.randn(4, 4))]
    assert not masks_updates(torch.optim.AdamW(weights, foreach=True))
    assert not masks_updates(torch.optim.Muon(weights))


def test_the_monitor_takes_the_device_decision_as_given():
    # Where the two could part (a z-score within rounding of the threshold), the step was skipped or taken on
    # the device already: the monitor counts it so, and keeps a taken step's values in its windows.
    monitor = StabilityMonitor(guard=True)
    for i in range(30):
        assert monitor.allow_update(i, 3.0 + 0.01 * (i % 3), 1.0)
    assert not monitor.allow_update(30, 3.0, 1.0, skipped=True)
    assert monitor.skipped == 1 and monitor.state.norms[-1] == 1.0 and len(monitor.state.norms) == 30
    assert monitor.allow_update(31, 3.0, 500.0, skipped=False)  # a hard spike, taken
    assert monitor.skipped == 1 and monitor.state.norms[-1] == 500.0 and monitor.state.skip_streak == 0
    assert [e["event"] for e in monitor.events] == ["grad_spike"]  # reported as the host judged it
