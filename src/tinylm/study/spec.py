"""A study: named arms of training settings compared at equal compute, read from a YAML file.

::

    name: modern
    base: {preset: basic, init: scaled, schedule: cosine, batching: packed}
    mode: cumulative          # or: each
    steps:
      - {name: rope, change: {position: rope}, note: rotary positions}
      - {name: rmsnorm, change: {norm: rmsnorm}}
    seeds: 3
    budget: {tokens: 2e6}     # or {flops: 1e15}

Arm 0 is the base; then one arm per step. ``cumulative``: arm i is the base with the changes of
steps 1..i, compared to arm i-1; ``each``: arm i is the base with step i's change alone, compared
to the base arm. ``base`` and every ``change`` hold model or training settings, read with the
config's own types (:mod:`tinylm.fields`), so a wrong key or type is one line before anything
runs. The file format is described for users in src/tinylm/studies/README.md.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from tinylm.config import BUDGET_FIELDS, RunConfig, preset
from tinylm.errors import UserError
from tinylm.fields import ConfigError, dotted, load_yaml, merge, nest, read_as, read_fields, read_settings, require

Mode = Literal["cumulative", "each"]
RankBy = Literal["val_loss_doc", "val_loss"]

STUDIES_DIR = "studies"
"""The shipped studies: package data of tinylm (src/tinylm/studies/), so an installed or an
editable tinylm finds them without depending on the working directory."""
DEFAULT_STUDY = "seed"

RUNNER_SET = {"train.out"}
"""Settings the runner sets for every run (its folder)."""
BUDGET_SETTINGS = {f"train.{name}" for name in BUDGET_FIELDS}
"""Set with the study's ``budget`` (or budget flags): equal for every arm by construction."""
NOT_CHANGEABLE = {"preset", "train.seed"}
"""A step may not change them: every arm of a preset shares its shape's preset and its seeds (pairing)."""
SCORING_SETTINGS = {"train.data", "train.tokenizer", "train.val_fraction", "train.text_field", "train.doc_sep",
                    "train.eval_tokens", "model.vocab_size"}  # fmt: skip
"""A step may not change them either: they decide the held-out tokens every arm is scored on, and
losses measured on other tokens (or per token of another tokenizer) do not compare."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class Step:
    """One arm after the base: what it changes."""

    name: str
    """The arm's name; its runs are OUT/<preset>/<name> (one seed) or <name>-seed<k>."""
    change: dict[str, Any] = field(default_factory=dict)
    """Model or training settings this step changes, shaped like RunConfig (``{"model": {...}}``)."""
    note: str = ""
    """Free text the report shows beside the arm."""
    key_change: str | None = None
    """Short text for the report's timeline; default: the change itself (``+ position rope``)."""

    def __post_init__(self) -> None:
        read_fields(self)


