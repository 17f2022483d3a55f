import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import write_stories
from tinylm.config import ModelConfig
from tinylm.data.batching import PackedRows, PaddedRows, document_ids, validation_batches
from tinylm.data.prepare import PrepareOptions, TokenSplit, prepare, token_dtype
from tinylm.data.sources import ReadOptions, open_source
from tinylm.errors import UserError
from tinylm.loss import IGNORE_INDEX
from tinylm.model import GPT


def docs_of(path, **options):
    return list(open_source(str(path), ReadOptions(**options)).train())


def test_tinystories_layout_splits_at_endoftext_lines(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("first story.\n\nsecond paragraph.\n<|endoftext|>\nnext one.\n<|endoftext|>\n\nlast\n")
    assert docs_of(path) == ["first story.\n\nsecond paragraph.", "next one.", "last"]


def test_plain_text_splits_at_blank_lines_or_doc_sep(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a b\nc\n\n\nd e\n---\nf\n")
    assert docs_of(path) == ["a b\nc", "d e\n---\nf"]
    assert docs_of(path, doc_sep="---") == ["a b\nc\n\n\nd e", "f"]


def test_json_jsonl_and_parquet_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"body": "three"}, {"body": "four"}]))
    assert docs_of(tmp_path / "a.jsonl") == ["one", "two"]
    assert docs_of(tmp_path / "b.json", text_field="body") == ["three", "four"]
    with pytest.raises(UserError, match="no field 'text'"):
        docs_of(tmp_path / "b.json")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["five", "six", ""]}), tmp_path / "c.parquet")
    assert docs_of(tmp_path / "c.parquet") == ["five", "six"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "a"}', "", "", '{"text": "b"', '{"text": "c"}'], r"bad\.jsonl:4: not valid JSON \(.* column 13\)"),
        (['{"text": "a"}', "", "[1, 2]"], r"bad\.jsonl:3: expected an object with a 'text' field, got list"),
        (['{"text": "a"}', "42"], r"bad\.jsonl:2: expected an object with a 'text' field, got int"),
        (["", '{"text": "a"}', '{"body": "b"}'], r"bad\.jsonl:3: no field 'text' \(choose one with --text-field\)"),
        (['{"text": "a"}', '{"text": 5}'], r"bad\.jsonl:2: field 'text' is a int, not text"),
        (['{"text": "a"}', '{"text": "b"}', '{"text": "c'], r"bad\.jsonl:3: not valid JSON"),  # a torn last line
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message):
        docs_of(path)


def test_jsonl_null_text_is_an_empty_document_and_strings_are_documents(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "a"}\n{"text": null}\n"b"\n')
    assert docs_of(path) == ["a", "b"]


