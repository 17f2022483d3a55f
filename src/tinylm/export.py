"""Export a run to the Hugging Face format, built offline: GPT-2 mechanics as a GPT2LMHeadModel,
Llama mechanics (rotary positions, RMSNorm, SwiGLU) as a LlamaForCausalLM, with QK-norm and no
biases as a Qwen3ForCausalLM, and the tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from tinylm.config import ModelConfig
from tinylm.data.tokenizer import EOT_TEXT, BPETokenizer, gpt2_ranks_path
from tinylm.errors import UserError
from tinylm.layers import NORM_EPS, swiglu_hidden
from tinylm.paths import (
    check_writable_dir,
    disk_full_is_one_line,
    remove_stale_temporaries,
    replace_durably,
    temporary_dir,
)
from tinylm.rundir import load_run

# Our Linear layers store (out, in); GPT-2's Conv1D layers store (in, out).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


GPT2_MECHANICS = dict(position="learned", norm="layernorm", mlp="gelu", qk_norm=False, logit_softcap=None, bias=True)
LLAMA_MECHANICS = dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=False, logit_softcap=None)
QWEN3_MECHANICS = dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, logit_softcap=None, bias=False)
"""The switch values each Hugging Face class can represent (Llama has optional biases; Qwen3 has
QK-norm, per head with one gain for all heads as tinylm's, applied before the rotation as tinylm
does, but no MLP biases; none has a logit cap; all may tie the output layer or not)."""

HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_family(m: ModelConfig) -> str:
    """'gpt2', 'llama' or 'qwen3', chosen by the position and QK-norm mechanics; any other switch
    that family cannot represent is a one-line UserError naming it."""
    if m.position == "learned":
        family, mechanics, chosen_by = "gpt2", GPT2_MECHANICS, f"position={m.position!r}"
    elif m.qk_norm:
        family, mechanics, chosen_by = "qwen3", QWEN3_MECHANICS, f"position={m.position!r} and qk_norm=True"
    else:
        family, mechanics, chosen_by = "llama", LLAMA_MECHANICS, f"position={m.position!r}"
    for key, needed in mechanics.items():
        if getattr(m, key) != needed:
            raise UserError(f"cannot export {key}={getattr(m, key)!r} with {chosen_by}: tinylm exports Hugging "
                            f"Face's {HF_CLASSES[family]} for these mechanics, which needs {key}={needed!r}")  # fmt: skip
    return family


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """GPT-2 names, Conv1D layout."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # tied to transformer.wte.weight
        if name.endswith(_TRANSPOSED):
            tensor = tensor.t()
        state[name] = tensor.detach().contiguous().clone()
    return state


def llama_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Llama names: the fused q/k/v and gate/up matrices (and biases) split in Llama's order."""
    state = model.state_dict()
    hidden = swiglu_hidden(model.config.n_embd, model.config.bias)
    out = {
        "model.embed_tokens.weight": state["transformer.wte.weight"],
        "model.norm.weight": state["transformer.ln_f.weight"],
    }
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    kinds = ("weight", "bias") if model.config.bias else ("weight",)
    for i in range(model.config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "ln_1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "ln_2.weight"]
        for kind in kinds:
            q, k, v = state[f"{ours}attn.c_attn.{kind}"].chunk(3, dim=0)
            gate, up = state[f"{ours}mlp.c_fc.{kind}"].split(hidden, dim=0)
            out.update({f"{theirs}self_attn.q_proj.{kind}": q, f"{theirs}self_attn.k_proj.{kind}": k,
                        f"{theirs}self_attn.v_proj.{kind}": v, f"{theirs}mlp.gate_proj.{kind}": gate,
                        f"{theirs}mlp.up_proj.{kind}": up})  # fmt: skip
            out[f"{theirs}self_attn.o_proj.{kind}"] = state[f"{ours}attn.c_proj.{kind}"]
            out[f"{theirs}mlp.down_proj.{kind}"] = state[f"{ours}mlp.c_proj.{kind}"]
        if model.config.qk_norm:  # Qwen3's names
            out[theirs + "self_attn.q_norm.weight"] = state[ours + "attn.q_norm.weight"]
            out[theirs + "self_attn.k_norm.weight"] = state[ours + "attn.k_norm.weight"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


_VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight", "model.embed_tokens.weight")


def hf_model(model: torch.nn.Module, eot: int, vocab_size: int | None = None):
    """The Hugging Face model holding ``model``'s weights (GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM).

    ``vocab_size``: the tokenizer's. A padded vocabulary's extra rows are left out: tinylm keeps them out
    of the softmax in training, evaluation and sampling, and a Hugging Face model would give them
    probability (and generate ids the tokenizer cannot decode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = dataclasses.replace(model.config, vocab_size=vocab_size or model.config.vocab_size)
    family = hf_family(m)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            layer_norm_epsilon=NORM_EPS, bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=m.tie_embeddings,
        )  # fmt: skip
        hf, state = GPT2LMHeadModel(config), hf_state_dict(model)
    else:
        hf, state = _rotary_hf_model(m, family, eot), llama_state_dict(model)
    state = {k: v[: m.vocab_size] if k in _VOCAB_ROWS else v for k, v in state.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = ["lm_head.weight"] if m.tie_embeddings else []
    missing = [k for k in missing if k not in tied and not k.endswith(".attn.bias")]
    if missing or unexpected:
        raise UserError(
            f"weights do not map onto {type(hf).__name__} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if m.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def _rotary_hf_model(m: ModelConfig, family: str, eot: int):
    """An empty LlamaForCausalLM or Qwen3ForCausalLM of ``m``'s shape (the same config fields; Qwen3
    adds the QK-norm gains and has no MLP biases, which hf_family has checked are off)."""
    import transformers

    shape = dict(
        vocab_size=m.vocab_size, hidden_size=m.n_embd, intermediate_size=swiglu_hidden(m.n_embd, m.bias),
        num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.n_head,
        head_dim=m.n_embd // m.n_head, max_position_embeddings=m.block_size, rms_norm_eps=NORM_EPS,
        rope_theta=m.rope_theta, hidden_act="silu", attention_bias=m.bias,
        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=m.tie_embeddings,
    )  # fmt: skip
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, mlp_bias=m.bias))
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, use_sliding_window=False))


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
    """Write the run's Hugging Face folder to ``out``: built under a temporary name beside it and
    renamed once complete, so ``out`` never holds half an export (a kill or a full disk leaves none)."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise UserError("export needs transformers: pip install 'tinylm[hf]'") from e
    check_writable_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; choose another --out")
    run = load_run(run_dir)
    m = run.cfg.model
    hf = hf_model(run.model, run.tokenizer.eot_id, run.tokenizer.vocab_size)
    if isinstance(run.tokenizer, BPETokenizer):
        backend = run.tokenizer.backend
    else:
        backend = gpt2_hf_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOT_TEXT, eos_token=EOT_TEXT, unk_token=EOT_TEXT
    )
    hf_tok.model_max_length = m.block_size
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # a killed export's
    tmp = temporary_dir(out)
    try:
        with disk_full_is_one_line(out.parent, f"nothing was exported (no {out.name}): make room and export again"):
            tmp.mkdir()
            hf.save_pretrained(tmp, safe_serialization=True)
            hf_tok.save_pretrained(tmp)
            info = {"exported_from": str(run_dir), "preset": run.cfg.preset}
            (tmp / "tinylm.json").write_text(json.dumps(info, indent=2))
            for path in tmp.iterdir():  # the files' bytes on disk before the rename makes them the export
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            if out.exists():
                out.rmdir()  # empty, as checked above
            replace_durably(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
