"""Muon for the blocks' matrices, AdamW for the rest; z-loss in training only."""

import dataclasses
import json
import math
import re

import pytest
import torch

from conftest import tiny_config
from tinylm.config import TrainConfig, preset
from tinylm.costs import model_costs
from tinylm.distributed import Cluster
from tinylm.metrics import read_metrics
from tinylm.model import GPT
from tinylm.optim import LR_RATIO, Optimizers, build_optimizer, is_hidden_matrix, set_lr
from tinylm.train import build_trainer, train
from tinylm.trainer import accumulate_gradients, step_batches


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


def _trainer(stories, run_dir, **settings):
    cfg = tiny_config(stories, run_dir, **settings)
    return build_trainer(cfg, resume=False, quiet=True, cluster=Cluster(), device=torch.device("cpu"))


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else(stories, tmp_path):
    cfg = tiny_config(stories, tmp_path, optimizer="muon")
    model = GPT(preset("tiny"))
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    owner = {}
    for o in opt.optimizers:
        for group in o.param_groups:
            for p in group["params"]:
                assert id(p) not in owner, "a parameter in two optimizers"
                owner[id(p)] = o
    named = dict(model.named_parameters())
    assert set(owner) == {id(p) for p in named.values()}  # every parameter, once
    on_muon = {n for n, p in named.items() if owner[id(p)] is muon}
    assert on_muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}  # fmt: skip
    assert "transformer.wte.weight" not in on_muon and "transformer.h.0.ln_1.weight" not in on_muon


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_muon_takes_its_settings_and_adamw_decays_matrices_only(optimizer):
    # Settings unlike the defaults, so that each must reach its optimizer; one frozen parameter.
    settings = dict(lr=2e-3, beta1=0.8, beta2=0.9, weight_decay=0.05, muon_lr=0.04, muon_momentum=0.7)
    cfg = TrainConfig(optimizer=optimizer, max_steps=10, **settings)
    model = GPT(preset("tiny"))
    frozen = model.transformer.h[1].ln_2.weight
    frozen.requires_grad_(False)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    adamw, *muon = opt.optimizers if optimizer == "muon" else [opt]
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"] is True  # the fast kernel
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    for group in (decay, no_decay):
        assert group["lr"] == 2e-3 and group["betas"] == (0.8, 0.9) and LR_RATIO not in group
    on = {id(p): name for name, p in model.named_parameters()}
    on_muon = {on[id(p)] for o in muon for g in o.param_groups for p in g["params"]}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected_decay = {n for n in trainable - on_muon if n.endswith(".weight") and "ln" not in n and "wpe" not in n}
    assert {on[id(p)] for p in decay["params"]} == expected_decay and "transformer.wte.weight" in expected_decay
    assert {on[id(p)] for p in no_decay["params"]} == trainable - on_muon - expected_decay
    assert "transformer.wpe.weight" in trainable - on_muon - expected_decay  # a matrix, but never decayed
    assert all(p is not frozen for g in adamw.param_groups for p in g["params"])
    if optimizer == "muon":
        (muon_group,) = muon[0].param_groups
        assert muon_group["lr"] == 0.04 and muon_group["momentum"] == 0.7
        assert muon_group["weight_decay"] == pytest.approx(0.05 * 2e-3 / 0.04)  # AdamW's shrink per step
        assert muon_group[LR_RATIO] == pytest.approx(0.04 / 2e-3)
        assert len(on_muon) == 8 and all(p is not frozen for p in muon_group["params"])
    set_lr(opt, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3] + ([0.02] if optimizer == "muon" else []))


def test_the_schedule_scales_muon_and_adamw_alike(stories, tmp_path):
    trainer = _trainer(stories, tmp_path / "run", optimizer="muon", lr=2e-3, muon_lr=0.05, schedule="cosine")
    for _ in range(3):
        record = trainer.train_step()
        adamw, muon = trainer.optimizer.optimizers
        assert all(g["lr"] == record["lr"] for g in adamw.param_groups)
        assert all(abs(g["lr"] - record["lr"] * 25) < 1e-12 for g in muon.param_groups)
    assert record["lr"] < 2e-3  # decaying: the schedule moved both


def test_muon_run_trains(stories, tmp_path):
    s = train(tiny_config(stories, tmp_path / "run", optimizer="muon", max_steps=20, eval_every=10), quiet=True).summary
    assert s["completed"] and s["best_val_loss"] < s["start_val_loss"] - 1.0


def test_muon_resume_equals_uninterrupted(stories, tmp_path):
    whole = train(tiny_config(stories, tmp_path / "whole", optimizer="muon", schedule="cosine"), quiet=True)
    cfg = tiny_config(stories, tmp_path / "split", optimizer="muon", schedule="cosine")
    assert train(cfg, quiet=True, interrupt_after=6).interrupted
    resumed = train(cfg, resume=True, quiet=True)
    assert _without_time(read_metrics(whole.run_dir)) == _without_time(read_metrics(resumed.run_dir))


