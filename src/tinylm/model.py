"""A pre-norm decoder: GPT-2 by default (LayerNorm, learned positions, GELU MLP, tied
embeddings), with the later mechanics as ``ModelConfig`` switches (``layers.py`` holds the parts).

Parameter names follow GPT-2 (``transformer.wte``, ``h.N.attn.c_attn`` ...) so a GPT-2 model's
weights map one to one onto Hugging Face's ``GPT2LMHeadModel``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from tinylm.config import ModelConfig
from tinylm.layers import Block, Rotary, make_norm, rotary
from tinylm.loss import linear_cross_entropy, textbook_loss

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        parts = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd))
        if cfg.position == "learned":
            parts["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        parts.update(
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=make_norm(cfg),
        )
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        self.init_weights("scaled", seed=None)

    @torch.no_grad()
    def init_weights(self, mode: str, seed: int | None) -> None:
        """'scaled': GPT-2's init (an untied output matrix N(0, 0.02) too). 'naive': every
        Linear/Embedding weight from N(0, 1). Norm gains 1 and biases 0 in both."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        std = 1.0 if mode == "naive" else 0.02
        residual_std = 1.0 if mode == "naive" else 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # Residual output projections are scaled so the stream's variance does not
                # grow with depth (GPT-2); SwiGLU's down projection is one of them.
                s = residual_std if name.endswith("c_proj") else std
                module.weight.normal_(0.0, s, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def compile_blocks(self) -> None:
        """torch.compile every block in place; identical blocks reuse one compiled graph, and
        parameter names (checkpoints, export) stay as they are."""
        for block in self.transformer.h:
            block.compile()

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters (a tied matrix counts once); non_embedding leaves out the token and
        position tables and an untied output matrix, so the count compares across the switches."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) final hidden states -> (..., V) logits, soft-capped if the model caps them."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        full_logits: bool = False,
        z_loss: float = 0.0,
        return_cross_entropy: bool = False,
        vocab_size: int | None = None,
    ) -> tuple[torch.Tensor | None, ...]:
        """idx, targets, doc_ids: (B, T). Returns (logits, loss).

        With targets the loss is computed chunk by chunk and logits is None (unless
        ``full_logits``, the textbook path: loss.textbook_loss on the full logits); without targets
        logits are (B, T, V).
        doc_ids, when given, keep attention inside each document and restart positions.
        z_loss: coefficient of the log-sum-exp² term added to the loss (training only).
        return_cross_entropy: return (logits, loss, cross-entropy), the last the loss without the
        z-loss term, detached: what training logs (the loss is what it backpropagates).
        vocab_size: the tokenizer's; output rows beyond it (a vocabulary padded to a multiple of 64,
        quality's 50304) stay out of the loss's softmax, as in evaluation (evaluate.validation_loss_sum)
        and sampling: no target is ever a padding id, so training need not spend probability on them,
        and the loss it logs is the one evaluation measures. None: every row.
        """
        x = self.hidden_states(idx, doc_ids)  # (B, T, C)
        if targets is None:
            return self.logits(x), None
        if full_logits:
            logits = self.logits(x)[..., :vocab_size]  # (B, T, V)
            loss, cross_entropy = textbook_loss(logits.flatten(0, 1).float(), targets.flatten(), z_loss)
            return (logits, loss, cross_entropy) if return_cross_entropy else (logits, loss)
        loss, cross_entropy = linear_cross_entropy(
            x.flatten(0, 1), self.lm_head.weight[:vocab_size], targets.flatten(), softcap=self.config.logit_softcap,
            z_loss=z_loss,
            return_cross_entropy=True,
        )  # fmt: skip
        return (None, loss, cross_entropy) if return_cross_entropy else (None, loss)

    def hidden_states(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, C): the final norm's output, which ``logits`` turns into logits."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block size {self.config.block_size}")
        attn_mask = None
        if doc_ids is None:
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            attn_mask = (same_doc & causal)[:, None]  # (B, 1, T, T)
            pos = positions_within_documents(doc_ids)  # (B, T)
        x, rope = self.embed(idx, pos)
        x = self.transformer.drop(x)  # (B, T, C)
        for block in self.transformer.h:
            x, _ = block(x, attn_mask, None, rope)
        return self.transformer.ln_f(x)

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, Rotary | None]:
        """Token embeddings plus the positions' vectors (learned), or with their rotations (rope).

        pos: (T,) or (B, T), each token's position within its document."""
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.position == "learned":
            return x + self.transformer.wpe(pos), None
        cfg = self.config
        return x, rotary(pos, cfg.n_embd // cfg.n_head, cfg.rope_theta)

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """Logits of the last position and the updated key/value cache (for generation)."""
        past = 0 if cache is None else cache[0][0].shape[2]
        T = idx.shape[1]
        pos = torch.arange(past, past + T, device=idx.device)
        x, rope = self.embed(idx, pos)  # (B, T, C)
        new_cache: KVCache = []
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, None, None if cache is None else cache[i], rope)
            new_cache.append(kv)
        x = self.transformer.ln_f(x[:, -1:])  # (B, 1, C)
        return self.logits(x)[:, -1], new_cache  # (B, V)


def positions_within_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> each token's offset from the start of its document."""
    T = doc_ids.shape[1]
    t = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts_here = torch.ones_like(doc_ids, dtype=torch.bool)
    starts_here[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    doc_start = torch.where(starts_here, t, 0).cummax(dim=1).values
    return t - doc_start
