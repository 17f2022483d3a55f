"""Experiment trackers (--tracker): TensorBoard, Weights & Biases offline, an MLflow file store; a study's
runs tagged by study, arm, preset and seed; a failing tracker never costs the run; resume may switch it."""

import json
import struct

import pytest
import yaml

from conftest import tiny_config
from tinylm import tracking
from tinylm.cli import main
from tinylm.cli.flags import Parser
from tinylm.cli.settings import resolve_config
from tinylm.config import RunConfig
from tinylm.rundir import read_metrics, read_summary
from tinylm.study.runner import run_study
from tinylm.study.spec import read_study
from tinylm.train import train

PAIR = """
name: pair
base: {preset: tiny, schedule: cosine}
mode: each
steps:
  - {name: qk, change: {qk_norm: true}}
"""


def settings(stories, **train) -> dict:
    """The flags of a tiny, quick study run."""
    values = dict(data=str(stories), tokenizer="bpe:512", batch_size=2, eval_every=2, eval_tokens=256, lr=3e-3,
                  device="cpu", max_steps=3)  # fmt: skip
    return {"train": {**values, **train}}


def val_losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and "event" not in r]


# --- MLflow ------------------------------------------------------------------------------


@pytest.fixture
def mlflow(monkeypatch):
    module = pytest.importorskip("mlflow")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what tinylm sets for its own file store, undone after
    return module


def mlflow_runs(mlflow, store, monkeypatch, experiment: str):
    """The experiment's runs as flat rows (``tags.arm``, ``metrics.val_loss``, ...); as a list, since
    search_runs' default DataFrame needs pandas, which mlflow-skinny does not install."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return [{"run_id": r.info.run_id, "status": r.info.status, **{f"tags.{k}": v for k, v in r.data.tags.items()},
             **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
             **{f"params.{k}": v for k, v in r.data.params.items()}} for r in runs]  # fmt: skip


def test_a_tiny_study_in_an_mlflow_file_store_has_its_runs_tagged_with_the_final_losses_of_results_json(
    stories, tmp_path, monkeypatch, mlflow
):
    from tinylm.report import write_report

    out = tmp_path / "study"
    run_study(read_study(yaml.safe_load(PAIR), "pair.yaml"), ["tiny"], settings(stories, tracker="mlflow"), out,
              seeds=2, quiet=True)  # fmt: skip
    write_report([out], out / "report.md")
    results = json.loads((out / "results.json").read_text())
    runs = mlflow_runs(mlflow, out / "mlruns", monkeypatch, "pair")  # the store: in the study's folder
    assert len(runs) == len(results) == 4
    tracked = {(r["tags.arm"], r["tags.preset"], int(r["tags.seed"])): r for r in runs}
    assert sorted(tracked) == sorted((row["arm"], row["preset"], row["seed"]) for row in results)
    client = mlflow.tracking.MlflowClient()
    for row in results:
        run = tracked[(row["arm"], row["preset"], row["seed"])]
        assert run["tags.study"] == "pair" and run["status"] == "FINISHED"
        assert run["metrics.val_loss"] == row["final_val_loss"]  # the last one logged
        assert run["metrics.summary/best_val_loss_doc"] == row["best_val_loss_doc"]
        assert run["metrics.summary/final_val_loss"] == row["final_val_loss"]
        assert run["params.train.lr"] == str(row["lr"]) and run["params.model.qk_norm"] == str(row["arm"] == "qk")
        history = client.get_metric_history(run["run_id"], "val_loss")
        run_dir = out / "tiny" / f"{row['arm']}-seed{run['tags.seed_index']}"
        assert sorted((m.step, m.value) for m in history) == val_losses(read_metrics(run_dir))


def test_a_run_resumed_with_another_tracker_sends_its_history_first_then_goes_on_in_the_same_tracked_run(
    stories, tmp_path, monkeypatch, mlflow
):
    run_dir = tmp_path / "run"
    train(tiny_config(stories, run_dir, max_steps=4), quiet=True)  # no tracker
    train(tiny_config(stories, run_dir, max_steps=6, tracker="mlflow"), resume=True, quiet=True)
    train(tiny_config(stories, run_dir, max_steps=8, tracker="mlflow"), resume=True, quiet=True)
    runs = mlflow_runs(mlflow, tmp_path / "mlruns", monkeypatch, "tinylm")  # outside a study: beside the run
    assert len(runs) == 1 and runs[0]["tags.mlflow.runName"] == "run"
    client, run_id = mlflow.tracking.MlflowClient(), runs[0]["run_id"]
    records = read_metrics(run_dir)
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["train_loss"]) for r in records
                                                          if "train_loss" in r]  # fmt: skip
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0, 4, 6, 8]


# --- Weights & Biases, offline -----------------------------------------------------------


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)


def wandb_offline_run(run_dir):
    """The run record, config, history rows and summary of the offline run in RUN_DIR/wandb, read from its
    .wandb file: a leveldb-style log (7-byte header per chunk: crc, length, type) of protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, chunk, payloads = path.read_bytes(), 32768, 7, b"", []  # 7: the file's own header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            payloads.append(chunk)
            chunk = b""
    run, config, history, summary = None, {}, [], {}

    def items(updates):
        return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}

    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update(items(record.run.config.update))
        elif kind == "config":
            config.update(items(record.config.update))
        elif kind == "history":
            history.append(items(record.history.item))
        elif kind == "summary":
            summary.update(items(record.summary.update))
    return run, config, history, summary