def test_folder_with_train_and_valid_files_uses_its_own_split(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_stories(folder / "train.txt", 30, seed=1)
    write_stories(folder / "valid.txt", 5, seed=2)
    data = prepare(PrepareOptions(str(folder)), quiet=True)
    assert data.meta["own_validation_split"]
    assert data.meta["splits"]["train"]["documents"] == 30
    assert data.meta["splits"]["val"]["documents"] == 5


def test_split_by_document_is_deterministic_and_disjoint(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("".join(f"document number {i} is here.\n<|endoftext|>\n" for i in range(100)))
    data = prepare(PrepareOptions(str(path), val_fraction=0.1), quiet=True)
    tok = data.tokenizer

    def texts(split):
        s = data.split(split)
        return [tok.decode(s.document(i)[:-1]) for i in range(s.n_docs)]  # without the closing EOT

    train, val = texts("train"), texts("val")
    assert len(val) == 10 and len(train) == 90
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(f"document number {i} is here." for i in range(100))


def test_every_document_ends_with_endoftext(stories):
    data = prepare(PrepareOptions(str(stories)), quiet=True)
    split = data.split("train")
    ends = split.tokens[split.offsets[1:] - 1]
    assert (ends == data.meta["eot_id"]).all()
    assert data.meta["dtype"] == "uint16" and split.tokens.dtype == np.uint16


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_prepared_data_is_cached_by_content(tmp_path):
    path = write_stories(tmp_path / "s.txt", 50)
    first = prepare(PrepareOptions(str(path)), quiet=True)
    stamp = os.stat(first.directory / "train.bin").st_mtime_ns
    again = prepare(PrepareOptions(str(path)), quiet=True)
    assert again.directory == first.directory
    assert os.stat(again.directory / "train.bin").st_mtime_ns == stamp
    write_stories(path, 51)
    changed = prepare(PrepareOptions(str(path)), quiet=True)
    assert changed.directory != first.directory
    other_tokenizer = prepare(PrepareOptions(str(path), tokenizer="bpe:300"), quiet=True)
    assert other_tokenizer.directory != changed.directory


def test_prepared_data_found_in_the_cache_names_the_source_asked_for(tmp_path):
    # The cache is keyed by content: the same text under another folder reuses the earlier preparation,
    # but a run's summary must name the data it was given, not a path from an earlier command.
    first, second = (tmp_path / "a" / "s.txt", tmp_path / "b" / "s.txt")
    for path in (first, second):
        path.parent.mkdir()
        write_stories(path, 50)
    prepared_first = prepare(PrepareOptions(str(first)), quiet=True)
    prepared_second = prepare(PrepareOptions(str(second)), quiet=True)
    assert prepared_second.directory == prepared_first.directory  # reused, not prepared again
    assert prepared_first.meta["source"] == str(first)
    assert prepared_second.meta["source"] == str(second)


def test_trained_bpe_has_the_asked_size_and_round_trips(stories, tmp_path):
    data = prepare(PrepareOptions(str(stories), tokenizer="bpe:320"), out=tmp_path / "bpe", quiet=True)
    tok = data.tokenizer
    assert tok.vocab_size == 320 and data.meta["vocab_size"] == 320
    assert (tmp_path / "bpe" / "tokenizer.json").exists()
    text = 'once upon a time, lily saw a boat. "i like my cat," said tom.'
    assert tok.decode(tok.encode_batch([text])[0]) == text
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text here.\n<|endoftext|>\nbad \xff\xfe bytes.\n<|endoftext|>\n" * 20)
    data = prepare(PrepareOptions(str(path)), quiet=True)
    assert data.meta["invalid_utf8_bytes"] == 40
    assert "40 bytes of invalid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.txt", "not found"),
        (lambda p: (p / "empty.txt").write_text("\n\n") and p / "empty.txt", "empty"),
        (lambda p: (p / "x.csv").write_text("a,b") and p / "x.csv", "unsupported"),
        (
            lambda p: (p / "bad.jsonl").write_text('{"text": "a"}\n{oops\n') and p / "bad.jsonl",
            "bad.jsonl:2: not valid JSON",
        ),
    ],
)
def test_bad_sources_fail_without_leaving_a_prepared_directory(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(UserError, match=message):
        prepare(PrepareOptions(str(path)), out=tmp_path / "prepared", quiet=True)
    assert not (tmp_path / "prepared").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_unknown_tokenizer_is_refused(stories):
    with pytest.raises(UserError, match="unknown tokenizer"):
        prepare(PrepareOptions(str(stories), tokenizer="sentencepiece"), quiet=True)


def test_hub_data_offline_fails_with_the_offline_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="shakespeare"):
        open_source("hf:someone/nothing-here", ReadOptions())


def test_shakespeare_is_embedded_one_document_per_scene():
    docs = list(open_source("shakespeare", ReadOptions()).train())
    assert len(docs) > 700
    hamlet = [d for d in docs if d.startswith("Hamlet")]
    assert 15 <= len(hamlet) <= 25
    assert "To be, or not to be" in "".join(hamlet)
    assert "**" not in docs[0]


# --- batching -------------------------------------------------------------------------


def _split(docs: list[list[int]]) -> TokenSplit:
    tokens = np.concatenate([np.asarray(d, dtype=np.uint16) for d in docs])
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return TokenSplit(tokens, offsets)


EOT = 99


def _docs(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, 90, rng.integers(2, 30))) + [EOT] for _ in range(n)]


