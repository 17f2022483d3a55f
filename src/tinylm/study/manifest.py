"""OUT/study.json, a study's manifest, and the ``study`` block in each of its runs' summary.json.

study.json says which runs make which arm, what each arm changes and is compared to, the budget
each arm got, its LR trials and the LR it chose; paths are relative to OUT. It is rewritten
(atomically, under OUT/.study.lock, by the launcher and by each run's worker) as the study
progresses, and merged across reruns that run other arms, presets or more seeds of the same
study, or the study grown by steps; a rerun of another study, or of the same one with other
settings, is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinylm.errors import UserError, damaged
from tinylm.paths import DirLock, disk_full_is_one_line, write_atomic
from tinylm.rundir import SUMMARY_FILE, read_summary
from tinylm.study.plan import Plan
from tinylm.study.spec import Arm, flat

STUDY_FILE = "study.json"
LOCK_FILE = ".study.lock"
"""Held while study.json (or tasks.json) is read, changed and written: several processes write them."""
PER_PRESET = ("runs", "budget", "lr", "lr_factor", "trials", "trial_losses")
"""An arm's entries that hold one value per preset."""
WORKER_SET = ("lr", "lr_factor", "trial_losses")
"""Entries of an LR-tuned arm that its runs' worker sets once the arm's trials have finished."""


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
                                  "budget": plan.budget})  # fmt: skip
        self.executor: dict[str, Any] | None = None
        """The executor training the study now (``Executor.describe()``), for tinylm status."""
        old = read_manifest(plan.out) or {}
        if old:
            self.definition = grown_definition(old.get("definition"), self.definition, plan.out)
        self.seeds = max(plan.seeds, old.get("seeds") or 0)
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
        with study_lock(self.plan.out):
            self._merge_disk()
            study, plan = self.plan.study, self.plan
            order = [a.name for a in study.arms]
            arms = sorted(
                self.arms.values(), key=lambda a: order.index(a["name"]) if a["name"] in order else len(order)
            )
            data = {
                "study": study.name, "mode": study.mode, "rank_by": study.rank_by, "seeds": self.seeds,
                "budget": plan.budget, "lr_tune": study.lr_tune, "lr_tune_share": study.lr_tune_share,
                "presets": self.presets, "arms": arms, "definition": self.definition,
            }  # fmt: skip
            if self.executor is not None:
                data["executor"] = self.executor
            advice = "the finished runs are kept: make room and run the same command again, which goes on from them"
            with disk_full_is_one_line(self.plan.out, advice):
                write_atomic(self.path, json.dumps(data, indent=2) + "\n")

    def _merge_disk(self) -> None:
        """Take what another command wrote since this one started: `--phases a` and `--phases b` (or two
        presets) running at once into one OUT would otherwise each write only their own arms, and the
        last writer would drop the other's. What this plan runs is its own; the rest is the file's."""
        disk = read_manifest(self.plan.out) or {}
        if not disk:
            return
        self.definition = grown_definition(disk.get("definition"), self.definition, self.plan.out)
        self.seeds = max(self.seeds, disk.get("seeds") or 0)
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
            for key in WORKER_SET:  # what a worker found since: kept where this plan has nothing newer
                for p, v in (entry.get(key) or {}).items():
                    if p in self.plan.presets and self.arms[name].get(key, {}).get(p) is None:
                        self.arms[name].setdefault(key, {})[p] = v


def study_lock(out: Path) -> DirLock:
    """The lock (taken by ``with``, waiting for its holder) under which study.json and tasks.json change."""
    lock = DirLock(out / LOCK_FILE, "study.json is being written", file=True)
    lock.acquire(wait=True)
    return lock


def update_arm(out: Path, arm_name: str, preset_name: str, merge: bool = False, **entries: Any) -> None:
    """Set per-preset entries of one arm in OUT/study.json, under the lock (a worker's findings: the LR
    its trials chose, a finished trial). ``merge``: a mapping entry is added to, not replaced."""
    with study_lock(out):
        data = read_manifest(out)
        if data is None:
            return
        for arm in data["arms"]:
            if isinstance(arm, dict) and arm.get("name") == arm_name:
                for key, value in entries.items():
                    per_preset = arm.setdefault(key, {})
                    old = per_preset.get(preset_name)
                    per_preset[preset_name] = (
                        {**old, **_plain(value)} if merge and isinstance(old, dict) else _plain(value)
                    )
        write_atomic(out / STUDY_FILE, json.dumps(data, indent=2) + "\n")


def grown_definition(old: Any, new: dict[str, Any], out: Path) -> dict[str, Any]:
    """The definition of a study folder after a rerun: the same, or the study grown by steps (either way
    round: the larger is kept). Seeds are not part of it: a rerun with more seeds adds runs. Else refused."""
    old = dict(old or {})
    old.pop("seeds", None)  # written by tinylm before a study could grow by seeds
    old_steps, new_steps = (d.get("study", {}).get("steps") or [] for d in (old, new))
    if _without_steps(old) != _without_steps(new):
        raise_changed(out)
    small, large = sorted((old_steps, new_steps), key=len)
    if new.get("study", {}).get("mode") == "cumulative":
        grown = large[: len(small)] == small  # a step after the last: the arms before it are unchanged
    else:
        grown = all(step in large for step in small)
    if not grown:
        raise_changed(out)
    return new if large is new_steps else old


def _without_steps(definition: dict[str, Any]) -> dict[str, Any]:
    study = {k: v for k, v in (definition.get("study") or {}).items() if k not in ("steps", "seeds")}
    return {**{k: v for k, v in definition.items() if k != "seeds"}, "study": study}


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


def study_block(study_name: str, arm_name: str, lr_factor: float | None, trial: bool = False) -> dict[str, Any]:
    return {"name": study_name, "arm": arm_name, "lr_factor": lr_factor, "trial": trial}
