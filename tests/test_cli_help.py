"""The command line without surprises: every option documented with its default, one spelling of a
boolean, no option taken for another, `tinylm` and `tinylm --version`, and files written where asked.

The walks below cover every command and option there is, so one added later without help or
without its default shown fails here."""

import argparse
import dataclasses
import importlib.metadata
import typing

import pytest

from test_report import make_run
from tinylm.cli import build_parser, main, resolve_config
from tinylm.cli.flags import Refused, Switch
from tinylm.config import RunConfig
from tinylm.fields import base_type, sections


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def every_parser() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    return {"tinylm": top, **{f"tinylm {name}": p for name, p in commands(top).items()}}


def help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's help exactly as --help prints it (defaults and %(...)s filled in)."""
    return parser._get_formatter()._expand_help(action)


def options_missing_help_or_default(parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    no_help, no_default = [], []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, Refused)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if isinstance(action, argparse._SubParsersAction):
            no_help += [f"{c.dest}" for c in action._choices_actions if not c.help]
            continue
        if not action.help or action.help == argparse.SUPPRESS:
            no_help.append(name)
        elif action.option_strings and not action.required and "default" not in help_of(parser, action).lower():
            no_default.append(name)
    return no_help, no_default


@pytest.mark.parametrize("command", list(every_parser()))
def test_every_option_has_help_that_shows_its_default(command):
    no_help, no_default = options_missing_help_or_default(every_parser()[command])
    assert not no_help, f"{command}: options without help: {no_help}"
    assert not no_default, f"{command}: options whose help shows no default: {no_default}"


def test_an_option_without_help_or_default_is_caught():
    parser = build_parser()
    train = commands(parser)["train"]
    train.add_argument("--undocumented")
    train.add_argument("--no-default-said", help="something")
    train.add_argument("--default-shown", type=int, default=3, help="something")
    assert options_missing_help_or_default(train) == (["--undocumented"], ["--no-default-said"])


def test_a_preset_dependent_default_is_shown_per_preset():
    text = " ".join(commands(build_parser())["train"].format_help().split())
    assert "--n-layer N_LAYER Number of transformer blocks. (default: the preset's: basic 4, mid 6, quality 12" in text
    assert "(default: --no-qk-norm)" in text and "(default: --guard)" in text


def test_ablate_help_names_the_budget_a_study_gets_without_flags():
    """ablate's runs never get 'none' or train's 200 steps: the study's budget, else a per-device default."""
    text = " ".join(commands(build_parser())["ablate"].format_help().split())
    assert "--max-tokens MAX_TOKENS Token slots to train (steps x batch size x accumulation x block size). " \
        "(default: the study's budget, else token slots per run fit for the device and preset" in text


def test_refused_options_are_hidden_and_only_those():
    for command, parser in every_parser().items():
        for action in parser._actions:
            hidden = action.help == argparse.SUPPRESS
            assert hidden == isinstance(action, Refused), (command, action.option_strings)


def test_no_help_speaks_of_this_projects_machines_or_history():
    for command, parser in every_parser().items():
        text = " ".join(parser.format_help().split()).lower()
        for phrase in ("this project", "2-core", "see readme", "gpt2lmheadmodel directory", "(learned positions)",
                       "../shared", "/work/", "``"):  # fmt: skip
            assert phrase not in text, (command, phrase)


# --- one boolean style: --flag / --no-flag --------------------------------------------------------


def test_every_boolean_option_is_a_switch():
    for command, parser in every_parser().items():
        for action in parser._actions:
            name = "/".join(action.option_strings)
            assert not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)), (command, name)
            assert action.metavar != "on|off" and set(action.choices or ()) != {"on", "off"}, (command, name)


def boolean_fields(kind: type, prefix: str = "") -> list[str]:
    hints, parts, out = typing.get_type_hints(kind), sections(kind), []
    for f in dataclasses.fields(kind):
        if f.name in parts:
            out += boolean_fields(parts[f.name], f"{prefix}{f.name}.")
        elif base_type(hints[f.name]) is bool:
            out.append(prefix + f.name)
    return out


def test_every_boolean_setting_is_a_switch_wherever_it_is_a_flag():
    fields = set(boolean_fields(RunConfig))
    assert {"model.qk_norm", "train.guard", "train.compile"} <= fields
    seen = set()
    for command, parser in every_parser().items():
        for action in parser._actions:
            if action.dest in fields:
                seen.add(action.dest)
                assert isinstance(action, Switch), (command, action.dest)
    assert seen == fields


