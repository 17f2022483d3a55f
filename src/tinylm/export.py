"""Export a run to the Hugging Face format: a GPT2LMHeadModel and its tokenizer, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tinylm.data.tokenizer import EOT_TEXT, BPETokenizer, gpt2_ranks_path
from tinylm.errors import UserError
from tinylm.paths import check_writable_dir
from tinylm.rundir import load_run

# Our Linear layers store (out, in); GPT-2's Conv1D layers store (in, out).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        if name.endswith(_TRANSPOSED):
            tensor = tensor.t()
        state[name] = tensor.detach().contiguous().clone()
    return state


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merge_pair(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The last merge that builds ``token``: replay BPE on its bytes with the ranks below its own."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"cannot derive the merge for token {token!r}")
    return parts[0], parts[1]


def gpt2_hf_tokenizer():
    """A `tokenizers` byte-level BPE equal to tiktoken's r50k_base, from the offline ranks."""
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ranks = load_tiktoken_bpe(str(gpt2_ranks_path()))
    to_char = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = len(ranks)
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _merge_pair(ranks, token)
            merges.append((text(left), text(right)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT_TEXT])
    return tok


def export_hf(run_dir: Path, out: Path) -> Path:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    except ImportError as e:
        raise UserError("export needs transformers: pip install 'tinylm[hf]'") from e
    check_writable_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose another --out")
    run = load_run(run_dir)
    m = run.cfg.model
    eot = run.tokenizer.eot_id
    config = GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True,
    )  # fmt: skip
    hf_model = GPT2LMHeadModel(config)
    missing, unexpected = hf_model.load_state_dict(hf_state_dict(run.model), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")]
    if missing or unexpected:
        raise UserError(f"weights do not map onto GPT2LMHeadModel (missing {missing[:3]}, unexpected {unexpected[:3]})")
    hf_model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out, safe_serialization=True)
    if isinstance(run.tokenizer, BPETokenizer):
        backend = run.tokenizer.backend
    else:
        backend = gpt2_hf_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOT_TEXT, eos_token=EOT_TEXT, unk_token=EOT_TEXT
    )
    hf_tok.model_max_length = m.block_size
    hf_tok.save_pretrained(out)
    (out / "tinylm.json").write_text(json.dumps({"exported_from": str(run_dir), "preset": run.cfg.preset}, indent=2))
    return out
