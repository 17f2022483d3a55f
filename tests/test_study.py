"""Studies: the file, the arms and configs it makes, budgets, paired seeds, LR tuning, resume, study.json."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tinylm.train
import tinylm.trainer
from tinylm.config import ModelConfig
from tinylm.costs import model_costs
from tinylm.errors import UserError
from tinylm.study.manifest import STUDY_FILE
from tinylm.study.plan import Plan
from tinylm.study.runner import run_study, select_arms
from tinylm.study.spec import load_study, read_study, shipped_studies
from tinylm.study.worker import pick_lr_factor

TWO_ARMS = """
name: pair
base: {preset: tiny, schedule: cosine}
mode: each
steps:
  - {name: qk, change: {qk_norm: true}, note: normalised queries and keys}
"""


def write(tmp_path, text: str, name: str = "study.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def settings(stories, **train) -> dict:
    """The flags of a tiny, quick run (a trained BPE of 512 tokens keeps its steps cheap)."""
    values = dict(data=str(stories), tokenizer="bpe:512", batch_size=2, eval_every=2, eval_tokens=256, lr=3e-3,
                  device="cpu", max_steps=2)  # fmt: skip
    values.update(train)
    return {"train": values}


def summary(path) -> dict:
    return json.loads((path / "summary.json").read_text())


# --- the file ------------------------------------------------------------------------------


def test_shipped_studies_are_found_by_name_and_read():
    assert {"seed", "modern"} <= set(shipped_studies())
    modern = load_study("modern")
    assert [a.name for a in modern.arms] == ["base", "rope", "rmsnorm", "swiglu", "qknorm", "muon"]
    assert modern.base == {"preset": "basic", "train": {"init": "scaled", "schedule": "cosine", "batching": "packed"}}
    assert modern.budget.tokens == 2_000_000 and modern.seeds == 3 and modern.mode == "cumulative"
    assert modern.steps[3].change == {"model": {"qk_norm": True}}  # read as the field's type


def test_the_seed_study_is_the_four_phases_of_the_seed_report():
    """The phases as ablation.py hard-coded them before studies: names, settings and timeline texts."""
    before = [
        ("baseline", "Random init N(0, 1), fixed LR, padded", "naive", "constant", "padded"),
        ("init", "Scaled (GPT-2) init", "scaled", "constant", "padded"),
        ("cosine", "+ Warm-up and cosine decay", "scaled", "cosine", "padded"),
        ("packed", "+ Packed sequences", "scaled", "cosine", "packed"),
    ]
    seed = load_study("seed")
    got = []
    for arm in seed.arms:
        train = {**seed.base["train"], **arm.changes.get("train", {})}
        got.append((arm.name, arm.key_change, train["init"], train["schedule"], train["batching"]))
    assert got == before
    assert [a.compare_to for a in seed.arms] == [None, "baseline", "init", "cosine"]


def test_a_study_round_trips_through_its_file(tmp_path):
    text = (
        TWO_ARMS + "seeds: 2\nbudget: {flops: 2.5e12}\nlr_tune: [0.5, 1, 2]\nlr_tune_share: 0.25\nrank_by: val_loss\n"
    )
    study = read_study(yaml.safe_load(text), "study.yaml")
    again = read_study(yaml.safe_load(yaml.safe_dump(study.to_dict())), "again.yaml")
    assert again == study
    assert study.budget.flops == 2.5e12 and study.lr_tune == [0.5, 1.0, 2.0] and study.rank_by == "val_loss"


@pytest.mark.parametrize(
    "change, message",
    [
        ("colour: red", "unknown key(s) colour"),
        ("mode: sideways", "mode must be one of 'cumulative', 'each'"),
        ("seeds: 0", "seeds must be at least 1"),
        ("seeds: two", "seeds must be a number"),
        ("lr_tune: [1, -2]", "lr_tune must hold distinct positive factors"),
        ("lr_tune: [1, 1.0000001]", "lr_tune must hold distinct positive factors"),  # one trial folder, lr1
        ("lr_tune: 2", "lr_tune must be a list"),
        ("lr_tune_share: 1.5", "lr_tune_share must be in (0, 1]"),
        ("budget: {tokens: 1e6, flops: 1e12}", "budget: give one of tokens or flops"),
        ("budget: {minutes: 3}", "budget: unknown key(s) minutes"),
        ("budget: {tokens: -5}", "budget: tokens must be positive"),
        ("rank_by: accuracy", "rank_by must be one of"),
        ("steps:\n  - {name: a, change: {posiiton: rope}}", "step 1: change: unknown setting(s): posiiton"),
        ("steps:\n  - {name: a, change: {position: rotary}}", "step 1: change: position must be one of"),
        ("steps:\n  - {name: a, change: {n_layer: many}}", "step 1: change: n_layer must be a number"),
        ("steps:\n  - {name: a, change: {qk_norm: maybe}}", "step 1: change: qk_norm must be true or false"),
        ("steps:\n  - {name: a, change: {max_steps: 10}}", "max_steps is not a study setting"),
        ("steps:\n  - {name: a, change: {seed: 3}}", "seed is set by the study runner"),
        ("steps:\n  - {name: a, change: {preset: mid}}", "preset is set by the study runner"),
        ("steps:\n  - {name: a, change: {data: other.txt}}", "data changes the validation data"),
        ("steps:\n  - {name: a, change: {eval_tokens: 1024}}", "eval_tokens changes the validation data"),
        ("steps:\n  - {name: a, change: {tokenizer: bpe}}", "tokenizer changes the validation data"),
        ("steps:\n  - {name: a/b, change: {lr: 1}}", "name must be letters"),
        ("steps:\n  - {change: {lr: 1}}", "step 1: missing name"),
        ("steps:\n  - {name: base, change: {lr: 1}}", "arm names must differ"),
        ("steps: {name: a}", "steps must be a list"),
        ("base: {preset: huge}", "base: unknown preset 'huge'"),
        ("base: {out: somewhere}", "out is set by the study runner"),
        ("base: {lr: fast}", "base: lr must be a number"),
    ],
)
def test_bad_keys_and_types_are_one_line_naming_the_file(tmp_path, change, message):
    key = change.split(":", 1)[0]
    replaced = (key + ":", "  -") if key == "steps" else (key + ":",)  # a step's lines go with steps:
    lines = [line for line in TWO_ARMS.strip().splitlines() if not line.startswith(replaced)]
    path = write(tmp_path, "\n".join(lines) + "\n" + change + "\n")
    with pytest.raises(UserError) as e:
        load_study(str(path))
    assert message in str(e.value) and str(e.value).startswith(str(path)), str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_every_shipped_study_file_is_package_data():
    """A wheel (not only an editable install) carries the studies: pyproject's package-data names them."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tinylm"]
    shipped = [p.relative_to(root / "src" / "tinylm").as_posix() for p in (root / "src/tinylm/studies").iterdir()]
    assert "studies/seed.yaml" in shipped and "studies/README.md" in shipped
    assert all(any(fnmatch.fnmatch(name, g) for g in globs) for name in shipped), (shipped, globs)


