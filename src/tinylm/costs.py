"""What a model costs: parameters, training FLOPs per token, memory for a batch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tinylm.config import ModelConfig, Optimizer
from tinylm.layers import swiglu_hidden
from tinylm.loss import _CHUNK_ELEMENTS


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
    cfg: ModelConfig,
    batch_size: int = 8,
    bytes_per_value: int = 4,
    device_type: str = "cpu",
    optimizer: Optimizer = "adamw",
) -> ModelCosts:
    """optimizer: 'adamw' or 'muon' (TrainConfig.optimizer), whose state the memory estimate counts."""
    C, L, T, V = cfg.n_embd, cfg.n_layer, cfg.block_size, cfg.vocab_size
    matrices = block_matrices(cfg)
    embeddings = V * C + (T * C if cfg.position == "learned" else 0) + (0 if cfg.tie_embeddings else V * C)
    params_non_embedding = L * (matrices + block_vectors(cfg)) + norm_params(cfg, C)
    params = embeddings + params_non_embedding
    block_matmul = 2 * matrices  # a multiply and an add per weight
    attention = 2 * 2 * T * C  # q @ k^T and att @ v for one token against the whole block
    head = 2 * V * C
    forward = L * (block_matmul + attention) + head
    # Rotary angles, norms, soft-capping are elementwise: left out, like GELU and the softmax.
    # Memory: weights, gradients and the optimizer's state; activations kept for backward, about
    # 16 C values per token and layer (LayerNorm outputs, q/k/v, attention output, the 4C MLP
    # hidden before and after GELU; SDPA keeps no T x T matrix), and one chunk of logits.
    tokens = batch_size * T
    activations = tokens * L * 16 * C + tokens * 4 * C
    memory = {
        "weights": params * bytes_per_value,
        "gradients": params * bytes_per_value,
        "optimizer": optimizer_state_values(cfg, params, optimizer) * 4,
        "activations": activations * bytes_per_value,
        "logits_chunk": 2 * min(_CHUNK_ELEMENTS[device_type], tokens * V) * 4,
    }
    memory["total"] = sum(memory.values())
    return ModelCosts(
        params=params,
        params_non_embedding=params_non_embedding,
        flops_per_token_forward=forward,
        flops_per_token_train=3 * forward,
        output_layer_flop_share=head / forward,
        memory_bytes=memory,
    )


def optimizer_state_values(cfg: ModelConfig, params: int, optimizer: Optimizer = "adamw") -> int:
    """fp32 values the optimizer keeps: AdamW two moments per parameter; Muon one momentum buffer per
    block matrix (optim.is_hidden_matrix), with AdamW's two moments for everything else. AdamW's
    one-value step count per parameter tensor is left out (a few hundred bytes)."""
    if optimizer == "adamw":
        return 2 * params
    on_muon = cfg.n_layer * block_matrices(cfg)
    return on_muon + 2 * (params - on_muon)


def block_matrices(cfg: ModelConfig) -> int:
    """Weights of one block's matrices: q, k, v and the output projection (4 C^2), and the MLP's
    two 4x matrices (8 C^2) or SwiGLU's three (3 C H)."""
    C = cfg.n_embd
    mlp = 3 * C * swiglu_hidden(C, cfg.bias) if cfg.mlp == "swiglu" else 8 * C * C
    return 4 * C * C + mlp


def block_vectors(cfg: ModelConfig) -> int:
    """One block's biases and norm parameters."""
    C = cfg.n_embd
    hidden = swiglu_hidden(C, cfg.bias) if cfg.mlp == "swiglu" else 4 * C
    biases = 4 * C + (2 * hidden if cfg.mlp == "swiglu" else hidden) + C if cfg.bias else 0
    qk_gains = 2 * (C // cfg.n_head) if cfg.qk_norm else 0
    return biases + 2 * norm_params(cfg, C) + qk_gains


def norm_params(cfg: ModelConfig, dim: int) -> int:
    return dim if cfg.norm == "rmsnorm" or not cfg.bias else 2 * dim
