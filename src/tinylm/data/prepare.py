"""Tokenise a source once into memory-mapped token files with document boundaries.

A prepared directory holds, per split, ``SPLIT.bin`` (every document's tokens followed by
<|endoftext|>, uint16 when the vocabulary fits, else uint32) and ``SPLIT.idx`` (int64
offsets: document i is ``bin[idx[i]:idx[i+1]]``), plus ``meta.json`` and, for a trained BPE,
``tokenizer.json``. It is written under a temporary name and renamed, so a directory that
exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tinylm.data.sources import ReadOptions, Source, open_source
from tinylm.data.tokenizer import BPETokenizer, Tokenizer, cache_dir, load_tokenizer, parse_bpe_size
from tinylm.errors import UserError
from tinylm.paths import disk_full_is_one_line, remove_stale_temporaries, replace_durably, temporary_dir

FORMAT_VERSION = 2  # 2: a trained BPE encodes the text '<|endoftext|>' in a document as text
_BATCH_CHARS = 1 << 22  # documents are tokenised in batches of about 4 MB of text


@dataclass
class PrepareOptions:
    data: str
    tokenizer: str = "gpt2"
    val_fraction: float = 0.05
    text_field: str = "text"
    doc_sep: str | None = None
    tokenizer_file: str | None = None
    """For 'bpe:N': reuse this trained tokenizer.json (e.g. a run's) instead of training one."""

    @classmethod
    def from_config(cls, settings, data: str | None = None, tokenizer_file: Path | None = None) -> PrepareOptions:
        """The options a run's TrainConfig (or anything with its data fields: the prepare command's
        flags) asks for; ``data`` replaces its source, e.g. to evaluate a run on other text."""
        return cls(
            data or settings.data, settings.tokenizer, settings.val_fraction, settings.text_field, settings.doc_sep,
            tokenizer_file=str(tokenizer_file) if tokenizer_file else None,
        )  # fmt: skip


@dataclass
class PreparedData:
    directory: Path
    meta: dict
    tokenizer: Tokenizer

    def split(self, name: str) -> TokenSplit:
        return TokenSplit.load(self.directory, name, np.dtype(self.meta["dtype"]))


@dataclass
class TokenSplit:
    tokens: np.ndarray  # memory-mapped, (n_tokens,)
    offsets: np.ndarray  # (n_docs + 1,)

    @classmethod
    def load(cls, directory: Path, split: str, dtype: np.dtype) -> TokenSplit:
        tokens = np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r")
        offsets = np.fromfile(directory / f"{split}.idx", dtype=np.int64)
        return cls(tokens, offsets)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def cache_key(source: Source, options: PrepareOptions) -> str:
    identity = {
        "format": FORMAT_VERSION,
        "source": source.fingerprint,
        "tokenizer": options.tokenizer,
        "val_fraction": options.val_fraction,
        "text_field": options.text_field,
        "doc_sep": options.doc_sep,
        "tokenizer_file": _file_sha256(options.tokenizer_file) if options.tokenizer_file else None,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare(options: PrepareOptions, out: Path | None = None, quiet: bool = False) -> PreparedData:
    """Prepare ``options.data`` into ``out`` (default: the content-keyed cache) or reuse it."""
    bpe_size = parse_bpe_size(options.tokenizer)  # fail on a bad tokenizer before reading data
    source = open_source(options.data, ReadOptions(options.text_field, options.doc_sep))
    key = cache_key(source, options)
    directory = out if out is not None else cache_dir() / "data" / key
    meta_path = directory / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("cache_key") == key:
            return _prepared(directory, meta, source)
        if out is not None:
            raise UserError(f"{directory} holds data prepared from something else; choose another --out")
    elif directory.exists() and any(directory.iterdir()):
        raise UserError(f"{directory} exists and is not a prepared data directory")

    remove_stale_temporaries(directory)
    tmp = temporary_dir(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    advice = "nothing was kept: make room, or prepare into a larger disk (--out, or TINYLM_CACHE for the cache)"
    try:
        with disk_full_is_one_line(directory.parent, advice):
            tmp.mkdir(parents=True)
            meta = _publish(_write(source, options, key, bpe_size, tmp, quiet), tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _prepared(directory, meta, source)


def _prepared(directory: Path, meta: dict, source: Source) -> PreparedData:
    """The same content may have been prepared from another path (the cache is keyed by content): the
    meta a run records names the source it was given, not the one the cache was filled from."""
    meta = {**meta, "source": source.description}
    return PreparedData(directory, meta, load_tokenizer(meta["tokenizer"], directory))


def _publish(meta: dict, tmp: Path, directory: Path) -> dict:
    """Rename the finished ``tmp`` to ``directory``; if another process got there first with
    the same data, its copy is kept and its meta returned (two prepares may run at once)."""
    try:
        if directory.exists():
            directory.rmdir()  # empty when checked; a concurrent prepare may have filled it since
        replace_durably(tmp, directory)
        return meta
    except OSError:
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise
        theirs = json.loads(meta_path.read_text())
        if theirs.get("cache_key") != meta["cache_key"]:
            raise UserError(f"{directory} was just filled with data prepared from something else; choose another --out")
        return theirs


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned integer type that holds every token id."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _is_val(index: int, fraction: float) -> bool:
    """Deterministic, evenly spread split by document index: every (1/fraction)-th document."""
    return int((index + 1) * fraction) > int(index * fraction)


def _training_documents(source: Source, fraction: float) -> Iterator[str]:
    if source.val is not None:
        yield from source.train()
        return
    for i, doc in enumerate(source.train()):
        if not _is_val(i, fraction):
            yield doc


def _write(source: Source, options: PrepareOptions, key: str, bpe_size: int | None, tmp: Path, quiet: bool) -> dict:
    started = time.perf_counter()
    if bpe_size is None:
        tokenizer: Tokenizer = load_tokenizer("gpt2")
    elif options.tokenizer_file:
        shutil.copy(options.tokenizer_file, tmp / BPETokenizer.FILE)
        tokenizer = BPETokenizer.load(tmp, options.tokenizer)
    else:
        if not quiet:
            print(f"training a byte-level BPE of {bpe_size} tokens on {source.description}", file=sys.stderr)
        tokenizer = BPETokenizer.train(_training_documents(source, options.val_fraction), bpe_size)
        tokenizer.save(tmp)
        if tokenizer.vocab_size < bpe_size:
            print(f"warning: the data supports only {tokenizer.vocab_size} of the {bpe_size} BPE tokens asked for",
                  file=sys.stderr)  # fmt: skip
    dtype = token_dtype(tokenizer.vocab_size)
    source.stats.invalid_bytes = 0  # count the tokenising pass only
    bar = tqdm(total=source.size_bytes, unit="B", unit_scale=True, desc="tokenising", disable=quiet or None)
    writers = {split: _SplitWriter(tmp / split, tokenizer, dtype, bar) for split in ("train", "val")}
    if source.val is None:  # one pass, each document routed to its side
        for i, doc in enumerate(source.train()):
            writers["val" if _is_val(i, options.val_fraction) else "train"].add(doc)
    else:
        for split, read in (("train", source.train), ("val", source.val)):
            for doc in read():
                writers[split].add(doc)
    splits = {split: writer.close() for split, writer in writers.items()}
    bar.close()
    _check_split(source, options.val_fraction, splits["train"]["documents"], splits["val"]["documents"])
    meta = {
        "format": FORMAT_VERSION,
        "cache_key": key,
        "source": source.description,
        "fingerprint": source.fingerprint,
        "tokenizer": tokenizer.spec,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": np.dtype(dtype).name,
        "val_fraction": options.val_fraction if source.val is None else None,
        "own_validation_split": source.val is not None,
        "splits": splits,
        "invalid_utf8_bytes": source.stats.invalid_bytes,
        "prepare_seconds": round(time.perf_counter() - started, 3),
    }
    if source.stats.invalid_bytes:
        print(
            f"warning: {source.stats.invalid_bytes} bytes of invalid UTF-8 in {source.description} "
            "were replaced with U+FFFD",
            file=sys.stderr,
        )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _check_split(source: Source, fraction: float, n_train: int, n_val: int) -> None:
    """Both splits need documents; if one has none, say what would give it some."""
    where = source.description
    if source.val is not None:  # the source's own train*/valid* files
        for split, n in (("train*", n_train), ("valid*", n_val)):
            if n == 0:
                raise UserError(f"{where}: the {split} files hold no documents; put documents in them")
        return
    n = n_train + n_val
    if n == 0:
        raise UserError(f"{where}: the corpus is empty (no documents)")
    if n == 1:
        raise UserError(
            f"{where} holds a single document, too few to split into training and validation; add documents "
            "(a .txt splits at blank lines, '<|endoftext|>' lines or --doc-sep) or use a folder with a train* "
            "and a valid* file"
        )
    if n_val == 0:
        at_least = math.ceil(1000 / n) / 1000
        raise UserError(
            f"{where}: none of its {n} documents falls in the validation split at --val-fraction {fraction}; "
            f"raise --val-fraction to at least {at_least}, add documents, or use a folder with a train* and a valid* file"
        )
    if n_train == 0:
        raise UserError(f"{where}: --val-fraction {fraction} leaves none of its {n} documents for training; lower it")


class _SplitWriter:
    """Appends documents, tokenised in batches, to SPLIT.bin and records their offsets."""

    def __init__(self, stem: Path, tokenizer: Tokenizer, dtype, bar: tqdm):
        self.stem, self.tokenizer, self.dtype, self.bar = stem, tokenizer, dtype, bar
        self.file = open(stem.with_suffix(".bin"), "wb")
        self.offsets = [0]
        self.pending: list[str] = []
        self.pending_chars = 0
        self.characters = 0

    def add(self, doc: str) -> None:
        self.pending.append(doc)
        self.pending_chars += len(doc)
        if self.pending_chars >= _BATCH_CHARS:
            self._flush()

    def _flush(self) -> None:
        stream, lengths = self.tokenizer.encode_stream(self.pending)
        stream.astype(self.dtype).tofile(self.file)
        self.offsets.extend((self.offsets[-1] + np.cumsum(lengths)).tolist())
        self.bar.update(sum(len(d.encode("utf-8", "replace")) for d in self.pending))
        self.characters += self.pending_chars
        self.pending, self.pending_chars = [], 0

    def close(self) -> dict:
        if self.pending:
            self._flush()
        self.file.close()
        np.asarray(self.offsets, dtype=np.int64).tofile(self.stem.with_suffix(".idx"))
        return {"documents": len(self.offsets) - 1, "tokens": self.offsets[-1], "characters": self.characters}