def test_a_study_name_or_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "name: mine\nsteps: []\n", "modern")  # a stray file never shadows the shipped study
    assert load_study("modern").name == "modern"
    assert load_study("./modern").name == "mine"
    with pytest.raises(UserError, match="no shipped study 'modrn'"):
        load_study("modrn")
    with pytest.raises(UserError, match="study file not found: other.yaml"):
        load_study("other.yaml")


def test_the_base_arm_text_leaves_out_the_preset_that_flags_override():
    """`--preset tiny` over `base: {preset: basic}` trains tiny: the timeline must not say basic."""
    modern = load_study("modern")
    assert modern.arms[0].key_change == "Base: init scaled, schedule cosine, batching packed"
    only_preset = read_study(yaml.safe_load("name: p\nbase: {preset: basic}\nsteps: []\n"), "p.yaml")
    assert only_preset.arms[0].key_change == "Base settings"


# --- the arms and their configs --------------------------------------------------------------

THREE = """
name: three
base: {{preset: tiny, init: scaled, batching: packed, doc_mask: true}}
mode: {mode}
steps:
  - {{name: rope, change: {{position: rope}}}}
  - {{name: padded, change: {{batching: padded}}}}
  - {{name: wide, change: {{n_embd: 64, lr: 0.002}}}}
"""


@pytest.mark.parametrize("mode", ["cumulative", "each"])
def test_cumulative_and_each_make_the_intended_configs(stories, tmp_path, mode):
    study = read_study(yaml.safe_load(THREE.format(mode=mode)), "three.yaml")
    plan = Plan(study, ["tiny"], settings(stories, lr=1e-3), tmp_path, study.arms, seeds=1)
    cfgs = {arm.name: plan.config("tiny", arm, 0) for arm in study.arms}
    shape = {name: (c.model.position, c.train.batching, c.model.n_embd, c.train.lr) for name, c in cfgs.items()}
    if mode == "cumulative":
        assert shape == {"base": ("learned", "packed", 32, 1e-3), "rope": ("rope", "packed", 32, 1e-3),
                         "padded": ("rope", "padded", 32, 1e-3), "wide": ("rope", "padded", 64, 2e-3)}  # fmt: skip
        assert [a.compare_to for a in study.arms] == [None, "base", "rope", "padded"]
        assert [a.key_change for a in study.arms][1:] == ["+ position rope", "+ batching padded",
                                                          "+ n_embd 64, lr 0.002"]  # fmt: skip
    else:
        assert shape == {"base": ("learned", "packed", 32, 1e-3), "rope": ("rope", "packed", 32, 1e-3),
                         "padded": ("learned", "padded", 32, 1e-3), "wide": ("learned", "packed", 64, 2e-3)}  # fmt: skip
        assert [a.compare_to for a in study.arms] == [None, "base", "base", "base"]
    assert {name: c.train.doc_mask for name, c in cfgs.items()} == {
        name: c.train.batching == "packed" for name, c in cfgs.items()
    }  # the base's doc_mask applies to the arms that pack
    for name, cfg in cfgs.items():  # everything else as the base and the flags say
        assert (cfg.preset, cfg.model.n_layer, cfg.train.init, cfg.train.max_steps, cfg.train.seed) == (
            "tiny", 2, "scaled", 2, 1337)  # fmt: skip
        assert cfg.train.out == str(tmp_path / "tiny" / name)


def refused(capsys, argv: list, *fragments: str) -> None:
    """The CLI in-process: exit code 2 and one stderr line holding every fragment."""
    from tinylm.cli import main

    code, err = main([str(a) for a in argv]), capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(fragment in err for fragment in fragments), err


