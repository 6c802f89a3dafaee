"""The embedded default's MoE base (recipes/tiny/moe_base/): a DeepSeek-V3 on the dense base's tiny world.

Routing is recomputed in float64 from the checkpoint's own router weights and biases, and expert loads are recounted
with our own hooks on fresh documents, never taken from the pretraining bookkeeping alone."""
from __future__ import annotations

import json

import pytest
import torch

from r1_engine.recipes.tiny import corpus
from r1_engine.recipes.tiny.pretrain import (
    BASE_DIR,
    META_FILE,
    _batch,
    evaluate_base,
    is_valid_base_model,
)
from r1_engine.recipes.tiny.pretrain_moe import (
    MOE_DIR,
    ExpertLoadCounter,
    MoEPretrainConfig,
    MoEShape,
    build_moe_model,
    ensure_moe_base_model,
    pretrain_moe,
    routers,
    update_expert_bias,
)

SMALL_SHAPE = MoEShape(
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, n_routed_experts=8, n_group=2, topk_group=1,
    num_experts_per_tok=2, moe_intermediate_size=16, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8,
)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MOE_DIR).eval()


@pytest.fixture(scope="module")
def meta():
    return json.loads((MOE_DIR / META_FILE).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the committed checkpoint
def test_committed_checkpoint_is_the_stated_deepseek_v3(model, meta):
    from safetensors import safe_open
    from transformers import DeepseekV3ForCausalLM

    assert is_valid_base_model(MOE_DIR, MoEPretrainConfig()), f"{MOE_DIR} is missing or has other settings"
    assert sum(f.stat().st_size for f in MOE_DIR.iterdir()) <= 8 * 2**20
    weights = MOE_DIR / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert ensure_moe_base_model() == MOE_DIR and weights.stat().st_mtime_ns == stamp  # valid: not rebuilt

    shape, config = MoEShape(), model.config
    assert isinstance(model, DeepseekV3ForCausalLM) and config.model_type == "deepseek_v3"
    for name in ("hidden_size", "intermediate_size", "first_k_dense_replace", "n_routed_experts", "n_group",
                 "topk_group", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size", "q_lora_rank",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "routed_scaling_factor",
                 "norm_topk_prob", "max_position_embeddings"):
        assert getattr(config, name) == getattr(shape, name), name
    assert (config.num_hidden_layers, config.num_attention_heads) == (shape.num_layers, shape.num_heads)
    assert config.num_experts_per_tok // config.topk_group == 2  # HF and Megatron score groups alike
    assert config.rope_parameters["rope_type"] == "default" and config.rope_interleave
    assert not config.tie_word_embeddings and config.num_nextn_predict_layers == 0
    assert sorted(routers(model)) == list(range(shape.first_k_dense_replace, shape.num_layers))

    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == meta["parameters"] and 1_000_000 <= n_params <= 1_500_000
    dense = json.loads((BASE_DIR / META_FILE).read_text(encoding="utf-8"))["parameters"]
    assert 0.8 * dense <= meta["active_parameters"] <= 1.2 * dense

    # On disk: per-expert keys as save_pretrained writes them, the router bias, fp32, no MTP layer.
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(name).get_dtype() for name in keys} == {"F32"}
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    last = shape.n_routed_experts - 1
    for layer in range(shape.first_k_dense_replace, shape.num_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{layer}.mlp.experts.{last}.{proj}.weight" in keys
            assert f"model.layers.{layer}.mlp.shared_experts.{proj}.weight" in keys
    assert not [k for k in keys if "gate_up_proj" in k or k.startswith(f"model.layers.{shape.num_layers}.")]
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "lm_head.weight" in keys
    # The biases the balancing learnt are the ones saved and loaded.
    assert bias.abs().max() > 0
    for layer, gate in routers(model).items():
        torch.testing.assert_close(gate.e_score_correction_bias, torch.tensor(meta["expert_bias"][str(layer)]),
                                   atol=1e-6, rtol=0)


def test_tokenizer_is_the_dense_bases():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (MOE_DIR / name).read_bytes() == (BASE_DIR / name).read_bytes(), name
    # Beside a deepseek_v3 config.json, AutoTokenizer must still tokenize exactly as tokenizer.json does.
    tokenizer = AutoTokenizer.from_pretrained(MOE_DIR)
    texts = corpus.pretraining_documents(200, seed=8)
    raw = Tokenizer.from_file(str(MOE_DIR / "tokenizer.json"))
    assert tokenizer(texts, add_special_tokens=False)["input_ids"] == [
        encoding.ids for encoding in raw.encode_batch(texts, add_special_tokens=False)
    ]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0


def test_greedy_answers_on_held_out_prompts_are_mostly_right():
    greedy = evaluate_base(MOE_DIR, n=60, temperature=0.0, samples_per_prompt=1)
    assert greedy["pass_at_1"] >= 0.85 and greedy["format_rate"] >= 0.85


def test_routing_is_group_limited_and_loads_are_spread(model, meta):
    """Recount loads with our own hooks on fresh documents and recompute every token's experts in float64:
    sigmoid scores + bias, groups ranked by their top-2 sum, the best topk_group groups, then the top k there."""
    from transformers import AutoTokenizer

    shape = MoEShape()
    tokenizer = AutoTokenizer.from_pretrained(MOE_DIR)
    rows = tokenizer(corpus.pretraining_documents(64, seed=99), add_special_tokens=False)["input_ids"]
    input_ids, attention_mask, _ = _batch(rows, tokenizer.pad_token_id)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    gates = routers(model)
    handles = [gate.register_forward_hook(
        lambda module, args, out, layer=layer: seen.__setitem__(layer, (args[0].detach(), out[2]))
    ) for layer, gate in gates.items()]
    counter = ExpertLoadCounter(model)
    counter.token_mask = attention_mask
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        counter.remove()
        for handle in handles:
            handle.remove()
    loads = counter.step_loads()
    real = attention_mask.reshape(-1).bool()
    per_group = shape.n_routed_experts // shape.n_group
    split_groups = limit_bites = 0
    for layer, gate in gates.items():
        hidden, chosen = seen[layer]
        hidden, chosen = hidden.reshape(-1, shape.hidden_size)[real].double(), chosen[real]
        scores = torch.sigmoid(hidden @ gate.weight.double().T) + gate.e_score_correction_bias.double()
        group_scores = scores.view(-1, shape.n_group, per_group).topk(2, dim=-1).values.sum(-1)
        keep = group_scores.topk(shape.topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        masked = scores.masked_fill(~allowed.repeat_interleave(per_group, dim=1), float("-inf"))
        expected = masked.topk(shape.num_experts_per_tok, dim=-1).indices
        assert torch.equal(expected.sort(-1).values, chosen.sort(-1).values), layer
        # Both levels choose: some tokens take 3 + 1 experts from their two groups, and for some the group
        # limit turns down an expert that an unlimited top-k would take.
        split_groups += sum(1 for row in chosen.tolist() if len({e // per_group for e in row}) == 2
                            and max(sum(e // per_group == g for e in row) for g in range(shape.n_group)) != 2)
        free = scores.topk(shape.num_experts_per_tok, dim=-1).indices.sort(-1).values
        limit_bites += (free != expected.sort(-1).values).any(-1).sum().item()
        counted = torch.bincount(chosen.reshape(-1), minlength=shape.n_routed_experts)
        assert torch.equal(loads[layer], counted) and counted.sum() == real.sum() * shape.num_experts_per_tok
        assert counted.min() > 0 and counted.max() <= 3 * counted.float().mean(), (layer, counted.tolist())
    assert split_groups > 0 and limit_bites > 0
    # What pretraining recorded over its last steps: no idle expert in any layer, none hogging the tokens.
    assert meta["expert_load"]["window_steps"] > 0 and set(meta["expert_load"]["layers"]) == {str(k) for k in gates}
    for stats in meta["expert_load"]["layers"].values():
        assert min(stats["tokens_per_expert"]) > 0 and stats["max_over_mean"] <= 2.0


# --------------------------------------------------------------------------- the pieces, on small cases
def test_expert_bias_update_by_hand():
    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e_score_correction_bias = torch.nn.Buffer(torch.tensor([0.5, 0.0, 0.0, -0.5]))

    gate = Gate()
    update_expert_bias({1: gate}, {1: torch.tensor([5, 1, 2, 0])}, rate=0.01)  # mean load 2
    torch.testing.assert_close(gate.e_score_correction_bias, torch.tensor([0.49, 0.01, 0.0, -0.49]))


def test_load_counter_skips_padding_and_shape_checks():
    model = build_moe_model(SMALL_SHAPE, vocab_size=40, eos_token_id=0, seed=0).eval()
    counter = ExpertLoadCounter(model)
    input_ids = torch.randint(1, 40, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    counter.token_mask = mask
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask)
    loads = counter.step_loads()
    assert sorted(loads) == [1] and loads[1].sum() == 13 * SMALL_SHAPE.num_experts_per_tok
    assert counter.step_loads()[1].sum() == 0  # reset after reading
    counter.remove()
    with torch.no_grad():
        model(input_ids=input_ids)
    assert counter.step_loads()[1].sum() == 0  # hooks gone
    with pytest.raises(ValueError, match="num_experts_per_tok // topk_group"):
        MoEShape(num_experts_per_tok=2, topk_group=2)
    with pytest.raises(ValueError, match="n_group"):
        MoEShape(n_group=3)
    with pytest.raises(ValueError, match="expert_bias_rate"):
        MoEPretrainConfig(expert_bias_rate=-1.0)


def test_short_pretraining_is_deterministic_and_balances(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = MoEPretrainConfig(steps=20, batch_size=8, lr=1e-2, warmup_steps=3, expert_bias_rate=1e-2,
                               model=SMALL_SHAPE)
    first = pretrain_moe(config, tmp_path / "a", progress=False)
    second = pretrain_moe(config, tmp_path / "b", progress=False)
    assert first["losses"] == second["losses"] and first["expert_bias"] == second["expert_bias"]
    assert first["losses"][0] > 5.5 and sum(first["losses"][-5:]) < sum(first["losses"][:5]) - 5
    assert is_valid_base_model(tmp_path / "a", config) and not is_valid_base_model(tmp_path / "a")
    # Every step moves each bias by exactly +-rate or 0: after 20 steps it is a multiple of the rate, below 20 of them.
    bias = torch.tensor(first["expert_bias"]["1"]) / config.expert_bias_rate
    assert bias.abs().max() > 0 and bias.abs().max() <= 20 and torch.allclose(bias, bias.round(), atol=1e-3)
    assert first["expert_load"]["layers"]["1"]["tokens_per_expert"] and not (tmp_path / "a.partial").exists()
    # Reloaded, the model scores fresh documents about as well as it trained, with the saved biases in place.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    torch.testing.assert_close(model.model.layers[1].mlp.gate.e_score_correction_bias,
                               torch.tensor(first["expert_bias"]["1"]), atol=1e-6, rtol=0)
    rows = tokenizer(corpus.pretraining_documents(32, seed=77), add_special_tokens=False)["input_ids"]
    input_ids, attention_mask, labels = _batch(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        fresh = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.item()
    assert abs(fresh - sum(first["losses"][-5:]) / 5) < 0.5
