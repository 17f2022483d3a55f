"""The run directory's module: its file names, the atomic write, and the options data is prepared with."""

import importlib.util
import os
from pathlib import Path

import pytest

from conftest import tiny_config
from tinylm import checkpoint, rundir
from tinylm.config import TrainConfig
from tinylm.data.prepare import PrepareOptions
from tinylm.paths import write_atomic
from tinylm.train import train

_HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_every_file_of_a_run_is_named_by_the_run_directory_module(stories, tmp_path):
    result = train(tiny_config(stories, tmp_path / "run", max_steps=4, tracker="tensorboard" if _HAS_TENSORBOARD else "none"),
                   quiet=True)  # fmt: skip
    names = {getattr(rundir, n) for n in rundir.__all__ if n.endswith(("_FILE", "_DIR"))}
    for entry in result.run_dir.iterdir():
        assert entry.name in names or (entry.is_dir() and entry.name == "checkpoint-000004"), entry.name
    files = checkpoint.locate(result.run_dir)
    assert {files.model.name, files.state.name} <= names
    assert rundir.read_config(result.run_dir).train.max_steps == 4
    assert rundir.read_summary(result.run_dir)["steps"] == 4


def test_write_atomic_replaces_a_file_whole(tmp_path):
    path = tmp_path / "summary.json"
    write_atomic(path, "old\n")
    write_atomic(path, b"new\n")
    assert path.read_bytes() == b"new\n" and os.listdir(tmp_path) == ["summary.json"]


def test_a_failed_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    write_atomic(path, "old\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["config.json"]


def test_prepare_options_come_from_the_config():
    t = TrainConfig(data="a.txt", tokenizer="bpe:300", val_fraction=0.1, text_field="body", doc_sep="---", max_steps=1)
    assert PrepareOptions.from_config(t) == PrepareOptions("a.txt", "bpe:300", 0.1, "body", "---")
    other = PrepareOptions.from_config(t, data="b.txt", tokenizer_file=Path("run/tokenizer.json"))
    assert (other.data, other.tokenizer_file) == ("b.txt", "run/tokenizer.json")