def test_the_default_ablate_makes_the_configs_it_made_before_studies(tmp_path):
    """`tinylm ablate --lr 2e-3 --max-steps 5 --doc-mask --first-seed 3 --seeds 2`, as the seed's phases made it:
    the flags over TrainConfig's defaults, then each phase's init, schedule and batching."""
    import dataclasses

    from tinylm.config import TrainConfig, preset

    flags = {"train": {"lr": 2e-3, "max_steps": 5, "doc_mask": True, "seed": 3}, "model": {"dropout": 0.1}}
    seed = load_study("seed")
    plan = Plan(seed, ["tiny"], flags, tmp_path, seed.arms, seeds=2)
    for arm, (init, schedule, batching) in zip(seed.arms, [("naive", "constant", "padded"), ("scaled", "constant",
                                               "padded"), ("scaled", "cosine", "padded"), ("scaled", "cosine", "packed")]):  # fmt: skip
        for k in (0, 1):
            before = dataclasses.replace(TrainConfig(**flags["train"]), init=init, schedule=schedule,
                                         batching=batching, seed=3 + k, out=str(tmp_path / "tiny" / f"{arm.name}-seed{k}"),
                                         doc_mask=batching == "packed")  # fmt: skip
            cfg = plan.config("tiny", arm, k)
            assert cfg.train == before
            assert cfg.model == dataclasses.replace(preset("tiny"), dropout=0.1) and cfg.preset == "tiny"


def test_a_flag_may_override_the_base_but_not_a_step(tmp_path, capsys):
    study = write(tmp_path, THREE.format(mode="each"))
    refused(capsys, ["ablate", "--study", study, "--position", "rope", "--out", tmp_path / "o"], "--position",
            "step rope")  # fmt: skip
    refused(capsys, ["ablate", "--study", study, "--phases", "rope,nope", "--out", tmp_path / "o"], "unknown phase")
    refused(capsys, ["ablate", "--study", tmp_path / "none.yaml", "--out", tmp_path / "o"], "study file not found")
    assert not (tmp_path / "o").exists()


def test_a_trailing_comma_in_presets_names_no_extra_preset(tmp_path, monkeypatch):
    """`--presets tiny,` ran tiny before studies; it must not become an unknown preset ''."""
    import tinylm.report
    import tinylm.study.runner
    from tinylm.cli import main

    asked = []
    real_plan = tinylm.study.runner.make_plan
    monkeypatch.setattr(
        tinylm.study.runner,
        "make_plan",
        lambda study, presets, *a, **k: asked.append(presets) or real_plan(study, presets, *a, **k),
    )
    monkeypatch.setattr(tinylm.study.runner, "run_tasks", lambda *a, **k: None)
    monkeypatch.setattr(tinylm.report, "write_report", lambda paths, out, **kw: out)
    assert main(["ablate", "--presets", "tiny,", "--max-steps", "1", "--out", str(tmp_path / "out")]) == 0
    assert asked == [["tiny"]]


