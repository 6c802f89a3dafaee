"""HF `config.json` -> `ModelInfo`: the architecture facts the model builder, the converter and the trainer share,
read and checked once (a ValueError naming the file and field for anything unsupported)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1_engine.parallel.moe import MLAInfo, MoEInfo, parse_moe

__all__ = ["ModelInfo", "parse_hf_config"]

_SUPPORTED = {
    "qwen2": ("Qwen2ForCausalLM",),
    "llama": ("LlamaForCausalLM",),
    "qwen3_moe": ("Qwen3MoeForCausalLM",),
    "deepseek_v3": ("DeepseekV3ForCausalLM",),
}


@dataclass(frozen=True)
class ModelInfo:
    """The architecture facts the model builder, the converter and the trainer share."""

    model_type: str  # "qwen2" | "llama" | "qwen3_moe" | "deepseek_v3"
    vocab_size: int  # true vocabulary (HF)
    padded_vocab_size: int  # Megatron's, a multiple of 128 * tp
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads
    head_dim: int
    ffn_hidden_size: int  # the dense MLP's (MoE layers: moe.ffn_hidden_size per expert)
    tie_word_embeddings: bool
    qkv_bias: bool
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # HF llama3 parameters, or None
    max_position_embeddings: int
    initializer_range: float
    torch_dtype: str | None
    hf_config: dict = field(repr=False, compare=False, default_factory=dict)
    moe: MoEInfo | None = None  # routed experts (Qwen3-MoE, DeepSeek-V3)
    mla: MLAInfo | None = None  # multi-latent attention (DeepSeek-V3)
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3)

    @property
    def architecture(self) -> str:
        return _SUPPORTED[self.model_type][0]


def _load_config_dict(hf_config: dict | str | Path) -> tuple[dict, str]:
    """The config dict and a name for it in error messages."""
    if isinstance(hf_config, dict):
        return dict(hf_config), "hf_config"
    path = Path(hf_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"HF config not found: {path}")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _require(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{where}: missing field {key!r}")
    return cfg[key]


def _rope(cfg: dict, where: str) -> tuple[float, dict | None]:
    """(theta, llama3 scaling or None) from either transformers-5 `rope_parameters` or the
    classic `rope_theta` + `rope_scaling` fields."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = params
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling")
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"{where}: unsupported rope scaling rope_type={rope_type!r} (supported: default, llama3)")
    llama3 = {}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise ValueError(f"{where}: llama3 rope scaling is missing field {key!r}")
        llama3[key] = float(scaling[key])
    return theta, llama3


def parse_hf_config(hf_config: dict | str | Path, tensor_parallel: int = 1, expert_parallel: int = 1) -> ModelInfo:
    """Read and validate an HF config (dict, config.json path, or checkpoint directory)."""
    cfg, where = _load_config_dict(hf_config)
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in _SUPPORTED:
        raise ValueError(
            f"{where}: unsupported model_type={model_type!r} (architectures={archs}); "
            f"supported: {sorted(_SUPPORTED)}"
        )
    for arch in archs:
        if arch not in _SUPPORTED[model_type]:
            raise ValueError(f"{where}: unsupported architecture {arch!r} for model_type={model_type!r}")

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: unsupported hidden_act={act!r} (SwiGLU with silu only)")
    if model_type == "qwen2" and cfg.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=True is not supported")
    if model_type in ("llama", "qwen3_moe", "deepseek_v3"):
        if cfg.get("attention_bias"):
            raise ValueError(f"{where}: attention_bias=True is not supported (o_proj bias)")
        if cfg.get("mlp_bias"):
            raise ValueError(f"{where}: mlp_bias=True is not supported")

    hidden = int(_require(cfg, "hidden_size", where))
    heads = int(_require(cfg, "num_attention_heads", where))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = int(_require(cfg, "vocab_size", where))
    if heads % kv_heads != 0:
        raise ValueError(f"{where}: num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}")
    # Megatron splits the fused QKV evenly: whole query groups per rank, or (tp > groups) each
    # group spread over tp / groups ranks.
    if heads % tensor_parallel != 0 or (kv_heads % tensor_parallel and tensor_parallel % kv_heads):
        raise ValueError(
            f"{where}: num_attention_heads={heads} / num_key_value_heads={kv_heads} cannot be split "
            f"over tensor_parallel={tensor_parallel}"
        )
    multiple = 128 * tensor_parallel
    num_layers = int(_require(cfg, "num_hidden_layers", where))
    moe = mla = None
    if model_type in ("qwen3_moe", "deepseek_v3"):
        if model_type == "qwen3_moe" and cfg.get("use_sliding_window"):
            raise ValueError(f"{where}: use_sliding_window=True is not supported")
        moe, mla = parse_moe(cfg, model_type, where, num_layers)
        if moe.num_experts % expert_parallel:
            raise ValueError(f"{where}: num_experts={moe.num_experts} is not divisible by "
                             f"expert_parallel={expert_parallel}")
    elif expert_parallel > 1:
        raise ValueError(f"expert_parallel={expert_parallel}: {where} is a dense model ({model_type}), it has no "
                         f"experts to distribute")
    if mla is not None:  # the rope (and its yarn scaling) is MLA's own: only the base is read here
        params = cfg.get("rope_parameters") or {}
        theta, scaling = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))), None
        head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    else:
        theta, scaling = _rope(cfg, where)
    return ModelInfo(
        model_type=model_type,
        vocab_size=vocab,
        padded_vocab_size=-(-vocab // multiple) * multiple,
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=int(_require(cfg, "intermediate_size", where)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),  # Qwen2/Llama default
        qkv_bias=(model_type == "qwen2"),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        hf_config=cfg,
        moe=moe,
        mla=mla,
        qk_norm=model_type == "qwen3_moe",
    )
