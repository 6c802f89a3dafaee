"""The HF <-> Megatron name map and tensor layouts, for `parallel/convert.py`.

Dense layers (Qwen2 / Llama; `i` is the global layer, `j` its index inside this pipeline stage):

    HF                                              Megatron (local spec | TE spec)
    model.embed_tokens.weight                       embedding.word_embeddings.weight        vocab
    model.layers.i.input_layernorm.weight           decoder.layers.j.input_layernorm.weight
                                                    | decoder.layers.j.self_attention.linear_qkv.layer_norm_weight
    model.layers.i.self_attn.{q,k,v}_proj.weight    decoder.layers.j.self_attention.linear_qkv.weight   qkv
    model.layers.i.self_attn.{q,k,v}_proj.bias      decoder.layers.j.self_attention.linear_qkv.bias     qkv (Qwen2)
    model.layers.i.self_attn.{q,k}_norm.weight      decoder.layers.j.self_attention.{q,k}_layernorm.weight  (Qwen3)
    model.layers.i.self_attn.o_proj.weight          decoder.layers.j.self_attention.linear_proj.weight  row
    model.layers.i.post_attention_layernorm.weight  decoder.layers.j.pre_mlp_layernorm.weight
                                                    | decoder.layers.j.mlp.linear_fc1.layer_norm_weight
    model.layers.i.mlp.{gate,up}_proj.weight        decoder.layers.j.mlp.linear_fc1.weight              glu
    model.layers.i.mlp.down_proj.weight             decoder.layers.j.mlp.linear_fc2.weight              row
    model.norm.weight                               decoder.final_layernorm.weight
    lm_head.weight (model.embed_tokens if tied)     output_layer.weight                     vocab

Multi-latent attention (DeepSeek-V3), under `self_attn.` / `self_attention.`:

    q_a_proj                                        linear_q_down_proj                      replicated
    q_proj (q_lora_rank None)                       linear_q_proj                           col
    q_a_layernorm                                   q_layernorm
    q_b_proj                                        linear_q_up_proj                        col
    kv_a_proj_with_mqa                              linear_kv_down_proj                     replicated
    kv_a_layernorm                                  kv_layernorm
    kv_b_proj                                       linear_kv_up_proj                       col
    o_proj                                          linear_proj                             row

MoE layers, under `mlp.`: gate.weight -> router.weight; gate.e_score_correction_bias -> router.expert_bias (a
buffer, fp32); experts.e.{gate,up}_proj -> experts.local_experts.l.linear_fc1 (expert glu) and experts.e.down_proj ->
experts.local_experts.l.linear_fc2 (expert) (with TE's grouped GEMM: experts.linear_fc1.weight<l> and
experts.linear_fc2.weight<l>), where expert e = ep_rank * (E / ep) + l lives on expert-parallel rank
e // (E / ep); shared_experts.{gate,up,down}_proj -> shared_experts.linear_fc{1,2} (glu / row, like a dense MLP).

Each Megatron tensor has a "full" form (what it would be at TP=1) and its TP shard:
* qkv: full = per query group g: [q heads of g, k_g, v_g] stacked on dim 0; shard = contiguous
  chunk r of tp along dim 0 (Megatron's own layout, also when tp > num_query_groups);
* glu: full = [gate; up]; shard r = [gate chunk r; up chunk r] (each rank's output splits in two);
* col (MLA's up projections, column-parallel): chunk r along dim 0;
* row (o_proj, down_proj): chunk r along dim 1 (input features);
* vocab: rows padded with zeros to padded_vocab_size, chunk r along dim 0;
* routed experts: like glu (fc1) and row (fc2), over the expert-tensor-parallel ranks (Megatron's default: the
  TP size);
* norms, routers and MLA's down projections: replicated over TP.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from r1_engine.parallel.models import ModelInfo

# Tensors some checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# a routed expert: SequentialMLP's experts.local_experts.<l>.linear_fc1.weight, or TE's grouped GEMM (TEGroupedMLP,
# moe_grouped_gemm with TE; UNVERIFIED without TE) experts.linear_fc1.weight<l>: local expert l's tensors either way
_EXPERT = re.compile(r"mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+))$")


def _attention_shapes(info: ModelInfo, p: str) -> dict[str, tuple[int, ...]]:
    h, heads = info.hidden_size, info.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {}
    if info.mla is not None:
        m = info.mla
        q_out = heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        if m.q_lora_rank is None:
            shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
        else:
            shapes[p + "self_attn.q_a_proj.weight"] = (m.q_lora_rank, h)
            shapes[p + "self_attn.q_a_layernorm.weight"] = (m.q_lora_rank,)
            shapes[p + "self_attn.q_b_proj.weight"] = (q_out, m.q_lora_rank)
        shapes[p + "self_attn.kv_a_proj_with_mqa.weight"] = (m.kv_lora_rank + m.qk_rope_head_dim, h)
        shapes[p + "self_attn.kv_a_layernorm.weight"] = (m.kv_lora_rank,)
        shapes[p + "self_attn.kv_b_proj.weight"] = (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
        shapes[p + "self_attn.o_proj.weight"] = (h, heads * m.v_head_dim)
        return shapes
    hd = info.head_dim
    q_out, kv_out = heads * hd, info.num_query_groups * hd
    shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
    shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
    shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
    if info.qkv_bias:
        shapes[p + "self_attn.q_proj.bias"] = (q_out,)
        shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
        shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
    shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
    if info.qk_norm:
        shapes[p + "self_attn.q_norm.weight"] = (hd,)
        shapes[p + "self_attn.k_norm.weight"] = (hd,)
    return shapes


def _mlp_shapes(info: ModelInfo, p: str, layer: int) -> dict[str, tuple[int, ...]]:
    h, moe = info.hidden_size, info.moe
    if moe is None or not moe.moe_layers[layer]:
        f = info.ffn_hidden_size
        return {p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f)}
    shapes: dict[str, tuple[int, ...]] = {p + "mlp.gate.weight": (moe.num_experts, h)}
    if moe.expert_bias:
        shapes[p + "mlp.gate.e_score_correction_bias"] = (moe.num_experts,)
    f = moe.ffn_hidden_size
    for e in range(moe.num_experts):
        x = f"{p}mlp.experts.{e}."
        shapes.update({x + "gate_proj.weight": (f, h), x + "up_proj.weight": (f, h), x + "down_proj.weight": (h, f)})
    if moe.shared_ffn_hidden_size:
        f, x = moe.shared_ffn_hidden_size, p + "mlp.shared_experts."
        shapes.update({x + "gate_proj.weight": (f, h), x + "up_proj.weight": (f, h), x + "down_proj.weight": (h, f)})
    return shapes


def hf_tensor_shapes(info: ModelInfo) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint, in HF's order, with its shape."""
    h = info.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (info.vocab_size, h)}
    for i in range(info.num_layers):
        p = f"model.layers.{i}."
        shapes.update(_attention_shapes(info, p))
        shapes.update(_mlp_shapes(info, p, i))
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not info.tie_word_embeddings:
        shapes["lm_head.weight"] = (info.vocab_size, h)
    return shapes


