"""A run folder is something users copy and share: nothing in it runs code, a damaged file is named
in one line, a full disk is one line that removes its own temporary files, and the order of writes
keeps metrics and checkpoints in step."""

import errno
import io
import json
import os
import pathlib
import shutil

import pytest
import torch

from conftest import tiny_config
from tinylm import checkpoint
from tinylm.cli import main
from tinylm.errors import UserError
from tinylm.metrics import MetricsLog, read_metrics
from tinylm.train import train


@pytest.fixture(scope="module")
def finished(stories, tmp_path_factory):
    run = tmp_path_factory.mktemp("trust") / "run"
    train(tiny_config(stories, run, max_steps=2), quiet=True)
    return run


@pytest.fixture
def run_copy(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def one_error_line(capsys, argv, *expected):
    """Run the CLI in-process: exit code 2 and exactly one error line holding each expected string
    (progress bars of other libraries may come before it)."""
    assert main([str(a) for a in argv]) == 2, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tinylm:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _repoint(run, path):
    """Make the pointer promise ``path`` as it is now: what someone crafting a run folder would do."""
    pointer = json.loads((run / checkpoint.POINTER_FILE).read_text())
    pointer["files"][path.name] = path.stat().st_size
    pointer[checkpoint.CHECKSUM][path.name] = checkpoint.file_checksum(path)
    (run / checkpoint.POINTER_FILE).write_text(json.dumps(pointer))


# --- 1. nothing executes from a run folder ---------------------------------------------------------


class CreatesAFile:
    """Unpickling this opens (so creates) a file: any code could stand in its place."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_state_file_that_would_run_code_is_refused_and_runs_nothing(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    state_path = checkpoint.locate(run_copy).state
    state = torch.load(state_path, weights_only=True)
    state["progress"]["payload"] = CreatesAFile(marker)
    torch.save(state, state_path)
    _repoint(run_copy, state_path)
    probe = io.BytesIO(state_path.read_bytes())  # the payload is real: an unrestricted load runs it
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()

    line = one_error_line(capsys, ["train", "--resume", run_copy, "--max-steps", 4, "--quiet"], str(state_path))
    assert "refused" in line and "--out NEW_DIR" in line
    assert not marker.exists()


def test_a_checkpoint_written_before_checksums_and_weights_only_still_resumes(run_copy, capsys):
    """The previous tinylm's checkpoint: a pointer of sizes alone, a state pickled for weights_only=False."""
    files = checkpoint.locate(run_copy)
    state = torch.load(files.state, weights_only=True)
    with open(files.state, "wb") as f:
        torch.save(state, f)  # as the old code wrote it (read back with weights_only=False)
    pointer = json.loads((run_copy / checkpoint.POINTER_FILE).read_text())
    old = {"dir": pointer["dir"], "step": pointer["step"], "files": {**pointer["files"]}}
    old["files"][checkpoint.STATE_FILE] = files.state.stat().st_size
    (run_copy / checkpoint.POINTER_FILE).write_text(json.dumps(old))
    assert main(["train", "--resume", str(run_copy), "--max-steps", "4", "--quiet"]) == 0, capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run_copy) if "train_loss" in r] == [1, 2, 3, 4]
    assert checkpoint.CHECKSUM in json.loads((run_copy / checkpoint.POINTER_FILE).read_text())  # its next save has them


def test_an_old_state_holding_other_objects_is_refused_with_how_to_go_on(run_copy, capsys):
    files = checkpoint.locate(run_copy)
    state = torch.load(files.state, weights_only=True)
    state["progress"]["note"] = pathlib.PurePosixPath("notes")  # harmless, but not on torch's list of safe types
    torch.save(state, files.state)
    _repoint(run_copy, files.state)
    one_error_line(capsys, ["train", "--resume", run_copy, "--quiet"], "trainer_state.pt", "refused", "--out NEW_DIR")
    assert main(["sample", str(run_copy), "--max-new-tokens", "3"]) == 0  # its weights still sample


# --- 2. checksums ------------------------------------------------------------------------------


def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_config(run):
    """One bit of n_embd's value (32 -> 22): still valid JSON, a valid setting, another model."""
    path = run / "config.json"
    text = path.read_text()
    assert text.count('"n_embd": 32') == 1
    path.write_text(text.replace('"n_embd": 32', '"n_embd": 22'))
    return path


