"""Validation loss on a fixed list of batches, and a trained run's loss, perplexity and bits per byte."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tinylm.data.batching import Batch, document_validation_batches, validation_batches
from tinylm.data.prepare import PrepareOptions, prepare
from tinylm.loss import linear_cross_entropy
from tinylm.model import GPT
from tinylm.rundir import load_run, tokenizer_file
from tinylm.runtime import autocast_for, resolve_precision, select_device


def validation_loss_sum(model: GPT, batches: list[Batch], device: torch.device, vocab_size: int,
                        precision: str = "fp32") -> tuple[float, int]:  # fmt: skip
    """Summed loss and the number of target tokens over the batches (sums add up across ranks).

    precision: 'fp32' or 'bf16' (autocast), resolved; training evaluates in the run's own.

    vocab_size is the tokenizer's: the softmax runs over those rows of the output layer only,
    so a vocabulary padded beyond it (quality's 50304) scores as the tokens sampling can emit.
    """
    # no_grad as a block, not a decorator: mutmut (benchmarks/mutation.sh) skips decorated functions
    with torch.no_grad():
        was_training = model.training
        model.eval()
        real_rows = model.lm_head.weight[:vocab_size]
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0  # one sync at the end
        for batch in batches:
            b = batch.to(device)
            with autocast_for(device, precision):
                hidden = model.hidden_states(b.x, b.doc_ids)
                loss = linear_cross_entropy(
                    hidden.flatten(0, 1), real_rows, b.y.flatten(), softcap=model.config.logit_softcap
                )
            total += loss.double() * b.real_tokens
            count += b.real_tokens
        model.train(was_training)
        return total.item(), count


def validation_loss(model: GPT, batches: list[Batch], device: torch.device, vocab_size: int,
                    precision: str = "fp32") -> float:  # fmt: skip
    """Mean loss per target token over all batches."""
    total, count = validation_loss_sum(model, batches, device, vocab_size, precision)
    return total / max(count, 1)


def evaluate_run(run_dir, data: str | None = None, eval_tokens: int | None = None, device_name: str = "auto",
                 precision: str | None = None) -> dict:  # fmt: skip
    """Loss, perplexity and bits per byte of a trained run on its own validation stream or other data.

    precision: 'fp32' or 'bf16'; None: the run's own (the one its val_loss was measured in).

    ``loss`` (and the perplexity and bits per byte made from it) is the packed stream's, as
    training's val_loss; ``loss_doc`` scores the same budget document by document, as val_loss_doc.
    """
    run_dir = Path(run_dir)
    device = select_device(device_name)
    run = load_run(run_dir, device)
    t = run.cfg.train
    # a run saved before tinylm kept its precision holds 'auto'
    precision = precision or resolve_precision(t.precision, device, saved_before_precision=True)
    prepared = prepare(PrepareOptions.from_config(t, data, tokenizer_file(run_dir)), quiet=True)
    split, block_size, eot = prepared.split("val"), run.cfg.model.block_size, prepared.meta["eot_id"]
    budget = eval_tokens if eval_tokens is not None else t.eval_tokens
    batches = validation_batches(split, block_size, t.batch_size, budget, eot, t.doc_mask)
    doc_batches = document_validation_batches(split, block_size, t.batch_size, budget, eot)
    loss = validation_loss(run.model, batches, device, run.tokenizer.vocab_size, precision)
    tokens = sum(b.real_tokens for b in batches)
    # Bytes of the scored text; each <|endoftext|> stands for one separator byte.
    n_bytes = 0
    for b in batches:
        ids = b.y.flatten().tolist()
        n_bytes += len(run.tokenizer.decode([i for i in ids if i != eot]).encode("utf-8")) + ids.count(eot)
    return {
        "run": str(run_dir),
        "data": prepared.meta["source"],
        "precision": precision,
        "tokens": tokens,
        "bytes": n_bytes,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_byte": loss * tokens / math.log(2) / max(n_bytes, 1),
        "loss_doc": validation_loss(run.model, doc_batches, device, run.tokenizer.vocab_size, precision),
        "tokens_doc": sum(b.real_tokens for b in doc_batches),
    }
