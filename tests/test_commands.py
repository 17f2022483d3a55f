"""The commands that use a finished run or prepare data, run as a user runs them (``tinylm.cli.main``)
and their outputs checked from outside: export loaded back in transformers, prepare's token files
decoded, plot's PNG read back, sample's several samples."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from conftest import make_story, tiny_config
from tinylm.cli import main
from tinylm.data.tokenizer import EOT_TEXT, GPT2Tokenizer
from tinylm.sample import load_run
from tinylm.train import train

LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
TEXT = 'once upon a time, lily saw a big cat.  "hello," said tom!\n\tünïcödé 東京 12345'


@pytest.fixture(scope="module")
def runs(stories, tmp_path_factory):
    """Two short runs with a trained BPE tokenizer: GPT-2 mechanics, and Llama's (untied, no biases)."""
    root = tmp_path_factory.mktemp("runs")
    train(tiny_config(stories, root / "gpt2", max_steps=12, eval_every=6), quiet=True)
    cfg = tiny_config(stories, root / "llama", max_steps=12, eval_every=6)
    cfg.model = dataclasses.replace(cfg.model, **LLAMA)
    train(cfg, quiet=True)
    return root


def _logits_agree(run_dir, hf_dir, family: str) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == family
    run = load_run(run_dir)
    idx = torch.randint(0, run.tokenizer.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = run.model(idx)[0], hf(idx).logits
    assert ours.std() > 0.1  # trained weights: a wrong mapping would not hide
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("run, family", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_export_command_writes_a_model_transformers_loads_with_the_same_logits_and_tokenizer(runs, tmp_path,
                                                                                             capsys, run, family):  # fmt: skip
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", str(runs / run), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    _logits_agree(runs / run, out, family)
    # the run's trained BPE, saved with the model: the same ids for any text, the separator included
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_run(runs / run).tokenizer
    expected = ours.encode_batch([TEXT])[0]
    assert len(expected) < len(TEXT.encode())  # merges are in play, not bytes alone
    assert hf_tok(TEXT)["input_ids"] == expected
    assert hf_tok(TEXT + EOT_TEXT)["input_ids"] == expected + [ours.eot_id]
    assert hf_tok.decode(expected) == ours.decode(expected) == TEXT
    assert hf_tok.eos_token_id == ours.eot_id and hf_tok.model_max_length == 64


def test_prepare_command_writes_token_files_that_decode_to_the_documents(tmp_path, capsys):
    rng = random.Random(5)
    docs = [make_story(rng) for _ in range(40)]
    source = tmp_path / "stories.txt"
    source.write_text("".join(f"{d}\n{EOT_TEXT}\n" for d in docs))
    out = tmp_path / "prepared"
    argv = ["prepare", "--data", str(source), "--tokenizer", "gpt2", "--out", str(out), "--val-fraction", "0.1"]
    assert main([*argv, "--block-size", "64"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    tok = GPT2Tokenizer()
    decoded, n_tokens = [], 0
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        offsets = np.fromfile(out / f"{split}.idx", dtype=np.int64)
        assert offsets[0] == 0 and offsets[-1] == len(tokens)
        for start, end in zip(offsets[:-1], offsets[1:]):
            doc = tokens[start:end].tolist()
            assert doc[-1] == tok.eot_id and tok.eot_id not in doc[:-1]  # one separator, at the end
            decoded.append(tok.decode(doc[:-1]))
        info = meta["splits"][split]
        assert info["documents"] == len(offsets) - 1 and info["tokens"] == len(tokens)
        assert f"{info['documents']:,} documents" in printed
        n_tokens += len(tokens)
    assert sorted(d.strip() for d in decoded) == sorted(docs)  # every document once, in one split
    assert 1 <= meta["splits"]["val"]["documents"] <= 8
    assert n_tokens == sum(len(t) + 1 for t in tok.encode_batch(docs))
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(argv) == 0  # the same data again: reused as it is
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_plot_command_draws_a_png_of_the_runs(runs, tmp_path, capsys):
    from matplotlib import image

    out = tmp_path / "curves.png"
    assert main(["plot", str(runs / "gpt2"), str(runs / "llama"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(out)  # (height, width, channels) in [0, 1]
    height, width = pixels.shape[:2]
    assert 200 <= height <= 2000 and width > 1.5 * height  # two panels side by side
    ink = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert 0.01 < ink < 0.5  # axes, labels and curves drawn; not a blank or filled canvas
    colour = (np.ptp(pixels[..., :3], axis=-1) > 0.2).mean()
    assert colour > 0.001  # the curves are in colour, not only the black axes


def test_sample_command_prints_several_seeded_samples(runs, capsys):
    argv = ["sample", str(runs / "gpt2"), "--prompt", "once upon a time", "--max-new-tokens", "12",
            "--num-samples", "3", "--seed", "4", "--device", "cpu", "--no-stop"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    parts = first.split("--- sample ")
    assert parts[0] == "" and [p.split(" ---")[0] for p in parts[1:]] == ["1", "2", "3"]
    texts = [p.split("---\n", 1)[1].rstrip("\n") for p in parts[1:]]
    assert all(t.startswith("once upon a time") and len(t) > len("once upon a time") for t in texts)
    assert len(set(texts)) > 1  # seed + i: each sample its own draw
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # and the same draws again
