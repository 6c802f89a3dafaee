"""HF safetensors <-> Megatron-core shards, and Megatron -> HF as a per-tensor stream.

Name map (Qwen2 / Llama; `i` is the global layer, `j` its index inside this pipeline stage):

    HF                                              Megatron (local spec | TE spec)
    model.embed_tokens.weight                       embedding.word_embeddings.weight        vocab
    model.layers.i.input_layernorm.weight           decoder.layers.j.input_layernorm.weight
                                                    | decoder.layers.j.self_attention.linear_qkv.layer_norm_weight
    model.layers.i.self_attn.{q,k,v}_proj.weight    decoder.layers.j.self_attention.linear_qkv.weight   qkv
    model.layers.i.self_attn.{q,k,v}_proj.bias      decoder.layers.j.self_attention.linear_qkv.bias     qkv (Qwen2)
    model.layers.i.self_attn.o_proj.weight          decoder.layers.j.self_attention.linear_proj.weight  row
    model.layers.i.post_attention_layernorm.weight  decoder.layers.j.pre_mlp_layernorm.weight
                                                    | decoder.layers.j.mlp.linear_fc1.layer_norm_weight
    model.layers.i.mlp.{gate,up}_proj.weight        decoder.layers.j.mlp.linear_fc1.weight              glu
    model.layers.i.mlp.down_proj.weight             decoder.layers.j.mlp.linear_fc2.weight              row
    model.norm.weight                               decoder.final_layernorm.weight
    lm_head.weight (model.embed_tokens if tied)     output_layer.weight                     vocab

Each Megatron parameter has a "full" form (what it would be at TP=1) and its TP shard:
* qkv: full = per query group g: [q heads of g, k_g, v_g] stacked on dim 0; shard = contiguous
  chunk r of tp along dim 0 (Megatron's own layout, also when tp > num_query_groups);
* glu: full = [gate; up]; shard r = [gate chunk r; up chunk r] (each rank's output splits in two);
* row (o_proj, down_proj): chunk r along dim 1 (input features);
* vocab: rows padded with zeros to padded_vocab_size, chunk r along dim 0;
* norms: replicated.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from parallel.models import ModelInfo, parse_hf_config, unwrap_model

__all__ = [
    "hf_tensor_shapes",
    "load_hf_checkpoint",
    "export_hf_state",
    "save_hf_checkpoint",
    "copy_tokenizer_files",
    "TOKENIZER_FILES",
]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "tekken.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # named chat templates, beside the default one
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# The name map
# ---------------------------------------------------------------------------------------------


def hf_tensor_shapes(info: ModelInfo) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint, in HF's order, with its shape."""
    h, hd = info.hidden_size, info.head_dim
    q_out, kv_out = info.num_attention_heads * hd, info.num_query_groups * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (info.vocab_size, h)}
    for i in range(info.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
        if info.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        shapes[p + "mlp.gate_proj.weight"] = (info.ffn_hidden_size, h)
        shapes[p + "mlp.up_proj.weight"] = (info.ffn_hidden_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, info.ffn_hidden_size)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not info.tie_word_embeddings:
        shapes["lm_head.weight"] = (info.vocab_size, h)
    return shapes


@dataclass(frozen=True)
class _Unit:
    """One Megatron parameter and the HF tensors it is made of."""

    kind: str  # "qkv" | "glu" | "row" | "vocab" | "replicated"
    hf_names: tuple[str, ...]
    full_shape: tuple[int, ...]  # the TP=1 Megatron tensor (vocab: unpadded rows)


# Suffix of a per-layer Megatron parameter -> (kind, HF suffixes)
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
}


def _unit(info: ModelInfo, shapes: dict, suffix: str, layer: int | None) -> _Unit:
    """The unit for a Megatron parameter: `suffix` is its name below `decoder.layers.j.` when
    `layer` (global index) is given, else its full name. `shapes` = hf_tensor_shapes(info)."""
    if layer is None:
        if suffix == "embedding.word_embeddings.weight":
            names = ("model.embed_tokens.weight",)
            kind = "vocab"
        elif suffix == "output_layer.weight":
            names = ("model.embed_tokens.weight",) if info.tie_word_embeddings else ("lm_head.weight",)
            kind = "vocab"
        elif suffix == "decoder.final_layernorm.weight":
            names, kind = ("model.norm.weight",), "replicated"
        else:
            raise ValueError(f"no HF mapping for Megatron parameter {suffix!r}")
    else:
        if suffix not in _LAYER_RULES:
            raise ValueError(f"no HF mapping for Megatron parameter 'decoder.layers.*.{suffix}'")
        kind, hf_suffixes = _LAYER_RULES[suffix]
        names = tuple(f"model.layers.{layer}.{s}" for s in hf_suffixes)
    parts = [shapes[n] for n in names]
    if kind in ("qkv", "glu"):
        full_shape = (sum(p[0] for p in parts), *parts[0][1:])
    else:
        full_shape = parts[0]
    return _Unit(kind, names, full_shape)


