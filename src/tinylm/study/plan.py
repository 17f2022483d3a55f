"""Every run a study will train, as RunConfigs, made and checked before anything runs.

Layers, later ones winning: the preset's shape < the study's ``base`` < the flags < the arm's
steps. Every arm of a preset gets the same budget: the same token slots, or (``budget: {flops: F}``)
the steps that spend F training FLOPs by the cost model ``tinylm info`` uses, so arms whose FLOPs
per token differ train on different token counts. Seed k of every arm trains with seed base + k.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinylm.config import BUDGET_FIELDS, RunConfig, TrainConfig, preset
from tinylm.costs import model_costs
from tinylm.data.prepare import PrepareOptions
from tinylm.errors import UserError
from tinylm.fields import build, merge
from tinylm.rundir import CONFIG_FILE
from tinylm.study.spec import Arm, Study, describe, dotted

BUDGET_NAMES = {"max_tokens": "tokens", "max_steps": "steps", "max_time": "time_s"}
"""A budget flag and its name in study.json's ``budget``."""

DEFAULT_TOKENS = {"tiny": 200_000, "basic": 20_000_000, "mid": 40_000_000, "quality": 80_000_000}
"""Token slots per arm when neither the flags nor the study give a budget: a real result on one GPU."""
DEFAULT_TOKENS_CPU = {"tiny": 200_000, "basic": 250_000, "mid": 250_000, "quality": 250_000}
"""The same without CUDA: minutes a run on a few cores, not hours (tinylm ablate says how long first)."""


@dataclass
class Plan:
    """One study on some presets, with the flags' settings over its base."""

    study: Study
    presets: list[str]
    settings: dict[str, Any]
    """The flags (nested like RunConfig): over the study's base, under its steps."""
    out: Path
    arms: list[Arm]
    """The arms to run (``--phases``), in the order given."""
    seeds: int
    nproc: int = 1
    budget: dict[str, Any] = field(init=False)
    """What study.json records: {"tokens": N}, {"flops": F}, or the budget flags by name."""
    _vocab: dict[tuple, int] = field(init=False, default_factory=dict, repr=False)
    """Vocabulary size by data options: preparing the data once per source answers every arm."""

    def __post_init__(self) -> None:
        self.budget = resolve_budget(self.study, self.settings, self.presets)

    @property
    def base_seed(self) -> int:
        train = merge(self.study.base, self.settings).get("train", {})
        return TrainConfig.seed if train.get("seed") is None else train["seed"]

    def run_dir(self, preset_name: str, arm: Arm, seed_index: int) -> Path:
        """OUT/<preset>/<arm> for a one-seed study, else <arm>-seed<k>. Seed 0 keeps the folder it has when
        a study grows from one seed to more (or back): a study grows without training a run twice."""
        folder = self.out / preset_name
        if seed_index == 0:
            for name in (arm.name, f"{arm.name}-seed0"):
                if (folder / name / CONFIG_FILE).exists():
                    return folder / name
        name = arm.name if self.seeds == 1 else f"{arm.name}-seed{seed_index}"
        return folder / name

    def trial_dir(self, preset_name: str, arm: Arm, factor: float) -> Path:
        return self.out / "trials" / preset_name / f"{arm.name}-lr{factor:g}"

    def config(self, preset_name: str, arm: Arm, seed_index: int) -> RunConfig:
        """The run of ``arm``'s seed ``seed_index`` on a preset, at the base LR."""
        own = {"seed": self.base_seed + seed_index, "out": str(self.run_dir(preset_name, arm, seed_index))}
        shape = {"model": dataclasses.asdict(preset(preset_name))}
        budget = {"train": self.budget_settings()}
        layers = merge(
            shape, self.study.base, self.settings, budget, arm.changes, {"preset": preset_name, "train": own}
        )
        train = layers["train"]
        if train.get("batching", TrainConfig.batching) != "packed" and "train.doc_mask" not in arm.changed:
            train["doc_mask"] = False  # a doc_mask of the base or the flags applies to the arms that pack
        try:
            cfg = build(RunConfig, layers)
        except UserError as e:
            raise UserError(f"arm {arm.name} of study {self.study.name} on preset {preset_name}: {e}") from None
        if "flops" in self.budget:
            cfg.train.max_steps = self.flops_steps(cfg, arm)
        return cfg

    def budget_settings(self) -> dict[str, Any]:
        """The budget as training settings. A FLOPs budget becomes steps once the arm's model is known:
        config() replaces this max_steps of 1 by the steps the FLOPs buy."""
        if "flops" in self.budget:
            return {**dict.fromkeys(BUDGET_FIELDS), "max_steps": 1}
        fields = {name: flag for flag, name in BUDGET_NAMES.items()}
        return {**dict.fromkeys(BUDGET_FIELDS), **{fields[k]: v for k, v in self.budget.items()}}

    def flops_steps(self, cfg: RunConfig, arm: Arm) -> int:
        per_step = self.flops_per_token(cfg) * self.slots_per_step(cfg)
        steps = math.floor(self.budget["flops"] / per_step)
        if steps < 1:
            raise UserError(f"budget flops {self.budget['flops']:g} is less than one step of arm {arm.name} on "
                            f"{cfg.preset} ({per_step:.3g} FLOPs); raise it")  # fmt: skip
        return steps

    def slots_per_step(self, cfg: RunConfig) -> int:
        """Token slots per optimizer step: batch x micro-batches (one per process by default) x block."""
        return cfg.train.batch_size * (cfg.train.grad_accum or self.nproc) * cfg.model.block_size

    def flops_per_token(self, cfg: RunConfig) -> int:
        """Training FLOPs per token (tinylm.costs), with the vocabulary the run will really have: a
        trained BPE resizes the embedding to its size, known once the data is prepared (cached)."""
        model = dataclasses.replace(cfg.model, vocab_size=self.vocab_size(cfg))
        return model_costs(model).flops_per_token_train

    def vocab_size(self, cfg: RunConfig) -> int:
        if not cfg.train.tokenizer.startswith("bpe:"):
            return cfg.model.vocab_size
        options = PrepareOptions.from_config(cfg.train)
        key = dataclasses.astuple(options)
        if key not in self._vocab:
            from tinylm.data.prepare import prepare

            self._vocab[key] = prepare(options, quiet=True).meta["vocab_size"]
        return self._vocab[key]

    def arm_budget(self, cfg: RunConfig) -> dict[str, Any]:
        """The compute one run of an arm gets: steps, token slots, FLOPs (None under a time budget)."""
        t, per_step = cfg.train, self.slots_per_step(cfg)
        limits = ([t.max_steps] if t.max_steps else []) + ([math.ceil(t.max_tokens / per_step)] if t.max_tokens else [])
        steps = min(limits) if limits else None
        fpt = self.flops_per_token(cfg)
        tokens = steps * per_step if steps else None
        return {"steps": steps, "tokens": tokens, "flops_per_token": fpt, "flops": fpt * tokens if tokens else None}


