"""The GRPO trainer on the tiny DeepSeek-V3-shaped MoE base (recipes/tiny/moe_base): routing recorded by the HF
rollout engine reaches the policy's rows and is replayed there; the reference routes by itself; weight sync
writes per-expert tensors into the rollout model's fused experts; the MoE metrics are logged."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.engine._trainer_common import DATA, tiny_config


@pytest.fixture(scope="module")
def moe_base():
    from r1_engine.recipes.tiny.pretrain import is_valid_base_model
    from r1_engine.recipes.tiny.pretrain_moe import MOE_DIR, MoEPretrainConfig

    assert is_valid_base_model(MOE_DIR, MoEPretrainConfig())  # the committed checkpoint, never rebuilt here
    return MOE_DIR


def _trainer(moe_base, out, replay: bool):
    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(out, steps=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, routing_replay=replay),
                              algo=dataclasses.replace(cfg.algo, epochs_per_batch=1))
    return GRPOTrainer(cfg, moe_base, load_prompts(DATA / "train.jsonl"))


def test_one_step_with_routing_replay(moe_base, tmp_path):
    from r1_engine.engine.batch import ROUTED_EXPERTS
    from r1_engine.parallel.moe import router_modules

    trainer = _trainer(moe_base, tmp_path / "on", replay=True)
    seen = {}
    update = trainer.update

    def spy(minis):
        seen["minis"] = minis
        return update(minis)

    trainer.update = spy
    replayed = []
    hooks = [r.register_forward_pre_hook(lambda m, a: replayed.append(m.router_replay.router_replay_action))
             for r in router_modules(trainer.policy)]
    metrics = trainer.train_one_step()
    for h in hooks:
        h.remove()
    minis = seen["minis"]
    routed = minis[0].extras[ROUTED_EXPERTS]
    assert routed.shape[:2] == minis[0].tokens.shape and routed.shape[2:] == (3, 4)  # 3 MoE layers, top-4
    real = minis[0].seq_ids >= 0
    assert int(routed[real].max()) < 16 and int(routed[real].min()) >= 0
    assert replayed and all(a is not None for a in replayed)  # every policy forward replayed the rollout's experts
    assert 1.0 <= metrics["train/moe/load_max"] < 16 and metrics["train/moe/load_min"] <= 1.0
    # the rollout's log-probs and the replayed policy's agree to fp32 round-off
    assert metrics["train/mismatch_abs"] < 1e-4
    # the weight sync reached the rollout model's fused experts and the router bias (the bias moved this step)
    hf = trainer.rollout_engine.model
    from r1_engine.parallel.convert import export_hf_state

    exported = dict(export_hf_state(trainer.policy))
    torch.testing.assert_close(hf.model.layers[1].mlp.experts.gate_up_proj.data[5, :48],
                               exported["model.layers.1.mlp.experts.5.gate_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(hf.model.layers[2].mlp.gate.e_score_correction_bias,
                               exported["model.layers.2.mlp.gate.e_score_correction_bias"], rtol=0, atol=0)
    trainer.close()


def test_replay_off_records_nothing(moe_base, tmp_path):
    from r1_engine.engine.batch import ROUTED_EXPERTS

    trainer = _trainer(moe_base, tmp_path / "off", replay=False)
    assert not trainer.rollout_engine.record_routing
    seen = {}
    update = trainer.update
    trainer.update = lambda minis: (seen.setdefault("minis", minis), update(minis))[1]
    metrics = trainer.train_one_step()
    assert ROUTED_EXPERTS not in seen["minis"][0].extras
    assert "train/moe/load_max" in metrics
    trainer.close()


def test_expert_bias_moves_once_per_rollout(moe_base, tmp_path):
    """2 mini-batches x 2 epochs under routing replay: four updates replay the same routing, and the expert bias
    still moves once, by the update rate or not at all per expert (a move per update would be up to 4 x rate)."""
    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer
    from r1_engine.parallel.moe import router_modules

    cfg = tiny_config(tmp_path / "bias", steps=1)
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, epochs_per_batch=2, mini_batches=2))
    trainer = GRPOTrainer(cfg, moe_base, load_prompts(DATA / "train.jsonl"))
    rate = cfg.model.moe_bias_update_rate
    before = [r.expert_bias.detach().clone() for r in router_modules(trainer.policy)]
    steps = []
    update = trainer.update
    trainer.update = lambda minis: (lambda out: (steps.extend(out[0]), out)[1])(update(minis))
    trainer.train_one_step()
    assert len(steps) == 4 and all(s["update_successful"] == 1.0 for s in steps)
    moved = torch.cat([(r.expert_bias - b).abs() for r, b in zip(router_modules(trainer.policy), before)])
    assert bool(((moved < 1e-8) | ((moved - rate).abs() < 1e-8)).all()), moved
    assert int((moved > rate / 2).sum()) >= 4
    trainer.close()


def test_load_balancing_loss_with_replay_is_refused_at_start(moe_base, tmp_path):
    """A load-balancing loss under routing replay would be computed on the policy's own routing: a coefficient set
    by hand is one line when the trainer is built (not at its first step); a checkpoint's own is turned off."""
    from r1_engine.engine.data import load_prompts
    from r1_engine.engine.trainer import GRPOTrainer

    cfg = tiny_config(tmp_path / "aux", steps=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, routing_replay=True, moe_aux_loss_coeff=0.01))
    with pytest.raises(ValueError, match=r"^--model.moe-aux-loss-coeff=0.01: a load-balancing loss with routing "
                                         r"replay is not supported"):
        GRPOTrainer(cfg, moe_base, load_prompts(DATA / "train.jsonl"))
    assert not (tmp_path / "aux" / "checkpoints").exists()
