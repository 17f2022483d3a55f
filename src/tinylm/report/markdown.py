"""The report's Markdown: per preset a timeline of the arms, its final metrics and the measured
effects, then one comparison table across presets. Every sentence is a template over measured numbers."""

from __future__ import annotations

from tinylm.report.effects import Effect, best_arm, changes, measure_effects, seed_change, worst_loss
from tinylm.report.notes import arm_notes, stability_text
from tinylm.report.runs import PHASE_SETTINGS, Arm, value_text


def fmt_loss(arm: Arm, key: str) -> str:
    mean, std = arm.mean(key), arm.std(key)
    if mean is None:
        return "–"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_params(arms: list[Arm]) -> str:
    counts = [r.summary["params"] for a in arms for r in a.runs]
    low, high = min(counts), max(counts)
    return f"{low / 1e6:.2f}M" if low == high else f"{low / 1e6:.2f}M–{high / 1e6:.2f}M"


def _worst_text(arms: list[Arm]) -> str:
    worst = worst_loss(arms)
    return "–" if worst is None else f"{worst:.2f}"


def render(groups: dict[str, list[Arm]], plot_names: dict[str, str]) -> str:
    lines: list[str] = ["# tinylm ablation report", ""]
    lines.append("Every number below is measured: it comes from the runs' `summary.json` and `metrics.jsonl`.")
    lines.append("")
    for preset, arms in groups.items():
        lines += preset_section(preset, arms, plot_names.get(preset))
    lines += comparison_section(groups)
    if "comparison" in plot_names:
        lines += [f"![best validation loss per preset and phase]({plot_names['comparison']})", ""]
    return "\n".join(lines)


def preset_section(preset: str, arms: list[Arm], plot_name: str | None) -> list[str]:
    """One preset: its timeline, its final metrics, its plot, and what changed the result."""
    lines = [f"## {preset.upper()} MODEL ({fmt_params(arms)} params)", ""]
    lines += timeline_table(arms) + final_metrics_table(arms)
    if plot_name is not None:
        lines += [f"![validation loss, {preset}]({plot_name})", ""]
    return lines + effects_section(arms)


def timeline_table(arms: list[Arm]) -> list[str]:
    """Each arm with what it changed against the arm before it, its losses and its notes."""
    peers = [r for a in arms for r in a.runs]
    lines = ["### Timeline of improvements", ""]
    lines += ["| Phase | Key change | Val loss (start → best) | Notes |", "| --- | --- | --- | --- |"]
    for i, arm in enumerate(arms):
        if i == 0:
            key = ", ".join(f"{k} {value_text(arm.recipe.get(k))}" for k in PHASE_SETTINGS)
        else:
            key = ", ".join(changes(arms[i - 1], arm) + seed_change(arms[i - 1], arm))
        lines.append(f"| {arm.name} | {key} | {fmt_loss(arm, 'start_val_loss')} → "
                     f"**{fmt_loss(arm, 'best_val_loss')}** | {arm_notes(arm, peers)} |")  # fmt: skip
    return lines


def final_metrics_table(arms: list[Arm]) -> list[str]:
    best = best_arm(arms)
    times = [t for a in arms for t in a.values("train_time_s")]
    lines = ["", "### Final metrics", "", "| Metric | Value |", "| --- | --- |"]
    lines.append(f"| Worst val loss | {_worst_text(arms)} |")
    best_text = f"**{best.mean('best_val_loss'):.2f}** ({best.name})" if best else "–"
    lines.append(f"| Best val loss | {best_text} |")
    if times:
        low, high = fmt_time(min(times)), fmt_time(max(times))
        per_run = low if low == high else f"{low}–{high}"
        lines.append(f"| Training time | {fmt_time(sum(times))} in all ({per_run} per run) |")
    skipped = "; ".join(
        f"{a.name}: {', '.join('unknown' if r.skipped_updates is None else str(r.skipped_updates) for r in a.runs)}"
        for a in arms
    )
    lines.append(f"| Skipped updates | {skipped} |")
    lines.append(f"| Stability | {stability_text(arms)} |")
    return lines + [""]


def effect_text(e: Effect) -> str:
    before, arm = e.before, e.arm
    b0, b1 = before.mean("best_val_loss"), arm.mean("best_val_loss")
    text = f"**{arm.name}** against **{before.name}** ({', '.join(e.changes + seed_change(before, arm))}): "
    text += f"{'' if e.d_best < 0 else 'did not help here: '}best val loss {b0:.2f} → {b1:.2f} ({e.d_best:+.2f})"
    s0, s1 = before.mean("start_val_loss"), arm.mean("start_val_loss")
    if s0 is not None and s1 is not None and abs(s1 - s0) >= 0.01:
        text += f"; start loss {s0:.2f} → {s1:.2f}"
    u0, u1 = before.mean("utilisation"), arm.mean("utilisation")
    if u0 and u1 and abs(u1 - u0) > 0.005:
        text += f"; real tokens per slot {u0:.2f} → {u1:.2f} (×{u1 / u0:.2f} real tokens for the same compute)"
    k0, k1 = before.mean("skipped_updates"), arm.mean("skipped_updates")
    if k0 is not None and k1 is not None and k0 != k1:
        text += f"; skipped updates {k0:.3g} → {k1:.3g}"
    return text


def effects_section(arms: list[Arm]) -> list[str]:
    """Each arm's measured effect against the one before it, ranked by the gain in best loss."""
    lines = ["### What changed the result (measured)", ""]
    effects = measure_effects(arms)
    for rank, effect in enumerate(sorted(effects, key=lambda e: e.d_best), 1):
        lines.append(f"{rank}. {effect_text(effect)}")
    helped = [e for e in effects if e.d_best < 0]
    if not helped:
        lines += ["", "No phase lowered the best validation loss on this data and budget."]
        return lines + [""]
    top = min(helped, key=lambda e: e.d_best)
    if len(top.changes) == 1:
        lines += ["", f"The largest single contributor here was **{top.arm.name}** ({top.changes[0]}, "
                      f"{top.d_best:+.2f} best val loss)."]  # fmt: skip
    else:
        lines += ["", f"The largest gain here was **{top.arm.name}** against **{top.before.name}** "
                      f"({top.d_best:+.2f} best val loss), which changed {len(top.changes)} settings at once: "
                      "these runs cannot say which of them gave it."]  # fmt: skip
    return lines + [""]


def comparison_section(groups: dict[str, list[Arm]]) -> list[str]:
    lines = ["## Final comparison table", "",
             "| Category | Params | Worst loss | Best loss | Training time | Stability |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for preset, arms in groups.items():
        best = best_arm(arms)
        total = sum(t for a in arms for t in a.values("train_time_s"))
        best_text = f"**{best.mean('best_val_loss'):.2f}**" if best else "–"
        lines.append(f"| **{preset}** | {fmt_params(arms)} | {_worst_text(arms)} | {best_text} "
                     f"| {fmt_time(total)} | {stability_text(arms)} |")  # fmt: skip
    return lines + [""]
