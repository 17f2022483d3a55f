"""tinylm's training step against implementations outside tinylm: Hugging Face's GPT2LMHeadModel and
LlamaForCausalLM trained with torch.optim.AdamW and clip_grad_norm_, and torch.optim.Muon used directly.

Both sides start from the same weights and see the same batches (tinylm's own: padded rows, two
micro-batches a step, so the per-target weighting of the step's gradient matters). tinylm steps
through its Trainer; the reference loop, the schedule and the weight-decay grouping are written out
here from their definitions. The settings make every mechanic act within the 20 steps: warm-up
(5 steps), cosine decay to the floor, clipping (the early steps' norms are above the cap, later ones
below it) and weight decay, on weight matrices only.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from tinylm.distributed import Cluster
from tinylm.loss import IGNORE_INDEX
from tinylm.train import build_trainer
from tinylm.trainer import step_batches

transformers = pytest.importorskip("transformers")

STEPS, WARMUP, PEAK_LR, MIN_LR_RATIO, WEIGHT_DECAY, CLIP = 20, 5, 3e-3, 0.1, 0.1, 1.0
SETTINGS = dict(max_steps=STEPS, warmup_steps=WARMUP, lr=PEAK_LR, min_lr_ratio=MIN_LR_RATIO, schedule="cosine",
                weight_decay=WEIGHT_DECAY, grad_clip=CLIP, beta1=0.9, beta2=0.95, batching="padded", grad_accum=2,
                batch_size=4, guard=False, eval_every=STEPS)  # fmt: skip
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)

LOSS_TOLERANCE = 2e-5
"""Largest allowed per-step difference in train loss (nats). Measured (fp32, Zen 4 CPU): under 1e-6;
with clipping off, decay on every parameter or Muon's decay unscaled: over 1e-3."""
WEIGHT_TOLERANCE = 1e-4
"""Largest allowed elementwise difference of the weights after 20 steps. Measured: under 1e-5 (AdamW
amplifies rounding where a gradient is near zero); with any of those changes: over 2e-3. Decay on a
norm gain, which must not happen, moves it by lr x wd = 3e-4 a step."""


def reference_lr(step: int) -> float:
    """Linear warm-up to the peak over WARMUP steps (step s gets peak * (s + 1) / WARMUP), then half a
    cosine from the peak down to MIN_LR_RATIO * peak, reached at step STEPS."""
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    floor = MIN_LR_RATIO * PEAK_LR
    progress = (step - WARMUP) / (STEPS - WARMUP)
    return floor + (PEAK_LR - floor) * (1 + math.cos(math.pi * progress)) / 2


def tinylm_trainer(stories, tmp_path, model_changes=None, **settings):
    cfg = tiny_config(stories, tmp_path / "run", **{**SETTINGS, **settings})
    if model_changes:
        cfg.model.__dict__.update(model_changes)
    torch.manual_seed(0)
    return build_trainer(cfg, resume=False, quiet=True, cluster=Cluster(), device=torch.device("cpu"))


def run_tinylm(trainer) -> tuple[list[float], list[float]]:
    records = [trainer.train_step() for _ in range(STEPS)]
    return [r["train_loss"] for r in records], [r["grad_norm"] for r in records]


def run_reference(model, optimizer, trainer, mean_loss_of) -> tuple[list[float], list[float]]:
    """The reference loop: the step's gradient is that of the mean cross-entropy over all its real
    targets, each micro-batch's mean weighted by its share of them; clip the global norm; set the
    scheduled LR on every group (times the group's ``lr_scale``)."""
    losses, norms = [], []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = reference_lr(step) * group.get("lr_scale", 1.0)
        batches, _ = step_batches(trainer.data.rows, trainer.t, step, Cluster())
        real = [int((b.y != IGNORE_INDEX).sum()) for b in batches]
        total = 0.0
        for b, n in zip(batches, real):
            loss = mean_loss_of(model, b)
            (loss / (sum(real) / n)).backward()
            total += loss.item() * n
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / sum(real))
    return losses, norms


