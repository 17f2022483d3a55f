"""A GPT-2 style decoder: pre-LayerNorm blocks, learned positions, tied embeddings.

Parameter names follow GPT-2 (``transformer.wte``, ``h.N.attn.c_attn`` ...) so the weights
map one to one onto Hugging Face's ``GPT2LMHeadModel``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.config import ModelConfig
from tinylm.loss import IGNORE_INDEX, linear_cross_entropy

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:  # generation: prepend the keys and values of earlier tokens
            k = torch.cat([cache[0], k], dim=2)  # (B, nh, past + T, hs)
            v = torch.cat([cache[1], v], dim=2)
        dropout = self.dropout if self.training else 0.0
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        elif cache is not None and T > 1:
            # New tokens see all cached tokens and the causal part of themselves.
            past = k.shape[2] - T
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask=None, cache=None):
        attn_out, kv = self.attn(self.ln_1(x), attn_mask, cache)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        self.init_weights("scaled", seed=None)

    @torch.no_grad()
    def init_weights(self, mode: str, seed: int | None) -> None:
        """'scaled': GPT-2's init. 'naive': every Linear/Embedding weight from N(0, 1)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        std = 1.0 if mode == "naive" else 0.02
        residual_std = 1.0 if mode == "naive" else 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # Residual output projections are scaled so the stream's variance does not
                # grow with depth (GPT-2).
                s = residual_std if name.endswith("c_proj") else std
                module.weight.normal_(0.0, s, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()

    def compile_blocks(self) -> None:
        """torch.compile every block in place; identical blocks reuse one compiled graph, and
        parameter names (checkpoints, export) stay as they are."""
        for block in self.transformer.h:
            block.compile()

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied matrix counts once
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        full_logits: bool = False,
        z_loss: float = 0.0,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx, targets, doc_ids: (B, T). Returns (logits, loss).

        With targets the loss is computed chunk by chunk and logits is None (unless
        ``full_logits``, the textbook path); without targets logits are (B, T, V).
        doc_ids, when given, keep attention inside each document and restart positions.
        z_loss: coefficient of the log-sum-exp² term added to the loss (training only).
        """
        x = self.hidden_states(idx, doc_ids)  # (B, T, C)
        if targets is None:
            return self.lm_head(x), None
        if full_logits:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
            return logits, loss
        loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), z_loss=z_loss)
        return None, loss

    def hidden_states(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, C): the final LayerNorm's output, which lm_head turns into logits."""
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
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x, _ = block(x, attn_mask)
        return self.transformer.ln_f(x)

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """Logits of the last position and the updated key/value cache (for generation)."""
        past = 0 if cache is None else cache[0][0].shape[2]
        T = idx.shape[1]
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        new_cache: KVCache = []
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, None, None if cache is None else cache[i])
            new_cache.append(kv)
        x = self.transformer.ln_f(x[:, -1:])  # (B, 1, C)
        return self.lm_head(x)[:, -1], new_cache  # (B, V)


def positions_within_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> each token's offset from the start of its document."""
    T = doc_ids.shape[1]
    t = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts_here = torch.ones_like(doc_ids, dtype=torch.bool)
    starts_here[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    doc_start = torch.where(starts_here, t, 0).cummax(dim=1).values
    return t - doc_start
