"""The report's statistical sections: the effects table with intervals and verdicts, the noise floor,
the ranked list of what changed the result, and whether one contributor is clear of the rest."""

from __future__ import annotations

from tinylm.report.effects import Effect, clear_contributor, measure_effects, ranked_effects, seed_change
from tinylm.report.runs import Arm
from tinylm.report.stats import CONFIDENCE, Interval, SeedPlan, spread


def fmt_delta(interval: Interval) -> str:
    """'-0.100 ± 0.050' (replicated) or '-0.100' (one pair, or a difference of unpaired means)."""
    if interval.half_width is None:
        return f"{interval.mean:+.3f}"
    return f"{interval.mean:+.3f} ± {interval.half_width:.3f}"


def pairs_text(effect: Effect) -> str:
    """How many seeds the difference is over, and which seeds had no partner."""
    n = effect.interval.n
    text = "no seed in common (difference of means)" if n == 0 else f"{n} paired seed{'s' if n > 1 else ''}"
    if effect.pairing.unpaired and n:
        text += f" (unpaired: seed {', '.join(map(str, effect.pairing.unpaired))})"
    return text


def effects_table(arms: list[Arm], target_halfwidth: float | None = None) -> list[str]:
    """One row per measured effect, in the arms' order: its interval over paired seeds, its verdict, and
    how many seeds a verdict needs (see seeds_cells)."""
    effects = measure_effects(arms)
    if not effects:
        return []
    metric = arms[0].metric.name
    target = "\\|Δ\\|" if target_halfwidth is None else f"{target_halfwidth:g}"
    lines = [f"### Effects ({metric} best val loss, paired by seed, {CONFIDENCE:.0%} CI, Student t)", ""]
    lines += [f"| Step | Against | Seeds | Δ best val loss | Verdict | Paired sd | Smallest detectable "
              f"| Seeds for half-width < {target} |",
              "| --- | --- | --- | ---: | --- | ---: | ---: | --- |"]  # fmt: skip
    for e in effects:
        flag = " ⚠ block_size changed" if e.caveat else ""
        lines.append(f"| {e.arm.name} | {e.before.name} | {pairs_text(e)} | {fmt_delta(e.interval)} | {e.verdict}{flag} "
                     f"| {' | '.join(seeds_cells(e.seeds(target_halfwidth)))} |")  # fmt: skip
    if all(not e.interval.replicated for e in effects):
        lines += ["", "Every effect here is unreplicated (no two seeds in common): the differences carry no verdict."]
    lines += ["", f"Paired sd: the standard deviation of the per-seed differences. Smallest detectable: the "
              f"smallest effect these seeds tell from zero at {CONFIDENCE:.0%}, t · sd / √n (the interval's "
              f"half-width). Seeds for half-width < {target}: the seeds whose interval would be narrower than "
              + ("the measured effect" if target_halfwidth is None else f"±{target_halfwidth:g}")
              + ", if the differences keep this sd (an estimate for planning, not a promise)."]  # fmt: skip
    return lines + [""]


def seeds_cells(plan: SeedPlan) -> list[str]:
    """Paired sd, smallest detectable effect, seeds needed (with how many to add); n/a with the reason."""
    if plan.sd is None or plan.detectable is None:
        return ["n/a", "n/a", f"n/a ({plan.reason})"]
    if plan.needed is None:
        return [f"{plan.sd:.3f}", f"{plan.detectable:.3f}", f"n/a ({plan.reason})"]
    more = f"{plan.needed - plan.n} more" if plan.needed > plan.n else f"have {plan.n}"
    return [f"{plan.sd:.3f}", f"{plan.detectable:.3f}", f"{plan.needed} ({more})"]


