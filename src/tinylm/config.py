"""Typed run configuration: model shape, data, optimisation and budget.

Every field is documented where it is declared, validated in ``__post_init__`` and saved
with each run as ``config.json``. Named presets are plain data (:data:`PRESETS`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tinylm.errors import UserError
from tinylm.fields import ConfigError, dotted, from_mapping, read_as
from tinylm.fields import read_fields as _read_fields
from tinylm.fields import require as _require
from tinylm.paths import write_atomic

GPT2_VOCAB_SIZE = 50257

Position = Literal["learned", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
Mlp = Literal["gelu", "swiglu"]


@dataclass
class ModelConfig:
    """Shape of a decoder: GPT-2 by default, each later mechanic a switch."""

    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Width of the residual stream."""
    block_size: int = 512
    """Longest context, in tokens: the length of a training row (and, with learned positions, the
    size of the position table)."""
    vocab_size: int = GPT2_VOCAB_SIZE
    """Rows of the token embedding and the output layer; must hold the tokenizer's vocabulary (a
    bpe:N tokenizer sets it to its own size)."""
    dropout: float = 0.0
    """Dropout probability on attention, MLP and embeddings.

    0 by default, as suits short runs."""
    bias: bool = True
    """Biases in the Linear layers and LayerNorms, as GPT-2 has (Llama-style blocks have none)."""
    position: Position = "learned"
    """'learned': a table of block_size position vectors (GPT-2); 'rope': rotary embeddings on
    queries and keys (no table)."""
    rope_theta: float = 10000.0
    """rope: base of the rotary frequencies."""
    norm: Norm = "layernorm"
    """'layernorm' (GPT-2) or 'rmsnorm' (no mean subtraction, no bias)."""
    mlp: Mlp = "gelu"
    """'gelu': 4x-wide GELU MLP (GPT-2); 'swiglu': gated SiLU MLP whose width keeps the MLP's
    parameter count within 1% of the GELU one."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head before attention (a learnable gain over the head
    dimension, shared by the heads)."""
    tie_embeddings: bool = True
    """The output layer shares the token embedding matrix, as GPT-2's does (--no-tie-embeddings: a
    separate output matrix)."""
    logit_softcap: float | None = None
    """Cap on the output logits, cap * tanh(logits / cap), in training, evaluation and sampling
    (default: no cap)."""

    def __post_init__(self) -> None:
        _read_fields(self)
        _require(self, ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"), lambda v: v >= 1, "at least 1")
        _require(self, ("dropout",), lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        _require(self, ("rope_theta", "logit_softcap"), lambda v: v > 0, "positive")
        if self.n_embd % self.n_head:
            raise ConfigError("n_embd", f"({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(
                "position", f"rope needs an even head size (n_embd / n_head = {self.n_embd // self.n_head})"
            )


PRESETS: dict[str, ModelConfig] = {
    # The three sizes of the seed report (parameter counts with the GPT-2 vocabulary).
    "basic": ModelConfig(n_layer=4, n_head=4, n_embd=128),  # 7,291,776
    "mid": ModelConfig(n_layer=6, n_head=6, n_embd=192),  # 12,417,216
    # quality pads the vocabulary to a multiple of 64 (as nanoGPT does) for faster GPU
    # matmuls; the 47 extra rows are never a target.
    "quality": ModelConfig(n_layer=12, n_head=6, n_embd=384, vocab_size=50304),  # 40,807,680
    # For tests and smoke runs: seconds on a laptop CPU.
    "tiny": ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


Init = Literal["scaled", "naive"]
Schedule = Literal["constant", "cosine", "wsd"]
Batching = Literal["padded", "packed"]
Optimizer = Literal["adamw", "muon"]
Tracker = Literal["none", "tensorboard", "wandb", "mlflow"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass
class TrainConfig:
    """Everything about a training run except the model's shape."""

    # --- data ---
    data: str = "shakespeare"
    """Training text: a file or folder (.txt, .json, .jsonl, .parquet), 'shakespeare' (installed with
    tinylm), 'tinystories' (downloaded from the Hugging Face hub) or 'hf:NAME[:CONFIG]' (a hub data set)."""
    tokenizer: str = "gpt2"
    """'gpt2' (GPT-2's 50257 tokens, via tiktoken) or 'bpe:N' (a byte-level BPE of N tokens trained on the data)."""
    batching: Batching = "packed"
    """'packed': documents joined by <|endoftext|> into full blocks; 'padded': one document a row."""
    doc_mask: bool = False
    """With packed batching: attention stays inside each document, and positions restart at each
    document's start."""
    val_fraction: float = 0.05
    """Share of documents held out when the source has no validation split."""
    text_field: str = "text"
    """Field holding the text in .json/.jsonl/.parquet/hub sources."""
    doc_sep: str | None = None
    """Line that separates documents in a .txt without <|endoftext|> lines (default: blank lines)."""

    # --- model init ---
    init: Init = "scaled"
    """'scaled': GPT-2 init, N(0, 0.02) and residual projections 0.02/sqrt(2 n_layer); 'naive': N(0, 1)."""

    # --- optimisation ---
    lr: float = 1e-3
    """Peak learning rate (AdamW's; under Muon, of the weights Muon does not train)."""
    schedule: Schedule = "constant"
    """'constant', 'cosine' (warm-up then cosine decay) or 'wsd' (warm-up, stable, decay)."""
    warmup_steps: int | None = None
    """Linear warm-up steps for cosine/wsd (default: 5% of the run)."""
    min_lr_ratio: float = 0.1
    """Floor of cosine/wsd decay as a fraction of the peak."""
    decay_fraction: float = 0.2
    """wsd: the final share of the run spent decaying."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices, Muon's included (never on biases, norm gains or position
    embeddings)."""
    beta1: float = 0.9
    """AdamW's decay rate of the gradient's running mean (its momentum)."""
    beta2: float = 0.95
    """AdamW's decay rate of the gradient's running square."""
    optimizer: Optimizer = "adamw"
    """'adamw', or 'muon': torch.optim.Muon for the 2-D weight matrices inside the blocks (attention and
    MLP), AdamW (lr, betas, weight_decay) for embeddings, the output layer, norm gains and biases."""
    muon_lr: float = 0.02
    """Muon's peak learning rate; the schedule (warm-up, decay, the guard's cuts) scales it as it scales lr.

    0.02 is Muon's reference value; it beat 0.01 and 0.05 on the basic preset (40 packed cosine steps)."""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum."""
    z_loss: float = 0.0
    """Coefficient of PaLM's auxiliary loss z_loss * logsumexp(logits)^2 (0: off; PaLM used 1e-4).
    The gradients are of the cross-entropy plus the term; the term is logged apart (train_z_loss), and
    train_loss and val_loss stay the cross-entropy alone.

    The train/val gap the stability label reads is of the cross-entropy too."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int | None = None
    """Micro-batches per optimizer step, shared out over the processes (a multiple of their number:
    the same model on any count); default: one per process, so the global batch grows with them."""

    # --- budget: whichever comes first ends the run ---
    max_steps: int | None = None
    """Optimizer steps to train."""
    max_tokens: int | None = None
    """Token slots to train (steps x batch size x accumulation x block size)."""
    max_time: float | None = None
    """Seconds of training (evaluation included)."""

    # --- evaluation and logging ---
    eval_every: int = 50
    """Steps between validation passes (step 0 and the last step are always evaluated)."""
    eval_tokens: int | None = 65536
    """Cap on validation tokens, a fixed prefix of the validation stream (null in a recipe: all of it)."""
    log_every: int = 1
    """Steps between metrics.jsonl lines."""
    checkpoint_every: int | None = None
    """Steps between checkpoints (default: at every evaluation)."""
    tracker: Tracker = "none"
    """Also send the metrics.jsonl records and the run's settings to an experiment tracker: 'tensorboard'
    (events under OUT/tensorboard), 'wandb' or 'mlflow' (optional extras: pip install 'tinylm[wandb]').
    It changes nothing the run trains, so a resume may switch it."""

    # --- stability guard ---
    guard: bool = True
    """Skip non-finite or extreme updates and roll back from divergence with a lower LR."""

    host_read_every: int = 1
    """Steps between the host's reads of the training losses and gradient norms (1: every step, as tinylm
    always has). With N > 1 a guarded step's skip decision is made on the device and its update masked,
    so that a GPU need not wait for its queue each step; the N steps are read in one transfer, and before
    every evaluation, checkpoint and stop. metrics.jsonl is the same, but a divergence seen in the training
    loss rolls back at the next read rather than at once, so the setting is saved and kept on resume.
    Guarded runs under Muon, and runs over several processes, read every step whatever it says."""

    # --- run ---
    seed: int = 1337
    """Random seed of the initial weights and of the order of the training rows."""
    precision: Precision = "auto"
    """Arithmetic of the forward and backward passes: 'bf16' (bf16 autocast: bf16 matmuls, the loss and
    softmax statistics summed in fp32, weights and optimizer in fp32), 'fp32', or 'auto': bf16 on CUDA
    and on CPUs with bf16 units (AMX or AVX512-BF16), fp32 elsewhere. A run saves the precision auto chose
    and resumes in it; evaluation during training runs in it too."""
    compile: bool = False
    """torch.compile each transformer block (all blocks share one compiled graph); the first steps
    wait for the compilation. Meant for GPUs.

    Measured on a 2-core CPU, it changed the step time by under 10% either way."""
    device: str = "auto"
    """'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:N'."""
    out: str = "runs/latest"
    """Run directory to write (a stopped run goes on with tinylm train --resume DIR)."""

    def __post_init__(self) -> None:
        # Types first (every float finite), then ranges. A budget of 0 is refused, not read as
        # "no budget": a run of no steps has nothing to measure.
        _read_fields(self)
        counts = ("batch_size", "grad_accum", "max_steps", "max_tokens", "eval_every", "eval_tokens", "log_every",
                  "checkpoint_every", "host_read_every")  # fmt: skip
        _require(self, counts, lambda v: v >= 1, "at least 1")
        _require(self, ("warmup_steps", "seed"), lambda v: v >= 0, "at least 0")
        _require(self, ("lr", "muon_lr", "max_time"), lambda v: v > 0, "positive")
        _require(self, ("weight_decay", "grad_clip", "z_loss"), lambda v: v >= 0, "at least 0")
        _require(self, ("val_fraction",), lambda v: 0.0 < v < 1.0, "in (0, 1)")
        _require(self, ("min_lr_ratio", "decay_fraction"), lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        _require(self, ("beta1", "beta2", "muon_momentum"), lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        _require(self, ("data", "tokenizer", "text_field", "device", "out"), lambda v: v.strip(), "non-empty")
        if self.doc_mask and self.batching != "packed":
            raise ConfigError("doc_mask", "needs --batching packed")
        if self.max_steps is None and self.max_tokens is None and self.max_time is None:
            raise UserError("no budget: give --max-steps, --max-tokens or --max-time")


BUDGET_FIELDS = ("max_steps", "max_tokens", "max_time")
"""The TrainConfig fields that bound a run's length."""

RESUME_EDITS: dict[str, str] = {
    "train.max_steps": "the budget: where the run stops, not what a step computes",
    "train.max_tokens": "the budget",
    "train.max_time": "the budget",
    "train.device": "where the same computation runs",
    "train.compile": "how the same computation is compiled",
    "train.eval_every": "when validation is measured (a guarded run's roll-back points move with it)",
    "train.log_every": "how often metrics.jsonl gets a line",
    "train.checkpoint_every": "how often the run is saved",
    "train.tracker": "where a copy of the metrics goes",
    "train.data": "a moved data path: accepted when the data prepared from it is the same (the checkpoint keeps "
    "its content hash, data.content, and that is compared instead)",
}
"""The settings a resume may change, each with why it leaves the mathematics alone; every other
setting is fixed by the checkpoint and a resume that changes it is refused. A new setting that a
resume may change is one line here (docs/reliability.md lists them)."""

RESUMABLE = frozenset(RESUME_EDITS)
"""Their dotted names (the run's folder, train.out, may also be spelt otherwise)."""


def resume_edits_text() -> str:
    """``--max-steps, --max-tokens, ...``: the flags of RESUME_EDITS, for one-line errors."""
    return ", ".join("--" + name.split(".")[-1].replace("_", "-") for name in RESUME_EDITS)


@dataclass
class RunConfig:
    """A whole run: the model's shape and how it is trained. Saved as config.json."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=200))
    preset: str | None = None
    """Name of the preset the model shape started from, if any."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fixed_settings(self) -> dict[str, Any]:
        """What a resumed run must keep, by dotted path: every setting but RESUMABLE and the folder.
        Each checkpoint holds them, so a config.json edited since is refused rather than half applied."""
        return {k: v for k, v in dotted(self.to_dict()).items() if k not in RESUMABLE and k != "train.out"}

    def __post_init__(self) -> None:
        _read_fields(self)

    @classmethod
    def from_dict(cls, raw: Any) -> RunConfig:
        if not isinstance(raw, dict):
            raise UserError("must hold an object with 'model' and 'train' settings")
        return from_mapping(cls, renamed_settings(raw))

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        """The config.json of a run; a missing, damaged or invalid file is a one-line UserError naming it."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UserError(f"{path.parent} is not a run directory (no {path.name})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        if not text.strip():
            raise UserError(f"{path} is empty; {_LOST_CONFIG}")
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path} is damaged (not valid JSON: {e}); {_LOST_CONFIG}") from None
        try:
            return cls.from_dict(raw)
        except UserError as e:
            raise UserError(f"{path}: {e}; fix that value or train the run again") from None


def renamed_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """Settings as an older tinylm saved them, in today's names: ``tensorboard: true`` (before there was a
    choice of trackers) is ``tracker: tensorboard``. Flat or sectioned, as :func:`tinylm.fields.nest` reads."""
    raw = dict(raw)
    if isinstance(raw.get("train"), dict):
        raw["train"] = renamed_settings(raw["train"])
    if "tensorboard" in raw:
        on = read_as("tensorboard", bool, raw.pop("tensorboard"))
        if on and "tracker" not in raw:
            raw["tracker"] = "tensorboard"
    return raw


_LOST_CONFIG = "the run's settings are lost: restore the file from a copy or train the run again"
