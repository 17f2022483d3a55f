"""OUT/study.json, a study's manifest, and the ``study`` block in each of its runs' summary.json.

study.json says which runs make which arm, what each arm changes and is compared to, the budget
each arm got, its LR trials and the LR it chose; paths are relative to OUT. It is rewritten
(atomically) as the study progresses, and merged across reruns that run other arms or presets
of the same study; a rerun of another study, or of the same one with other settings, is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinylm.errors import UserError, damaged
from tinylm.paths import write_atomic
from tinylm.rundir import SUMMARY_FILE, read_summary
from tinylm.study import Arm, flat
from tinylm.studyplan import Plan

STUDY_FILE = "study.json"
PER_PRESET = ("runs", "budget", "lr", "lr_factor", "trials", "trial_losses")
"""An arm's entries that hold one value per preset."""


def read_manifest(out: Path) -> dict[str, Any] | None:
    """OUT/study.json, or None where OUT holds none (an ablation from before studies, a single run)."""
    path = out / STUDY_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("arms"), list):
        raise damaged(path, "delete it and rerun the study's command (finished runs are kept)")
    return data


class Manifest:
    """study.json of one study's OUT, kept in memory and written after every change."""

    def __init__(self, plan: Plan):
        self.plan, self.path = plan, plan.out / STUDY_FILE
        self.definition = _plain({"study": plan.study.to_dict(), "settings": _without_tracker(plan.settings),
                                  "seeds": plan.seeds, "budget": plan.budget})  # fmt: skip
        old = read_manifest(plan.out) or {}
        if old and old.get("definition") != self.definition:
            raise_changed(plan.out)
        self.presets = list(dict.fromkeys([*old.get("presets", []), *plan.presets]))
        self.arms = {a["name"]: a for a in old.get("arms", []) if isinstance(a, dict) and "name" in a}

    def arm(self, arm: Arm) -> dict[str, Any]:
        """The entry of ``arm``, made on first use."""
        if arm.name not in self.arms:
            self.arms[arm.name] = {"name": arm.name, "note": arm.note, "key_change": arm.key_change,
                                   "change": flat(arm.change), "compare_to": arm.compare_to,
                                   **{key: {} for key in PER_PRESET}}  # fmt: skip
        return self.arms[arm.name]

    def set(self, arm: Arm, key: str, preset_name: str, value: Any) -> None:
        self.arm(arm).setdefault(key, {})[preset_name] = _plain(value)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.plan.out).as_posix()

    def write(self) -> None:
        self._merge_disk()
        study, plan = self.plan.study, self.plan
        order = [a.name for a in study.arms]
        arms = sorted(self.arms.values(), key=lambda a: order.index(a["name"]) if a["name"] in order else len(order))
        data = {
            "study": study.name, "mode": study.mode, "rank_by": study.rank_by, "seeds": plan.seeds,
            "budget": plan.budget, "lr_tune": study.lr_tune, "lr_tune_share": study.lr_tune_share,
            "presets": self.presets, "arms": arms, "definition": self.definition,
        }  # fmt: skip
        write_atomic(self.path, json.dumps(data, indent=2) + "\n")

    def _merge_disk(self) -> None:
        """Take what another command wrote since this one started: `--phases a` and `--phases b` (or two
        presets) running at once into one OUT would otherwise each write only their own arms, and the
        last writer would drop the other's. What this plan runs is its own; the rest is the file's."""
        disk = read_manifest(self.plan.out) or {}
        if not disk:
            return
        if disk.get("definition") != self.definition:
            raise_changed(self.plan.out)
        self.presets = list(dict.fromkeys([*self.presets, *disk.get("presets", [])]))
        mine = {a.name for a in self.plan.arms}
        for entry in disk["arms"]:
            name = entry.get("name") if isinstance(entry, dict) else None
            if name is None:
                continue
            if name not in mine or name not in self.arms:
                self.arms[name] = entry
                continue
            for key in PER_PRESET:  # an arm this plan runs: its other presets' values are the file's
                theirs = {p: v for p, v in (entry.get(key) or {}).items() if p not in self.plan.presets}
                self.arms[name][key] = {**theirs, **self.arms[name].get(key, {})}


def _without_tracker(settings: dict[str, Any]) -> dict[str, Any]:
    """The flags but --tracker: which dashboard gets a copy of the metrics makes no other study."""
    train = settings.get("train") or {}
    if "tracker" not in train:
        return settings
    return {**settings, "train": {k: v for k, v in train.items() if k != "tracker"}}


def raise_changed(out: Path) -> None:
    raise UserError(f"{out} was started with other settings (another study, or other flags, seeds or budget; "
                    f"see {out / STUDY_FILE}); rerun the original command or use another --out")  # fmt: skip


def _plain(value: Any) -> Any:
    """As JSON holds it (tuples as lists, keys as text): what a reread study.json compares equal to."""
    return json.loads(json.dumps(value, default=str))


def mark_summary(run_dir: Path, block: dict[str, Any]) -> None:
    """Add the ``study`` block to a run's summary.json (atomically; unchanged if it holds it), so a
    results row names its study and arm even when read without study.json."""
    summary = read_summary(run_dir)
    if summary.get("study") != block:
        summary["study"] = block
        write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")


def study_block(study_name: str, arm: Arm, lr_factor: float | None, trial: bool = False) -> dict[str, Any]:
    return {"name": study_name, "arm": arm.name, "lr_factor": lr_factor, "trial": trial}