def test_an_arm_impossible_on_a_preset_is_refused_before_anything_runs(stories, tmp_path):
    study = read_study(yaml.safe_load("name: odd\nsteps:\n  - {name: heads, change: {n_head: 3}}\n"), "odd.yaml")
    with pytest.raises(UserError, match=r"^arm heads of study odd on preset tiny: n_embd \(32\) must be divisible"):
        run_study(study, ["tiny"], settings("unused.txt"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- budgets -------------------------------------------------------------------------------


def test_equal_flops_budgets_give_each_arm_the_steps_its_flops_per_token_buy(stories, tmp_path):
    text = "name: f\nbase: {preset: tiny}\nmode: each\nbudget: {flops: 4e11}\nsteps:\n" \
           "  - {name: deeper, change: {n_layer: 3}}\n  - {name: swiglu, change: {mlp: swiglu}}\n"  # fmt: skip
    study = read_study(yaml.safe_load(text), "f.yaml")
    flags = settings(stories, grad_accum=3)
    flags["train"].pop("max_steps")
    plan = Plan(study, ["tiny"], flags, tmp_path, study.arms, seeds=1)
    vocab = tinylm.train.prepare_data(plan.config("tiny", study.arms[0], 0), quiet=True).meta["vocab_size"]
    steps = {}
    for arm in study.arms:
        cfg = plan.config("tiny", arm, 0)
        model = ModelConfig(n_layer=3 if arm.name == "deeper" else 2, n_head=2, n_embd=32, block_size=64,
                            vocab_size=vocab, mlp="swiglu" if arm.name == "swiglu" else "gelu")  # fmt: skip
        fpt = model_costs(model).flops_per_token_train
        assert cfg.train.max_steps == math.floor(4e11 / (fpt * 2 * 3 * 64)) and cfg.train.max_tokens is None
        budget = plan.arm_budget(cfg)
        assert budget["tokens"] == cfg.train.max_steps * 2 * 3 * 64 and budget["flops"] <= 4e11
        assert budget["flops_per_token"] == fpt
        steps[arm.name] = cfg.train.max_steps
    assert steps["deeper"] < steps["base"]  # a FLOPs budget: fewer steps for the arm that costs more per token


def test_budget_flags_override_the_study_and_a_flops_budget_below_one_step_is_refused(stories, tmp_path):
    study = read_study(yaml.safe_load(TWO_ARMS + "budget: {tokens: 5000}\n"), "s.yaml")
    no_flags = settings(stories)
    no_flags["train"].pop("max_steps")
    assert (
        Plan(study, ["tiny"], no_flags, tmp_path, study.arms, 1).config("tiny", study.arms[1], 0).train.max_tokens
        == 5000
    )
    cfg = Plan(study, ["tiny"], settings(stories), tmp_path, study.arms, 1).config("tiny", study.arms[1], 0)
    assert (cfg.train.max_steps, cfg.train.max_tokens) == (2, None)
    tiny = read_study(yaml.safe_load(TWO_ARMS + "budget: {flops: 10}\n"), "s.yaml")
    with pytest.raises(UserError, match="budget flops 10 is less than one step of arm base on tiny"):
        Plan(tiny, ["tiny"], no_flags, tmp_path, tiny.arms, 1).config("tiny", tiny.arms[0], 0)


# --- paired seeds ---------------------------------------------------------------------------


def test_seed_k_of_every_arm_sees_the_same_batches_and_starts_from_the_same_weights(stories, tmp_path, monkeypatch):
    seen: dict[tuple, list] = {}
    real = tinylm.trainer.step_batches

    def spy(rows, t, step, cluster):
        batches, real_tokens = real(rows, t, step, cluster)
        seen.setdefault((t.out.rsplit("/", 1)[-1], t.seed), []).append([b.x.clone() for b in batches])
        return batches, real_tokens

    monkeypatch.setattr(tinylm.trainer, "step_batches", spy)
    study = read_study(yaml.safe_load("name: lr\nmode: each\nsteps:\n  - {name: fast, change: {lr: 0.01}}\n"), "s")
    run_study(study, ["tiny"], settings(stories, max_steps=3, seed=40), tmp_path, seeds=2, quiet=True)
    assert sorted(seen) == [("base-seed0", 40), ("base-seed1", 41), ("fast-seed0", 40), ("fast-seed1", 41)]
    for k in (0, 1):
        base, fast = seen[(f"base-seed{k}", 40 + k)], seen[(f"fast-seed{k}", 40 + k)]
        assert len(base) == 3 and all(a[0].equal(b[0]) for a, b in zip(base, fast))
        start = {summary(tmp_path / "tiny" / f"{arm}-seed{k}")["start_val_loss"] for arm in ("base", "fast")}
        assert len(start) == 1  # same init: the same loss before the first step
    assert not seen[("base-seed0", 40)][0][0].equal(seen[("base-seed1", 41)][0][0])


# --- LR tuning ------------------------------------------------------------------------------

TUNED = """
name: tuned
base: {preset: tiny}
mode: cumulative
steps:
  - {name: muon, change: {optimizer: muon}}
lr_tune: [0.5, 1, 2]
lr_tune_share: 0.5
"""

PLANTED = {0.5: 3.0, 1.0: 2.5, 2.0: 2.0}
"""best_val_loss_doc planted in each trial's summary, by LR factor: 2 is best."""


def planted_train(real_train, planted):
    """Real training; a trial's summary then holds the planted per-document loss of its LR factor."""

    def train(cfg, resume=False, quiet=False, interrupt_after=None):
        result = real_train(cfg, resume=resume, quiet=quiet, interrupt_after=interrupt_after)
        if "/trials/" in cfg.train.out and not result.interrupted:
            factor = float(cfg.train.out.rsplit("-lr", 1)[1])
            path = result.run_dir / "summary.json"
            path.write_text(json.dumps({**summary(result.run_dir), "best_val_loss_doc": planted[factor]}))
        return result

    return train


def test_lr_tuning_trains_each_arm_at_the_factor_whose_trial_was_best(stories, tmp_path, monkeypatch):
    monkeypatch.setattr(tinylm.train, "train", planted_train(tinylm.train.train, PLANTED))
    study = read_study(yaml.safe_load(TUNED), "tuned.yaml")
    run_study(study, ["tiny"], settings(stories, max_steps=4, lr=1e-3, muon_lr=0.01), tmp_path, quiet=True)
    manifest = json.loads((tmp_path / STUDY_FILE).read_text())
    for arm in manifest["arms"]:
        name = arm["name"]
        assert arm["trials"] == {"tiny": {f: f"trials/tiny/{name}-lr{f}" for f in ("0.5", "1", "2")}}
        assert arm["lr_factor"] == {"tiny": 2.0} and arm["lr"] == {"tiny": 2e-3}
        assert arm["trial_losses"] == {"tiny": {"0.5": 3.0, "1": 2.5, "2": 2.0}}
        trial = json.loads((tmp_path / "trials" / "tiny" / f"{name}-lr0.5" / "config.json").read_text())["train"]
        assert (trial["lr"], trial["max_steps"], trial["seed"]) == (5e-4, 2, 1337)  # half the budget, seed 0
        assert trial["muon_lr"] == (0.005 if name == "muon" else 0.01)
        full = json.loads((tmp_path / "tiny" / name / "config.json").read_text())["train"]
        assert (full["lr"], full["max_steps"]) == (2e-3, 4)
        assert full["muon_lr"] == (0.02 if name == "muon" else 0.01)  # Muon's LR moves with the factor
        assert summary(tmp_path / "tiny" / name)["study"] == {"name": "tuned", "arm": name, "lr_factor": 2.0,
                                                              "trial": False}  # fmt: skip
        assert summary(tmp_path / "trials" / "tiny" / f"{name}-lr1")["study"]["trial"] is True


def test_the_lr_pick_ranks_by_the_study_metric_and_falls_back_to_the_packed_loss():
    doc = {0.5: {"best_val_loss": 2.0, "best_val_loss_doc": 3.0}, 1.0: {"best_val_loss": 2.5, "best_val_loss_doc": 2.9}}
    assert pick_lr_factor(doc, "val_loss_doc", "arm a") == 1.0
    assert pick_lr_factor(doc, "val_loss", "arm a") == 0.5
    older = {0.5: {"best_val_loss": 2.0}, 1.0: {"best_val_loss": 1.5}, 2.0: {"best_val_loss": float("nan")}}
    assert pick_lr_factor(older, "val_loss_doc", "arm a") == 1.0  # runs without per-document validation
    with pytest.raises(UserError, match="every LR trial of arm a failed"):
        pick_lr_factor({2.0: {"best_val_loss": None}, 4.0: {"best_val_loss": float("inf")}}, "val_loss", "arm a")


def test_the_lr_pick_ranks_every_trial_by_one_metric():
    # A trial finished by an older tinylm lacks the per-document loss: comparing its packed loss with another
    # trial's per-document one would measure the evaluation (the two differ by up to 0.024 on the same weights in
    # results/studies/modern-basic), not the learning rate.
    mixed = {0.5: {"best_val_loss": 2.0}, 1.0: {"best_val_loss": 1.9, "best_val_loss_doc": 2.1}}
    assert pick_lr_factor(mixed, "val_loss_doc", "arm a") == 1.0


# --- resume, study.json ---------------------------------------------------------------------


def test_an_interrupted_study_resumes_and_never_reruns_a_finished_arm_or_trial(stories, tmp_path, monkeypatch):
    real = tinylm.train.train
    planted = planted_train(real, PLANTED)

    def interrupt_muon(cfg, resume=False, quiet=False, interrupt_after=None):
        if cfg.train.out.endswith("tiny/muon") and not resume:
            interrupt_after = 2
        return planted(cfg, resume=resume, quiet=quiet, interrupt_after=interrupt_after)

    monkeypatch.setattr(tinylm.train, "train", interrupt_muon)
    study = read_study(yaml.safe_load(TUNED), "tuned.yaml")
    flags = settings(stories, max_steps=4)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, ["tiny"], flags, tmp_path, quiet=True)
    finished = sorted(p.parent for p in tmp_path.rglob("summary.json") if summary(p.parent)["completed"])
    assert len(finished) == 7  # the base, its three trials, muon's three trials
    stamps = {p: (p / "summary.json").stat().st_mtime_ns for p in finished}

    monkeypatch.setattr(tinylm.train, "train", planted)
    run_study(study, ["tiny"], flags, tmp_path, quiet=True)
    assert {p: (p / "summary.json").stat().st_mtime_ns for p in finished} == stamps
    assert summary(tmp_path / "tiny" / "muon")["completed"] and summary(tmp_path / "tiny" / "muon")["steps"] == 4

    other = read_study(yaml.safe_load(TUNED.replace("[0.5, 1, 2]", "[1, 2]")), "tuned.yaml")
    with pytest.raises(UserError, match="was started with other settings"):
        run_study(other, ["tiny"], flags, tmp_path, quiet=True)
    with pytest.raises(UserError, match="was started with other settings"):
        run_study(study, ["tiny"], settings(stories, max_steps=4, lr=2e-3), tmp_path, quiet=True)
    (tmp_path / STUDY_FILE).unlink()  # an OUT from before study.json: its finished runs say it
    with pytest.raises(UserError, match=r"trials/tiny/base-lr0.5 was started with other settings"):
        run_study(study, ["tiny"], settings(stories, max_steps=4, lr=2e-3), tmp_path, quiet=True)


def test_a_study_stopped_in_an_lr_trial_and_a_full_run_ends_as_an_uninterrupted_one(stories, tmp_path, monkeypatch):
    from tinylm.metrics import read_metrics

    study, flags = read_study(yaml.safe_load(TUNED), "tuned.yaml"), settings(stories, max_steps=4)
    run_study(study, ["tiny"], flags, tmp_path / "whole", quiet=True)
    real = tinylm.train.train

    def interrupt_once(cfg, resume=False, quiet=False, interrupt_after=None):
        if cfg.train.out.endswith(("trials/tiny/base-lr2", "tiny/muon")) and not resume:
            interrupt_after = 1
        return real(cfg, resume=resume, quiet=quiet, interrupt_after=interrupt_after)

    monkeypatch.setattr(tinylm.train, "train", interrupt_once)
    for _ in range(2):  # stopped in base's last trial, then in muon's full run
        with pytest.raises(KeyboardInterrupt):
            run_study(study, ["tiny"], flags, tmp_path / "split", quiet=True)
    run_study(study, ["tiny"], flags, tmp_path / "split", quiet=True)
    runs = sorted(p.parent.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("summary.json"))
    assert len(runs) == 8  # two arms, each three trials and a full run
    for run in runs:
        split, whole = ([{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_metrics(tmp_path / d / run)]
                        for d in ("split", "whole"))  # fmt: skip
        assert split == whole, run
    chosen = [json.loads((tmp_path / d / STUDY_FILE).read_text())["arms"] for d in ("split", "whole")]
    assert [a["lr_factor"] for a in chosen[0]] == [a["lr_factor"] for a in chosen[1]]


def test_a_study_rerun_with_its_folder_spelt_otherwise_skips_its_finished_runs(stories, tmp_path, monkeypatch):
    # The run folder is bookkeeping (a resume may spell it otherwise, and `tinylm train --resume /abs/RUN`
    # writes that spelling into config.json): the same study from an absolute --out was refused as "other settings".
    monkeypatch.chdir(tmp_path)
    study = read_study(yaml.safe_load(TWO_ARMS), "pair.yaml")
    run_study(study, ["tiny"], settings(stories), Path("abl"), quiet=True)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "abl").rglob("summary.json")}
    assert len(stamps) == 2
    run_study(study, ["tiny"], settings(stories), tmp_path / "abl", quiet=True)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "abl").rglob("summary.json")} == stamps
    with pytest.raises(UserError, match="was started with other settings"):  # a real difference still is
        run_study(study, ["tiny"], settings(stories, lr=2e-3), tmp_path / "abl", quiet=True)


