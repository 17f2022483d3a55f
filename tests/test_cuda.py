"""The CUDA path on a real GPU (bf16 autocast, flash SDPA, NCCL); skipped where there is no CUDA.

scripts/gpu_check.sh runs these on a lent device. On the CPU the same properties are tested in
test_model.py, test_use.py, test_train.py and test_distributed.py; here they meet the GPU kernels.
"""

import contextlib
import json
import socket
import subprocess
import sys
import types

import pytest
import torch

from conftest import tiny_config
from tinylm.config import ModelConfig
from tinylm.evaluate import autocast_for
from tinylm.loss import IGNORE_INDEX, linear_cross_entropy
from tinylm.metrics import read_metrics
from tinylm.model import GPT
from tinylm.sample import SamplingOptions, generate
from tinylm.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
CUDA = torch.device("cuda")


@contextlib.contextmanager
def exact_fp32_matmuls():
    """TF32 off: cached and uncached paths multiply different shapes, so TF32 rounds them differently."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_chunked_loss_under_bf16_autocast_stays_close_to_fp32_textbook():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=1000)).to(CUDA)
    x = torch.randint(0, 1000, (4, 64), device=CUDA)
    y = torch.randint(0, 1000, (4, 64), device=CUDA)
    y[0, 40:] = IGNORE_INDEX
    with exact_fp32_matmuls():
        _, ref = model(x, y, full_logits=True)
        ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    with autocast_for(CUDA, "bf16"):
        _, loss = model(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.01 * ref.item()
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r).norm() <= 0.05 * r.norm() + 1e-6


def test_chunked_loss_over_several_chunks_under_bf16_stays_close_to_fp32():
    # The model's own chunks on CUDA are large (loss._CHUNK_ELEMENTS): force several here.
    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device=CUDA, requires_grad=True)
    weight = (torch.randn(1000, 64, device=CUDA) * 0.2).requires_grad_()
    targets = torch.randint(0, 1000, (300,), device=CUDA)
    targets[::7] = IGNORE_INDEX
    with exact_fp32_matmuls():
        ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
        ref_grads = torch.autograd.grad(ref, (hidden, weight))
    with autocast_for(CUDA, "bf16"):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=64)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert abs(loss.item() - ref.item()) < 0.01 * ref.item()
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r).norm() <= 0.02 * r.norm()


def test_kv_cache_logits_and_greedy_text_match_the_full_forward_on_cuda():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50)).to(CUDA).eval()
    idx = torch.randint(0, 50, (1, 12), device=CUDA)
    with exact_fp32_matmuls(), torch.no_grad():
        full, _ = model(idx)
        last, cache = model.forward_cached(idx[:, :8], None)
        torch.testing.assert_close(last, full[:, 7], rtol=1e-4, atol=1e-4)
        for t in range(8, 12):
            last, cache = model.forward_cached(idx[:, t : t + 1], cache)
            torch.testing.assert_close(last, full[:, t], rtol=1e-4, atol=1e-4)
        opts = SamplingOptions(max_new_tokens=16, temperature=0.0, stop_at_eot=False)
        prompt = idx[0, :4].tolist()
        vocabulary = types.SimpleNamespace(vocab_size=50, eot_id=0)  # what generate() asks of a tokenizer
        cached = list(generate(model, prompt, opts, vocabulary, use_cache=True))
        uncached = list(generate(model, prompt, opts, vocabulary, use_cache=False))
    assert cached == uncached


def test_resume_equals_uninterrupted_on_cuda(stories, tmp_path):
    def losses(run_dir):
        return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in read_metrics(run_dir)]

    whole = train(tiny_config(stories, tmp_path / "whole", schedule="cosine", device="cuda"), quiet=True)
    assert whole.summary["device"].startswith("cuda")
    cfg = tiny_config(stories, tmp_path / "split", schedule="cosine", device="cuda")
    assert train(cfg, quiet=True, interrupt_after=6).interrupted
    resumed = train(cfg, resume=True, quiet=True)
    a, b = losses(whole.run_dir), losses(resumed.run_dir)
    assert [r[0] for r in a] == [r[0] for r in b]  # no step missing or repeated
    # Same arithmetic; atomics in some CUDA backward kernels make the last bits vary run to run.
    for (_, ta, va), (_, tb, vb) in zip(a, b):
        for p, q in ((ta, tb), (va, vb)):
            assert (p is None) == (q is None) and (p is None or abs(p - q) < 2e-3)


def test_ddp_with_one_nccl_rank_gives_the_plain_gradients():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=100)
        plain = GPT(cfg).to(CUDA)
        wrapped = GPT(cfg).to(CUDA)
        wrapped.load_state_dict(plain.state_dict())
        ddp = DistributedDataParallel(wrapped, device_ids=[CUDA.index or 0])
        x = torch.randint(0, 100, (2, 32), device=CUDA)
        with autocast_for(CUDA, "bf16"):
            plain(x, x)[1].backward()
            ddp(x, x)[1].backward()
        for p, q in zip(plain.parameters(), wrapped.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        total = torch.ones(3, device=CUDA)
        dist.all_reduce(total)
        assert total.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


def test_train_sample_and_eval_commands_run_on_cuda(stories, tmp_path):
    def tinylm(*args):
        done = subprocess.run([sys.executable, "-m", "tinylm", *map(str, args)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    run = tmp_path / "run"
    tinylm("train", "--preset", "tiny", "--data", stories, "--tokenizer", "bpe:512", "--batch-size", 4,
           "--max-steps", 8, "--eval-every", 4, "--eval-tokens", 512, "--quiet", "--out", run)  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["best_val_loss"] < summary["start_val_loss"]
    text = tinylm("sample", run, "--prompt", "once upon a time", "--max-new-tokens", 20, "--seed", 1).stdout
    assert "once upon a time" in text
    tinylm("eval", run)
    assert json.loads((run / "eval.json").read_text())["loss"] > 0


def test_every_model_switch_trains_resumes_and_samples_on_cuda(stories, tmp_path):
    # RoPE, RMSNorm, SwiGLU, QK-norm, an untied head and a logit cap at once, under bf16 autocast.
    import dataclasses

    from tinylm.rundir import load_run

    switches = dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False,
                    logit_softcap=15.0, bias=False)  # fmt: skip

    def config(out):
        cfg = tiny_config(stories, tmp_path / out, max_steps=8, eval_every=4, device="cuda")
        cfg.model = dataclasses.replace(cfg.model, **switches)
        return cfg

    whole = train(config("whole"), quiet=True)
    assert whole.summary["best_val_loss"] < whole.summary["start_val_loss"]
    split = config("split")
    assert train(split, quiet=True, interrupt_after=4).interrupted
    resumed = train(split, resume=True, quiet=True)
    assert abs(resumed.summary["final_val_loss"] - whole.summary["final_val_loss"]) < 2e-3
    run = load_run(resumed.run_dir, device=CUDA)
    prompt = run.tokenizer.encode_batch(["once upon a time"])[0]
    opts = SamplingOptions(max_new_tokens=16, temperature=0.0, stop_at_eot=False)
    with exact_fp32_matmuls():
        cached = list(generate(run.model, prompt, opts, run.tokenizer, use_cache=True))
        uncached = list(generate(run.model, prompt, opts, run.tokenizer, use_cache=False))
    assert cached == uncached


def test_steps_inside_a_read_interval_do_not_synchronise_on_cuda(stories, tmp_path):
    # host_read_every: the guard decides on the device and the update is masked; the host waits for nothing
    # until it reads (torch raises on any synchronising call while the debug mode is "error").
    from tinylm.distributed import Cluster
    from tinylm.train import build_trainer

    cfg = tiny_config(stories, tmp_path / "run", device="cuda", max_steps=8, host_read_every=4)
    trainer = build_trainer(cfg, resume=False, quiet=True, cluster=Cluster(), device=CUDA)
    assert trainer.read_every == 4 and trainer.device_guard is not None
    trainer.train_step()  # the first creates the optimizer's state and warms the libraries up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    taken = trainer.read_steps()
    assert [s.record["step"] for s in taken] == [1, 2, 3, 4] and all(s.record["train_loss"] > 0 for s in taken)


def test_a_masked_update_skips_a_nan_step_on_cuda_as_the_host_does(stories, tmp_path, monkeypatch):
    real_forward, calls = GPT.forward, {"n": 0}

    def forward_with_one_nan(self, idx, targets=None, doc_ids=None, **options):
        logits, *losses = real_forward(self, idx, targets, doc_ids, **options)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                losses = [loss * float("nan") for loss in losses]
        return logits, *losses

    monkeypatch.setattr(GPT, "forward", forward_with_one_nan)
    runs = {}
    for n in (1, 4):
        calls["n"] = 0
        runs[n] = train(tiny_config(stories, tmp_path / f"n{n}", device="cuda", host_read_every=n), quiet=True)
    for run in runs.values():
        assert [(e["event"], e["step"], e["skipped"]) for e in run.summary["events"]] == [("nan", 3, True)]
        assert run.summary["skipped_updates"] == 1
    a, b = read_metrics(runs[1].run_dir), read_metrics(runs[4].run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):  # a skipped update moved nothing: the losses after it agree (atomics vary the last bits)
        for key in ("train_loss", "val_loss"):
            p, q = ra.get(key), rb.get(key)  # metrics.jsonl writes a non-finite value as a string
            assert type(p) is type(q) and (not isinstance(p, float) or abs(p - q) < 2e-3), (ra["step"], key, p, q)