@dataclass
class Budget:
    """Compute per arm: token slots (steps x batch x accumulation x block), or training FLOPs."""

    tokens: int | None = None
    flops: float | None = None
    """Each arm trains floor(flops / (FLOPs per token x token slots per step)) steps."""

    def __post_init__(self) -> None:
        read_fields(self)
        require(self, ("tokens", "flops"), lambda v: v > 0, "positive")
        if (self.tokens is None) == (self.flops is None):
            raise UserError("give one of tokens or flops, e.g. {tokens: 2e6}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Study:
    """A study file, read and checked."""

    name: str
    steps: list[Step]
    """The arms after the base, in order."""
    base: dict[str, Any] = field(default_factory=dict)
    """Settings every arm starts from, shaped like RunConfig; may name a ``preset``."""
    base_arm: Step = field(default_factory=lambda: Step("base"))
    """Name, note and key_change of arm 0 (it changes nothing)."""
    mode: Mode = "cumulative"
    seeds: int = 1
    """Runs per arm; seed k of every arm trains with train seed base_seed + k (paired)."""
    budget: Budget | None = None
    """None: the budget flags, else the preset's default token slots."""
    lr_tune: list[float] | None = None
    """Factors of the base LR (and muon_lr) each arm tries in short trials before its full runs."""
    lr_tune_share: float = 0.2
    """Share of an arm's budget each LR trial trains for (first seed only)."""
    rank_by: RankBy = "val_loss_doc"
    """Validation loss that ranks LR trials and the report's arms (per-document or packed)."""
    launch: dict[str, Any] | None = None
    """Where the runs train: ``launcher`` (local or slurm; --launcher wins) and the Slurm settings
    (``slurm: {partition: gpu, time: 120}``; the --slurm-* flags win). Not part of what the study
    measures: changing it does not make a folder's study another one."""

    def __post_init__(self) -> None:
        read_fields(self)
        require(self, ("seeds",), lambda v: v >= 1, "at least 1")
        require(self, ("lr_tune_share",), lambda v: 0 < v <= 1, "in (0, 1]")
        if not NAME.fullmatch(self.name):
            raise ConfigError("name", f"must be letters, digits, '_', '.' or '-', got {self.name!r}")
        if self.lr_tune is not None:
            self.lr_tune = _factors(self.lr_tune)
        if self.launch is not None:
            _check_launch(self.launch)

    @property
    def arms(self) -> list[Arm]:
        return arms_of(self)

    def to_dict(self) -> dict[str, Any]:
        """The study as a file holds it (what a changed study is told apart by)."""
        out = dataclasses.asdict(self)
        out["budget"] = self.budget.to_dict() if self.budget else None
        del out["launch"]  # where the runs train is not what they measure
        return out


def _check_launch(launch: Any) -> None:
    """The ``launch:`` block: a known launcher, and Slurm settings that read (tinylm.study.slurm)."""
    from tinylm.study.executor import LAUNCHERS
    from tinylm.study.slurm_options import read_options

    if not isinstance(launch, dict):
        raise ConfigError("launch", f"must be a mapping such as {{launcher: slurm, slurm: {{time: 60}}}}, got {launch!r}")
    if unknown := sorted(str(k) for k in launch if k not in ("launcher", "slurm")):
        raise ConfigError("launch", f"has unknown key(s) {', '.join(unknown)}; it holds launcher and slurm")
    if launch.get("launcher") is not None and launch["launcher"] not in LAUNCHERS:
        raise ConfigError("launch.launcher", f"must be one of {', '.join(LAUNCHERS)}, got {launch['launcher']!r}")
    read_options(None, launch)


def _factors(values: Any) -> list[float]:
    if not isinstance(values, list) or not values:
        raise ConfigError("lr_tune", f"must be a list of factors (e.g. [0.5, 1, 2]) or null, got {values!r}")
    factors = [read_as(f"lr_tune[{i}]", float, v) for i, v in enumerate(values)]
    # Distinct as written too: a trial's folder is named by f"{factor:g}" (1 and 1.0000001 would share one).
    if any(f <= 0 for f in factors) or len({f"{f:g}" for f in factors}) < len(factors):
        raise ConfigError("lr_tune", f"must hold distinct positive factors, got {values!r}")
    return factors


@dataclass(frozen=True)
class Arm:
    """One arm of a study: its settings over the base and the arm it is compared to."""

    name: str
    note: str
    key_change: str
    change: dict[str, Any]
    """This arm's own step (nested like RunConfig); {} for the base."""
    changes: dict[str, Any]
    """Every step's change this arm holds (cumulative: steps 1..i; each: step i): laid over the
    base and the flags."""
    compare_to: str | None

    @property
    def changed(self) -> set[str]:
        """The dotted settings this arm's steps set."""
        return set(dotted(self.changes))


def arms_of(study: Study) -> list[Arm]:
    """Arm 0 is the base; cumulative: arm i adds step i to arm i-1; each: arm i is the base plus step i."""
    b = study.base_arm
    # The base's preset is left out: --preset/--presets override it, so the text would misname the runs.
    shown = {k: v for k, v in study.base.items() if k != "preset"}
    base_text = b.key_change or ("Base: " + describe(shown) if shown else "Base settings")
    arms = [Arm(b.name, b.note, base_text, {}, {}, None)]
    for step in study.steps:
        before = arms[-1] if study.mode == "cumulative" else arms[0]
        prefix = "+ " if study.mode == "cumulative" else ""
        text = step.key_change or prefix + describe(step.change)
        arms.append(Arm(step.name, step.note, text, step.change, merge(before.changes, step.change), before.name))
    return arms


def describe(settings: dict[str, Any]) -> str:
    """``position rope, norm rmsnorm``: settings by their field names, as the report writes them."""
    return ", ".join(f"{name.rsplit('.', 1)[-1]} {_text(v)}" for name, v in dotted(settings).items())


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def flat(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings by their field names alone (``{"position": "rope"}``), as study files write them."""
    return {name.rsplit(".", 1)[-1]: value for name, value in dotted(settings).items()}


# --- reading a study file ----------------------------------------------------------------


def shipped_studies() -> dict[str, Path]:
    """The studies that come with tinylm, by name."""
    folder = Path(str(resources.files("tinylm").joinpath(STUDIES_DIR)))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def study_path(spec: str) -> Path:
    """``--study``'s file: a bare name (``modern``: no folder, no .yaml) is a shipped study; anything
    else is a path. The rule is explicit so that a stray file in the working folder never shadows
    a shipped study."""
    if NAME.fullmatch(spec) and Path(spec).suffix not in (".yaml", ".yml"):
        shipped = shipped_studies()
        if spec not in shipped:
            raise UserError(f"no shipped study {spec!r} (shipped: {', '.join(shipped)}); give a file path for your own")
        return shipped[spec]
    return Path(spec)


def load_study(spec: str = DEFAULT_STUDY) -> Study:
    path = study_path(spec)
    return read_study(load_yaml(path, "study file"), str(path))


def read_study(raw: dict[str, Any], source: str) -> Study:
    """A Study from a file's mapping; any problem is a UserError naming ``source`` and the key."""
    _check_keys(Study, raw, f"{source}: ")
    steps = raw.get("steps")
    if not isinstance(steps, list):
        raise UserError(f"{source}: steps must be a list of {{name, change, note}} mappings, got {steps!r}")
    values = dict(raw)
    values["steps"] = [_step(s, f"{source}: step {i + 1}: ") for i, s in enumerate(steps)]
    values["base_arm"] = _step(raw.get("base_arm") or {"name": "base"}, f"{source}: base_arm: ", base=True)
    values["base"] = _settings(raw.get("base") or {}, f"{source}: base", refused=set())
    if (name := values["base"].get("preset")) is not None:
        _check_preset(name, source)
    if raw.get("budget") is not None:
        _check_keys(Budget, raw["budget"], f"{source}: budget: ")
        values["budget"] = _build(Budget, raw["budget"], f"{source}: budget: ")
    study = _build(Study, values, f"{source}: ")
    names = [a.name for a in study.arms]
    if len(set(names)) < len(names):
        raise UserError(f"{source}: arm names must differ, got {', '.join(names)}")
    return study


def _check_preset(name: Any, source: str) -> None:
    try:
        preset(name)
    except UserError as e:
        raise UserError(f"{source}: base: {e}") from None


def _step(raw: Any, where: str, base: bool = False) -> Step:
    _check_keys(Step, raw, where)
    if base and raw.get("change"):
        raise UserError(f"{where}the base arm changes nothing: put its settings under base")
    values = dict(raw)
    name = str(raw.get("name"))
    values["change"] = _settings(raw.get("change") or {}, f"{where}change", NOT_CHANGEABLE | SCORING_SETTINGS)
    step = _build(Step, values, where)
    if not NAME.fullmatch(name):
        raise UserError(f"{where}name must be letters, digits, '_', '.' or '-', got {name!r}")
    return step


def _settings(raw: Any, where: str, refused: set[str]) -> dict[str, Any]:
    """Model/training settings, nested like RunConfig and read as their fields' types."""
    try:
        typed = read_settings(RunConfig, nest(RunConfig, raw, where))
    except ConfigError as e:
        raise UserError(f"{where}: {e}") from None
    for key in dotted(typed):
        if key in refused & SCORING_SETTINGS:
            raise UserError(f"{where}: {key.rsplit('.', 1)[-1]} changes the validation data every arm is scored on; "
                            "set it in base or with a flag")  # fmt: skip
        if key in RUNNER_SET | refused:
            raise UserError(f"{where}: {key.rsplit('.', 1)[-1]} is set by the study runner, not in a study file")
        if key in BUDGET_SETTINGS:
            raise UserError(f"{where}: {key.rsplit('.', 1)[-1]} is not a study setting; give budget: {{tokens: N}} "
                            "or {flops: F} (every arm gets the same)")  # fmt: skip
    return typed


def _check_keys(kind: type, raw: Any, where: str) -> None:
    if not isinstance(raw, dict):
        raise UserError(f"{where}must be a mapping, got {raw!r}")
    known = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise UserError(f"{where}unknown key(s) {', '.join(unknown)}; a {kind.__name__.lower()} has {', '.join(known)}")
    required = [f.name for f in dataclasses.fields(kind) if _required(f)]
    if lacking := [k for k in required if raw.get(k) is None]:
        raise UserError(f"{where}missing {', '.join(lacking)}")


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    try:
        return kind(**values)
    except UserError as e:
        raise UserError(f"{where}{e}") from None


@dataclass(frozen=True)
class Phase:
    """An arm of the seed study, by the three settings its phases change (what the report groups by)."""

    name: str
    key_change: str
    init: str
    schedule: str
    batching: str


def _seed_phases() -> dict[str, Phase]:
    study = load_study(DEFAULT_STUDY)
    phases = {}
    for arm in study.arms:
        train = {**study.base.get("train", {}), **arm.changes.get("train", {})}
        phases[arm.name] = Phase(arm.name, arm.key_change, train["init"], train["schedule"], train["batching"])
    return phases


PHASES: dict[str, Phase] = _seed_phases()