def test_packed_rows_hold_every_token_exactly_once_per_epoch():
    split = _split(_docs(40))
    rows = PackedRows(split, block_size=16, eot_id=EOT, seed=3)
    batch = rows.batch(0, rows.n_rows)
    assert batch.real_tokens == batch.slots  # no padding at all
    targets = batch.y.numpy()
    # Rows come shuffled; put them back in stream order and the targets are the stream itself.
    starts = [int(np.flatnonzero(np.all(_windows(split.tokens, 16) == row, axis=1))[0]) for row in batch.x.numpy()]
    assert sorted(starts) == list(range(rows.n_rows))
    ordered = targets[np.argsort(starts)].ravel()
    np.testing.assert_array_equal(ordered, split.tokens[1 : rows.n_rows * 16 + 1])
    next_epoch = rows.batch(rows.n_rows, rows.n_rows)
    assert not torch.equal(next_epoch.x, batch.x)  # a fresh order


def _windows(tokens, T):
    n = (len(tokens) - 1) // T
    return np.stack([tokens[i * T : i * T + T] for i in range(n)])


def test_padded_rows_hold_one_document_each_and_ignore_pads():
    docs = _docs(10)
    rows = PaddedRows(_split(docs), block_size=16, eot_id=EOT, seed=0)
    batch = rows.batch(0, 10)
    lengths = [min(len(d), 16) for d in docs]
    assert batch.real_tokens == sum(lengths)
    assert rows.truncated_docs == sum(len(d) > 16 for d in docs)
    for x, y in zip(batch.x, batch.y):
        n = int((y != IGNORE_INDEX).sum())
        assert x[0] == EOT  # each row opens with <|endoftext|>, like a packed document does
        assert (y[n:] == IGNORE_INDEX).all() and (y[:n] != IGNORE_INDEX).all()
        assert torch.equal(x[1:n], y[: n - 1])


def test_padding_does_not_change_the_loss_of_real_tokens():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=100)).eval()
    docs = _docs(6, seed=1)
    batch = PaddedRows(_split(docs), block_size=16, eot_id=EOT, seed=0).batch(0, 6)
    _, padded_loss = model(batch.x, batch.y)
    total, count = 0.0, 0
    for x, y in zip(batch.x, batch.y):
        n = int((y != IGNORE_INDEX).sum())
        _, loss = model(x[None, :n], y[None, :n])
        total, count = total + loss.item() * n, count + n
    assert padded_loss.item() == pytest.approx(total / count, rel=1e-5)


def test_doc_mask_keeps_documents_apart():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=100)).eval()
    x = torch.tensor([[5, 6, 7, 8, EOT, 10, 11, 12, 13, EOT, 20, 21, 22, 23, 24, 25]])
    changed = x.clone()
    changed[0, 1:4] = torch.tensor([40, 41, 42])  # rewrite document 1
    ids = torch.from_numpy(document_ids(x.numpy(), EOT))
    logits, _ = model(x, doc_ids=ids)
    logits_changed, _ = model(changed, doc_ids=ids)
    torch.testing.assert_close(logits[:, 4:], logits_changed[:, 4:])  # documents 2 and 3 untouched
    assert not torch.allclose(logits[:, 1:4], logits_changed[:, 1:4])
    # Without the mask, document 2 sees document 1.
    plain, _ = model(x)
    plain_changed, _ = model(changed)
    assert not torch.allclose(plain[:, 4:], plain_changed[:, 4:])
    # A document later in a row is scored as if it started the row (positions restart).
    alone, _ = model(x[:, 4:9])
    torch.testing.assert_close(logits[:, 4:9], alone, rtol=1e-5, atol=1e-5)


def test_validation_stream_is_fixed_and_capped():
    split = _split(_docs(50))
    full = validation_batches(split, 16, batch_size=4, max_tokens=None, eot_id=EOT)
    capped = validation_batches(split, 16, batch_size=4, max_tokens=40, eot_id=EOT)
    assert sum(b.x.shape[0] for b in capped) == 3  # ceil(40 / 16) blocks
    assert torch.equal(capped[0].x, full[0].x[:3])  # a prefix of the same stream
    again = validation_batches(split, 16, batch_size=4, max_tokens=None, eot_id=EOT)
    assert all(torch.equal(a.y, b.y) for a, b in zip(full, again))