def test_study_json_and_the_summary_block(stories, tmp_path):
    study = read_study(yaml.safe_load(TWO_ARMS), "pair.yaml")
    run_study(study, ["tiny"], settings(stories), tmp_path, select_arms(study, "qk"), seeds=2, quiet=True)
    first = json.loads((tmp_path / STUDY_FILE).read_text())
    assert [a["name"] for a in first["arms"]] == ["qk"]
    run_study(study, ["tiny"], settings(stories), tmp_path, select_arms(study, "base"), seeds=2, quiet=True)
    manifest = json.loads((tmp_path / STUDY_FILE).read_text())
    assert {k: manifest[k] for k in ("study", "mode", "rank_by", "seeds", "budget", "lr_tune", "lr_tune_share",
                                     "presets")} == {"study": "pair", "mode": "each", "rank_by": "val_loss_doc",
                                                     "seeds": 2, "budget": {"steps": 2}, "lr_tune": None,
                                                     "lr_tune_share": 0.2, "presets": ["tiny"]}  # fmt: skip
    base, qk = manifest["arms"]  # in the study's order, merged across the two commands
    assert (base["name"], base["compare_to"], base["change"]) == ("base", None, {})
    assert (qk["name"], qk["compare_to"], qk["change"], qk["note"]) == ("qk", "base", {"qk_norm": True},
                                                                        "normalised queries and keys")  # fmt: skip
    assert qk["key_change"] == "qk_norm on" and qk["trials"] == {} and qk["lr"] == {"tiny": 3e-3}
    assert qk["runs"] == {"tiny": ["tiny/qk-seed0", "tiny/qk-seed1"]}
    assert qk["budget"]["tiny"]["steps"] == 2 and qk["budget"]["tiny"]["tokens"] == 2 * 2 * 64
    for path in qk["runs"]["tiny"]:
        assert summary(tmp_path / path)["study"] == {"name": "pair", "arm": "qk", "lr_factor": None, "trial": False}