def cross_entropy_of_logits(model, batch) -> torch.Tensor:
    """A Hugging Face model's mean cross-entropy over the batch's real targets, from its full logits."""
    logits = model(batch.x).logits
    return F.cross_entropy(logits.flatten(0, 1), batch.y.flatten(), ignore_index=IGNORE_INDEX)


def adamw_decaying_matrices(named, fused: bool | None = None) -> torch.optim.AdamW:
    """Weight decay on the weight matrices and embeddings; none on biases, norm gains, position table."""
    named = list(named)
    decay = [p for n, p in named if p.dim() == 2 and "wpe" not in n]
    rest = [p for n, p in named if not (p.dim() == 2 and "wpe" not in n)]
    assert rest, "the grouping must leave something undecayed"
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def gpt2_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tinylm's GPT-2 weights under GPT2LMHeadModel's names: the same names, with the four Linear
    weights of a block transposed into Conv1D's (in, out) layout; the tied output matrix dropped."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    return {n: (t.t() if n.endswith(conv1d) else t).clone() for n, t in state.items() if n != "lm_head.weight"}


def llama_names(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """tinylm's Llama-style weights under LlamaForCausalLM's names: the fused q/k/v matrix split in
    three equal row blocks, the fused SwiGLU matrix in gate rows then up rows."""
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"],
           "model.norm.weight": state["transformer.ln_f.weight"], "lm_head.weight": state["lm_head.weight"]}  # fmt: skip
    for i in range(n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.c_attn.weight"].chunk(3)
        gate, up = state[ours + "mlp.c_fc.weight"].chunk(2)
        out |= {theirs + "self_attn.q_proj.weight": q, theirs + "self_attn.k_proj.weight": k,
                theirs + "self_attn.v_proj.weight": v, theirs + "self_attn.o_proj.weight": state[ours + "attn.c_proj.weight"],
                theirs + "mlp.gate_proj.weight": gate, theirs + "mlp.up_proj.weight": up,
                theirs + "mlp.down_proj.weight": state[ours + "mlp.c_proj.weight"],
                theirs + "input_layernorm.weight": state[ours + "ln_1.weight"],
                theirs + "post_attention_layernorm.weight": state[ours + "ln_2.weight"]}  # fmt: skip
    return {n: t.clone() for n, t in out.items()}


def largest_weight_difference(reference: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> float:
    assert reference.keys() <= ours.keys()
    return max((reference[n] - ours[n]).abs().max().item() for n in reference)


def check_agreement(name, ours, theirs, weights_theirs, weights_ours):
    (loss_ours, norm_ours), (loss_theirs, norm_theirs) = ours, theirs
    # every mechanic acted: clipping cut some steps and not others; the LR warmed up and decayed
    assert any(n > CLIP for n in norm_theirs) and any(n < CLIP for n in norm_theirs), norm_theirs
    loss_diff = max(abs(a - b) for a, b in zip(loss_ours, loss_theirs))
    norm_diff = max(abs(a - b) / b for a, b in zip(norm_ours, norm_theirs))
    weight_diff = largest_weight_difference(weights_theirs, weights_ours)
    print(f"\n{name}: largest per-step loss difference {loss_diff:.2e}, relative grad-norm difference "
          f"{norm_diff:.2e}, largest weight difference after {STEPS} steps {weight_diff:.2e}")  # fmt: skip
    assert loss_ours[-1] < loss_ours[0] - 0.5  # it learned: the comparison is of a moving model
    assert loss_diff < LOSS_TOLERANCE, (loss_ours, loss_theirs)
    assert norm_diff < 1e-4, (norm_ours, norm_theirs)
    assert weight_diff < WEIGHT_TOLERANCE


def test_the_reference_schedule_warms_up_and_decays_within_the_steps():
    lrs = [reference_lr(s) for s in range(STEPS)]
    assert lrs[0] == PEAK_LR / WARMUP and lrs[WARMUP] == PEAK_LR
    assert lrs[-1] < 0.15 * PEAK_LR and all(a > b for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1 :]))


