"""What the report covers: studies read from their study.json, and loose runs grouped by recipe as before.

A study runner writes OUT/study.json naming each arm, what it changes, which arm it is compared to and
its run directories per preset (paths relative to OUT); LR-tuning trials are listed there too, and are
never arms. Runs outside any study folder are pooled into arms by recipe, in phase order, each compared
to the arm before it, so ablation folders written before studies existed still report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinylm.errors import UserError, damaged
from tinylm.report.runs import DOC, RANK_BY, Arm, Metric, choose_metric, find_runs, group, load_run
from tinylm.rundir import SUMMARY_FILE, read_summary
from tinylm.study.manifest import STUDY_FILE

ADVICE = "rerun the study (finished arms are kept) or leave its folder out"


@dataclass
class Study:
    """One part of the report: a study's arms per preset, or loose runs grouped by recipe (name None)."""

    groups: dict[str, list[Arm]]
    wanted: Metric = DOC
    """The metric asked for; a preset whose runs lack it is ranked by the packed loss (see choose_metric)."""
    name: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    """study.json as saved ({} for loose runs)."""
    unfinished: list[str] = field(default_factory=list)
    """Run directories study.json lists that have no summary.json yet, or interrupted runs (left out)."""
    folder: Path | None = None
    """The study's folder (loose runs: the folder the reported paths share); results name runs relative to it."""


def load_studies(paths: list[Path], rank_by: str | None = None) -> list[Study]:
    """Every study under the paths (a folder holding study.json), then the runs outside them grouped by recipe.
    rank_by ('doc' or 'packed') overrides each study's own rank_by; the default is per-document.
    Interrupted runs outside a study are left out and named, as a study's are."""
    folders = []
    for root in paths:
        if not root.exists():
            raise UserError(f"no such directory: {root}")
        folders += [f.parent for f in sorted(root.rglob(STUDY_FILE))]
    studies = [read_study(folder, rank_by) for folder in dict.fromkeys(folders)]
    loose = find_runs(paths, outside=folders)
    finished = [r for r in loose if not r.interrupted]
    partial = [str(r.run_dir) for r in loose if r.interrupted]
    if partial and not finished and not studies:
        raise UserError(f"the runs under {', '.join(map(str, paths))} were all interrupted before the end of their "
                        "budget; finish them with tinylm train --resume DIR")  # fmt: skip
    if finished or partial:  # interrupted runs beside a study are named too, with no arm of their own
        wanted = RANK_BY[rank_by or "doc"]
        root = Path(os.path.commonpath([p.resolve() for p in paths]))
        studies.append(Study(group(finished, wanted), wanted, unfinished=partial, folder=root))
    return studies


def read_study(folder: Path, rank_by: str | None = None) -> Study:
    """The arms of folder/study.json per preset, in the study's order, each with its finished runs."""
    info = _read_info(folder / STUDY_FILE)
    wanted = RANK_BY[rank_by or _rank_by(info, folder)]
    study = Study({}, wanted, str(info.get("study") or folder.name), info, folder=folder)
    presets = info.get("presets") or list(dict.fromkeys(p for a in info["arms"] for p in a.get("runs") or {}))
    for preset in presets:
        arms = [arm for entry in info["arms"] if (arm := _arm(folder, preset, entry, study)) is not None]
        if not arms:
            continue
        metric, _ = choose_metric(wanted, [r for a in arms for r in a.runs])
        for arm in arms:
            arm.metric = metric
        study.groups[preset] = arms
    if not study.groups:
        raise UserError(f"{folder / STUDY_FILE} lists no finished run yet; report it once an arm has finished")
    return study


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        info = None
    arms = info.get("arms") if isinstance(info, dict) else None
    if not isinstance(arms, list) or not all(isinstance(a, dict) and isinstance(a.get("name"), str) for a in arms):
        raise damaged(path, ADVICE, "no list of named arms")
    return info


def _rank_by(info: dict[str, Any], folder: Path) -> str:
    value = info.get("rank_by") or "val_loss_doc"
    if value not in RANK_BY:
        raise damaged(folder / STUDY_FILE, ADVICE, f"rank_by {value!r} is not one of {', '.join(RANK_BY)}")
    return value


def _arm(folder: Path, preset: str, entry: dict[str, Any], study: Study) -> Arm | None:
    """The arm's finished runs of one preset (None when it has none yet); unfinished ones are noted."""
    runs = []
    for rel in (entry.get("runs") or {}).get(preset) or []:
        # An interrupted run writes its summary too, but its best loss is a partial run's: not a seed yet.
        if (folder / rel / SUMMARY_FILE).exists() and not read_summary(folder / rel).get("interrupted"):
            runs.append(load_run(folder / rel))
        else:
            study.unfinished.append(rel)
    if not runs:
        return None
    trials = ((entry.get("trials") or {}).get(preset)) or {}
    return Arm(
        preset,
        runs[0].recipe,
        runs,
        name=entry["name"],
        compare_to=entry.get("compare_to"),
        note=entry.get("note") or "",
        key_change=entry.get("key_change") or "",
        lr=(entry.get("lr") or {}).get(preset),
        trials={str(factor): _trial(folder / rel) for factor, rel in trials.items()},
    )


def _trial(run_dir: Path) -> dict[str, Any] | None:
    """A trial's summary, None until it has finished (trials are read for their loss only, never as arms)."""
    return read_summary(run_dir) if (run_dir / SUMMARY_FILE).exists() else None