def test_two_commands_writing_one_study_json_at_once_keep_each_others_arms_and_presets(tmp_path):
    """`--phases base` and `--phases qk` (or two presets) started together into one OUT: each writes
    study.json as it goes, and neither write may drop what the other recorded."""
    from tinylm.study.manifest import Manifest, read_manifest

    study = read_study(yaml.safe_load(TWO_ARMS), "pair.yaml")
    base, qk = study.arms
    flags = {"train": {"max_steps": 2}}
    plans = [Plan(study, presets, flags, tmp_path, arms, seeds=1)
             for presets, arms in ((["tiny"], [base]), (["tiny"], [qk]), (["basic"], [qk]))]  # fmt: skip
    manifests = [Manifest(plan) for plan in plans]  # all started before any wrote
    for manifest, plan in zip(manifests, plans):
        arm, preset_name = plan.arms[0], plan.presets[0]
        manifest.set(arm, "runs", preset_name, [manifest.relative(plan.run_dir(preset_name, arm, 0))])
        manifest.write()
    manifests[0].set(base, "lr", "tiny", 1e-3)
    manifests[0].write()  # the first writes again, last
    data = read_manifest(tmp_path)
    runs = {a["name"]: a["runs"] for a in data["arms"]}
    assert runs == {"base": {"tiny": ["tiny/base"]}, "qk": {"tiny": ["tiny/qk"], "basic": ["basic/qk"]}}
    assert data["presets"] == ["tiny", "basic"] and data["arms"][0]["lr"] == {"tiny": 1e-3}


def test_ablate_study_end_to_end(stories, tmp_path):
    from conftest import TINY_CLI_FLAGS

    study = write(tmp_path, TWO_ARMS)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "tinylm", "ablate", "--study", str(study), *TINY_CLI_FLAGS,
                           "--data", str(stories), "--max-steps", "2", "--eval-every", "2", "--seeds", "2",
                           "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    runs = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("summary.json"))
    assert runs == ["tiny/base-seed0", "tiny/base-seed1", "tiny/qk-seed0", "tiny/qk-seed1"]
    configs = {r: json.loads((out / r / "config.json").read_text()) for r in runs}
    assert [c["model"]["qk_norm"] for c in configs.values()] == [False, False, True, True]
    assert [c["train"]["seed"] for c in configs.values()] == [1337, 1338, 1337, 1338]
    assert {c["train"]["schedule"] for c in configs.values()} == {"cosine"}  # the study's base
    assert json.loads((out / STUDY_FILE).read_text())["arms"][1]["runs"] == {"tiny": runs[2:]}
    assert (out / "report.md").exists() and "report written to" in done.stdout