def test_gpt2_training_matches_hugging_face_gpt2_with_torch_adamw(stories, tmp_path):
    trainer = tinylm_trainer(stories, tmp_path)
    m = trainer.model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True))  # fmt: skip
    missing, unexpected = hf.load_state_dict(gpt2_names(trainer.model.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} | {n for n in missing if n.endswith(".attn.bias")}
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    optimizer = adamw_decaying_matrices(hf.transformer.named_parameters())  # lm_head is wte

    theirs = run_reference(hf.train(), optimizer, trainer, cross_entropy_of_logits)
    ours = run_tinylm(trainer)
    check_agreement(
        "GPT-2 vs GPT2LMHeadModel", ours, theirs, dict(hf.named_parameters()), gpt2_names(trainer.model.state_dict())
    )


def test_llama_mechanics_training_match_hugging_face_llama_with_torch_adamw(stories, tmp_path):
    trainer = tinylm_trainer(stories, tmp_path, LLAMA)
    m = trainer.model.config
    hidden = trainer.model.transformer.h[0].mlp.c_proj.weight.shape[1]
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.n_embd,
            intermediate_size=hidden,
            num_hidden_layers=m.n_layer,
            num_attention_heads=m.n_head,
            num_key_value_heads=m.n_head,
            head_dim=m.n_embd // m.n_head,
            max_position_embeddings=m.block_size,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )  # rope theta left at the default: 10000, as tinylm's
    )
    hf.load_state_dict(llama_names(trainer.model.state_dict(), m.n_layer), strict=True)
    optimizer = adamw_decaying_matrices(hf.named_parameters())

    theirs = run_reference(hf.train(), optimizer, trainer, cross_entropy_of_logits)
    ours = run_tinylm(trainer)
    check_agreement("Llama mechanics vs LlamaForCausalLM", ours, theirs, dict(hf.named_parameters()),
                    llama_names(trainer.model.state_dict(), m.n_layer))  # fmt: skip


MUON_LR, MUON_MOMENTUM = 0.02, 0.95


def test_muon_training_matches_torch_muon_used_directly(stories, tmp_path):
    """Muon on the blocks' matrices, fused AdamW on the rest, over a copy of tinylm's model and its loss.

    The network and the loss are tinylm's here (the two tests above check them against Hugging Face):
    torch's Muon orthogonalises in bf16, where a last-bit difference in a gradient flips roundings
    and grows step by step, so only the optimizers' setup differs from tinylm's run, and the two
    agree to the bit: which parameters each optimizer holds, the LRs, the decay and the schedule."""
    trainer = tinylm_trainer(stories, tmp_path, optimizer="muon", muon_lr=MUON_LR, muon_momentum=MUON_MOMENTUM)
    reference = copy.deepcopy(trainer.model)
    blocks = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    on_muon = [(n, p) for n, p in reference.named_parameters() if n.startswith("transformer.h.") and n.endswith(blocks)]
    muon_names = {n for n, _ in on_muon}
    # Muon's decay is p *= 1 - lr * wd with Muon's own lr: wd scaled by PEAK_LR / MUON_LR shrinks a matrix as
    # much a step as AdamW's decay at PEAK_LR would; the schedule scales both LRs by the same factor.
    muon = torch.optim.Muon([p for _, p in on_muon], lr=MUON_LR, weight_decay=WEIGHT_DECAY * PEAK_LR / MUON_LR,
                            momentum=MUON_MOMENTUM, nesterov=True)  # fmt: skip
    for group in muon.param_groups:
        group["lr_scale"] = MUON_LR / PEAK_LR
    adamw = adamw_decaying_matrices(
        ((n, p) for n, p in reference.named_parameters() if n not in muon_names), fused=True
    )

    class Both:  # the two optimizers stepped as one by the reference loop
        param_groups = [*adamw.param_groups, *muon.param_groups]

        def step(self):
            adamw.step(), muon.step()

        def zero_grad(self, set_to_none=True):
            adamw.zero_grad(set_to_none), muon.zero_grad(set_to_none)

    theirs = run_reference(reference.train(), Both(), trainer, lambda model, b: model(b.x, b.y)[1])
    ours = run_tinylm(trainer)
    check_agreement("Muon vs torch.optim.Muon", ours, theirs, reference.state_dict(), trainer.model.state_dict())