def _model_units(model) -> list[tuple[str, torch.nn.Parameter, _Unit]]:
    """(Megatron name, parameter, unit) for every parameter of this rank's stage."""
    info: ModelInfo = _info(model)
    shapes = hf_tensor_shapes(info)
    layer_of = {j: layer.layer_number - 1 for j, layer in enumerate(model.decoder.layers)}
    units = []
    for name, param in model.named_parameters():
        if name.startswith("decoder.layers."):
            j, suffix = name[len("decoder.layers.") :].split(".", 1)
            unit = _unit(info, shapes, suffix, layer_of[int(j)])
        else:
            unit = _unit(info, shapes, name, None)
        units.append((name, param, unit))
    return units


def _info(model) -> ModelInfo:
    info = getattr(model, "model_info", None)
    if info is None:
        raise ValueError("model has no model_info: build it with parallel.models.build_gpt_model")
    return info


# ---------------------------------------------------------------------------------------------
# Full <-> HF tensors and full <-> TP shard
# ---------------------------------------------------------------------------------------------


def _hf_to_full(info: ModelInfo, unit: _Unit, tensors: list[torch.Tensor]) -> torch.Tensor:
    if unit.kind == "qkv":
        q, k, v = tensors
        groups = info.num_query_groups
        per_group = info.num_attention_heads // groups
        trailing = q.shape[1:]
        q = q.reshape(groups, per_group * info.head_dim, *trailing)
        k = k.reshape(groups, info.head_dim, *trailing)
        v = v.reshape(groups, info.head_dim, *trailing)
        return torch.cat([q, k, v], dim=1).reshape(-1, *trailing)
    if unit.kind == "glu":
        return torch.cat(tensors, dim=0)
    return tensors[0]


def _full_to_hf(info: ModelInfo, unit: _Unit, full: torch.Tensor) -> list[torch.Tensor]:
    if unit.kind == "qkv":
        groups = info.num_query_groups
        per_group = info.num_attention_heads // groups
        hd = info.head_dim
        trailing = full.shape[1:]
        grouped = full.reshape(groups, (per_group + 2) * hd, *trailing)
        q, k, v = torch.split(grouped, [per_group * hd, hd, hd], dim=1)
        return [q.reshape(-1, *trailing), k.reshape(-1, *trailing), v.reshape(-1, *trailing)]
    if unit.kind == "glu":
        return list(full.chunk(2, dim=0))
    return [full]