# --- the plan's arithmetic, without training -------------------------------------------------------


def plan_of(text: str, tmp_path, **train) -> Plan:
    """A Plan on tiny with the GPT-2 tokenizer (no data to prepare) and these training flags."""
    study = read_study(yaml.safe_load(text), "s.yaml")
    return Plan(study, ["tiny"], {"train": {"device": "cpu", "batch_size": 2, **train}}, tmp_path, study.arms, seeds=1)


def test_a_flag_on_what_a_step_changes_is_named_as_typed(tmp_path):
    from tinylm.study.plan import check_flags

    study = read_study(yaml.safe_load(TWO_ARMS), "s.yaml")
    check_flags(study, {"train": {"lr": 1e-3}, "model": {"n_layer": 3}})  # the base's settings may change
    with pytest.raises(UserError) as refused:
        check_flags(study, {"model": {"qk_norm": False}})
    assert str(refused.value) == (
        "--qk-norm is what step qk of study pair changes (qk_norm on); edit a copy of the study instead"
    )


def test_an_lr_trial_is_its_run_at_the_factor_on_a_share_of_each_budget(tmp_path):
    from tinylm.config import RunConfig, TrainConfig, preset
    from tinylm.study.plan import trial_config

    model = preset("tiny")
    for budget, share, expected in [
        ({"max_steps": 10}, 0.25, {"max_steps": 2}),  # floor(2.5)
        ({"max_steps": 10}, 0.05, {"max_steps": 1}),  # at least one step
        ({"max_tokens": 1000}, 0.25, {"max_tokens": 250}),
        ({"max_tokens": 1000}, 0.0007, {"max_tokens": 1}),  # at least one token
        ({"max_time": 60.0}, 0.25, {"max_time": 15.0}),
    ]:
        cfg = RunConfig(model=model, train=TrainConfig(lr=2e-3, muon_lr=0.02, **budget), preset="tiny")
        trial = trial_config(cfg, 3.0, share, tmp_path / "trial")
        got = {k: getattr(trial.train, k) for k in ("max_steps", "max_tokens", "max_time")}
        assert got == {"max_steps": None, "max_tokens": None, "max_time": None, **expected}, budget
        assert trial.train.lr == pytest.approx(6e-3) and trial.train.muon_lr == 0.02  # AdamW: Muon's LR unused
        assert trial.train.out == str(tmp_path / "trial") and cfg.train.out != trial.train.out
        assert trial.model == model and trial.preset == "tiny"
    muon = RunConfig(model=model, train=TrainConfig(lr=2e-3, optimizer="muon", muon_lr=0.02, max_steps=10))
    assert trial_config(muon, 0.5, 0.5, tmp_path).train.muon_lr == pytest.approx(0.01)  # Muon moves most weights


def test_an_arms_budget_counts_steps_token_slots_and_flops(tmp_path):
    per_step = 2 * 64  # batch x block (one process, no accumulation)
    fpt = model_costs(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).flops_per_token_train
    for flags, steps in [({"max_tokens": 1000}, 8), ({"max_steps": 5, "max_tokens": 1000}, 5), ({"max_steps": 9}, 9)]:
        plan = plan_of(TWO_ARMS, tmp_path, **flags)
        budget = plan.arm_budget(plan.config("tiny", plan.arms[1], 0))
        assert budget == {"steps": steps, "tokens": steps * per_step, "flops_per_token": fpt,
                          "flops": fpt * steps * per_step}, flags  # fmt: skip
    plan = plan_of(TWO_ARMS, tmp_path, max_time=30.0)
    budget = plan.arm_budget(plan.config("tiny", plan.arms[1], 0))
    assert budget == {"steps": None, "tokens": None, "flops_per_token": fpt, "flops": None}  # a time budget


def test_a_flops_budget_of_exactly_one_step_trains_one_step(tmp_path):
    fpt = model_costs(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).flops_per_token_train
    one_step = fpt * 2 * 64
    for flops, steps in [(one_step, 1), (2.5 * one_step, 2)]:
        plan = plan_of(TWO_ARMS + f"budget: {{flops: {flops!r}}}\n", tmp_path)
        assert plan.config("tiny", plan.arms[0], 0).train.max_steps == steps
    plan = plan_of(TWO_ARMS + f"budget: {{flops: {0.99 * one_step!r}}}\n", tmp_path)
    with pytest.raises(UserError, match="less than one step"):
        plan.config("tiny", plan.arms[0], 0)


@pytest.mark.parametrize("device, cuda, tokens", [("cpu", True, 250_000), ("auto", False, 250_000),
                                                  ("cuda", False, 250_000), ("auto", True, 20_000_000)])  # fmt: skip
