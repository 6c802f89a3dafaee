"""Tiny random MoE checkpoints, written by transformers from configs (no hub access).

Qwen3-MoE: hidden 48, 2 layers (layer 1 dense through mlp_only_layers), 4 heads / 2 KV heads with head_dim 8
(!= hidden / heads), q/k norms, 4 experts top-2 with norm_topk_prob, vocab 250 (the Megatron side pads).
DeepSeek-V3: hidden 48, 4 layers (the first dense), MLA with q_lora_rank 24, kv_lora_rank 16, nope 8, rope 4,
v 8; 8 experts in 4 groups, top-4 of the best 2 groups, sigmoid scores with a non-zero expert bias, one shared
expert, routed_scaling_factor 2.5. Weights are drawn larger than HF's init so that a wrong mapping shows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.parallel._models_tiny import randomize_weights

VOCAB = 250


def moe_hf_config(kind: str, **changes):
    from transformers import DeepseekV3Config, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=48, num_attention_heads=4, rms_norm_eps=1e-6,
                  max_position_embeddings=256, hidden_act="silu", tie_word_embeddings=False)
    if kind == "qwen3_moe":
        fields = dict(common, num_hidden_layers=2, num_key_value_heads=2, head_dim=8, intermediate_size=64,
                      moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[1], rope_theta=1_000_000.0,
                      # off: the layout tests compare exact gradients, and a load-balancing loss is computed per
                      # micro-batch and rank, so it changes with the split (transformers' default is 0.001)
                      router_aux_loss_coef=0.0)
        return Qwen3MoeConfig(**(fields | changes))
    if kind == "deepseek_v3":
        fields = dict(common, num_hidden_layers=4, num_key_value_heads=4, intermediate_size=64,
                      moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=4,
                      n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                      first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, rope_theta=10_000.0, num_nextn_predict_layers=0)
        return DeepseekV3Config(**(fields | changes))
    raise ValueError(f"unknown tiny MoE kind {kind!r}")


def moe_hf_model(kind: str, seed: int = 0, dtype=torch.float32, **changes):
    from transformers import AutoModelForCausalLM

    config = moe_hf_config(kind, **changes)
    torch.manual_seed(seed)
    # the eager experts run in any dtype (grouped_mm has no float64); sdpa stays finite with padding in float64
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager",
                                             attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(seed)
    randomize_weights(model, gen)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.rand(buf.shape, generator=gen))  # >= 0: HF and Megatron mask groups alike
    return model.eval()


def write_moe_checkpoint(kind: str, out_dir: str | Path, seed: int = 0, **changes) -> Path:
    out_dir = Path(out_dir)
    moe_hf_model(kind, seed, **changes).save_pretrained(out_dir)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256, "tiny": kind}))
    return out_dir


def hf_reference(ckpt_dir: str | Path, dtype=torch.float64):
    """The saved checkpoint read back by transformers (what a user's HF model would be), in `dtype`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=dtype, experts_implementation="eager",
                                                attn_implementation="sdpa").eval()
