"""What a model costs: parameters, training FLOPs per token, memory for a batch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tinylm.config import ModelConfig
from tinylm.loss import _CHUNK_ELEMENTS
from tinylm.model import GPT


@dataclass
class ModelCosts:
    params: int
    params_non_embedding: int
    flops_per_token_forward: int
    flops_per_token_train: int
    """Forward + backward (3x forward), attention included, over the full block."""
    output_layer_flop_share: float
    """Share of the training FLOPs spent in the vocabulary projection."""
    memory_bytes: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def model_costs(
    cfg: ModelConfig, batch_size: int = 8, bytes_per_value: int = 4, device_type: str = "cpu"
) -> ModelCosts:
    with torch.device("meta"):
        model = GPT(cfg)
    params = model.num_params()
    C, L, T, V = cfg.n_embd, cfg.n_layer, cfg.block_size, cfg.vocab_size
    block_matmul = 2 * 12 * C * C  # q, k, v, out projection (4 C^2) and the 4x MLP (8 C^2)
    attention = 2 * 2 * T * C  # q @ k^T and att @ v for one token against the whole block
    head = 2 * V * C
    forward = L * (block_matmul + attention) + head
    # Memory: weights, gradients and two AdamW moments; activations kept for backward, about
    # 16 C values per token and layer (LayerNorm outputs, q/k/v, attention output, the 4C MLP
    # hidden before and after GELU; SDPA keeps no T x T matrix), and one chunk of logits.
    tokens = batch_size * T
    activations = tokens * L * 16 * C + tokens * 4 * C
    memory = {
        "weights": params * bytes_per_value,
        "gradients": params * bytes_per_value,
        "optimizer": 2 * params * 4,
        "activations": activations * bytes_per_value,
        "logits_chunk": 2 * min(_CHUNK_ELEMENTS[device_type], tokens * V) * 4,
    }
    memory["total"] = sum(memory.values())
    return ModelCosts(
        params=params,
        params_non_embedding=model.num_params(non_embedding=True),
        flops_per_token_forward=forward,
        flops_per_token_train=3 * forward,
        output_layer_flop_share=head / forward,
        memory_bytes=memory,
    )
