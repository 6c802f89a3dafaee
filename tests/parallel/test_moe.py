"""MoE models (Qwen3-MoE, DeepSeek-V3 with MLA) on Megatron-core: HF float64 parity, exact round trips, expert
parallelism (EP=2 alone and with TP=2 / PP=2) against EP=1, routing replay, and bad configurations."""
from __future__ import annotations

import pytest
import torch

from tests.parallel._moe_tiny import VOCAB, hf_reference, moe_hf_config, write_moe_checkpoint
from tests.parallel._models_tiny import read_safetensors_dir

KINDS = ["qwen3_moe", "deepseek_v3"]


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    return {kind: write_moe_checkpoint(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


def _megatron_logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids, torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)[..., :VOCAB]


def test_parse_moe_configs(moe_dirs):
    from parallel.models import parse_hf_config

    qwen = parse_hf_config(moe_dirs["qwen3_moe"])
    assert qwen.moe.moe_layers == (True, False) and qwen.moe.num_experts == 4 and qwen.moe.topk == 2
    assert qwen.qk_norm and qwen.mla is None and qwen.head_dim == 8 and qwen.moe.score_function == "softmax"
    ds = parse_hf_config(moe_dirs["deepseek_v3"])
    assert ds.moe.moe_layers == (False, True, True) and ds.moe.shared_ffn_hidden_size == 16
    assert (ds.moe.num_groups, ds.moe.group_topk, ds.moe.scaling_factor, ds.moe.expert_bias) == (4, 2, 2.5, True)
    assert (ds.mla.q_lora_rank, ds.mla.kv_lora_rank, ds.mla.qk_rope_head_dim) == (24, 16, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf_float64(kind, moe_dirs, single_process_parallel):
    from parallel.convert import load_hf_checkpoint
    from parallel.models import build_gpt_model

    model = build_gpt_model(moe_dirs[kind])
    load_hf_checkpoint(model, moe_dirs[kind])
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf_reference(moe_dirs[kind])(ids).logits
    got = _megatron_logits(model, ids)
    assert want.abs().max() > 1.0  # logits of a size where a wrong mapping shows
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bitwise(kind, moe_dirs, tmp_path, single_process_parallel):
    from parallel.convert import load_hf_checkpoint, save_hf_checkpoint
    from parallel.models import build_gpt_model

    model = build_gpt_model(moe_dirs[kind])
    load_hf_checkpoint(model, moe_dirs[kind])
    save_hf_checkpoint(model, tmp_path / "out")
    original, exported = read_safetensors_dir(moe_dirs[kind]), read_safetensors_dir(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    if kind == "deepseek_v3":  # the router bias travels (a buffer, not a parameter)
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in exported


@pytest.mark.parametrize("kind, changes, message", [
    ("deepseek_v3", {"scoring_func": "softmax"}, "unsupported scoring_func='softmax'"),
    ("deepseek_v3", {"topk_method": "greedy"}, "unsupported topk_method='greedy'"),
    ("deepseek_v3", {"num_experts_per_tok": 2}, "num_experts_per_tok=2 with topk_group=2"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave=False is not supported"),
    ("deepseek_v3", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "unsupported rope scaling"),
    ("qwen3_moe", {"num_experts_per_tok": 5}, "num_experts_per_tok=5 must be in [1, 4]"),
])
def test_unsupported_routing_is_named(kind, changes, message):
    from parallel.models import parse_hf_config

    cfg = moe_hf_config(kind).to_dict() | changes
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_hf_config(cfg)


def test_expert_parallel_must_divide(moe_dirs):
    from parallel.models import parse_hf_config
    from tests.parallel._models_tiny import tiny_hf_config

    with pytest.raises(ValueError, match=r"num_experts=4 is not divisible by expert_parallel=3"):
        parse_hf_config(moe_dirs["qwen3_moe"], expert_parallel=3)
    with pytest.raises(ValueError, match=r"expert_parallel=2: .* is a dense model \(qwen2\)"):
        parse_hf_config(tiny_hf_config("qwen2").to_dict(), expert_parallel=2)


def _recorded_experts(model, rows):
    """Each token's experts in every MoE layer, read off the routers' routing maps: [B, S, layers, k]."""
    from parallel.moe import router_modules

    maps = []
    hooks = [r.register_forward_hook(lambda m, a, out: maps.append(out[1].detach().clone()))
             for r in router_modules(model)]
    with torch.no_grad():
        model.eval()(rows.tokens, rows.position_ids, rows.attention_mask())
    for h in hooks:
        h.remove()
    b, s = rows.tokens.shape
    k = int(maps[0].sum(1)[0])
    # routing maps are [S * B, E] in S-major order; the k chosen experts in ascending order
    idx = [m.nonzero()[:, 1].view(s, b, k).transpose(0, 1) for m in maps]
    return torch.stack(idx, dim=2)


def test_routing_replay_restores_the_rollout_routing(moe_dirs, single_process_parallel):
    """DeepSeek-V3: shifting the routers' expert bias (it selects experts but weighs nothing) flips some tokens'
    experts; replaying the recorded experts gives back the original log-probs exactly."""
    from engine.batch import rl_rows
    from parallel.convert import load_hf_checkpoint
    from parallel.models import build_gpt_model
    from parallel.moe import ROUTED_EXPERTS, router_modules
    from parallel.step import logprobs

    model = build_gpt_model(moe_dirs["deepseek_v3"])
    load_hf_checkpoint(model, moe_dirs["deepseek_v3"])
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (4, 6, 3)]
    completions = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (5, 3, 6)]
    rows = rl_rows(prompts, completions, torch.zeros(3), max_tokens_per_row=16)
    recorded = _recorded_experts(model, rows)
    before = logprobs(model, rows)

    with torch.no_grad():
        for router in router_modules(model):
            router.expert_bias += 0.3 * torch.randn(router.expert_bias.shape, generator=gen)
    flipped = (_recorded_experts(model, rows) != recorded).any(-1)
    real = (rows.seq_ids >= 0)[:, :, None]
    assert (flipped & real).sum() >= 5  # the perturbation really changes routing
    drifted = logprobs(model, rows)
    replayed = logprobs(model, rows.with_extras(**{ROUTED_EXPERTS: recorded}))
    assert (drifted - before).abs().max() > 1e-3
    torch.testing.assert_close(replayed, before, rtol=0, atol=1e-6)