def _swap_merges(run):
    """Two BPE merges swapped: still a valid tokenizer, but another one (the text it samples is garbled)."""
    path = run / "tokenizer.json"
    spec = json.loads(path.read_text())
    merges = spec["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]
    path.write_text(json.dumps(spec))
    return path


FLIPS = {
    "tokenizer.json": _swap_merges,
    "weights": lambda run: (_flip_middle_byte(checkpoint.locate(run).model), checkpoint.locate(run).model)[1],
    "state": lambda run: (_flip_middle_byte(checkpoint.locate(run).state), checkpoint.locate(run).state)[1],
    "config.json": _flip_config,
}


@pytest.mark.parametrize("flipped", list(FLIPS))
def test_a_flipped_byte_is_one_line_naming_the_file_for_every_command(run_copy, tmp_path, capsys, flipped):
    path = FLIPS[flipped](run_copy)
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    commands = {
        "resume": ["train", "--resume", run_copy, "--max-steps", 4, "--quiet"],
        "sample": ["sample", run_copy, "--max-new-tokens", 3],
        "eval": ["eval", run_copy, "--device", "cpu"],
        "export": ["export", run_copy, "--out", tmp_path / "hf"],
    }
    for name, argv in commands.items():
        one_error_line(capsys, argv, path.name, "damaged" if flipped != "config.json" or name != "resume" else "")
    if flipped == "tokenizer.json":  # a run folder's own file, recorded by the checkpoint beside its two
        assert "tokenizer.json" in json.loads((run_copy / checkpoint.POINTER_FILE).read_text())["run_files"]
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "hf").exists()


def test_checksums_are_recorded_for_each_file_and_match(finished):
    files = checkpoint.locate(finished)
    pointer = json.loads((finished / checkpoint.POINTER_FILE).read_text())
    assert pointer[checkpoint.CHECKSUM] == {p.name: checkpoint.file_checksum(p) for p in (files.model, files.state)}


# --- 3. a full disk ----------------------------------------------------------------------------


class _FillsUp(io.FileIO):
    """A file on a disk that is full after ``room`` bytes."""

    room = 20_000

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        return super().write(data)


def test_a_full_disk_inside_torch_save_is_one_line_naming_the_last_good_checkpoint(stories, tmp_path, monkeypatch):
    """torch.save reports a failed write as RuntimeError("... unexpected pos ..."): that must not reach the user."""
    cfg = tiny_config(stories, tmp_path / "run", checkpoint_every=4)
    real_open = open

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        full = "000008" in str(path) and str(path).endswith(checkpoint.STATE_FILE)
        return io.BufferedWriter(_FillsUp(path, "w")) if full else real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(UserError) as e:
        train(cfg, quiet=True)
    message = str(e.value)
    assert "\n" not in message and "No space left on device" in message and "unexpected pos" not in message
    assert f"{tmp_path / 'run' / 'checkpoint-000004'} (step 4)" in message and "--resume" in message
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name or ".tmp" in p.name) == [
        "checkpoint-000004", "checkpoint.json"]  # fmt: skip
    monkeypatch.undo()
    train(cfg, resume=True, quiet=True)
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "train_loss" in r]
    assert steps == list(range(1, 13))  # neither ahead of nor behind the checkpoint it resumed from


def test_a_stale_temporary_folder_of_a_killed_save_goes_at_the_next_start(run_copy):
    stale = run_copy / ".checkpoint-000004.999999.tmp"
    stale.mkdir()
    (stale / checkpoint.STATE_FILE).write_bytes(b"x" * 1000)
    (run_copy / "config.json.999999.tmp").write_text("{")
    assert main(["train", "--resume", str(run_copy), "--max-steps", "3", "--quiet"]) == 0
    assert not stale.exists() and not (run_copy / "config.json.999999.tmp").exists()