def test_an_adamw_checkpoint_from_before_the_switch_resumes(stories, tmp_path):
    # Old runs: config.json without the new fields, trainer_state.pt holding AdamW's own state_dict.
    whole = train(tiny_config(stories, tmp_path / "whole"), quiet=True)
    cfg = tiny_config(stories, tmp_path / "split")
    train(cfg, quiet=True, interrupt_after=6)
    config = tmp_path / "split" / "config.json"
    saved = json.loads(config.read_text())
    for new in ("optimizer", "muon_lr", "muon_momentum", "z_loss"):
        del saved["train"][new]
    config.write_text(json.dumps(saved))
    state = torch.load(tmp_path / "split" / "checkpoint-000006" / "trainer_state.pt", weights_only=False)
    assert set(state["optimizer"]) == {"state", "param_groups"}  # AdamW's layout, as before
    resumed = train(cfg, resume=True, quiet=True)
    assert _without_time(read_metrics(whole.run_dir)) == _without_time(read_metrics(resumed.run_dir))


def test_the_guards_rollback_restores_both_optimizers(stories, tmp_path):
    trainer = _trainer(stories, tmp_path / "run", optimizer="muon", guard=True)
    trainer.train_step()
    trainer.validate()  # keeps this state as the good one
    kept = [{k: v.clone() for k, v in s.items()} for s in _states(trainer.optimizer)]
    trainer.train_step()
    assert any(not torch.equal(s[name], k[name]) for s, k in zip(_states(trainer.optimizer), kept) for name in k)
    trainer.monitor.rollback(trainer.model, trainer.optimizer, trainer.progress.step)
    for s, k in zip(_states(trainer.optimizer), kept):
        assert all(torch.equal(s[name], k[name]) for name in k)


def _states(opt: Optimizers) -> list[dict[str, torch.Tensor]]:
    return [s for o in opt.optimizers for s in o.state.values()]


def test_z_loss_is_backpropagated_but_train_and_val_loss_are_the_cross_entropy(stories, tmp_path):
    plain = _trainer(stories, tmp_path / "plain")
    z = _trainer(stories, tmp_path / "z", z_loss=1e-2)
    assert plain.validate() == z.validate()  # validation: the cross-entropy alone
    batches, step_real = step_batches(z.data.rows, z.t, 0, z.cluster)
    grads = {}
    for name, trainer in (("plain", plain), ("z", z)):
        accumulate_gradients(trainer.model, batches, step_real, trainer.cluster, trainer.device, trainer.t.z_loss)
        grads[name] = trainer.model.lm_head.weight.grad.clone()
        trainer.optimizer.zero_grad(set_to_none=True)
    plain_record, z_record = plain.train_step(), z.train_step()
    # the same weights and batch: the logged loss (and what the guard judges) is the cross-entropy ...
    assert z_record["train_loss"] == pytest.approx(plain_record["train_loss"], abs=1e-6)
    assert z.monitor.last_train_loss == z_record["train_loss"]
    assert "train_z_loss" not in plain_record
    # ... and the term, logged beside it, is z * ln(V)^2 at the start, when every log-sum-exp is about ln(V)
    expected = 1e-2 * math.log(z.model.config.vocab_size) ** 2
    assert abs(z_record["train_z_loss"] - expected) < 0.1 * expected
    # the gradients are still of the cross-entropy plus the term
    assert not torch.allclose(grads["z"], grads["plain"], rtol=1e-3, atol=0)


def test_a_z_loss_runs_logs_and_summary_hold_the_cross_entropy(stories, tmp_path):
    runs = {z: train(tiny_config(stories, tmp_path / f"z{z}", z_loss=z, max_steps=2, eval_every=2), quiet=True)
            for z in (0.0, 1e-2)}  # fmt: skip
    first = {z: read_metrics(r.run_dir)[1] for z, r in runs.items()}
    assert first[1e-2]["step"] == 1 and first[1e-2]["train_loss"] == pytest.approx(first[0.0]["train_loss"], abs=1e-6)
    assert first[1e-2]["train_z_loss"] > 0
    last = read_metrics(runs[1e-2].run_dir)[-1]
    assert runs[1e-2].summary["final_train_loss"] == last["train_loss"]


def test_muon_on_a_torch_without_it_is_a_one_line_error(stories, tmp_path, monkeypatch):
    from tinylm.errors import UserError

    monkeypatch.delattr(torch.optim, "Muon")
    cfg = tiny_config(stories, tmp_path, optimizer="muon")
    said = f"--optimizer muon needs torch.optim.Muon (torch 2.9 or later); this is torch {torch.__version__}"
    with pytest.raises(UserError, match=f"^{re.escape(said)}$"):
        build_optimizer(GPT(preset("tiny")), cfg.train, torch.device("cpu"))


