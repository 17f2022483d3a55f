"""Bad input is one line naming the file or field and what to do, exit code 2, nothing written or lost."""

import errno
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import TINY_CLI_FLAGS, tiny_config
from tinylm.cli import main
from tinylm.config import ModelConfig, RunConfig, TrainConfig
from tinylm.errors import UserError
from tinylm.metrics import read_metrics
from tinylm.train import train

TINY = TINY_CLI_FLAGS


@pytest.fixture(scope="module")
def finished(stories, tmp_path_factory):
    """A finished 4-step run (checkpoint at step 4); tests copy it before damaging anything."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(stories, out, max_steps=4, eval_every=2), quiet=True)
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI in-process: exit code 2 and one stderr line holding every fragment."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --- 1. a damaged config.json ----------------------------------------------------------

DAMAGED = {
    "empty": "",
    "torn": '{"model": {"n_layer": 2, "n_he',
    "not an object": "[1, 2]",
    "wrong type": None,  # filled in from the real file: lr is "fast"
}


def _damage(run_dir: Path, how: str) -> None:
    path = run_dir / "config.json"
    if how == "wrong type":
        raw = json.loads(path.read_text())
        raw["train"]["lr"] = "fast"
        path.write_text(json.dumps(raw))
    else:
        path.write_text(DAMAGED[how])


@pytest.mark.parametrize("how", list(DAMAGED))
@pytest.mark.parametrize("command", ["resume", "sample", "eval", "export", "report"])
def test_damaged_config_json_is_one_line_and_nothing_changes(run_copy, tmp_path, capsys, command, how):
    if command == "export":
        pytest.importorskip("transformers")
    _damage(run_copy, how)
    before = snapshot(run_copy)
    argv = {
        "resume": ["train", "--resume", run_copy, "--max-steps", 6, "--quiet"],
        "sample": ["sample", run_copy, "--max-new-tokens", 3],
        "eval": ["eval", run_copy],
        "export": ["export", run_copy, "--out", tmp_path / "hf"],
        "report": ["report", run_copy, "--out", tmp_path / "report" / "report.md"],
    }[command]
    err = refused(capsys, argv, str(run_copy / "config.json"))
    assert ("lr" in err) if how == "wrong type" else ("damaged" in err or "empty" in err)
    assert snapshot(run_copy) == before
    assert not (tmp_path / "hf").exists() and not (tmp_path / "report").exists()


def test_damaged_config_json_in_a_subprocess_has_no_traceback(run_copy):
    _damage(run_copy, "torn")
    done = subprocess.run([sys.executable, "-m", "tinylm", "sample", str(run_copy)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "config.json" in done.stderr


# --- 2. a torn last line in metrics.jsonl ----------------------------------------------


def test_torn_last_metrics_line_is_dropped_when_reading(run_copy):
    metrics = run_copy / "metrics.jsonl"
    whole = read_metrics(run_copy)
    metrics.write_text(metrics.read_text() + '{"step": 5, "tokens": 12')  # a kill inside the write
    assert read_metrics(run_copy) == whole


def test_damaged_metrics_line_before_the_end_names_its_line(run_copy):
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:10]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl line 2"):
        read_metrics(run_copy)


def test_report_and_plot_tolerate_a_torn_metrics_line(run_copy, tmp_path, capsys):
    metrics = run_copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "tra')
    assert main(["report", str(run_copy), "--out", str(tmp_path / "r" / "report.md")]) == 0
    assert main(["plot", str(run_copy), "--out", str(tmp_path / "runs.png")]) == 0


def test_resume_drops_a_torn_metrics_line(run_copy, capsys):
    metrics = run_copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "tra')
    assert main(["train", "--resume", str(run_copy), "--max-steps", "6", "--quiet"]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole again
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == list(range(1, 7))


# --- 3. an --out that cannot be created, found before the data is prepared ----------------


@pytest.fixture
def no_prepare(monkeypatch):
    def prepare(*args, **kwargs):
        raise AssertionError("the data was prepared before --out was checked")

    monkeypatch.setattr("tinylm.train.prepare_data", prepare)


def test_out_under_a_regular_file_is_refused_before_preparing(stories, tmp_path, capsys, no_prepare):
    blocker = tmp_path / "file.txt"
    blocker.write_text("mine")
    refused(capsys, ["train", *TINY, "--data", stories, "--out", blocker / "run"], "--out", str(blocker))
    assert blocker.read_text() == "mine"
    refused(capsys, ["train", *TINY, "--data", stories, "--out", blocker], "--out", "file")


def test_out_under_proc_is_refused_before_preparing(stories, capsys, no_prepare):
    refused(capsys, ["train", *TINY, "--data", stories, "--out", "/proc/tinylm-test/run"], "/proc/tinylm-test/run")


def test_out_on_a_read_only_file_system_is_refused_before_preparing(stories, tmp_path, capsys, monkeypatch, no_prepare):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(Path, "mkdir", read_only)
    refused(capsys, ["train", *TINY, "--data", stories, "--out", tmp_path / "run"], "Read-only file system")
    assert list(tmp_path.iterdir()) == []


def test_out_under_a_file_in_a_subprocess_has_no_traceback(stories, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("mine")
    cmd = [sys.executable, "-m", "tinylm", "train", *TINY, "--data", str(stories), "--out", str(blocker / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- 4. export --out pointing at a file ------------------------------------------------


def test_export_out_pointing_at_a_file_is_refused(finished, tmp_path, capsys):
    pytest.importorskip("transformers")
    target = tmp_path / "model.bin"
    target.write_text("mine")
    refused(capsys, ["export", finished, "--out", target], str(target), "file")
    assert target.read_text() == "mine"
    refused(capsys, ["export", finished, "--out", target / "hf"], str(target))


# --- 5. YAML and config.json values go through the same typed validation ----------------


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_numbers_pyyaml_reads_as_strings_are_the_numbers_users_mean(stories, tmp_path):
    from tinylm.cli import build_parser, resolve_config

    recipe = _recipe(tmp_path, f"preset: tiny\nlr: 1e-3\nmax_tokens: 2e6\nbeta2: 9.9e-1\ndata: {stories}\n")
    args = build_parser().parse_args(["train", "--config", str(recipe)])
    cfg = resolve_config(args)
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_tokens == 2_000_000 and isinstance(cfg.train.max_tokens, int)
    assert cfg.train.beta2 == 0.99


@pytest.mark.parametrize(
    "line, field",
    [
        ('lr: "fast"', "lr"),
        ('guard: "maybe"', "guard"),
        ("n_layer: 2.5", "n_layer"),
        ("max_steps: true", "max_steps"),
        ("schedule: linear", "schedule"),
        ("tokenizer: 5", "tokenizer"),
        ("train:\n  lr: .nan", "lr"),
        ("model: 3", "model"),
    ],
)
def test_yaml_value_of_the_wrong_type_names_the_file_and_field(stories, tmp_path, capsys, no_prepare, line, field):
    recipe = _recipe(tmp_path, f"preset: tiny\n{line}\n")
    refused(capsys, ["train", "--config", recipe, "--data", stories, "--out", tmp_path / "run"], str(recipe), field)
    assert not (tmp_path / "run").exists()


def test_a_flag_overriding_a_bad_yaml_value_does_not_blame_the_file(stories, tmp_path, capsys, no_prepare):
    recipe = _recipe(tmp_path, "preset: tiny\nmax_steps: 5\n")
    err = refused(capsys, ["train", "--config", recipe, "--max-steps", "0", "--data", stories], "max_steps")
    assert str(recipe) not in err


def test_config_json_values_are_validated_like_flags(tmp_path):
    good = RunConfig(model=ModelConfig(), train=TrainConfig(max_steps=3)).to_dict()
    good["train"]["lr"] = "1e-3"  # a hand-edited file: the number the user means
    assert RunConfig.from_dict(good).train.lr == 0.001
    good["train"]["guard"] = "maybe"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(good))
    with pytest.raises(UserError, match=r"config\.json.*guard"):
        RunConfig.load(path)


# --- 6. values accepted silently today ---------------------------------------------------


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--lr", "-0.001"),
        ("--max-steps", "0"),
        ("--max-tokens", "0"),
        ("--max-time", "0"),
        ("--max-time", "inf"),
        ("--batch-size", "-4"),
        ("--eval-every", "0"),
        ("--log-every", "0"),
        ("--eval-tokens", "0"),
        ("--val-fraction", "1.5"),
        ("--val-fraction", "0"),
        ("--beta1", "1"),
        ("--beta2", "-0.1"),
        ("--weight-decay", "-0.1"),
        ("--grad-clip", "nan"),
        ("--warmup-steps", "-1"),
        ("--decay-fraction", "1.5"),
        ("--seed", "-1"),
        ("--dropout", "nan"),
    ],
)
def test_invalid_values_are_refused_and_name_the_field(stories, tmp_path, capsys, no_prepare, flag, value):
    field = flag[2:].replace("-", "_")
    refused(capsys, ["train", *TINY, "--data", stories, "--out", tmp_path / "run", flag, value], field)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_zero_budget(run_copy, capsys):
    before = snapshot(run_copy)
    refused(capsys, ["train", "--resume", run_copy, "--max-steps", "0"], "max_steps")
    assert snapshot(run_copy) == before


def _edit_config(run_dir: Path, **train_settings) -> None:
    path = run_dir / "config.json"
    raw = json.loads(path.read_text())
    raw["train"].update(train_settings)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("setting, value", [("lr", 0.01), ("batch_size", 2), ("beta2", 0.5), ("optimizer", "muon")])
def test_resume_refuses_a_config_json_edited_since_its_checkpoint(run_copy, capsys, setting, value):
    # --resume refuses these as flags; an edit of config.json trained on silently (batch_size moved every
    # later step's rows, beta2 was overridden by the optimizer's saved state while config.json said 0.5)
    _edit_config(run_copy, **{setting: value})
    before = snapshot(run_copy)
    refused(capsys, ["train", "--resume", run_copy, "--max-steps", 6, "--quiet"], f"train.{setting}", "--out NEW_DIR")
    assert snapshot(run_copy) == before


def test_resume_of_a_muon_run_edited_to_adamw_is_one_line(stories, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(stories, run, max_steps=2, optimizer="muon"), quiet=True)
    _edit_config(run, optimizer="adamw")
    refused(capsys, ["train", "--resume", run, "--max-steps", 4, "--quiet"], "train.optimizer")
    # A checkpoint from before they kept their settings: torch's KeyError, worded
    from tinylm import checkpoint
    from tinylm.model import GPT
    from tinylm.optim import build_optimizer

    cfg = RunConfig.load(run / "config.json")
    model = GPT(cfg.model)
    with pytest.raises(UserError, match="optimizer state does not fit --optimizer"):
        checkpoint.load(run, model, build_optimizer(model, cfg.train, torch.device("cpu")))


def test_resume_takes_an_edited_budget_in_config_json(run_copy, capsys):
    _edit_config(run_copy, max_steps=6)
    assert main(["train", "--resume", str(run_copy), "--quiet"]) == 0, capsys.readouterr().err
    assert json.loads((run_copy / "summary.json").read_text())["steps"] == 6


def test_ablate_refuses_a_zero_budget(tmp_path, capsys):
    refused(capsys, ["ablate", "--preset", "tiny", "--max-steps", "0", "--out", tmp_path / "abl"], "max_steps")
    assert not (tmp_path / "abl").exists()


@pytest.mark.parametrize("command", ["ablate", "report", "plot", "eval"])
def test_other_outs_under_a_file_are_refused_before_any_work(finished, tmp_path, capsys, command):
    blocker = tmp_path / "file.txt"
    blocker.write_text("mine")
    argv = {
        "ablate": ["ablate", "--preset", "tiny", "--max-steps", 2, "--out", blocker / "abl"],
        "report": ["report", finished, "--out", blocker / "report.md"],
        "plot": ["plot", finished, "--out", blocker / "runs.png"],
        "eval": ["eval", finished, "--out", blocker / "eval.json"],
    }[command]
    refused(capsys, argv, "--out", str(blocker))
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("text", ["lr: [1\nx", None])
def test_unparsable_or_unreadable_yaml_is_one_line(stories, tmp_path, capsys, text):
    recipe = _recipe(tmp_path, text) if text is not None else tmp_path  # None: a folder given as --config
    refused(capsys, ["train", "--config", recipe, "--data", stories, "--out", tmp_path / "run"], str(recipe))


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--repeats", "0"],
        ["bench", "--batch-size", "0"],
        ["train", "--nproc-per-node", "0"],
        ["sample", "RUN", "--max-new-tokens", "-3"],
        ["eval", "RUN", "--eval-tokens", "0"],
    ],
)
def test_counts_below_their_minimum_are_refused_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be at least" in err[0], err


def test_prepare_out_that_cannot_be_created_is_refused_before_tokenising(stories, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["prepare", "--data", str(stories), "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_damaged_trained_tokenizer_is_one_line(stories, tmp_path, capsys):
    from tinylm.data.tokenizer import BPETokenizer

    (tmp_path / BPETokenizer.FILE).write_text('{"version": "1.0", "truncated')
    with pytest.raises(UserError, match="tokenizer.json is damaged"):
        BPETokenizer.load(tmp_path, "bpe:512")


def test_a_summary_without_the_figures_is_one_line_in_report(stories, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(stories, run, max_steps=1, eval_every=1), quiet=True)
    (run / "summary.json").write_text('{"completed": true}')
    assert main(["report", str(run), "--out", str(tmp_path / "report.md")]) == 2