@dataclass(frozen=True)
class Unit:
    """One Megatron tensor and the HF tensors it is made of."""

    kind: str  # "qkv" | "glu" | "col" | "row" | "vocab" | "replicated" | "expert_glu" | "expert"
    hf_names: tuple[str, ...]
    full_shape: tuple[int, ...]  # the TP=1 Megatron tensor (vocab: unpadded rows)
    expert_owner: int | None = None  # expert-parallel rank holding it (routed experts only)
    fp32: bool = False  # kept in fp32 whatever the model's dtype (the router's expert bias)

    @property
    def is_expert(self) -> bool:
        return self.expert_owner is not None


# Suffix of a per-layer Megatron tensor -> (kind, HF suffixes)
_LAYER_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        "qkv",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ),
    "self_attention.linear_qkv.bias": (
        "qkv",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    ),
    "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("glu", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
    # multi-latent attention
    "self_attention.linear_q_proj.weight": ("col", ("self_attn.q_proj.weight",)),
    "self_attention.linear_q_down_proj.weight": ("replicated", ("self_attn.q_a_proj.weight",)),
    "self_attention.linear_q_up_proj.weight": ("col", ("self_attn.q_b_proj.weight",)),
    "self_attention.linear_kv_down_proj.weight": ("replicated", ("self_attn.kv_a_proj_with_mqa.weight",)),
    "self_attention.linear_kv_up_proj.weight": ("col", ("self_attn.kv_b_proj.weight",)),
    "self_attention.kv_layernorm.weight": ("replicated", ("self_attn.kv_a_layernorm.weight",)),
    # the TE spec fuses MLA's norms into the up projections (read from megatron-core's spec, UNVERIFIED)
    "self_attention.linear_q_up_proj.layer_norm_weight": ("replicated", ("self_attn.q_a_layernorm.weight",)),
    "self_attention.linear_kv_up_proj.layer_norm_weight": ("replicated", ("self_attn.kv_a_layernorm.weight",)),
    # MoE
    "mlp.router.weight": ("replicated", ("mlp.gate.weight",)),
    "mlp.router.expert_bias": ("replicated", ("mlp.gate.e_score_correction_bias",)),
    "mlp.shared_experts.linear_fc1.weight": ("glu", ("mlp.shared_experts.gate_proj.weight",
                                                     "mlp.shared_experts.up_proj.weight")),
    "mlp.shared_experts.linear_fc2.weight": ("row", ("mlp.shared_experts.down_proj.weight",)),
}


