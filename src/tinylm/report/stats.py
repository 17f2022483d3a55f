"""The report's statistics: paired differences by seed, Student-t intervals, verdicts, noise floors and
the seeds an effect needs.

Pure arithmetic over numbers already read from runs. Seed k of every arm of a study shares its
initialisation seed and data order, so an effect is measured as the per-seed differences between
an arm and the arm it is compared to; a seed present in only one of the two arms has no partner
and is left out of the interval (and named, so the reader knows).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
"""The two-sided coverage of every interval the report states."""


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided Student-t confidence interval; half_width is None when unreplicated."""

    mean: float
    half_width: float | None
    n: int
    """How many values the mean is over (0: a difference of unpaired means)."""

    @property
    def replicated(self) -> bool:
        return self.half_width is not None

    @property
    def low(self) -> float:
        return self.mean - (self.half_width or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half_width or 0.0)

    def clear_of(self, other: Interval) -> bool:
        """Both intervals measured and disjoint: the two effects differ beyond noise."""
        return self.replicated and other.replicated and (self.high < other.low or other.high < self.low)


def half_width(sd: float, n: int, confidence: float = CONFIDENCE) -> float:
    """t(1 - (1 - confidence)/2, n - 1) · sd / √n: the half-width of the interval of n values whose sample
    standard deviation is sd (n ≥ 2)."""
    from scipy.stats import t

    return float(t.ppf(1 - (1 - confidence) / 2, n - 1)) * sd / math.sqrt(n)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """mean ± t(1 - (1 - confidence)/2, n - 1) · sd / √n; one value gives an unreplicated interval."""
    if not values:
        raise ValueError("an interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, None, len(values))
    return Interval(mean, half_width(statistics.stdev(values), len(values), confidence), len(values))


@dataclass(frozen=True)
class Pairing:
    """after − before per seed measured in both arms, and the seeds measured in only one."""

    diffs: dict[int, float]
    unpaired: list[int]


def pair_by_seed(before: Mapping[int, float], after: Mapping[int, float]) -> Pairing:
    """Per-seed differences after − before over the seeds both arms have (lower loss is better)."""
    both = sorted(set(before) & set(after))
    unpaired = sorted(set(before) ^ set(after))
    return Pairing({s: after[s] - before[s] for s in both}, unpaired)


def effect_interval(before: Mapping[int, float], after: Mapping[int, float]) -> tuple[Interval, Pairing] | None:
    """The interval of the paired differences; with no seed in common, the difference of the arms' means
    as an unreplicated point (n = 0). None when either arm has no value."""
    if not before or not after:
        return None
    pairing = pair_by_seed(before, after)
    if pairing.diffs:
        return t_interval(list(pairing.diffs.values())), pairing
    return Interval(statistics.fmean(after.values()) - statistics.fmean(before.values()), None, 0), pairing


def seeds_needed(sd: float, target: float, confidence: float = CONFIDENCE) -> int:
    """The fewest seeds (at least 2) whose interval's half-width is below ``target`` when the differences
    keep the standard deviation sd. The t quantile shrinks as seeds are added, so n is searched for,
    starting from the normal distribution's answer: t exceeds z at every n, so no fewer seeds can do."""
    if target <= 0:
        raise ValueError(f"the target half-width must be positive, got {target}")
    z = statistics.NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    n = max(2, math.ceil((z * sd / target) ** 2))
    while half_width(sd, n, confidence) >= target:
        n += 1
    return n


@dataclass(frozen=True)
class SeedPlan:
    """How many seeds an effect needs, from its paired differences; figures None (n/a) with a reason."""

    n: int
    """Paired seeds measured."""
    sd: float | None
    """Sample standard deviation of the paired differences (n − 1 in the denominator)."""
    detectable: float | None
    """The smallest effect these seeds tell from zero at CONFIDENCE: the interval's half-width, t · sd / √n."""
    target: float | None
    """The half-width wanted: the measured effect's size, or the one asked for."""
    needed: int | None
    """Seeds for the half-width to fall below target, if the differences keep this standard deviation."""
    reason: str | None = None
    """Why the figures are n/a."""


def seed_plan(diffs: Sequence[float], target_halfwidth: float | None = None,
              confidence: float = CONFIDENCE) -> SeedPlan:  # fmt: skip
    """The seeds an effect needs: for its interval's half-width to fall below the measured effect
    (|mean difference|), or below ``target_halfwidth`` when given."""
    n = len(diffs)
    if n < 2:
        why = "no seed in common" if n == 0 else "one paired seed: no spread to measure; run 2 or more seeds"
        return SeedPlan(n, None, None, target_halfwidth, None, why)
    sd = statistics.stdev(diffs)
    target = abs(statistics.fmean(diffs)) if target_halfwidth is None else target_halfwidth
    if target == 0:
        return SeedPlan(n, sd, half_width(sd, n, confidence), target, None, "the measured effect is 0: give a target")
    return SeedPlan(n, sd, half_width(sd, n, confidence), target, seeds_needed(sd, target, confidence))


def verdict(interval: Interval) -> str:
    """'improvement' when the whole interval is below zero, 'regression' when above, else 'within noise
    (±half-width)'; 'unreplicated' (no verdict) when there is no interval."""
    if interval.half_width is None:
        return "unreplicated"
    if interval.high < 0:
        return "improvement"
    if interval.low > 0:
        return "regression"
    return f"within noise (±{interval.half_width:.3f})"


@dataclass(frozen=True)
class Spread:
    """The noise floor of one arm: how far the ranked loss moves between seeds of one recipe."""

    n: int
    mean: float
    std: float | None
    low: float
    high: float


def spread(values: Sequence[float]) -> Spread | None:
    """Sample standard deviation and range of the values; None for no values, std None for one."""
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return Spread(len(values), statistics.fmean(values), std, min(values), max(values))


def clear_leader(intervals: Sequence[Interval]) -> int | None:
    """The index of the largest improvement (lowest mean) when its interval lies below zero and is
    disjoint from every other effect's interval; None when no effect is clear of the rest."""
    if not intervals:
        return None
    lead = min(range(len(intervals)), key=lambda i: intervals[i].mean)
    top = intervals[lead]
    if verdict(top) != "improvement":
        return None
    if all(top.clear_of(other) for i, other in enumerate(intervals) if i != lead):
        return lead
    return None