def _full_to_shard(info: ModelInfo, unit: _Unit, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    if unit.kind == "replicated":
        return full
    if unit.kind == "row":
        return full.chunk(tp, dim=1)[rank]
    if unit.kind == "qkv":
        return full.chunk(tp, dim=0)[rank]
    if unit.kind == "glu":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    if unit.kind == "vocab":
        pad = info.padded_vocab_size - full.shape[0]
        padded = torch.cat([full, full.new_zeros(pad, *full.shape[1:])]) if pad else full
        return padded.chunk(tp, dim=0)[rank]
    raise AssertionError(unit.kind)


def _shards_to_full(info: ModelInfo, unit: _Unit, shards: list[torch.Tensor]) -> torch.Tensor:
    if unit.kind == "replicated":
        return shards[0]
    if unit.kind == "row":
        return torch.cat(shards, dim=1)
    if unit.kind == "qkv":
        return torch.cat(shards, dim=0)
    if unit.kind == "glu":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if unit.kind == "vocab":
        return torch.cat(shards, dim=0)[: info.vocab_size]
    raise AssertionError(unit.kind)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class _CheckpointReader:
    """Lazy access to the tensors of an HF safetensors checkpoint (single file or sharded)."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.dir = Path(hf_dir)
        index = self.dir / SAFETENSORS_INDEX
        single = self.dir / SAFETENSORS_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from None
            self.file_of = {name: self.dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as handle:
                self.file_of = {name: single for name in handle.keys()}
        else:
            raise ValueError(f"{self.dir}: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} found")
        for path in set(self.file_of.values()):
            if not path.is_file():
                raise ValueError(f"{index}: shard file {path.name} is missing")
        self._handles: dict[Path, object] = {}

    def get(self, name: str, expected_shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.file_of:
            raise ValueError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        path = self.file_of[name]
        if path not in self._handles:
            self._handles[path] = self._safe_open(path, framework="pt", device="cpu")
        try:
            tensor = self._handles[path].get_tensor(name)
        except Exception as err:  # a stale index naming a tensor the shard does not hold
            raise ValueError(f"{path}: cannot read tensor {name!r} ({err})") from None
        if tuple(tensor.shape) != tuple(expected_shape):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected_shape)}"
            )
        return tensor


def _check_config_matches(info: ModelInfo, hf_dir: Path) -> None:
    path = hf_dir / "config.json"
    if not path.is_file():
        return
    ckpt = parse_hf_config(path)
    for field_name in (
        "model_type", "vocab_size", "hidden_size", "num_layers", "num_attention_heads",
        "num_query_groups", "head_dim", "ffn_hidden_size", "tie_word_embeddings", "rope_theta",
    ):
        mine, theirs = getattr(info, field_name), getattr(ckpt, field_name)
        if mine != theirs:
            raise ValueError(f"{path}: {field_name}={theirs!r} but the model was built with {mine!r}")


@torch.no_grad()
def load_hf_checkpoint(model, hf_dir: str | Path) -> None:
    """Fill this rank's shard of `model` (from `build_gpt_model`) from an HF checkpoint directory.

    Reads only the tensors this rank's stage needs, one at a time. Raises ValueError naming the
    tensor / file for a missing tensor, a wrong shape, an unexpected tensor (a checkpoint of
    another architecture), or a config.json that disagrees with the model.
    """
    from megatron.core import parallel_state as mpu

    info = _info(model)
    hf_dir = Path(hf_dir)
    _check_config_matches(info, hf_dir)
    reader = _CheckpointReader(hf_dir)
    expected = hf_tensor_shapes(info)
    unexpected = [
        n for n in reader.file_of
        if n not in expected
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and info.tie_word_embeddings)
    ]
    if unexpected:
        raise ValueError(f"{hf_dir}: unexpected tensors for {info.architecture}: {unexpected[:5]}")

    tp, rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    for name, param, unit in _model_units(model):
        parts = [reader.get(n, expected[n]) for n in unit.hf_names]
        shard = _full_to_shard(info, unit, _hf_to_full(info, unit, parts), tp, rank)
        if shard.shape != param.shape:
            raise ValueError(
                f"Megatron parameter {name!r}: shard shape {tuple(shard.shape)} from {unit.hf_names} "
                f"does not match the parameter's {tuple(param.shape)}"
            )
        param.data.copy_(shard)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _export_plan(model, info: ModelInfo) -> list[tuple[int, str, _Unit]]:
    """(owner pipeline stage, Megatron name on the owner, unit) for every exported parameter,
    in HF order, agreed by all stages of this rank's pipeline group."""
    from megatron.core import parallel_state as mpu

    local = [(name, unit) for name, _, unit in _model_units(model)]
    pp = mpu.get_pipeline_model_parallel_world_size()
    if pp > 1:
        gathered: list = [None] * pp
        dist.all_gather_object(gathered, local, group=mpu.get_pipeline_model_parallel_group())
    else:
        gathered = [local]
    owner: dict[str, tuple[int, str, _Unit]] = {}
    for stage, entries in enumerate(gathered):
        for name, unit in entries:
            first = unit.hf_names[0]
            if name == "output_layer.weight" and info.tie_word_embeddings:
                continue  # the tied copy of the embedding on the last stage
            owner.setdefault(first, (stage, name, unit))
    order = {name: k for k, name in enumerate(hf_tensor_shapes(info))}
    plan = sorted(owner.values(), key=lambda entry: order[entry[2].hf_names[0]])
    covered = {n for _, _, unit in plan for n in unit.hf_names}
    missing = [n for n in order if n not in covered]
    if missing:
        raise ValueError(f"no pipeline stage holds {missing[:5]}")
    return plan


@torch.no_grad()
def export_hf_state(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the model as full HF-named tensors, one Megatron parameter at a time.

    Collective over the model-parallel group (tp x pp): every one of its ranks must iterate the
    generator to the end, together. Every rank receives every tensor: the owning stage all-gathers
    the TP shards of one parameter, then broadcasts the full tensor over the pipeline group.
    At most one full parameter (e.g. the fused QKV, or [gate; up]) exists at a time beyond the
    model itself, so the whole model is never materialised on one rank. Yielded tensors are on
    the model's device and may alias its parameters (TP=1, PP=1): copy what you keep.
    Data-parallel replicas export independently (identical streams).
    """
    from megatron.core import parallel_state as mpu

    model = unwrap_model(model)
    info = _info(model)
    tp_group = mpu.get_tensor_model_parallel_group()
    tp = mpu.get_tensor_model_parallel_world_size()
    pp = mpu.get_pipeline_model_parallel_world_size()
    pp_group = mpu.get_pipeline_model_parallel_group()
    my_stage = mpu.get_pipeline_model_parallel_rank()
    params = dict(model.named_parameters())
    dtype = model.config.params_dtype
    device = next(model.parameters()).device

    for stage, name, unit in _export_plan(model, info):
        if stage == my_stage:
            shard = params[name].detach()
            if unit.kind == "replicated" or tp == 1:
                shards = [shard]
            else:
                shards = [torch.empty_like(shard) for _ in range(tp)]
                dist.all_gather(shards, shard.contiguous(), group=tp_group)
            full = _shards_to_full(info, unit, shards) if unit.kind != "replicated" else shard
        else:
            full = torch.empty(unit.full_shape, dtype=dtype, device=device)
        if pp > 1:
            full = full.contiguous()
            dist.broadcast(full, src=dist.get_global_rank(pp_group, stage), group=pp_group)
        for hf_name, tensor in zip(unit.hf_names, _full_to_hf(info, unit, full)):
            yield hf_name, tensor


def save_hf_checkpoint(
    model,
    out_dir: str | Path,
    hf_config: dict | str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    *,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path | None:
    """Write the model as an HF checkpoint: safetensors (sharded above `max_shard_bytes`, with
    `model.safetensors.index.json`), config.json (from `hf_config`, default the model's own)
    and the tokenizer files found in `tokenizer_dir`.

    Collective like `export_hf_state`; the first rank of the model-parallel group with dp rank 0
    writes, and holds at most one shard in host memory. Returns out_dir on the writer, else None.
    """
    from megatron.core import parallel_state as mpu
    from safetensors.torch import save_file

    model = unwrap_model(model)
    info = _info(model)
    writer = mpu.get_model_parallel_group().rank() == 0 and mpu.get_data_parallel_rank() == 0
    out_dir = Path(out_dir)
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)

    shard_files: list[str] = []
    weight_map: dict[str, str] = {}
    buffer: dict[str, torch.Tensor] = {}
    buffered = 0
    total = 0
    dtype_name = str(model.config.params_dtype).replace("torch.", "")

    def flush() -> None:
        nonlocal buffer, buffered
        fname = f"model-{len(shard_files) + 1:05d}.safetensors.tmp"
        save_file(buffer, str(out_dir / fname), metadata={"format": "pt"})
        shard_files.append(fname)
        for tensor_name in buffer:
            weight_map[tensor_name] = fname
        buffer, buffered = {}, 0

    for name, tensor in export_hf_state(model):
        if not writer:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if buffer and buffered + nbytes > max_shard_bytes:
            flush()
        buffer[name] = tensor.detach().to("cpu", copy=True).contiguous()
        buffered += nbytes
        total += nbytes
    if not writer:
        if dist.is_initialized():
            dist.barrier(group=mpu.get_model_parallel_group())
        return None
    if buffer or not shard_files:
        flush()

    # Final names, now that the shard count is known.
    final: dict[str, str] = {}
    for k, tmp in enumerate(shard_files, start=1):
        final[tmp] = SAFETENSORS_FILE if len(shard_files) == 1 else f"model-{k:05d}-of-{len(shard_files):05d}.safetensors"
        os.replace(out_dir / tmp, out_dir / final[tmp])
    stale_index = out_dir / SAFETENSORS_INDEX
    if len(shard_files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: final[f] for n, f in weight_map.items()}}
        stale_index.write_text(json.dumps(index, indent=2))
    elif stale_index.exists():
        stale_index.unlink()

    config = dict((info if hf_config is None else parse_hf_config(hf_config)).hf_config)
    config.setdefault("architectures", [info.architecture])
    config["torch_dtype"] = dtype_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    if dist.is_initialized():
        dist.barrier(group=mpu.get_model_parallel_group())
    return out_dir


def copy_tokenizer_files(tokenizer_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer files byte for byte (never re-saved from a loaded object, which would rewrite
    tokenizer_config.json's class and could let a loader rebuild a different tokenizer), so the export is
    read exactly as the user's model was. Returns the names copied; ValueError if there is no tokenizer."""
    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    if not tokenizer_dir.is_dir():
        raise ValueError(f"tokenizer_dir {tokenizer_dir} is not a directory")
    copied = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not set(copied) - {"generation_config.json", "chat_template.jinja", "chat_template.json"}:
        raise ValueError(f"tokenizer_dir {tokenizer_dir} has no tokenizer files "
                         f"(looked for {', '.join(TOKENIZER_FILES)})")
    for name in copied:
        shutil.copy2(tokenizer_dir / name, out_dir / name)
    if (tokenizer_dir / CHAT_TEMPLATE_DIR).is_dir():
        shutil.copytree(tokenizer_dir / CHAT_TEMPLATE_DIR, out_dir / CHAT_TEMPLATE_DIR, dirs_exist_ok=True)
        copied.append(CHAT_TEMPLATE_DIR)
    return copied