def _q_layernorm(info: ModelInfo) -> tuple[str, tuple[str, ...]]:
    # the same Megatron name is Qwen3's per-head q_norm or MLA's norm of the compressed query
    return ("replicated", ("self_attn.q_a_layernorm.weight",) if info.mla is not None else ("self_attn.q_norm.weight",))


def unit_of(info: ModelInfo, shapes: dict, suffix: str, layer: int | None, ep_size: int = 1,
            ep_rank: int = 0) -> Unit:
    """The unit of a Megatron tensor: `suffix` is its name below `decoder.layers.j.` when `layer` (global index)
    is given, else its full name. `shapes` = hf_tensor_shapes(info)."""
    expert_owner = None
    if layer is None:
        if suffix == "embedding.word_embeddings.weight":
            names, kind = ("model.embed_tokens.weight",), "vocab"
        elif suffix == "output_layer.weight":
            names = ("model.embed_tokens.weight",) if info.tie_word_embeddings else ("lm_head.weight",)
            kind = "vocab"
        elif suffix == "decoder.final_layernorm.weight":
            names, kind = ("model.norm.weight",), "replicated"
        else:
            raise ValueError(f"no HF mapping for Megatron parameter {suffix!r}")
    else:
        expert = _EXPERT.match(suffix)
        if expert:
            local = int(expert.group(1) if expert.group(1) is not None else expert.group(4))
            which = expert.group(2) or expert.group(3)
            per_rank = info.moe.num_experts // ep_size
            e, expert_owner = ep_rank * per_rank + local, ep_rank
            base = f"model.layers.{layer}.mlp.experts.{e}."
            names = (base + "gate_proj.weight", base + "up_proj.weight") if which == "linear_fc1" else (
                base + "down_proj.weight",)
            kind = "expert_glu" if which == "linear_fc1" else "expert"
        else:
            if suffix == "self_attention.q_layernorm.weight":
                kind, hf_suffixes = _q_layernorm(info)
            elif suffix == "self_attention.k_layernorm.weight":
                kind, hf_suffixes = "replicated", ("self_attn.k_norm.weight",)
            elif suffix in _LAYER_RULES:
                kind, hf_suffixes = _LAYER_RULES[suffix]
            else:
                raise ValueError(f"no HF mapping for Megatron parameter 'decoder.layers.*.{suffix}'")
            names = tuple(f"model.layers.{layer}.{s}" for s in hf_suffixes)
    parts = [shapes[n] for n in names]
    if kind in ("qkv", "glu", "expert_glu"):
        full_shape = (sum(p[0] for p in parts), *parts[0][1:])
    else:
        full_shape = parts[0]
    return Unit(kind, names, full_shape, expert_owner, fp32=suffix == "mlp.router.expert_bias")


