"""Tokenizers: GPT-2's (tiktoken r50k_base, offline) and a byte-level BPE trained on the data.

The GPT-2 ranks are not downloaded from a model hub: they are byte-identical to
``whisper/assets/gpt2.tiktoken`` in the openai-whisper source distribution on PyPI, which a
package registry serves. ``fetch_gpt2_ranks`` takes them from there once, checks the sha256
and keeps them in the user's cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from tinylm.errors import UserError, damaged
from tinylm.paths import DirLock, write_atomic

EOT_TEXT = "<|endoftext|>"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_WHISPER_SDIST = "openai-whisper==20250625"
# GPT-2's pre-tokenisation pattern (as published with the r50k_base encoding).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer(Protocol):
    spec: str
    vocab_size: int
    eot_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def encode_stream(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' tokens, each followed by <|endoftext|>, and each one's length (EOT included)."""
        ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: Path) -> None: ...


def cache_dir() -> Path:
    """Where tinylm keeps the tokenizer ranks and prepared data sets."""
    if os.environ.get("TINYLM_CACHE"):
        return Path(os.environ["TINYLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinylm"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gpt2_ranks_path(fetch: bool = True) -> Path:
    """Path of a verified r50k_base ranks file, fetching it once if needed."""
    explicit = os.environ.get("TINYLM_GPT2_RANKS")
    path = Path(explicit) if explicit else cache_dir() / "gpt2.tiktoken"
    if path.exists():
        if _sha256(path) != GPT2_RANKS_SHA256:
            raise UserError(f"{path} is not the GPT-2 ranks file (sha256 mismatch); delete it")
        return path
    if explicit:
        raise UserError(f"TINYLM_GPT2_RANKS points to {path}, which does not exist")
    if not fetch:
        raise UserError("the GPT-2 tokenizer is not installed; run: tinylm fetch-tokenizer")
    return fetch_gpt2_ranks(path)


def fetch_gpt2_ranks(dest: Path) -> Path:
    """Take gpt2.tiktoken out of the openai-whisper sdist (a PyPI download) and verify it. One process
    at a time: a study's runs starting together on a fresh cache fetch it once, the others wait for it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with DirLock(dest.with_name(dest.name + ".lock"), file=True) as lock:
        lock.acquire(wait=True)
        if dest.exists() and _sha256(dest) == GPT2_RANKS_SHA256:  # fetched while this one waited
            return dest
        return _download_gpt2_ranks(dest)


def _download_gpt2_ranks(dest: Path) -> Path:
    print(f"tinylm: fetching the GPT-2 tokenizer ranks from PyPI ({_WHISPER_SDIST} sdist)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--dest", tmp, _WHISPER_SDIST]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("openai_whisper-*.tar.gz")) + list(Path(tmp).glob("openai-whisper-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {_WHISPER_SDIST} for the GPT-2 ranks: {last}")
        with tarfile.open(sdists[0]) as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken")), None)
            if member is None:
                raise UserError(f"{sdists[0].name} holds no whisper/assets/gpt2.tiktoken")
            data = archive.extractfile(member).read()  # type: ignore[union-attr]
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        raise UserError("the downloaded GPT-2 ranks fail the sha256 check; not installed")
    write_atomic(dest, data)
    return dest


class GPT2Tokenizer:
    """tiktoken's r50k_base: 50257 tokens, <|endoftext|> = 50256."""

    spec = "gpt2"

    def __init__(self) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(gpt2_ranks_path()))
        self._enc = tiktoken.Encoding(
            name="gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TEXT: len(ranks)}
        )
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token
        self._threads = max(1, os.cpu_count() or 1)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._enc.encode_ordinary(t) for t in texts]

    def encode_stream(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if any(EOT_TEXT in t for t in texts):  # literal marker text inside a document: one by one
            docs = [ids + [self.eot_id] for ids in self.encode_batch(texts)]
            return np.fromiter((i for d in docs for i in d), dtype=np.int64), np.array([len(d) for d in docs])
        # Joined by the special token, documents encode exactly as they do alone (the regex
        # never spans it), and a few long calls beat thousands of short ones. tiktoken
        # releases the GIL, so the parts run in parallel threads.
        n = len(texts)
        cuts = [n * k // self._threads for k in range(self._threads + 1)]
        parts = [EOT_TEXT.join(texts[a:b]) + EOT_TEXT for a, b in zip(cuts, cuts[1:]) if b > a]
        allowed = {EOT_TEXT}
        with ThreadPoolExecutor(len(parts)) as pool:
            encoded = list(pool.map(lambda text: self._enc.encode(text, allowed_special=allowed), parts))
        stream = np.concatenate([np.asarray(e, dtype=np.int64) for e in encoded])
        ends = np.flatnonzero(stream == self.eot_id) + 1
        return stream, np.diff(ends, prepend=0)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def save(self, directory: Path) -> None:
        pass  # fully described by its spec


@lru_cache(maxsize=1)
def _gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()  # loading the ranks takes a fifth of a second: once per process


class BPETokenizer:
    """A byte-level BPE (Hugging Face ``tokenizers``) trained on the user's data."""

    FILE = "tokenizer.json"

    def __init__(self, hf_tokenizer, spec: str) -> None:
        # Like GPT-2's encode_ordinary: the text "<|endoftext|>" inside a document is ordinary
        # text; only the separator the pipeline appends is the EOT id. (Not stored in
        # tokenizer.json, so set on every load.)
        hf_tokenizer.encode_special_tokens = True
        self._tok = hf_tokenizer
        self.spec = spec
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.eot_id = hf_tokenizer.token_to_id(EOT_TEXT)

    @classmethod
    def train(cls, documents: Iterator[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.encode_special_tokens = True  # the literal marker in a document is text to learn from
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(documents, trainer=trainer)
        return cls(tok, f"bpe:{vocab_size}")

    @classmethod
    def load(cls, directory: Path, spec: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = directory / cls.FILE
        if not path.exists():
            raise UserError(f"{path} is missing: the run's trained tokenizer is lost; train the run again")
        try:
            return cls(HFTokenizer.from_file(str(path)), spec)
        except Exception as e:  # tokenizers raises a bare Exception for a torn or invalid file
            raise damaged(path, "train the run again or restore the file", str(e).splitlines()[0][:120]) from None

    @property
    def backend(self):
        """The underlying Hugging Face ``tokenizers.Tokenizer``."""
        return self._tok

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_stream(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        docs = [ids + [self.eot_id] for ids in self.encode_batch(texts)]
        return np.fromiter((i for d in docs for i in d), dtype=np.int64), np.array([len(d) for d in docs])

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: Path) -> None:
        write_atomic(directory / self.FILE, self._tok.to_str(pretty=True))  # the bytes HF's save() writes


def parse_bpe_size(spec: str) -> int | None:
    """'bpe:N' -> N; 'gpt2' -> None; anything else is a user error."""
    if spec == "gpt2":
        return None
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            size = 0
        if size < 257:
            raise UserError(f"bpe vocabulary must be an integer of at least 257 (the bytes + EOT), got {spec!r}")
        return size
    raise UserError(f"unknown tokenizer {spec!r}; use 'gpt2' or 'bpe:N'")


def load_tokenizer(spec: str, directory: Path | None = None) -> Tokenizer:
    """The tokenizer named by spec; a trained BPE is read from ``directory``."""
    if parse_bpe_size(spec) is None:
        return _gpt2()
    if directory is None or not (directory / BPETokenizer.FILE).exists():
        raise UserError(f"no trained tokenizer for {spec!r} in {directory}")
    return BPETokenizer.load(directory, spec)
