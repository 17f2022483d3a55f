"""Rows of (input, target) tokens from a prepared split: padded, packed, and the fixed validation stream.

Row order is a pure function of (seed, epoch), so the batch of any step can be rebuilt
from the step number alone: resuming a run, or splitting a step across data-parallel
ranks, needs no loader state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tinylm.data.prepare import TokenSplit
from tinylm.errors import UserError
from tinylm.loss import IGNORE_INDEX


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) input tokens
    y: torch.Tensor  # (B, T) targets, IGNORE_INDEX where padded
    doc_ids: torch.Tensor | None  # (B, T) document index within each row, for the doc mask
    real_tokens: int  # targets that are real tokens (not padding)

    @property
    def slots(self) -> int:
        return self.y.numel()

    def to(self, device: torch.device) -> Batch:
        to_gpu = device.type == "cuda"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            # from pinned memory the copy is asynchronous: the host goes on launching kernels
            return t.pin_memory().to(device, non_blocking=True) if to_gpu else t

        return Batch(move(self.x), move(self.y), move(self.doc_ids), self.real_tokens)


def document_ids(x: np.ndarray, eot_id: int) -> np.ndarray:
    """Each <|endoftext|> starts a new document: it opens the next one, so it sees nothing before."""
    return np.cumsum(x == eot_id, axis=1)


class RowSource:
    """Numbered rows of a training split, shuffled afresh every epoch."""

    n_rows: int

    def __init__(self, split: TokenSplit, block_size: int, eot_id: int, seed: int, doc_mask: bool = False):
        self.split, self.block_size, self.eot_id, self.seed = split, block_size, eot_id, seed
        self.doc_mask = doc_mask
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _row_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.n_rows)
        return self._order

    def batch(self, first_row: int, count: int) -> Batch:
        """Rows first_row .. first_row + count - 1 of the endless shuffled sequence."""
        picks = []
        for k in range(first_row, first_row + count):
            epoch, within = divmod(k, self.n_rows)
            picks.append(self._row_order(epoch)[within])
        return self._rows(np.asarray(picks))

    def _rows(self, rows: np.ndarray) -> Batch:
        raise NotImplementedError


class PackedRows(RowSource):
    """Documents joined by <|endoftext|> and cut into full blocks: every slot is a real token.

    Row i is tokens[i*T : i*T + T + 1]: each token is a target exactly once per epoch.
    """

    def __init__(self, split, block_size, eot_id, seed, doc_mask=False):
        super().__init__(split, block_size, eot_id, seed, doc_mask)
        self.n_rows = (len(split.tokens) - 1) // block_size
        if self.n_rows < 1:
            raise UserError(
                f"the training split has {len(split.tokens)} tokens, fewer than one block of "
                f"{block_size + 1}; use more data or a smaller --block-size"
            )

    def _rows(self, rows: np.ndarray) -> Batch:
        T = self.block_size
        chunk = np.stack([self.split.tokens[r * T : r * T + T + 1] for r in rows]).astype(np.int64)
        x, y = chunk[:, :-1], chunk[:, 1:]
        doc_ids = torch.from_numpy(document_ids(x, self.eot_id)) if self.doc_mask else None
        return Batch(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), doc_ids, y.size)


class PaddedRows(RowSource):
    """One document per row, preceded by <|endoftext|>, cut at the block size and padded.

    Padded target positions hold IGNORE_INDEX, so the loss skips them; padding sits after
    the document, where causal attention keeps it from touching real positions.
    """

    def __init__(self, split, block_size, eot_id, seed, doc_mask=False):
        super().__init__(split, block_size, eot_id, seed, doc_mask)
        self.n_rows = split.n_docs
        lengths = np.diff(split.offsets)  # each document with its closing EOT
        self.truncated_docs = int((lengths > block_size).sum())
        self.expected_utilisation = float(np.minimum(lengths, block_size).sum() / (block_size * len(lengths)))

    def _rows(self, rows: np.ndarray) -> Batch:
        return padded_batch(self.split, rows, self.block_size, self.eot_id)


def padded_batch(split: TokenSplit, docs: np.ndarray, block_size: int, eot_id: int) -> Batch:
    """One row per document of ``docs``: <|endoftext|> first, then the document (its closing EOT
    included) cut to the block, padded with EOT inputs and IGNORE_INDEX targets.

    The only layout in which documents are presented alone, for training and for the
    per-document validation alike. No doc_ids even under --doc-mask: a row holds one document
    and its padding comes after it, so causal attention alone already keeps them apart.
    """
    T = block_size
    x = np.full((len(docs), T), eot_id, dtype=np.int64)
    y = np.full((len(docs), T), IGNORE_INDEX, dtype=np.int64)
    for i, r in enumerate(docs):
        doc = np.concatenate([[eot_id], split.document(r)[:T]]).astype(np.int64)
        n = len(doc) - 1
        x[i, :n], y[i, :n] = doc[:-1], doc[1:]
    real = int((y != IGNORE_INDEX).sum())
    return Batch(torch.from_numpy(x), torch.from_numpy(y), None, real)


def training_rows(split: TokenSplit, batching: str, block_size: int, eot_id: int, seed: int, doc_mask: bool):
    kind = PackedRows if batching == "packed" else PaddedRows
    return kind(split, block_size, eot_id, seed, doc_mask)


def validation_batches(
    split: TokenSplit, block_size: int, batch_size: int, max_tokens: int | None, eot_id: int, doc_mask: bool = False
) -> list[Batch]:
    """The fixed packed validation stream: consecutive blocks of the held-out documents, in order.

    Whatever the training batching, every run of the same data and block size is scored
    on these exact tokens, so losses compare across runs.
    """
    T = block_size
    n_blocks = packed_validation_blocks(split, T, max_tokens)
    chunk = np.stack([split.tokens[i * T : i * T + T + 1] for i in range(n_blocks)]).astype(np.int64)
    batches = []
    for start in range(0, n_blocks, batch_size):
        part = chunk[start : start + batch_size]
        x, y = part[:, :-1], part[:, 1:]
        doc_ids = torch.from_numpy(document_ids(x, eot_id)) if doc_mask else None
        batches.append(Batch(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), doc_ids, y.size))
    return batches


def packed_validation_blocks(split: TokenSplit, block_size: int, max_tokens: int | None) -> int:
    """How many blocks the packed validation stream scores: all the split holds, capped by max_tokens."""
    n_blocks = (len(split.tokens) - 1) // block_size
    if n_blocks < 1:
        raise UserError(
            f"the validation split has {len(split.tokens)} tokens, fewer than one block of {block_size + 1}; hold "
            "out more text (raise --val-fraction, or a larger valid* file) or lower --block-size"
        )
    if max_tokens is not None:
        n_blocks = max(1, min(n_blocks, -(-max_tokens // block_size)))
    return n_blocks


def document_validation_batches(
    split: TokenSplit, block_size: int, batch_size: int, max_tokens: int | None, eot_id: int
) -> list[Batch]:
    """The per-document validation: each held-out document in its own row, scored from its start.

    In the packed stream most documents begin mid-row after another one, a context that
    padded training never shows. Here every document is laid out as padded training lays it
    out (padded_batch), so the loss favours neither batching. The documents are the split's
    first ones, in order, until their scored targets reach the packed stream's count
    (the same eval_tokens budget; the last document is kept whole), so every run of the
    same data and block size is scored on the same documents.
    """
    budget = packed_validation_blocks(split, block_size, max_tokens) * block_size
    targets = np.minimum(np.diff(split.offsets), block_size)  # a document's scored targets: its row's
    n_docs = min(int(np.searchsorted(np.cumsum(targets), budget)) + 1, split.n_docs)
    # Rows of like length share a batch, and columns holding only padding are cut: a row's
    # scores are the same (padding comes after the document, causal attention never looks
    # ahead) and a block far longer than the documents (basic's 512) costs no more than packed.
    by_length = np.argsort(-targets[:n_docs], kind="stable")
    batches = []
    for start in range(0, n_docs, batch_size):
        part = by_length[start : start + batch_size]
        b, width = padded_batch(split, part, block_size, eot_id), int(targets[part].max())
        batches.append(Batch(b.x[:, :width].contiguous(), b.y[:, :width].contiguous(), None, b.real_tokens))
    return batches
