"""What each arm changed against the arm before it, and by how much: the report's statistics."""

from __future__ import annotations

from dataclasses import dataclass

from tinylm.report.runs import Arm, setting_names, value_text


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
    """One arm measured against the arm before it."""

    before: Arm
    arm: Arm
    changes: list[str]
    """The settings that differ (the seeds are not a setting: see seed_change)."""
    d_best: float


def measure_effects(arms: list[Arm]) -> list[Effect]:
    """Each arm against the one before it (pairs without a finite best loss are left out)."""
    effects = []
    for before, arm in zip(arms, arms[1:]):
        a, b = before.mean("best_val_loss"), arm.mean("best_val_loss")
        if a is not None and b is not None:
            effects.append(Effect(before, arm, changes(before, arm), b - a))
    return effects


def best_arm(arms: list[Arm]) -> Arm | None:
    """The arm with the lowest mean best validation loss; None where no arm has a finite one."""
    finite = [a for a in arms if a.mean("best_val_loss") is not None]
    return min(finite, key=lambda a: a.mean("best_val_loss")) if finite else None


def worst_loss(arms: list[Arm]) -> float | None:
    """The highest mean worst validation loss of the arms."""
    worst = [v for a in arms if (v := a.mean("worst_val_loss")) is not None]
    return max(worst) if worst else None