def test_training_on_the_embedded_shakespeare_needs_no_network(tmp_path, monkeypatch):
    from conftest import tiny_config
    from tinylm.train import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = train(
        tiny_config("shakespeare", tmp_path / "run", max_steps=2, eval_every=2, tokenizer="gpt2"), quiet=True
    )
    assert result.summary["completed"] and result.summary["data"].startswith("shakespeare")


@pytest.mark.parametrize("literal_marker", [False, True])
def test_gpt2_stream_encoding_equals_encoding_each_document(literal_marker):
    from tinylm.data.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    docs = ["Hello there.  ", "\n\nnew lines\n", " leading space", "tabs\tand 123 numbers!", "x", "ünïcödé 東京"]
    if literal_marker:
        docs.append("a document that mentions <|endoftext|> in its text")
    stream, lengths = tok.encode_stream(docs)
    expected = [i for d in docs for i in tok.encode_batch([d])[0] + [tok.eot_id]]
    assert stream.tolist() == expected
    assert lengths.tolist() == [len(tok.encode_batch([d])[0]) + 1 for d in docs]


def test_hub_data_without_the_datasets_package_names_the_offline_alternatives(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without it: import fails
    with pytest.raises(UserError, match=r"pip install 'tinylm\[hf\]'.*shakespeare") as error:
        open_source("hf:someone/nothing-here", ReadOptions())
    assert "shared" not in str(error.value)  # a folder only this project's own machines have


# --- concurrent and interrupted preparation ------------------------------------------


def _prepare_in_lockstep(path, wrote, first_done, second: bool) -> None:
    """Prepare ``path`` in a child process; both children finish writing before either
    publishes, and the second publishes only after the first has (the crash of issue 12)."""
    import tinylm.data.prepare as prep

    real_write = prep._write

    def write_then_wait(*args):
        meta = real_write(*args)
        wrote.wait(60)
        if second:
            first_done.wait(60)
        return meta

    prep._write = write_then_wait
    try:
        data = prep.prepare(PrepareOptions(str(path)), quiet=True)
        assert data.meta["splits"]["train"]["documents"] > 0
    finally:
        if not second:
            first_done.set()


def test_two_processes_preparing_the_same_data_at_once_both_succeed(tmp_path):
    import multiprocessing

    path = write_stories(tmp_path / "race.txt", 60, seed=12)
    ctx = multiprocessing.get_context("fork")
    wrote, first_done = ctx.Barrier(2), ctx.Event()
    children = [ctx.Process(target=_prepare_in_lockstep, args=(path, wrote, first_done, i == 1)) for i in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [child.exitcode for child in children] == [0, 0]
    data = prepare(PrepareOptions(str(path)), quiet=True)
    assert data.meta["splits"]["train"]["documents"] + data.meta["splits"]["val"]["documents"] == 60
    assert not [p for p in data.directory.parent.iterdir() if ".tmp-" in p.name]


def test_temporary_folders_of_a_killed_prepare_are_removed(tmp_path):
    import socket
    import subprocess

    from tinylm.data.prepare import cache_key
    from tinylm.data.tokenizer import cache_dir

    path = write_stories(tmp_path / "killed.txt", 40, seed=13)
    options = PrepareOptions(str(path))
    key = cache_key(open_source(str(path), ReadOptions()), options)
    parent = cache_dir() / "data"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs
    host = socket.gethostname()
    planted = {
        "dead": parent / f"{key}.tmp-{host}-{gone.pid}",
        "dead, older name": parent / f"{key}.tmp-{gone.pid}",
        "alive": parent / f"{key}.tmp-{host}-{os.getppid()}",  # another prepare still writing
        "other host": parent / f"{key}.tmp-elsewhere.example-{gone.pid}",  # a shared cache: not ours to judge
    }
    for folder in planted.values():
        folder.mkdir(parents=True)
        (folder / "train.bin").write_bytes(b"\0" * 10)
    data = prepare(options, quiet=True)
    assert data.meta["splits"]["train"]["documents"] > 0
    assert {name: folder.exists() for name, folder in planted.items()} == {
        "dead": False, "dead, older name": False, "alive": True, "other host": True,
    }  # fmt: skip


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe:300"])
def test_literal_endoftext_in_a_document_is_ordinary_text(tmp_path, tokenizer):
    path = tmp_path / "marker.jsonl"
    docs = [f"story {i}: the tag <|endoftext|> is just text here, said tom.<|endoftext|>" for i in range(40)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = prepare(PrepareOptions(str(path), tokenizer=tokenizer), quiet=True)
    tok, eot = data.tokenizer, data.meta["eot_id"]
    stream, lengths = tok.encode_stream(docs[:3])
    assert (stream == eot).sum() == 3 and lengths.tolist() == [len(tok.encode_batch([d])[0]) + 1 for d in docs[:3]]
    assert eot not in tok.encode_batch([docs[0]])[0]
    split = data.split("train")
    assert (split.tokens == eot).sum() == split.n_docs  # only the separators the pipeline appends
    assert tok.decode(split.document(0)[:-1]) in docs


def _write_corpus(folder, files: dict[str, str]):
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder if len(files) > 1 else folder / next(iter(files))


@pytest.mark.parametrize(
    "files, flags, message",
    [
        ({"one.txt": "just one story, no blank lines.\n"}, [], "single document.*add documents.*valid\\* file"),
        ({"two.txt": "story one.\n\nstory two.\n"}, [],
         "none of its 2 documents falls in the validation split.*raise --val-fraction to at least 0.5"),
        ({"two.txt": "story one.\n\nstory two.\n"}, ["--val-fraction", "0.5"], "training split has .* tokens"),
        ({"train.txt": "a story.\n\nanother.\n", "valid.txt": "\n\n"}, [], "the valid\\* files hold no documents"),
        ({"train.txt": "once upon a time. " * 200, "valid.txt": "hi.\n"}, [],
         "validation split has 3 tokens.*raise --val-fraction, or a larger valid\\* file"),
    ],
)  # fmt: skip
def test_a_corpus_too_small_to_split_says_what_would_help(tmp_path, files, flags, message):
    import re
    import subprocess
    import sys

    data = _write_corpus(tmp_path / "corpus", files)
    cmd = [sys.executable, "-m", "tinylm", "train", "--preset", "tiny", "--tokenizer", "gpt2", "--max-steps", "1",
           "--quiet", "--data", str(data), "--out", str(tmp_path / "run"), *flags]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), done.stderr


def test_runs_fetching_the_gpt2_ranks_at_once_fetch_them_once(tmp_path, monkeypatch):
    """A study's parallel runs on a fresh cache all need the GPT-2 ranks: one downloads them, the
    others wait and use them. Before, each downloaded, and the renames of one shared NAME.tmp raced
    (FileNotFoundError: gpt2.tiktoken.tmp -> gpt2.tiktoken failed a run of a Slurm study)."""
    import io
    import subprocess
    import tarfile
    import threading
    import time
    from pathlib import Path

    from tinylm.data import tokenizer

    ranks = tokenizer.gpt2_ranks_path().read_bytes()  # the installed file (conftest's TINYLM_GPT2_RANKS)
    downloads = []

    def fake_pip_download(cmd, **kwargs):
        downloads.append(1)
        time.sleep(0.3)  # both threads are downloading at once unless one waits for the other
        dest = Path(cmd[cmd.index("--dest") + 1])
        with tarfile.open(dest / "openai_whisper-20250625.tar.gz", "w:gz") as archive:
            info = tarfile.TarInfo("openai_whisper-20250625/whisper/assets/gpt2.tiktoken")
            info.size = len(ranks)
            archive.addfile(info, io.BytesIO(ranks))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(tokenizer.subprocess, "run", fake_pip_download)
    monkeypatch.delenv("TINYLM_GPT2_RANKS")
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))
    results, errors = [], []

    def fetch():
        try:
            results.append(tokenizer.gpt2_ranks_path())
        except Exception as e:  # noqa: BLE001 - the race's error is what this test looks for
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [tmp_path / "cache" / "gpt2.tiktoken"] * 3
    assert len(downloads) == 1
    assert (tmp_path / "cache" / "gpt2.tiktoken").read_bytes() == ranks