def test_a_study_logged_to_wandb_offline_holds_each_runs_metrics_and_config_grouped_by_study(
    stories, tmp_path, offline_wandb
):
    out = tmp_path / "study"
    run_study(read_study(yaml.safe_load(PAIR), "pair.yaml"), ["tiny"], settings(stories, tracker="wandb", seed=5),
              out, seeds=1, quiet=True)  # fmt: skip
    for arm in ("base", "qk"):
        run_dir = out / "tiny" / arm
        run, config, history, summary = wandb_offline_run(run_dir)
        assert (run.project, run.run_group, run.job_type, run.display_name) == ("tinylm", "pair", arm, f"tiny/{arm}")
        assert {"study:pair", f"arm:{arm}", "preset:tiny", "seed:5"} <= set(run.tags)
        assert (config["study"], config["arm"], config["preset"], config["seed"]) == ("pair", arm, "tiny", "5")
        assert config["train"] == RunConfig.load(run_dir / "config.json").to_dict()["train"]
        assert config["model"]["qk_norm"] is (arm == "qk")
        records = read_metrics(run_dir)
        assert val_losses(history) == val_losses(records)
        assert [(h["step"], h["train_loss"]) for h in history if "train_loss" in h] == [
            (r["step"], r["train_loss"]) for r in records if "train_loss" in r
        ]
        assert summary["final_val_loss"] == read_summary(run_dir)["final_val_loss"]
        assert json.loads((run_dir / "tracking.json").read_text())["wandb"] == run.run_id


# --- what a run of a study is ------------------------------------------------------------


def test_a_run_is_placed_in_its_study_by_study_json_and_a_trial_by_its_folder(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    arms = [{"name": "a", "runs": {"tiny": ["tiny/a-seed0", "tiny/a-seed1"]}},
            {"name": "a-b", "runs": {"tiny": ["tiny/a-b-seed0", "tiny/a-b-seed1"]}}]  # fmt: skip
    (out / "study.json").write_text(json.dumps({"study": "demo", "arms": arms}))

    def place(*parts):
        run_dir = out.joinpath(*parts)
        return tracking.describe_run(tiny_config("data.txt", run_dir, seed=8), run_dir)

    run = place("tiny", "a-b-seed1")
    assert run.name == "tiny/a-b-seed1" and run.study_dir == out
    assert run.tags == {"study": "demo", "arm": "a-b", "preset": "tiny", "seed_index": "1", "seed": "8"}
    trial = place("trials", "tiny", "a-b-lr0.5")  # not yet in study.json while it trains
    assert trial.tags == {"study": "demo", "arm": "a-b", "preset": "tiny", "seed_index": "0", "trial": "lr x0.5",
                          "seed": "8"}  # fmt: skip
    assert place("tiny", "stray").tags == {}  # a folder the study does not list
    lone = tracking.describe_run(tiny_config("data.txt", tmp_path / "lone"), tmp_path / "lone")
    assert (lone.name, lone.tags, lone.study_dir) == ("lone", {}, None)


def test_a_study_rerun_with_another_tracker_is_the_same_study(stories, tmp_path):
    study, out = read_study(yaml.safe_load(PAIR), "pair.yaml"), tmp_path / "study"
    run_study(study, ["tiny"], settings(stories, max_steps=2), out, seeds=1, quiet=True)
    run_study(study, ["tiny"], settings(stories, max_steps=2, tracker="tensorboard"), out, seeds=1, quiet=True)
    assert read_summary(out / "tiny" / "qk")["completed"]


# --- failures: never the run's --------------------------------------------------------------


class Failing:
    """A tracker backend that raises at one moment: 'open', the second 'log', or 'finish'."""

    at = "log"

    def __init__(self, run, resuming):
        if self.at == "open":
            raise ConnectionError("no server\nat all")
        self.continued, self.logged = False, 0

    def log(self, step, values):
        self.logged += 1
        if self.at == "log" and self.logged == 2:
            raise ConnectionError("the server went away")

    def finish(self, summary):
        if self.at == "finish":
            raise ConnectionError("the server went away")


@pytest.mark.parametrize("at", ["open", "log", "finish"])
def test_a_tracker_failing_warns_once_and_the_run_finishes_with_every_record(stories, tmp_path, monkeypatch,
                                                                              capsys, at):  # fmt: skip
    monkeypatch.setattr(Failing, "at", at)
    monkeypatch.setitem(tracking.BACKENDS, "tensorboard", Failing)
    result = train(tiny_config(stories, tmp_path / "run", max_steps=4, tracker="tensorboard"), quiet=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tinylm: warning:")]
    assert len(warnings) == 1 and "the tensorboard tracker failed (ConnectionError" in warnings[0], warnings
    assert result.summary["completed"] and result.summary["steps"] == 4
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "train_loss" in r] == [1, 2, 3, 4]


def test_a_tracker_without_its_package_is_one_line_naming_the_extra(stories, tmp_path, monkeypatch, capsys):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    code = main(["train", "--preset", "tiny", "--data", str(stories), "--max-steps", "1", "--device", "cpu",
                 "--tracker", "wandb", "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--tracker wandb needs the wandb package: pip install 'tinylm[wandb]'" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --- settings from before trackers ---------------------------------------------------------


@pytest.mark.parametrize("old, tracker", [(True, "tensorboard"), (False, "none"), ("on", "tensorboard")])
def test_a_config_or_recipe_from_before_trackers_reads_its_tensorboard_switch_as_the_tracker(tmp_path, old, tracker):
    raw = RunConfig().to_dict()
    del raw["train"]["tracker"]
    raw["train"]["tensorboard"] = old
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert RunConfig.load(tmp_path / "config.json").train.tracker == tracker
    (tmp_path / "recipe.yaml").write_text(f"tensorboard: {json.dumps(old)}\nmax_steps: 3\n")
    parser = Parser()
    parser.add_argument("--config")
    assert resolve_config(parser.parse_args(["--config", str(tmp_path / "recipe.yaml")])).train.tracker == tracker