def test_without_a_budget_one_preset_gets_the_documented_default_for_its_device(tmp_path, monkeypatch, device, cuda,
                                                                                 tokens):  # fmt: skip
    # docs/studies.md: on a GPU 20M token slots for basic, on a CPU-only machine 250k.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    study = read_study(yaml.safe_load(TWO_ARMS.replace("preset: tiny", "preset: basic")), "s.yaml")
    plan = Plan(study, ["basic"], {"train": {"device": device}}, tmp_path, study.arms, seeds=1)
    assert plan.budget == {"tokens": tokens}
    assert plan.config("basic", study.arms[0], 0).train.max_tokens == tokens
    on_base = read_study(yaml.safe_load(TWO_ARMS.replace("{preset: tiny", f"{{preset: basic, device: {device}")), "s")
    assert Plan(on_base, ["basic"], {}, tmp_path, on_base.arms, seeds=1).budget == {"tokens": tokens}  # the study's
    bare_text = TWO_ARMS.replace("base: {preset: tiny, schedule: cosine}", "base: {preset: basic}")
    bare = read_study(yaml.safe_load(bare_text), "s.yaml")  # no training settings at all: device auto
    default = 20_000_000 if cuda else 250_000
    assert Plan(bare, ["basic"], {}, tmp_path, bare.arms, seeds=1).budget == {"tokens": default}
    with pytest.raises(
        UserError, match=r"^give a budget \(--max-tokens, --max-steps or --max-time\) when ablating several presets$"
    ):
        Plan(study, ["tiny", "basic"], {"train": {"device": device}}, tmp_path, study.arms, seeds=1)
    budgeted = read_study(yaml.safe_load(TWO_ARMS + "budget: {tokens: 5000}\n"), "s.yaml")
    assert Plan(budgeted, ["tiny", "basic"], {}, tmp_path, budgeted.arms, seeds=1).budget == {"tokens": 5000}


def test_run_folders_by_seed_and_seed_0_keeps_the_folder_it_has(tmp_path):
    # A study grown from one seed to two (or back) finds seed 0's finished run where it is.
    study = read_study(yaml.safe_load(TWO_ARMS), "s.yaml")
    qk = study.arms[1]
    one, two = (Plan(study, ["tiny"], {}, tmp_path, study.arms, seeds=n) for n in (1, 2))
    assert one.run_dir("tiny", qk, 0) == tmp_path / "tiny" / "qk"
    assert [two.run_dir("tiny", qk, k) for k in (0, 1)] == [
        tmp_path / "tiny" / "qk-seed0",
        tmp_path / "tiny" / "qk-seed1",
    ]
    (tmp_path / "tiny" / "qk").mkdir(parents=True)
    assert two.run_dir("tiny", qk, 0) == tmp_path / "tiny" / "qk-seed0"  # a folder without a run is not one
    (tmp_path / "tiny" / "qk" / "config.json").write_text("{}")
    assert two.run_dir("tiny", qk, 0) == tmp_path / "tiny" / "qk" and two.run_dir("tiny", qk, 1).name == "qk-seed1"
    (tmp_path / "tiny" / "base-seed0").mkdir()
    (tmp_path / "tiny" / "base-seed0" / "config.json").write_text("{}")
    assert one.run_dir("tiny", study.arms[0], 0) == tmp_path / "tiny" / "base-seed0"
    assert one.config("tiny", study.arms[0], 0).train.out == str(tmp_path / "tiny" / "base-seed0")
    assert one.trial_dir("tiny", qk, 0.5) == tmp_path / "trials" / "tiny" / "qk-lr0.5"
    assert one.trial_dir("tiny", qk, 2.0) == tmp_path / "trials" / "tiny" / "qk-lr2"


def test_doc_mask_follows_packing_unless_the_arm_sets_it(tmp_path):
    # A doc_mask of the flags applies to the arms that pack (packed is the default batching); an arm that
    # sets doc_mask itself keeps it, so one that asks for it with padded batching is refused, not changed.
    text = """
name: m
base: {preset: tiny}
mode: each
steps:
  - {name: padded, change: {batching: padded}}
  - {name: masked, change: {batching: padded, doc_mask: true}}
"""
    plan = plan_of(text, tmp_path, max_steps=5, doc_mask=True)
    base, padded, masked = plan.arms
    assert plan.config("tiny", base, 0).train.doc_mask  # packed by default: the flag applies
    assert not plan.config("tiny", padded, 0).train.doc_mask
    with pytest.raises(UserError, match="^arm masked of study m on preset tiny: .*doc_mask.*packed"):
        plan.config("tiny", masked, 0)


def test_a_flops_budget_prepares_a_trained_bpe_once_and_quietly(stories, tmp_path, monkeypatch, capsys):
    # The FLOPs per token need the trained vocabulary's size before anything runs: the plan prepares the
    # data once for every arm, without the progress lines of a run's own preparing.
    import tinylm.data.prepare

    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))  # nothing prepared yet
    calls, real = [], tinylm.data.prepare.prepare
    monkeypatch.setattr(tinylm.data.prepare, "prepare", lambda *a, **k: calls.append(a) or real(*a, **k))
    study = read_study(yaml.safe_load(TWO_ARMS + "budget: {flops: 4e11}\n"), "s.yaml")
    flags = settings(stories, tokenizer="bpe:300")  # a size the stories support: no warning
    flags["train"].pop("max_steps")
    plan = Plan(study, ["tiny"], flags, tmp_path / "out", study.arms, seeds=1)
    capsys.readouterr()
    cfgs = [plan.config("tiny", arm, 0) for arm in study.arms]
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == ("", "") and len(calls) == 1
    assert plan.vocab_size(cfgs[1]) == real(*calls[0], quiet=True).meta["vocab_size"] == 300
