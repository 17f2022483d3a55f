"""The words the report puts beside an arm's numbers: the shape of its curve, its events, its
train/val gap, the updates it skipped, and the stability of a preset's arms."""

from __future__ import annotations

import dataclasses
import math

from tinylm.report.runs import Arm, Run, rank
from tinylm.stability import Thresholds, gap_wording

MARKS = {"very stable": "🟢", "stable": "🟢", "ok": "🟡", "unstable": "🔴"}


def stability_text(arms: list[Arm]) -> str:
    """The least stable arms speak for the preset, each named with its reason."""
    label = max((a.stability["label"] for a in arms), key=rank)
    alike = [a for a in arms if a.stability["label"] == label]
    reasons = {a.stability["reason"] for a in alike}
    if len(arms) == 1:
        where = alike[0].stability["reason"]
    elif len(reasons) == 1:
        where = f"{'every arm' if len(alike) == len(arms) else ', '.join(a.name for a in alike)}: {reasons.pop()}"
    else:
        where = "; ".join(f"{a.name}: {a.stability['reason']}" for a in alike)
    return f"{MARKS.get(label, '⚪')} {label.capitalize()} ({where})"


def arm_notes(arm: Arm, peers: list[Run]) -> str:
    """Notes derived from the (first seed's) curve and summary, and every seed's skipped updates."""
    s = arm.runs[0].summary
    notes = _curve_notes(arm.runs[0]) + _event_notes(s.get("events", []))
    gap = s["stability"].get("train_val_gap")
    if gap is not None:
        notes.append(f"{gap_wording(gap, _thresholds(s['stability']))} train/val gap ({gap:+.2f})")
    if s.get("utilisation") is not None:
        notes.append(f"{100 * s['utilisation']:.0f}% of token slots real")
    return "; ".join(notes + skipped_notes(arm, peers))


def _curve_notes(run: Run) -> list[str]:
    """Where the best came in the run: early, after a plateau, at the end, or before it."""
    s = run.summary
    curve = [v for _, v in run.val_curve]
    steps = s["steps"]
    if s.get("best_step") is None or not steps or len(curve) < 4:
        return []
    if s["best_step"] <= steps / 3:
        return ["early saturation (best in the first third)"]
    if _has_plateau(curve):
        return ["long plateau"]
    return ["still improving at the end" if s["best_step"] == steps else "converging"]


def _event_notes(events: list[dict]) -> list[str]:
    notes = []
    for event in events:
        if event["event"] == "divergence":
            notes.append(f"divergence at step {event['step']} (val {_num(event.get('value'))})")
        elif event["event"] == "recovery":
            notes.append(f"recovered at step {event['step']} with LR × {event['lr_scale']:g}")
    return notes


def skipped_notes(arm: Arm, peers: list[Run]) -> list[str]:
    """A note for each run of the arm that skipped updates, against the fewest any other run skipped."""
    notes = []
    for run in arm.runs:
        n = run.skipped_updates
        if not n:
            continue
        note = f"{f'seed {run.seed} ' if len(arm.runs) > 1 else ''}skipped {n} of {run.summary['steps']} updates"
        others = [r.skipped_updates for r in peers if r is not run and r.skipped_updates is not None]
        if others and n > min(others):
            note += f": trained on {n - min(others)} fewer updates than its peers"
        notes.append(note)
    return notes


def _thresholds(stability: dict) -> Thresholds:
    """The limits a run was labelled with (saved in its summary; older runs used today's defaults)."""
    known = {f.name for f in dataclasses.fields(Thresholds)}
    return Thresholds(**{k: v for k, v in (stability.get("thresholds") or {}).items() if k in known})


def _num(x) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


def _has_plateau(curve: list[float]) -> bool:
    """Three consecutive evaluations within 1% of each other before the last quarter."""
    cut = max(3, int(len(curve) * 0.75))
    for i in range(cut - 2):
        window = curve[i : i + 3]
        if max(window) - min(window) < 0.01 * min(window):
            return True
    return False
