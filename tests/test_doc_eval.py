"""The per-document validation: each held-out document scored alone from its start, beside the packed stream."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from tinylm import checkpoint
from tinylm.costs import model_costs
from tinylm.data.batching import PaddedRows, document_validation_batches, validation_batches
from tinylm.data.prepare import PrepareOptions, TokenSplit, prepare
from tinylm.distributed import Cluster
from tinylm.loss import IGNORE_INDEX
from tinylm.metrics import read_metrics
from tinylm.train import build_trainer, train

EOT = 99


def _split(n: int, seed: int = 0) -> tuple[TokenSplit, list[list[int]]]:
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(0, 90, rng.integers(2, 30))) + [EOT] for _ in range(n)]
    tokens = np.concatenate([np.asarray(d, dtype=np.uint16) for d in docs])
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return TokenSplit(tokens, offsets), docs


def _docs_within_budget(lengths: list[int], block_size: int, budget: int) -> int:
    """The reference rule, spelled out: documents in order until their scored targets reach the budget."""
    count, n = 0, 0
    while n < len(lengths) and count < budget:
        count += min(lengths[n], block_size)
        n += 1
    return n


@pytest.mark.parametrize("max_tokens", [40, 200, None])
def test_document_rows_are_padded_training_rows_of_the_first_documents_within_the_budget(max_tokens):
    split, docs = _split(50)
    T = 16
    batches = document_validation_batches(split, T, batch_size=4, max_tokens=max_tokens, eot_id=EOT)
    packed = validation_batches(split, T, batch_size=4, max_tokens=max_tokens, eot_id=EOT)
    budget = sum(b.real_tokens for b in packed)  # the packed stream's scored tokens
    n = _docs_within_budget([len(d) for d in docs], T, budget)
    assert n == len(docs) if max_tokens is None else 0 < n < len(docs)
    assert sum(b.x.shape[0] for b in batches) == n and all(b.x.shape[0] == 4 for b in batches[:-1])
    same = PaddedRows(split, T, EOT, seed=0)._rows(np.arange(n))  # padded training's rows of those documents
    # Batches may group the rows in another order and leave out columns of padding only: given that
    # padding back, the rows are padded training's, each document once.
    x = torch.cat([F.pad(b.x, (0, T - b.x.shape[1]), value=EOT) for b in batches])
    y = torch.cat([F.pad(b.y, (0, T - b.y.shape[1]), value=IGNORE_INDEX) for b in batches])
    assert sorted(torch.cat([x, y], 1).tolist()) == sorted(torch.cat([same.x, same.y], 1).tolist())
    assert all((b.y[:, -1] != IGNORE_INDEX).any() for b in batches)  # no column of padding alone is kept
    assert sum(b.real_tokens for b in batches) == same.real_tokens
    if max_tokens is not None:  # the budget reached, by whole documents
        assert budget <= same.real_tokens < budget + T
    assert all(b.doc_ids is None for b in batches)  # one document a row: nothing for a doc mask to separate
    again = document_validation_batches(split, T, batch_size=4, max_tokens=max_tokens, eot_id=EOT)
    assert all(torch.equal(a.y, b.y) for a, b in zip(batches, again))


def _manual_per_document_loss(model, split: TokenSplit, block_size: int, eot: int, budget: int, vocab: int) -> float:
    """Each document alone, unpadded: [EOT, its tokens] cut to the block, one full forward, summed cross-entropy."""
    lengths = np.diff(split.offsets).tolist()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(_docs_within_budget(lengths, block_size, budget)):
            seq = torch.tensor([eot, *split.document(i)[:block_size].tolist()])
            logits, _ = model(seq[None, :-1])
            total += F.cross_entropy(logits[0, :, :vocab].double(), seq[1:], reduction="sum").item()
            count += len(seq) - 1
    return total / count


@pytest.mark.parametrize(
    "train_settings, position",
    [({}, "learned"), ({"doc_mask": True}, "rope"), ({"batching": "padded"}, "learned")],
    ids=["packed", "doc-mask-rope", "padded"],
)
def test_per_document_loss_equals_scoring_each_document_alone(stories, tmp_path, train_settings, position):
    cfg = tiny_config(stories, tmp_path / "run", **train_settings)
    cfg.model.position = position
    trainer = build_trainer(cfg, resume=False, quiet=True, cluster=Cluster(), device=torch.device("cpu"))
    for _ in range(3):  # trained a little: not the uniform start, where every layout scores alike
        trainer.train_step()
    losses = trainer.validate()
    prepared = prepare(PrepareOptions.from_config(cfg.train), quiet=True)
    split, eot = prepared.split("val"), prepared.meta["eot_id"]
    assert any(len(split.document(i)) > 64 for i in range(4)), "the check should meet a document cut at the block"
    trainer.model.eval()
    manual = _manual_per_document_loss(trainer.model, split, 64, eot, 512, prepared.meta["vocab_size"])
    assert losses["val_loss_doc"] == pytest.approx(manual, abs=1e-5)
    assert losses["val_loss_doc"] != pytest.approx(losses["val_loss"], abs=1e-4)  # a different number


def test_ranks_share_the_document_batches_and_their_sums_add_up(stories, tmp_path):
    from tinylm.evaluate import validation_loss_sum
    from tinylm.train import run_data

    cfg = tiny_config(stories, tmp_path / "run", eval_tokens=2048)
    prepared = prepare(PrepareOptions.from_config(cfg.train), quiet=True)
    whole = run_data(cfg, prepared, Cluster())
    shares = [run_data(cfg, prepared, Cluster(rank=r, world=2)) for r in range(2)]
    assert len(whole.val_doc_batches) > 2
    assert sum(len(s.val_doc_batches) for s in shares) == len(whole.val_doc_batches)
    torch.manual_seed(0)
    trainer = build_trainer(cfg, resume=False, quiet=True, cluster=Cluster(), device=torch.device("cpu"))
    cpu = torch.device("cpu")
    one = validation_loss_sum(trainer.model, whole.val_doc_batches, cpu, prepared.meta["vocab_size"])
    two = [validation_loss_sum(trainer.model, s.val_doc_batches, cpu, prepared.meta["vocab_size"]) for s in shares]
    assert sum(c for _, c in two) == one[1]
    assert sum(s for s, _ in two) == pytest.approx(one[0], rel=1e-9)


def test_every_evaluation_and_the_summary_carry_both_losses_and_the_flops(stories, tmp_path):
    from tinylm.evaluate import validation_loss
    from tinylm.rundir import load_run

    cfg = tiny_config(stories, tmp_path / "run")
    result = train(cfg, quiet=True)
    s = result.summary
    evals = [r for r in read_metrics(result.run_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    # val_loss is still the packed stream's, to the last bit: the final weights scored on it directly
    prepared = prepare(PrepareOptions.from_config(cfg.train), quiet=True)
    packed = validation_batches(prepared.split("val"), 64, 4, 512, prepared.meta["eot_id"])
    run = load_run(result.run_dir, torch.device("cpu"))
    assert validation_loss(run.model, packed, torch.device("cpu"), prepared.meta["vocab_size"]) == evals[-1]["val_loss"]
    docs = [r["val_loss_doc"] for r in evals]
    assert s["start_val_loss_doc"] == docs[0] and s["final_val_loss_doc"] == docs[-1]
    assert s["best_val_loss_doc"] == min(docs) and s["worst_val_loss_doc"] == max(docs)
    assert s["flops_per_token"] == model_costs(cfg.model).flops_per_token_train > 0
    assert s["train_flops"] == s["flops_per_token"] * s["tokens"] == s["flops_per_token"] * 12 * 4 * 64
    assert json.loads((result.run_dir / "summary.json").read_text())["best_val_loss_doc"] == s["best_val_loss_doc"]


def _strip_per_document_keys(run_dir) -> None:
    """Make run_dir look as a run written before the per-document loss: no key of it anywhere."""
    state_file = checkpoint.locate(run_dir).state
    state = torch.load(state_file, weights_only=False)
    del state["progress"]["val_losses_doc"]
    torch.save(state, state_file)
    pointer = json.loads((run_dir / checkpoint.POINTER_FILE).read_text())
    pointer["files"][checkpoint.STATE_FILE] = state_file.stat().st_size  # the size its own save would have written
    pointer.pop(checkpoint.CHECKSUM, None)  # such a run's pointer predates checksums too
    (run_dir / checkpoint.POINTER_FILE).write_text(json.dumps(pointer))
    records = [{k: v for k, v in r.items() if k != "val_loss_doc"} for r in read_metrics(run_dir)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = json.loads((run_dir / "summary.json").read_text())
    old = {k: v for k, v in summary.items() if "_doc" not in k and "flops" not in k}
    (run_dir / "summary.json").write_text(json.dumps(old))


def test_a_run_from_before_the_per_document_loss_resumes_evaluates_and_reports(stories, tmp_path):
    cfg = tiny_config(stories, tmp_path / "run")
    train(cfg, quiet=True, interrupt_after=6)
    _strip_per_document_keys(tmp_path / "run")
    resumed = train(cfg, resume=True, quiet=True)
    s = resumed.summary
    later = [r["val_loss_doc"] for r in read_metrics(resumed.run_dir) if "val_loss_doc" in r]
    assert len(later) == 2  # steps 8 and 12: measured from the resume on
    assert s["start_val_loss_doc"] is None  # never measured at the start: not a later value passed off as it
    assert s["best_val_loss_doc"] == min(later) and s["final_val_loss_doc"] == later[-1]
    _strip_per_document_keys(tmp_path / "run")
    for command in (["eval", "--device", "cpu"], ["report", "--out", str(tmp_path / "report")]):
        args = [sys.executable, "-m", "tinylm", command[0], str(tmp_path / "run"), *command[1:]]
        done = subprocess.run(args, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["loss_doc"] == pytest.approx(later[-1], rel=1e-6) and result["loss"] == pytest.approx(
        s["final_val_loss"], rel=1e-6
    )
