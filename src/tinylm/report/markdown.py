"""The report's Markdown: per study and preset a timeline of the arms, its final metrics, the measured
effects with their intervals and the noise floor, then one comparison table across presets. Every
sentence is a template over measured numbers."""

from __future__ import annotations

from tinylm.report.effects import best_arm, changes, seed_change, worst_loss
from tinylm.report.findings import effects_section, effects_table, noise_floor_table
from tinylm.report.notes import arm_notes, stability_text
from tinylm.report.runs import DOC, PACKED, PHASE_SETTINGS, Arm, choose_metric, finite_number, metric_label, value_text
from tinylm.report.studies import Study

PlotNames = dict[tuple[str, str], str]
"""One study's plots: (preset or 'comparison', 'curves' | 'effects' | 'best') -> the plot's file name."""


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


def fmt_count(x: float | None) -> str:
    """Tokens or FLOPs: 163840 -> '164k', 2e6 -> '2.00M', 1.2e15 -> '1.20e+15'."""
    if x is None:
        return "–"
    if x >= 1e9:
        return f"{x:.2e}"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"


def _worst_text(arms: list[Arm]) -> str:
    worst = worst_loss(arms)
    return "–" if worst is None else f"{worst:.2f}"


def render(studies: list[Study], plot_names: list[PlotNames], target_halfwidth: float | None = None) -> str:
    """The report; plot_names[i] names the plots of studies[i]. target_halfwidth: the half-width the effects
    table counts seeds for (default: each effect's own size)."""
    lines: list[str] = ["# tinylm ablation report", ""]
    lines.append("Every number below is measured: it comes from the runs' `summary.json` and `metrics.jsonl`.")
    lines.append("")
    for study, plots in zip(studies, plot_names, strict=True):
        if study.name is not None:
            lines += study_intro(study)
        elif study.unfinished:
            left_out = ", ".join(study.unfinished)
            lines += [f"Interrupted, left out (resume them with tinylm train --resume): {left_out}.", ""]
        if not study.groups:  # interrupted runs alone, named above
            continue
        for preset, arms in study.groups.items():
            lines += preset_section(study, preset, arms, plots, target_halfwidth)
        lines += comparison_section(study.groups)
        if (best := plots.get(("comparison", "best"))) is not None:
            lines += [f"![best validation loss per preset and phase]({best})", ""]
    return "\n".join(lines)


def study_intro(study: Study) -> list[str]:
    """What the study ran, as its study.json says: mode, seeds, budget, LR tuning and the ranked metric."""
    info = study.info
    facts = {
        "cumulative": "mode cumulative: each step adds its change to the arm before it and is measured against it",
        "each": "mode each: each step changes the base alone and is measured against the base",
    }
    said = [facts[info["mode"]]] if info.get("mode") in facts else []
    if info.get("seeds"):
        said.append(f"{info['seeds']} seed(s) per arm, paired: seed k of every arm shares its initialisation "
                    "and data order")  # fmt: skip
    budget = info.get("budget") or {}
    if "tokens" in budget:
        said.append(f"budget {fmt_count(budget['tokens'])} tokens per run")
    if "flops" in budget:
        said.append(f"budget {budget['flops']:.3g} training FLOPs per run (arms train on the tokens it buys)")
    if info.get("lr_tune"):
        factors = ", ".join(f"×{f:g}" for f in info["lr_tune"])
        share = info.get("lr_tune_share")
        said.append(f"learning rate tuned per arm over {factors} of the base LR on one-seed trials"
                    f"{f' of {share:.0%} of the budget' if share else ''} (trials are not arms)")  # fmt: skip
    said.append(f"ranked by the {study.wanted.name} best validation loss")
    lines = [f"## Study `{study.name}`", "", ". ".join(s[0].upper() + s[1:] for s in said) + ".", ""]
    if study.unfinished:
        lines += [f"Not finished yet, left out: {', '.join(study.unfinished)}.", ""]
    return lines


def preset_section(study: Study, preset: str, arms: list[Arm], plots: PlotNames,
                   target_halfwidth: float | None = None) -> list[str]:  # fmt: skip
    """One preset: its timeline, final metrics, plots, effects with intervals, noise floor and ranking."""
    lines = [f"## {preset.upper()} MODEL ({fmt_params(arms)} params)", ""]
    _, note = choose_metric(study.wanted, [r for a in arms for r in a.runs])
    if note:
        lines += [note, ""]
    lines += timeline_table(arms) + final_metrics_table(arms) + arm_metrics_table(arms) + trials_table(arms)
    if (curves := plots.get((preset, "curves"))) is not None:
        lines += [f"![validation loss, {preset}]({curves})", ""]
    lines += effects_table(arms, target_halfwidth) + noise_floor_table(arms)
    if (effects := plots.get((preset, "effects"))) is not None:
        lines += [f"![effect of each step, {preset}]({effects})", ""]
    return lines + effects_section(arms)