def test_switches_set_settings_both_ways():
    args = build_parser().parse_args(["train", "--no-guard", "--compile", "--doc-mask", "--no-bias", "--quiet"])
    cfg = resolve_config(args)
    assert cfg.train.guard is False and cfg.train.compile is True and cfg.train.doc_mask is True
    assert cfg.model.bias is False and args.quiet is True
    assert resolve_config(build_parser().parse_args(["train"])).train.guard is True


@pytest.mark.parametrize(
    "argv, wanted",
    [
        (["train", "--qk-norm", "on"], "write --qk-norm instead of '--qk-norm on'"),
        (["train", "--guard", "off"], "write --no-guard instead of '--guard off'"),
        (["ablate", "--out", "x", "--bias", "false"], "write --no-bias"),
        (["train", "--doc-mask=true"], "write --doc-mask instead"),
        (["train", "--compile=maybe"], "write --compile or --no-compile"),
        (["bench", "--memory", "no"], "write --no-memory"),
        (["info", "--json", "1"], "write --json"),
    ],
)
def test_the_older_on_off_spelling_is_one_line_naming_the_switch(capsys, argv, wanted):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and wanted in err[0], err


def test_a_value_after_a_switch_that_is_no_boolean_is_left_alone(tmp_path):
    args = build_parser().parse_args(["sample", "--no-stop", str(tmp_path)])
    assert args.stop is False and args.run_dir == str(tmp_path)


# --- no option taken for another -----------------------------------------------------------------


def test_ablate_refuses_seed_naming_first_seed_and_seeds(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["ablate", "--out", "x", "--seed", "3"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--first-seed" in err[0] and "--seeds" in err[0], err


def test_ablate_first_seed_and_seeds_are_two_settings():
    args = build_parser().parse_args(["ablate", "--out", "x", "--first-seed", "5", "--seeds", "2"])
    assert vars(args)["train.seed"] == 5 and args.seeds == 2


@pytest.mark.parametrize("argv", [["train", "--max-step", "5"], ["ablate", "--out", "x", "--first", "3"]])
def test_a_prefix_of_an_option_is_not_that_option(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


# --- tinylm and tinylm --version -----------------------------------------------------------------


def test_bare_tinylm_lists_the_commands_without_an_error(capsys):
    assert main([]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for name in commands(build_parser()):
        assert f"\n    {name}" in out, name


def test_version_is_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"tinylm {importlib.metadata.version('tinylm')}"


# --- report and plot write beside the runs, or where --out says ----------------------------------


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working folder, apart from the runs."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def test_report_goes_into_the_study_folder_not_the_working_one(tmp_path, work, capsys):
    study = tmp_path / "study"
    make_run(study, "baseline", phase="baseline", best=7.0)
    make_run(study, "packed")
    assert main(["report", str(study)]) == 0, capsys.readouterr().err
    assert (study / "report.md").exists() and (study / "results.csv").exists()
    assert list(work.iterdir()) == []


def test_plot_goes_into_the_folder_holding_the_runs(tmp_path, work, capsys):
    one = make_run(tmp_path / "study", "baseline", phase="baseline", best=7.0)
    two = make_run(tmp_path / "study", "packed")
    assert main(["plot", str(one), str(two)]) == 0, capsys.readouterr().err
    assert (one.parent / "runs.png").exists()
    assert main(["plot", str(one)]) == 0
    assert (one / "runs.png").exists()
    assert list(work.iterdir()) == []


def test_report_and_plot_write_where_out_says(tmp_path, work, capsys):
    run = make_run(tmp_path / "study", "packed")
    assert main(["report", str(run), "--out", str(tmp_path / "elsewhere" / "r.md")]) == 0
    assert main(["plot", str(run), "--out", "here.png"]) == 0, capsys.readouterr().err
    assert (tmp_path / "elsewhere" / "r.md").exists() and (work / "here.png").exists()


def test_runs_sharing_only_the_working_folder_need_out(work, capsys):
    make_run(work, "baseline", preset="basic")
    make_run(work, "packed", preset="basic")
    make_run(work, "packed", preset="mid")
    assert main(["plot", "basic/baseline", "basic/packed"]) == 0  # their folder, basic/, is not the working one
    assert (work / "basic" / "runs.png").exists()
    assert main(["plot", "basic/packed", "mid/packed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0], err
    assert not (work / "runs.png").exists()