def resolve_budget(study: Study, settings: dict[str, Any], presets: list[str]) -> dict[str, Any]:
    """Budget flags win over the study's budget; without either, one preset's default token slots."""
    train = settings.get("train", {})
    flags = {BUDGET_NAMES[k]: train[k] for k in BUDGET_FIELDS if train.get(k) is not None}
    if flags:
        return flags
    if study.budget:
        return study.budget.to_dict()
    if len(presets) > 1:
        raise UserError("give a budget (--max-tokens, --max-steps or --max-time) when ablating several presets")
    device = merge(study.base, settings).get("train", {}).get("device") or "auto"
    return {"tokens": (DEFAULT_TOKENS if _on_cuda(device) else DEFAULT_TOKENS_CPU)[presets[0]]}


def _on_cuda(device: str) -> bool:
    import torch

    return device != "cpu" and torch.cuda.is_available()


def with_lr_factor(cfg: RunConfig, factor: float, **train: Any) -> RunConfig:
    """The run at ``factor`` times its LR, and times its Muon LR too when it uses Muon: Muon moves the
    block matrices, most of the weights, so tuning lr alone would leave a Muon arm's main LR as it
    was. ``train`` changes more settings."""
    t = cfg.train
    muon_lr = t.muon_lr * factor if t.optimizer == "muon" else t.muon_lr
    changed = dataclasses.replace(t, lr=t.lr * factor, muon_lr=muon_lr, **train)
    return RunConfig(model=dataclasses.replace(cfg.model), train=changed, preset=cfg.preset)


def trial_config(cfg: RunConfig, factor: float, share: float, run_dir: Path) -> RunConfig:
    """A short LR trial of a run: its LR times ``factor``, on ``share`` of its budget."""
    t = cfg.train
    budget = {
        "max_steps": max(1, math.floor(share * t.max_steps)) if t.max_steps else None,
        "max_tokens": max(1, math.floor(share * t.max_tokens)) if t.max_tokens else None,
        "max_time": share * t.max_time if t.max_time else None,
    }
    return with_lr_factor(cfg, factor, out=str(run_dir), **budget)


def check_flags(study: Study, flags: dict[str, Any]) -> None:
    """A flag may override the base but not what a step changes: that arm would then equal the one before."""
    given = set(dotted(flags))
    for step in study.steps:
        if clash := sorted(given & set(dotted(step.change))):
            flag = "--" + clash[0].rsplit(".", 1)[-1].replace("_", "-")
            raise UserError(f"{flag} is what step {step.name} of study {study.name} changes ({describe(step.change)});"
                            " edit a copy of the study instead")  # fmt: skip