def _key_change(arm: Arm, by_name: dict[str, Arm]) -> str:
    before = by_name.get(arm.compare_to or "")
    if arm.key_change:
        return arm.key_change
    if before is None:
        return ", ".join(f"{k} {value_text(arm.recipe.get(k))}" for k in PHASE_SETTINGS)
    return ", ".join(changes(before, arm) + seed_change(before, arm))


def timeline_table(arms: list[Arm]) -> list[str]:
    """Each arm with what it changed against the arm it is compared to, its losses and its notes."""
    peers = [r for a in arms for r in a.runs]
    by_name = {a.name: a for a in arms}
    metric = arms[0].metric
    lines = ["### Timeline of improvements", ""]
    lines += [f"| Step | Key change | Val loss, {metric.name} (start → best, mean ± std over seeds) | Notes |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    for arm in arms:
        notes = "; ".join(n for n in (arm.note, arm_notes(arm, peers)) if n)
        lines.append(f"| {arm.name} | {_key_change(arm, by_name)} | {fmt_loss(arm, metric.key('start_val_loss'))} → "
                     f"**{fmt_loss(arm, metric.key('best_val_loss'))}** | {notes} |")  # fmt: skip
    return lines


def final_metrics_table(arms: list[Arm]) -> list[str]:
    best = best_arm(arms)
    times = [t for a in arms for t in a.values("train_time_s")]
    lines = ["", "### Final metrics", "", "| Metric | Value |", "| --- | --- |"]
    lines.append(f"| Worst val loss | {_worst_text(arms)} |")
    best_text = f"**{best.ranked_mean():.2f}** ({best.name})" if best else "–"
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


def _lr_text(arm: Arm) -> str:
    lr = arm.lr if arm.lr is not None else arm.recipe.get("lr")
    factor = arm.runs[0].study_tag.get("lr_factor")
    return value_text(lr) + (f" (×{factor:g})" if isinstance(factor, (int, float)) else "")


def arm_metrics_table(arms: list[Arm]) -> list[str]:
    """Per arm: seeds, compute spent (tokens and FLOPs), learning rate, and both validation losses."""
    lines = ["| Arm | Seeds | Tokens | Train FLOPs | LR | Best val loss, per-document | Best val loss, packed "
             "| Final val loss, per-document | Final val loss, packed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for a in arms:
        losses = [fmt_loss(a, m.key(k)) for k in ("best_val_loss", "final_val_loss") for m in (DOC, PACKED)]
        lines.append(f"| {a.name} | {len(a.runs)} | {fmt_count(a.mean('tokens'))} | {fmt_count(a.mean('train_flops'))} "
                     f"| {_lr_text(a)} | {' | '.join(losses)} |")  # fmt: skip
    return lines + [""]


def trials_table(arms: list[Arm]) -> list[str]:
    """The best loss each LR-tuning trial reached, per arm (only where a study tuned the learning rate)."""
    factors = list(dict.fromkeys(f for a in arms for f in a.trials))
    if not factors:
        return []
    lines = ["### Learning-rate trials (best val loss of each one-seed trial; the chosen LR trains the full runs)",
             "", f"| Arm | {' | '.join(f'×{f}' for f in factors)} | Chosen LR |",
             f"| --- | {' | '.join('---:' for _ in factors)} | ---: |"]  # fmt: skip
    for arm in arms:
        key, label = _trial_key(arm)
        cells = []
        for f in factors:
            summary = arm.trials.get(f)
            value = None if summary is None else summary.get(key)
            if f not in arm.trials:
                cells.append("–")
            else:
                cells.append("not run" if summary is None else f"{value:.3f}" if finite_number(value) else "diverged")
        lines.append(f"| {arm.name}{label} | {' | '.join(cells)} | {_lr_text(arm)} |")
    return lines + [""]


def _trial_key(arm: Arm) -> tuple[str, str]:
    """The summary key of the arm's trial losses, and a label where it is not the arm's metric: one loss for all
    of them, the packed one where a trial lacks the arm's (an older tinylm's), as the LR pick ranked them."""
    finished = [s for s in arm.trials.values() if s is not None]
    if all(arm.metric.key("best_val_loss") in s for s in finished):
        return arm.metric.key("best_val_loss"), ""
    return PACKED.key("best_val_loss"), f" ({PACKED.name} loss)"


def comparison_section(groups: dict[str, list[Arm]]) -> list[str]:
    lines = ["## Final comparison table", "",
             "| Category | Params | Worst loss | Best loss | Training time | Stability |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for preset, arms in groups.items():
        best = best_arm(arms)
        total = sum(t for a in arms for t in a.values("train_time_s"))
        best_text = f"**{best.ranked_mean():.2f}**" if best else "–"
        lines.append(f"| **{preset}**{metric_label(groups, preset)} | {fmt_params(arms)} | {_worst_text(arms)} "
                     f"| {best_text} | {fmt_time(total)} | {stability_text(arms)} |")  # fmt: skip
    return lines + [""]
