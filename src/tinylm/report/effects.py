"""What each arm changed against the arm it is compared to, and by how much: paired per seed, with intervals."""

from __future__ import annotations

from dataclasses import dataclass

from tinylm.report.runs import DOC, Arm, setting_names, value_text
from tinylm.report.stats import Interval, Pairing, SeedPlan, clear_leader, effect_interval, seed_plan, verdict


def changes(before: Arm, after: Arm) -> list[str]:
    """Every setting that differs between two arms, as 'name old→new'."""
    return [
        f"{k} {value_text(before.recipe.get(k))}→{value_text(after.recipe.get(k))}"
        for k in setting_names([before, after])
        if before.recipe.get(k) != after.recipe.get(k)
    ]


def seed_change(before: Arm, after: Arm) -> list[str]:
    """'seed old→new' where two arms were measured on different seeds."""
    if before.seeds == after.seeds:
        return []
    return [f"seed {'+'.join(map(str, before.seeds))}→{'+'.join(map(str, after.seeds))}"]


@dataclass
class Effect:
    """One arm measured against the arm it is compared to, on the ranked best validation loss."""

    before: Arm
    arm: Arm
    changes: list[str]
    """The settings that differ (the seeds are not a setting: see seed_change)."""
    interval: Interval
    """Of the per-seed differences arm − before; unreplicated with one pair, n = 0 with none."""
    pairing: Pairing

    @property
    def d_best(self) -> float:
        return self.interval.mean

    @property
    def verdict(self) -> str:
        return verdict(self.interval)

    @property
    def caveat(self) -> str | None:
        """Why the two arms' losses are not one measurement, when a step changed what is scored."""
        if self.before.recipe.get("block_size") == self.arm.recipe.get("block_size"):
            return None
        if self.arm.metric is DOC:
            return ("block_size changed: the per-document loss then scores other targets (each document is cut "
                    "at block_size), so this difference mixes the model's change with the metric's")  # fmt: skip
        return "block_size changed: the packed loss then scores the same tokens with other context lengths"

    def seeds(self, target_halfwidth: float | None = None) -> SeedPlan:
        """The seeds this effect needs for a verdict (its half-width below the effect, or below the target)."""
        return seed_plan(list(self.pairing.diffs.values()), target_halfwidth)


def measure_effects(arms: list[Arm]) -> list[Effect]:
    """Each arm against its compare_to arm, in the arms' order (arms without a finite ranked loss are left out)."""
    by_name = {a.name: a for a in arms}
    effects = []
    for arm in arms:
        before = by_name.get(arm.compare_to or "")
        if before is None:
            continue
        measured = effect_interval(before.ranked(), arm.ranked())
        if measured is not None:
            effects.append(Effect(before, arm, changes(before, arm), *measured))
    return effects


VERDICT_ORDER = ("improvement", "within noise", "unreplicated", "regression")


def ranked_effects(effects: list[Effect]) -> list[Effect]:
    """Improvements first, then effects within noise, unreplicated ones, regressions; by mean within each."""
    return sorted(effects, key=lambda e: (VERDICT_ORDER.index(e.verdict.split(" (")[0]), e.d_best))


def clear_contributor(effects: list[Effect]) -> Effect | None:
    """The largest improvement, when its interval is clear of every other effect's (see stats.clear_leader)."""
    lead = clear_leader([e.interval for e in effects])
    return None if lead is None else effects[lead]


def best_arm(arms: list[Arm]) -> Arm | None:
    """The arm with the lowest mean ranked best loss; None where no arm has a finite one."""
    finite = [a for a in arms if a.ranked_mean() is not None]
    return min(finite, key=lambda a: a.ranked_mean()) if finite else None


def worst_loss(arms: list[Arm]) -> float | None:
    """The highest mean worst validation loss of the arms (in their ranked metric)."""
    worst = [v for a in arms if (v := a.mean(a.metric.key("worst_val_loss"))) is not None]
    return max(worst) if worst else None