def model_units(model, info: ModelInfo) -> list[tuple[str, torch.Tensor, Unit]]:
    """(Megatron name, tensor, unit) for every parameter of this rank's stage, and the buffers a checkpoint holds
    (the routers' expert bias)."""
    from megatron.core import parallel_state as mpu

    shapes = hf_tensor_shapes(info)
    ep_size = mpu.get_expert_model_parallel_world_size()
    ep_rank = mpu.get_expert_model_parallel_rank()
    layer_of = {j: layer.layer_number - 1 for j, layer in enumerate(model.decoder.layers)}
    tensors = list(model.named_parameters())
    tensors += [(n, b) for n, b in model.named_buffers() if n.endswith("mlp.router.expert_bias")]
    units = []
    for name, tensor in tensors:
        if name.startswith("decoder.layers."):
            j, suffix = name[len("decoder.layers."):].split(".", 1)
            unit = unit_of(info, shapes, suffix, layer_of[int(j)], ep_size, ep_rank)
        else:
            unit = unit_of(info, shapes, name, None)
        units.append((name, tensor, unit))
    return units


# ---------------------------------------------------------------------------------------------
# Full <-> HF tensors and full <-> TP shard
# ---------------------------------------------------------------------------------------------


def hf_to_full(info: ModelInfo, unit: Unit, tensors: list[torch.Tensor]) -> torch.Tensor:
    if unit.kind == "qkv":
        q, k, v = tensors
        groups = info.num_query_groups
        per_group = info.num_attention_heads // groups
        trailing = q.shape[1:]
        q = q.reshape(groups, per_group * info.head_dim, *trailing)
        k = k.reshape(groups, info.head_dim, *trailing)
        v = v.reshape(groups, info.head_dim, *trailing)
        return torch.cat([q, k, v], dim=1).reshape(-1, *trailing)
    if unit.kind in ("glu", "expert_glu"):
        return torch.cat(tensors, dim=0)
    return tensors[0]


def full_to_hf(info: ModelInfo, unit: Unit, full: torch.Tensor) -> list[torch.Tensor]:
    if unit.kind == "qkv":
        groups = info.num_query_groups
        per_group = info.num_attention_heads // groups
        hd = info.head_dim
        trailing = full.shape[1:]
        grouped = full.reshape(groups, (per_group + 2) * hd, *trailing)
        q, k, v = torch.split(grouped, [per_group * hd, hd, hd], dim=1)
        return [q.reshape(-1, *trailing), k.reshape(-1, *trailing), v.reshape(-1, *trailing)]
    if unit.kind in ("glu", "expert_glu"):
        return list(full.chunk(2, dim=0))
    return [full]


def tp_split(unit: Unit) -> bool:
    """Whether the tensor is split over tensor-parallel ranks (routed experts: over the expert-TP ranks)."""
    return unit.kind != "replicated"


def full_to_shard(info: ModelInfo, unit: Unit, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    if not tp_split(unit):
        return full
    if unit.kind in ("row", "expert"):
        return full.chunk(tp, dim=1)[rank]
    if unit.kind in ("qkv", "col"):
        return full.chunk(tp, dim=0)[rank]
    if unit.kind in ("glu", "expert_glu"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    if unit.kind == "vocab":
        pad = info.padded_vocab_size - full.shape[0]
        padded = torch.cat([full, full.new_zeros(pad, *full.shape[1:])]) if pad else full
        return padded.chunk(tp, dim=0)[rank]
    raise AssertionError(unit.kind)


def shards_to_full(info: ModelInfo, unit: Unit, shards: list[torch.Tensor]) -> torch.Tensor:
    if not tp_split(unit):
        return shards[0]
    if unit.kind in ("row", "expert"):
        return torch.cat(shards, dim=1)
    if unit.kind in ("qkv", "col"):
        return torch.cat(shards, dim=0)
    if unit.kind in ("glu", "expert_glu"):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if unit.kind == "vocab":
        return torch.cat(shards, dim=0)[: info.vocab_size]
    raise AssertionError(unit.kind)
