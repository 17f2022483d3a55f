"""Experiment trackers: the run's metrics.jsonl records and settings, mirrored to TensorBoard, Weights &
Biases or MLflow (``--tracker``).

metrics.jsonl stays the run's record and a tracker is a copy of it for dashboards, so a tracker never
costs a run: a missing package is refused before the run starts (one line naming the extra to install),
and any failure after that is one warning, after which the run goes on without the tracker.

The trainer's metrics log calls one interface, :class:`Tracking` (``log(record)``, ``finish(summary)``);
each backend turns those calls into its own. A run of a study is tagged with the study's name, its arm,
preset and seed, read from the study's folder on disk: OUT/study.json lists each arm's runs per preset
(``<preset>/<arm>-seed<k>``, or ``<preset>/<arm>`` with one seed), and an arm's LR trials lie in
``trials/<preset>/<arm>-lr<factor>``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tinylm.config import RunConfig
from tinylm.errors import UserError
from tinylm.fields import dotted
from tinylm.paths import write_atomic
from tinylm.rundir import TENSORBOARD_DIR, TRACKING_FILE, read_metrics

PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
"""Tracker -> (the module it needs, the tinylm extra that installs it)."""

STUDY_FILE = "study.json"
"""The study runner's manifest in a study's folder: read here as a file format, not through the study code."""
TRIALS_DIR = "trials"
MLFLOW_STORE = "mlruns"
"""The MLflow file store tinylm makes beside the runs when MLFLOW_TRACKING_URI is not set."""
_NON_FINITE = ("nan", "inf", "-inf")  # how metrics.jsonl writes them (JSON has no NaN)


def check_tracker(name: str) -> None:
    """Refuse, in one line, a tracker whose package is not installed."""
    if name == "none":
        return
    module, extra = PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"--tracker {name} needs the {module} package: pip install 'tinylm[{extra}]'")


# --- which run this is -------------------------------------------------------------------


@dataclass
class TrackedRun:
    """What every tracker is told about a run: its settings, its name and, in a study, its place."""

    cfg: RunConfig
    dir: Path
    name: str
    """The run's path inside its study (``tiny/qk-seed1``), else its folder's name."""
    tags: dict[str, str]
    """study, arm, preset, seed (the training seed, as results.json has it), seed_index, and trial for an
    LR trial; {} outside a study."""
    study_dir: Path | None
    quiet: bool = False


def describe_run(cfg: RunConfig, run_dir: Path, quiet: bool = False) -> TrackedRun:
    run_dir = Path(os.path.abspath(run_dir))
    for out in list(run_dir.parents)[:3]:  # OUT/<preset>/<run> or OUT/trials/<preset>/<trial>
        manifest = _read_json(out / STUDY_FILE)
        where = run_dir.relative_to(out).as_posix()
        place = _place_in_study(manifest, where) if manifest else None
        if place is not None:
            tags = {"study": str(manifest.get("study")), **place, "seed": str(cfg.train.seed)}
            return TrackedRun(cfg, run_dir, where, tags, out, quiet)
    return TrackedRun(cfg, run_dir, run_dir.name, {}, None, quiet)


def _place_in_study(manifest: dict[str, Any], where: str) -> dict[str, str] | None:
    """arm and preset of the run at ``where`` (relative to the study's folder), or None if not the study's."""
    arms = [a for a in manifest.get("arms") or [] if isinstance(a, dict) and isinstance(a.get("name"), str)]
    for arm in arms:
        for preset, runs in (arm.get("runs") or {}).items():
            if isinstance(runs, list) and where in runs:
                return {"arm": arm["name"], "preset": preset, "seed_index": str(runs.index(where))}
    parts = where.split("/")
    if len(parts) == 3 and parts[0] == TRIALS_DIR:  # a trial is listed only once it has run: read its name
        for name in sorted((a["name"] for a in arms), key=len, reverse=True):  # "a-b" before "a"
            if parts[2].startswith(f"{name}-lr"):
                return {"arm": name, "preset": parts[1], "seed_index": "0", "trial": f"lr x{parts[2][len(name) + 3 :]}"}
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


# --- the one interface the metrics log calls ---------------------------------------------


class Backend(Protocol):
    continued: bool
    """Whether it goes on with a tracked run an earlier process of this run started (then it has the
    records metrics.jsonl holds already; else they are sent first)."""

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


class Tracking:
    """A run's tracker: ``log`` each metrics.jsonl record, ``finish`` with the summary. The first failure
    of the tracker is one warning and the end of tracking; the run goes on."""

    def __init__(self, name: str, backend: Backend | None):
        self.name, self.backend = name, backend

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        if self.backend is not None and step is not None and values:
            self._call(self.backend.log, step, values)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.backend is not None:
            self._call(self.backend.finish, summary or {})
        self.backend = None

    def _call(self, method, *args: Any) -> None:
        try:
            method(*args)
        except Exception as e:
            self.backend = None
            warn(self.name, e)


def warn(tracker: str, error: Exception) -> None:
    lines = str(error).strip().splitlines()
    print(f"tinylm: warning: the {tracker} tracker failed ({type(error).__name__}: {lines[0] if lines else ''}); "
          "training goes on without it, metrics.jsonl has every record", file=sys.stderr, flush=True)  # fmt: skip


def scalars(record: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """A metrics.jsonl record as (step, its numbers by name); a stability guard's event is named
    ``guard/<event>/<key>``. Non-finite values, which the file holds as text, are numbers again."""
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None, {}
    prefix = f"guard/{record['event']}/" if "event" in record else ""
    values = {}
    for key, value in record.items():
        if key in ("step", "event"):
            continue
        if isinstance(value, str) and value.lower() in _NON_FINITE:
            value = float(value)
        if isinstance(value, (int, float)):
            values[prefix + key] = float(value)
    return step, values


def open_tracking(cfg: RunConfig, run_dir: Path, resuming: bool, quiet: bool = False) -> Tracking | None:
    """The run's tracker (None without one). ``resuming``: an earlier process trained part of this run,
    so its tracked run goes on where the tracker still has it, else starts with metrics.jsonl's records."""
    name = cfg.train.tracker
    if name == "none":
        return None
    check_tracker(name)
    run = describe_run(cfg, run_dir, quiet)
    try:
        backend = BACKENDS[name](run, resuming)
    except Exception as e:  # a tracker that cannot start (no server, no login) costs the run nothing
        warn(name, e)
        return None
    tracking = Tracking(name, backend)
    if resuming and not backend.continued:  # resumed with a tracker this run had not used: its history first
        for record in read_metrics(run_dir):
            tracking.log(record)
    return tracking


def _final_figures(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's finite numbers (best_val_loss, final_val_loss_doc, train_time_s, ...)."""
    return {k: float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip


def _saved_ids(run_dir: Path) -> dict[str, str]:
    ids = _read_json(run_dir / TRACKING_FILE)
    return ids if isinstance(ids, dict) else {}


def _remember_id(run_dir: Path, tracker: str, run_id: str) -> None:
    write_atomic(run_dir / TRACKING_FILE, json.dumps({**_saved_ids(run_dir), tracker: run_id}, indent=2) + "\n")


# --- the backends ------------------------------------------------------------------------


class TensorBoardBackend:
    """Events under RUN_DIR/tensorboard; the settings and the study's tags as text."""

    def __init__(self, run: TrackedRun, resuming: bool):
        from torch.utils.tensorboard import SummaryWriter

        folder = run.dir / TENSORBOARD_DIR
        self.continued = resuming and folder.exists()
        self.writer = SummaryWriter(str(folder))
        if not self.continued:
            self.writer.add_text("config", f"```\n{json.dumps(run.cfg.to_dict(), indent=2)}\n```")
            if run.tags:
                self.writer.add_text("study", ", ".join(f"{k} {v}" for k, v in run.tags.items()))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.writer.close()


class WandbBackend:
    """A Weights & Biases run: project $WANDB_PROJECT (default tinylm), grouped by study, its job type the
    arm; the settings and the study's tags are its config. Files under RUN_DIR/wandb unless $WANDB_DIR."""

    def __init__(self, run: TrackedRun, resuming: bool):
        import wandb

        saved = _saved_ids(run.dir).get("wandb") if resuming else None
        self.continued = saved is not None
        tags = run.tags
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "tinylm",
            dir=os.environ.get("WANDB_DIR") or str(run.dir),
            name=run.name,
            group=tags.get("study"),
            job_type=tags.get("arm"),
            tags=[f"{k}:{tags[k]}" for k in ("study", "arm", "preset", "seed") if k in tags],
            config={**tags, **run.cfg.to_dict()},
            id=saved,
            resume="allow" if saved else None,
            settings=wandb.Settings(console="off", silent=run.quiet),
        )
        self.run.define_metric("*", step_metric="step")  # charts over the run's step, whatever a resume sends
        _remember_id(run.dir, "wandb", self.run.id)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(_final_figures(summary))
        self.run.finish(exit_code=0 if summary.get("completed", True) else 1)


class MlflowBackend:
    """An MLflow run in experiment $MLFLOW_EXPERIMENT_NAME, else the study's name, else tinylm; tags study,
    arm, preset and seed; every setting a parameter; the summary's figures as summary/<key> at the last step. Store: $MLFLOW_TRACKING_URI, else a file store
    ``mlruns`` in the study's folder (a run outside a study: beside its folder)."""

    def __init__(self, run: TrackedRun, resuming: bool):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run.study_dir or run.dir.parent).joinpath(MLFLOW_STORE).as_uri()
        if uri.startswith("file:"):  # MLflow 3 asks for this opt-in to its file store, the one needing no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric, self.client = Metric, MlflowClient(tracking_uri=uri)
        saved = _saved_ids(run.dir).get("mlflow") if resuming else None
        self.continued = saved is not None and self._still_there(saved)
        if self.continued:
            self.run_id = saved
            self.client.update_run(saved, status="RUNNING")
            return
        experiment = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or run.tags.get("study") or "tinylm")
        self.run_id = self.client.create_run(experiment, run_name=run.name, tags=run.tags).info.run_id
        params = [Param(k, str(v)) for k, v in dotted(run.cfg.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        _remember_id(run.dir, "mlflow", self.run_id)

    def _still_there(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # another store now, or the run deleted: a new tracked run
            return False
        return True

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:  # the kind tells MLflow 3's UI to open on training runs (not on LLM traces)
            return self.client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
        except Exception:  # made meanwhile by another run of the study
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, summary: dict[str, Any]) -> None:
        # summary/...: MLflow's charts put them in a section of their own, apart from the curves
        final = {f"summary/{k}": v for k, v in _final_figures(summary).items()}
        self.log(int(summary.get("steps") or 0), final)
        self.client.set_terminated(self.run_id, "FINISHED" if summary.get("completed", True) else "KILLED")


BACKENDS: dict[str, type] = {"tensorboard": TensorBoardBackend, "wandb": WandbBackend, "mlflow": MlflowBackend}