def test_an_export_that_meets_a_full_disk_leaves_no_folder_and_is_one_line(finished, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedTokenizerFast

    def disk_full(self, folder, *args, **kwargs):
        (folder / "tokenizer.json").write_text("{half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "tokenizer.json"))

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
    out = tmp_path / "exports" / "hf"
    one_error_line(capsys, ["export", finished, "--out", out], "No space left on device", str(out.parent))
    assert list((tmp_path / "exports").iterdir()) == []  # neither the export nor its temporary folder


# --- 4. order of writes ------------------------------------------------------------------------


def test_metrics_are_synced_before_the_checkpoint_that_covers_them(stories, tmp_path, monkeypatch):
    events = []
    real_write, real_fsync, real_save = MetricsLog.write, os.fsync, checkpoint.save

    def write(log, record):
        events.append("write")
        return real_write(log, record)

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            events.append("sync")
        return real_fsync(fd)

    def save(run_dir, model, optimizer, progress, settings=None):
        events.append("save")
        return real_save(run_dir, model, optimizer, progress, settings)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name a file descriptor")
    monkeypatch.setattr(MetricsLog, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(checkpoint, "save", save)
    train(tiny_config(stories, tmp_path / "run", max_steps=6, checkpoint_every=2), quiet=True)
    saves = [i for i, e in enumerate(events) if e == "save"]
    assert len(saves) == 3
    for i in saves:
        last_write = max(j for j in range(i) if events[j] == "write")
        assert "sync" in events[last_write:i], events[: i + 1]


# --- 5. resume edits ---------------------------------------------------------------------------


def test_a_resume_takes_cadence_tracker_and_moved_data_and_trains_the_same(stories, tmp_path):
    whole = train(tiny_config(stories, tmp_path / "whole", max_steps=6, checkpoint_every=2), quiet=True).run_dir
    run = tmp_path / "run"
    train(tiny_config(stories, run, max_steps=6, checkpoint_every=2), quiet=True, interrupt_after=2)
    moved = tmp_path / "moved" / stories.name
    moved.parent.mkdir()
    shutil.copy(stories, moved)
    argv = ["train", "--resume", run, "--quiet", "--data", moved, "--log-every", 3, "--eval-every", 3,
            "--checkpoint-every", 3, "--tracker", "tensorboard"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    train_losses = {r["step"]: r["train_loss"] for r in read_metrics(run) if "train_loss" in r}
    expected = {r["step"]: r["train_loss"] for r in read_metrics(whole) if "train_loss" in r}
    assert train_losses == {s: expected[s] for s in (1, 2, 3, 6)}  # steps 1-2 every step, then every 3rd
    assert (run / "tensorboard").is_dir()


def test_a_resume_refuses_changes_to_the_mathematics_and_lists_them(run_copy, stories, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(stories.read_text()[: len(stories.read_text()) // 2])
    before = (run_copy / "config.json").read_bytes()
    one_error_line(capsys, ["train", "--resume", run_copy, "--data", other, "--quiet"], "data.content")
    one_error_line(capsys, ["train", "--resume", run_copy, "--lr", 0.1, "--quiet"], "--resume", "--eval-every")
    assert (run_copy / "config.json").read_bytes() == before


def test_an_export_of_a_padded_vocabulary_leaves_the_padding_rows_out(stories, tmp_path):
    """tinylm keeps a padded vocabulary's extra rows out of the softmax; the exported model must too,
    or it gives them probability and generates ids its tokenizer cannot decode."""
    transformers = pytest.importorskip("transformers")
    from tinylm.export import export_hf
    from tinylm.rundir import load_run

    cfg = tiny_config(stories, tmp_path / "run", max_steps=1, eval_every=1, tokenizer="gpt2")
    cfg.model.vocab_size = 50304  # the quality preset's padding: 47 rows no target ever is
    train(cfg, quiet=True)
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    run = load_run(tmp_path / "run")
    assert hf.config.vocab_size == run.tokenizer.vocab_size == 50257
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = run.model(idx)[0][..., :50257], hf(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_sampling_beside_a_run_that_switches_checkpoints_reads_the_new_one(finished, tmp_path, monkeypatch):
    """A save that lands while a reader checks the previous checkpoint removes it: the reader follows
    the pointer to the new one instead of failing on a missing file."""
    from tinylm.rundir import load_run

    later = tmp_path / "later"
    shutil.copytree(finished, later)
    assert main(["train", "--resume", str(later), "--max-steps", "4", "--quiet"]) == 0
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    real_check = checkpoint._check_file

    def a_save_lands(path, files):
        if not (run / "checkpoint-000004").exists():  # the run's save: new folder, pointer, old one removed
            shutil.copytree(later / "checkpoint-000004", run / "checkpoint-000004")
            shutil.copy(later / checkpoint.POINTER_FILE, run / checkpoint.POINTER_FILE)
            shutil.rmtree(run / "checkpoint-000002")
        return real_check(path, files)

    monkeypatch.setattr(checkpoint, "_check_file", a_save_lands)
    loaded = load_run(run)
    expected = load_run(later)
    assert torch.equal(loaded.model.transformer.wte.weight, expected.model.transformer.wte.weight)
