"""The parts of a transformer block, each mechanic a choice of ``ModelConfig``: the norm
(LayerNorm | RMSNorm), the MLP (GELU | SwiGLU), attention with optional QK-norm and rotary
positions.

Names follow GPT-2 (``c_attn``, ``c_proj``, ``c_fc``, ``ln_1``): every residual output projection
is called ``c_proj``, which is how ``GPT.init_weights`` finds the matrices it scales by depth.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.config import ModelConfig

NORM_EPS = 1e-5
"""LayerNorm's default, used for RMSNorm too (torch's RMSNorm would otherwise take the dtype's
machine epsilon) so both norms behave the same on tiny inputs and exports can state it."""

Rotary = tuple[torch.Tensor, torch.Tensor]
"""cos and sin of every position's rotation angles: (T, hs) or (B, 1, T, hs)."""


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm computed in its gain's dtype (fp32) and returned in the input's.

    Under bf16 autocast QK-norm gets bf16 queries and keys while its gain stays fp32; given the two
    dtypes torch's kernel warns and falls back to a slow composite path (which normalises in fp32
    too). Casting the input up first takes the fused kernel; an fp32 input is computed as before.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.n_embd if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=NORM_EPS)
    return nn.LayerNorm(dim, eps=NORM_EPS, bias=cfg.bias)


def swiglu_hidden(n_embd: int, bias: bool) -> int:
    """SwiGLU's hidden width: its parameters (3 matrices) within 1% of the 4x GELU MLP's (2 matrices).

    About 8C/3, rounded to a multiple of 64 when that stays within 1% (mid: 512, quality: 1024);
    for widths where it does not, to the coarsest of 32, 16, ..., 1 that does (basic: 344, tiny: 85).
    """
    C = n_embd
    gelu = 8 * C * C + (5 * C if bias else 0)

    def params(h: int) -> int:
        return 3 * C * h + (2 * h + C if bias else 0)

    exact = (gelu - (C if bias else 0)) / (3 * C + (2 if bias else 0))
    for multiple in (64, 32, 16, 8, 4, 2, 1):
        h = max(multiple, round(exact / multiple) * multiple)
        if abs(params(h) - gelu) <= 0.01 * gelu:
            return h
    return max(1, round(exact))


def rotary(pos: torch.Tensor, head_size: int, theta: float) -> Rotary:
    """cos and sin of the rotation angles of positions ``pos`` (T,) or (B, T).

    The half-split layout of GPT-NeoX and Hugging Face's Llama (channel i pairs with i + hs/2), so
    the weights export to LlamaForCausalLM without permutation. Angles are computed in fp32.
    """
    if pos.dim() == 2:
        pos = pos[:, None]  # (B, 1, T): one rotation for every head
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, device=pos.device).float() / head_size)  # (hs/2,)
    angles = pos.float()[..., None] * inv_freq  # (..., T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, hs)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: Rotary) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by their positions' angles."""
    cos, sin = (r.to(x.dtype) for r in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            # RMSNorm over each head's channels with a learnable gain (shared by the heads, as in
            # Qwen3): without a gain, q.k / sqrt(hs) could never exceed sqrt(hs) and attention
            # could not sharpen beyond that.
            self.q_norm = RMSNorm(cfg.n_embd // cfg.n_head, eps=NORM_EPS)
            self.k_norm = RMSNorm(cfg.n_embd // cfg.n_head, eps=NORM_EPS)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope: Rotary | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # cached keys keep their rotation: each is rotated once, at its own position
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        # SDPA wants one dtype: keep q and k in v's whatever the norm and the angles computed in
        q, k = q.to(v.dtype), k.to(v.dtype)
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
    """GPT-2's: 4x wide, tanh-approximated GELU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up), projected back. Gate and up are one matrix (``c_fc``, gate rows
    first): one matmul instead of two."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = swiglu_hidden(cfg.n_embd, cfg.bias)
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, H) each
        return self.dropout(self.c_proj(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)

    def forward(self, x, attn_mask=None, cache=None, rope=None):
        attn_out, kv = self.attn(self.ln_1(x), attn_mask, cache, rope)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, kv