def test_muon_decays_the_weights_per_step_as_adamw_does(stories, tmp_path):
    cfg = tiny_config(stories, tmp_path, optimizer="muon", weight_decay=0.1, lr=1e-3, muon_lr=0.02)
    adamw, muon = build_optimizer(GPT(preset("tiny")), cfg.train, torch.device("cpu")).optimizers
    decaying = [g for g in adamw.param_groups if g["weight_decay"] > 0][0]
    # both shrink decoupled: p *= 1 - lr * weight_decay
    per_step = {
        decaying["lr"] * decaying["weight_decay"],
        muon.param_groups[0]["lr"] * muon.param_groups[0]["weight_decay"],
    }
    assert len({round(x, 12) for x in per_step}) == 1


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("switches", [{}, dict(mlp="swiglu", qk_norm=True, tie_embeddings=False, bias=False)])
def test_memory_estimate_counts_the_optimizers_own_state(stories, tmp_path, optimizer, switches):
    cfg = tiny_config(stories, tmp_path, optimizer=optimizer)
    model_cfg = dataclasses.replace(preset("tiny"), **switches)
    model = GPT(model_cfg)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    x = torch.randint(0, model_cfg.vocab_size, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    optimizers = opt.optimizers if isinstance(opt, Optimizers) else [opt]
    state = [v for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    estimate = model_costs(model_cfg, optimizer=optimizer).memory_bytes["optimizer"]
    assert estimate == nbytes(t for t in state if t.dim() > 0)  # moments and momentum buffers, exactly
    assert nbytes(state) - estimate < 1e-3 * estimate  # AdamW's step counts, left out
    if optimizer == "muon":  # one buffer instead of two moments for the blocks' matrices
        saved = model_costs(model_cfg).memory_bytes["optimizer"] - estimate
        assert saved == 4 * sum(p.numel() for n, p in model.named_parameters() if is_hidden_matrix(n, p))


def test_info_estimates_memory_for_the_optimizer_given(capsys):
    from tinylm.cli import main

    optimizer_mib = {}
    for optimizer in ("adamw", "muon"):
        assert main(["info", "--preset", "basic", "--json", "--optimizer", optimizer]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["optimizer"] == optimizer  # the JSON says whose state its memory estimate counts
        optimizer_mib[optimizer] = info["memory_bytes"]["optimizer"]
    assert optimizer_mib["muon"] < optimizer_mib["adamw"]


def test_z_loss_resume_equals_uninterrupted(stories, tmp_path):
    # train_loss and train_z_loss are written from the restored state as from the uninterrupted one
    whole = train(tiny_config(stories, tmp_path / "whole", z_loss=1e-2, schedule="cosine"), quiet=True)
    cfg = tiny_config(stories, tmp_path / "split", z_loss=1e-2, schedule="cosine")
    assert train(cfg, quiet=True, interrupt_after=6).interrupted
    resumed = train(cfg, resume=True, quiet=True)
    records = _without_time(read_metrics(resumed.run_dir))
    assert _without_time(read_metrics(whole.run_dir)) == records
    assert all("train_z_loss" in r for r in records if "train_loss" in r)


def test_a_longer_budget_is_described_in_steps_or_seconds():
    from tinylm.optim import SCHEDULE_EXTENSION_RULE, ScheduleSpan, describe_extension

    by_steps = ScheduleSpan(steps=100, time_s=None).extension(150, None)
    assert by_steps == {"from_steps": 100, "to_steps": 150, "rule": SCHEDULE_EXTENSION_RULE}
    assert describe_extension(by_steps) == "the schedule spans the first 100 steps; steps 101-150 keep its last LR"
    by_time = ScheduleSpan(steps=None, time_s=60.0).extension(None, 90.0)
    assert by_time == {"from_time_s": 60.0, "to_time_s": 90.0, "rule": SCHEDULE_EXTENSION_RULE}
    assert describe_extension(by_time) == "the schedule spans the first 60 s; the time up to 90 s keep its last LR"
    assert ScheduleSpan(steps=100, time_s=None).extension(100, None) is None
    assert ScheduleSpan(steps=None, time_s=60.0).extension(None, 60.0) is None


def test_muon_and_adamw_state_round_trips_and_refuses_another_optimizers(stories, tmp_path):
    from tinylm.errors import UserError

    cfg = tiny_config(stories, tmp_path, optimizer="muon")
    model = GPT(preset("tiny"))
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    x = torch.randint(0, 100, (2, 16))
    model(x, x)[1].backward()
    opt.zero_grad(set_to_none=False)  # kept, as zeros
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    saved = opt.state_dict()
    fresh = build_optimizer(model, cfg.train, torch.device("cpu"))
    fresh.load_state_dict(saved)
    for before, after in zip(opt.optimizers, fresh.optimizers):
        for p in before.state:
            for key, value in before.state[p].items():
                assert torch.equal(after.state[p][key], value)
    said = "the checkpoint's optimizer state is from another --optimizer; cannot resume"
    for wrong in ({"state": {}, "param_groups": []}, {"optimizers": [saved["optimizers"][0]]}):
        with pytest.raises(UserError, match=f"^{re.escape(said)}$"):
            fresh.load_state_dict(wrong)
