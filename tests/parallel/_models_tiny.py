"""Tiny random HF checkpoints (Qwen2 and Llama 3) written from configs, no hub access.

Shapes: hidden 64, 2 layers, 4 heads, 2 KV heads (head_dim 16), SwiGLU 128, vocab 250 (not a
multiple of 128, so the Megatron side pads). Qwen2: QKV bias, tied embeddings, sharded
safetensors with an index. Llama: Llama-3 RoPE scaling (a small original context so all three
frequency bands occur at head_dim 16), untied lm_head, a single model.safetensors.
Weights are drawn larger than HF's init so that a wrong mapping moves the logits visibly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 250


def tiny_hf_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        hidden_act="silu",
    )
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1_000_000.0)
    if kind == "llama":
        return LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_theta=10_000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    raise ValueError(f"unknown tiny model kind {kind!r}")


def tiny_hf_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(kind)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_weights(model, torch.Generator().manual_seed(seed))
    return model.eval()


@torch.no_grad()
def randomize_weights(model, gen: torch.Generator) -> None:
    """Norm weights around 1, the rest N(0, 0.15^2): larger than HF's init, so a wrong mapping shows."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(0.15 * torch.randn(param.shape, generator=gen))


def write_tiny_checkpoint(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model as an HF checkpoint (+ a stand-in tokenizer_config.json)."""
    out_dir = Path(out_dir)
    model = tiny_hf_model(kind, seed)
    # Qwen2 sharded (index + several files), Llama one file: both reader paths get exercised.
    model.save_pretrained(out_dir, max_shard_size="40KB" if kind == "qwen2" else "50GB")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256, "tiny": kind}))
    return out_dir


def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single file or sharded)."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
