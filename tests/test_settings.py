"""Settings from flags, YAML and config.json: one merge and one unknown-key check for any nesting."""

import argparse
import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tinylm.cli import build_parser, main, resolve_config
from tinylm.cli.flags import add_settings_flags, flag_help, given_settings
from tinylm.cli.settings import resume_config
from tinylm.config import ModelConfig, RunConfig, TrainConfig
from tinylm.errors import UserError
from tinylm.fields import ConfigError, build, field_docs, from_mapping, merge, nest, read_fields

# --- a made-up config with a section inside a section, as the study files will have -------


@dataclass
class Deep:
    rate: float = 0.5
    """How fast."""
    label: str = "x"

    def __post_init__(self) -> None:
        read_fields(self)
        if self.rate < 0:
            raise ConfigError("rate", "must be at least 0")


@dataclass
class Middle:
    steps: int = 1
    """How many."""
    deep: Deep = field(default_factory=Deep)

    def __post_init__(self) -> None:
        read_fields(self)


@dataclass
class Outer:
    middle: Middle = field(default_factory=Middle)
    name: str | None = None


def test_flat_and_sectioned_keys_reach_the_same_nested_field():
    flat = nest(Outer, {"rate": "1e-3", "steps": 4, "name": "a"})
    sectioned = nest(Outer, {"middle": {"steps": 4, "deep": {"rate": "1e-3"}}, "name": "a"})
    assert flat == sectioned == {"middle": {"steps": 4, "deep": {"rate": "1e-3"}}, "name": "a"}
    built = build(Outer, flat)
    assert built.middle.deep.rate == 0.001 and built.middle.steps == 4 and built.middle.deep.label == "x"


def test_layers_merge_section_by_section_later_wins():
    base = {"middle": {"steps": 1, "deep": {"rate": 0.1, "label": "base"}}}
    recipe = nest(Outer, {"rate": 0.2})
    flags = {"middle": {"deep": {"label": "flag"}}}
    merged = merge(base, recipe, flags)
    assert merged == {"middle": {"steps": 1, "deep": {"rate": 0.2, "label": "flag"}}}


def test_unknown_keys_are_refused_at_any_depth_naming_the_source():
    for raw, where in (({"speed": 1}, ""), ({"middle": {"deep": {"speed": 1}}}, "middle.deep ")):
        with pytest.raises(UserError, match=rf"^recipe\.yaml: unknown {where}setting\(s\): speed$"):
            nest(Outer, raw, "recipe.yaml")
    with pytest.raises(UserError, match="middle must be a mapping"):
        nest(Outer, {"middle": 3})


def test_a_bad_nested_value_carries_its_dotted_path():
    with pytest.raises(ConfigError) as caught:
        from_mapping(Outer, {"rate": -1})
    assert caught.value.path == "middle.deep.rate" and caught.value.field == "rate"
    with pytest.raises(ConfigError, match="steps must be a whole number"):
        from_mapping(Outer, {"steps": 2.5})


def test_flags_for_a_nested_section_are_flat_and_come_back_nested():
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, Middle, "middle", "middle.")
    args = parser.parse_args(["--steps", "3", "--rate", "2e-1"])
    assert given_settings(args) == {"middle": {"steps": 3, "deep": {"rate": 0.2}}}
    assert "How fast." in parser.format_help()


# --- the real settings ----------------------------------------------------------------


def test_flat_and_sectioned_recipes_resolve_alike(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("preset: tiny\nn_layer: 1\nlr: 2e-3\nmax_steps: 3\n")
    sectioned = tmp_path / "sectioned.yaml"
    sectioned.write_text("preset: tiny\nmodel:\n  n_layer: 1\ntrain:\n  lr: 2e-3\n  max_steps: 3\n")
    configs = [resolve_config(build_parser().parse_args(["train", "--config", str(p)])) for p in (flat, sectioned)]
    assert configs[0] == configs[1]
    assert configs[0].model.n_layer == 1 and configs[0].model.n_embd == 32 and configs[0].train.lr == 0.002


def test_precedence_preset_then_yaml_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: tiny\nn_embd: 96\nbatch_size: 3\n")
    args = build_parser().parse_args(["train", "--config", str(recipe), "--preset", "mid", "--batch-size", "5"])
    cfg = resolve_config(args)
    assert cfg.preset == "mid" and cfg.model.n_layer == 6 and cfg.model.n_embd == 96 and cfg.train.batch_size == 5
    assert cfg.train.max_steps == 200  # no budget given: the default one


def test_unknown_yaml_key_is_one_line_naming_file_and_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    for text in ("preset: tiny\nlearning_rate: 1\n", "train:\n  learning_rate: 1\n"):
        recipe.write_text(text)
        assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(recipe) in err[0] and "learning_rate" in err[0], err
    assert not (tmp_path / "run").exists()


def test_unknown_config_json_key_is_refused():
    raw = RunConfig(train=TrainConfig(max_steps=3)).to_dict()
    raw["train"]["learning_rate"] = 1
    with pytest.raises(UserError, match="learning_rate"):
        RunConfig.from_dict(raw)


@pytest.mark.parametrize(
    "flag, value, shown",
    [("--lr", "fast", "--lr"), ("--batching", "loose", "--batching"), ("--n-layer", "2.5", "--n-layer")],
)
def test_a_flag_of_the_wrong_type_is_one_line_naming_it(capsys, flag, value, shown):
    with pytest.raises(SystemExit) as stop:
        main(["train", flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shown in err[0], err


def test_resume_takes_only_budget_device_compile_and_tracker(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    RunConfig(model=ModelConfig(n_layer=2, n_head=2, n_embd=32), train=TrainConfig(max_steps=4, out="elsewhere")).save(
        run / "config.json"
    )
    parse = build_parser().parse_args
    cfg = resume_config(parse(["train", "--resume", str(run), "--max-steps", "9", "--compile", "--tracker", "mlflow"]))
    assert cfg.train.max_steps == 9 and cfg.train.compile and cfg.train.out == str(run) and cfg.model.n_layer == 2
    assert cfg.train.tracker == "mlflow"  # where a copy of the metrics goes: not a setting of the mathematics
    # --host-read-every too: it moves a guarded run's roll-backs (config.py)
    for extra in (["--n-layer", "3"], ["--lr", "0.1"], ["--preset", "tiny"], ["--host-read-every", "4"]):
        with pytest.raises(UserError, match="with --resume only"):
            resume_config(parse(["train", "--resume", str(run), *extra]))


def test_train_help_lists_every_field_with_its_documentation():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    for kind in (ModelConfig, TrainConfig):
        docs = field_docs(kind)
        for f in dataclasses.fields(kind):
            assert "--" + f.name.replace("_", "-") in text
            if f.name in docs:
                assert flag_help(docs[f.name]) in text, f.name


def test_python_m_tinylm_cli_still_runs():
    done = subprocess.run([sys.executable, "-m", "tinylm.cli", "info", "--preset", "tiny"], capture_output=True,
                          text=True, cwd=Path(__file__).parent)  # fmt: skip
    assert done.returncode == 0 and "preset tiny" in done.stdout, done.stderr


@pytest.mark.parametrize("text", ["lr: {a: 1}\n", "preset: [tiny]\n", "preset: {a: 1}\n"])
def test_a_mapping_or_list_where_a_value_belongs_is_one_line_naming_the_recipe(tmp_path, capsys, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(recipe) in err[0], err