def noise_floor_table(arms: list[Arm]) -> list[str]:
    """Per arm, how far the ranked best loss moves between seeds of one recipe: the scale below which a
    difference between arms is not evidence."""
    lines = [f"### Noise floor ({arms[0].metric.name} best val loss across seeds)", ""]
    lines += ["| Arm | Seeds | Mean | Std | Min–max |", "| --- | ---: | ---: | ---: | --- |"]
    for arm in arms:
        s = spread(list(arm.ranked().values()))
        if s is None:
            lines.append(f"| {arm.name} | 0 | – | – | – |")
        elif s.std is None:
            lines.append(f"| {arm.name} | 1 | {s.mean:.3f} | – (one seed) | – |")
        else:
            lines.append(f"| {arm.name} | {s.n} | {s.mean:.3f} | {s.std:.3f} | {s.low:.3f}–{s.high:.3f} |")
    return lines + [""]


def effect_text(e: Effect) -> str:
    before, arm = e.before, e.arm
    b0, b1 = before.ranked_mean(), arm.ranked_mean()
    said = ", ".join([*e.changes, *seed_change(before, arm)])
    text = f"**{arm.name}** against **{before.name}**{f' ({said})' if said else ''}: "
    text += f"best val loss {b0:.2f} → {b1:.2f}, {fmt_delta(e.interval)} over {pairs_text(e)}: {e.verdict}"
    start = arm.metric.key("start_val_loss")
    s0, s1 = before.mean(start), arm.mean(start)
    if s0 is not None and s1 is not None and abs(s1 - s0) >= 0.01:
        text += f"; start loss {s0:.2f} → {s1:.2f}"
    u0, u1 = before.mean("utilisation"), arm.mean("utilisation")
    if u0 and u1 and abs(u1 - u0) > 0.005:
        text += f"; real tokens per slot {u0:.2f} → {u1:.2f} (×{u1 / u0:.2f} real tokens for the same compute)"
    k0, k1 = before.mean("skipped_updates"), arm.mean("skipped_updates")
    if k0 is not None and k1 is not None and k0 != k1:
        text += f"; skipped updates {k0:.3g} → {k1:.3g}"
    if e.caveat:
        text += f"; ⚠ {e.caveat}"
    return text


def effects_section(arms: list[Arm]) -> list[str]:
    """The measured effects ranked by their intervals (improvements first), then whether one is clear."""
    lines = ["### What changed the result (measured)", ""]
    effects = measure_effects(arms)
    for rank, effect in enumerate(ranked_effects(effects), 1):
        lines.append(f"{rank}. {effect_text(effect)}")
    return lines + ["", contributor_text(effects), ""]


def contributor_text(effects: list[Effect]) -> str:
    """Name the largest contributor only when its interval is clear of every other effect's."""
    if not effects:
        return "No effect could be measured: no two arms compared here both have a finite best loss."
    if not any(e.interval.replicated for e in effects):
        return "These effects are unreplicated: no step can be named the largest contributor (run several seeds)."
    top = clear_contributor(effects)
    if top is not None and len(top.changes) <= 1:
        what = top.changes[0] if top.changes else top.arm.key_change or "no setting differs"
        return (f"The largest single contributor here was **{top.arm.name}** ({what}, {fmt_delta(top.interval)} "
                "best val loss), clear of every other step's interval.")  # fmt: skip
    if top is not None:
        return (f"The largest clear gain here was **{top.arm.name}** against **{top.before.name}** "
                f"({fmt_delta(top.interval)} best val loss), which changed {len(top.changes)} settings at once: "
                "these runs cannot say which of them gave it.")  # fmt: skip
    improved = [e for e in effects if e.verdict == "improvement"]
    if not improved:
        return "No step's interval lies wholly below zero: none improved the best loss beyond noise."
    lead = min(improved, key=lambda e: e.d_best)
    overlapping = ", ".join(
        f"**{e.arm.name}**" for e in effects if e is not lead and not lead.interval.clear_of(e.interval)
    )
    return (f"No single contributor is clear: the largest gain, **{lead.arm.name}** ({fmt_delta(lead.interval)}), "
            f"is not clear of {overlapping} (overlapping or unreplicated intervals).")  # fmt: skip
