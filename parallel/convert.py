"""HF safetensors <-> Megatron-core shards, and Megatron -> HF as a per-tensor stream.

The name map and the tensor layouts (TP shards, fused QKV / gate-up, routed experts by expert-parallel rank) are
in `parallel/names.py`; this module reads, writes and streams them.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from r1_engine.parallel.models import ModelInfo, parse_hf_config, unwrap_model
from r1_engine.parallel.names import (
    IGNORED_SUFFIXES,
    Unit,
    full_to_hf,
    full_to_shard,
    hf_tensor_shapes,
    hf_to_full,
    model_units,
    shards_to_full,
    tp_split,
)

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


def _info(model) -> ModelInfo:
    info = getattr(model, "model_info", None)
    if info is None:
        raise ValueError("model has no model_info: build it with parallel.models.build_gpt_model")
    return info


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _fp8_block(info: ModelInfo, where: Path) -> tuple[int, int] | None:
    """The weight block of a block-scaled FP8 checkpoint (DeepSeek-V3's published weights: e4m3 with one
    `weight_scale_inv` per 128 x 128 block), None for an unquantized one."""
    quant = info.hf_config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    block = quant.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise ValueError(f"{where}: unsupported quantization_config (quant_method={method!r}, weight_block_size="
                         f"{block!r}); supported: block-scaled fp8, or an unquantized checkpoint")
    return int(block[0]), int(block[1])


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 weight = fp8 weight x its block's scale (scale_inv [ceil(out / b0), ceil(in / b1)])."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


class _CheckpointReader:
    """Lazy access to the tensors of an HF safetensors checkpoint (single file or sharded); block-scaled FP8
    weights come back dequantized to fp32."""

    def __init__(self, hf_dir: str | Path, fp8_block: tuple[int, int] | None = None):
        self.fp8_block = fp8_block
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
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name + "_scale_inv"
            if self.fp8_block is None or scale_name not in self.file_of:
                raise ValueError(f"{path}: tensor {name!r} is fp8 but the checkpoint has no block-scaled fp8 "
                                 f"quantization_config with its {scale_name!r}")
            rows, cols = tensor.shape
            b0, b1 = self.fp8_block
            scale = self.get(scale_name, (-(-rows // b0), -(-cols // b1)))
            tensor = dequantize_fp8_blocks(tensor, scale, self.fp8_block)
        return tensor


def _is_mtp_tensor(info: ModelInfo, name: str) -> bool:
    """DeepSeek-V3's multi-token-prediction layers, stored as layers num_hidden_layers.. of the checkpoint: not
    part of the model transformers (or this engine) builds, so they are left unread."""
    extra = int(info.hf_config.get("num_nextn_predict_layers") or 0)
    if not extra or not name.startswith("model.layers."):
        return False
    index = name.split(".")[2]
    return index.isdigit() and info.num_layers <= int(index) < info.num_layers + extra


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
    reader = _CheckpointReader(hf_dir, _fp8_block(info, hf_dir / "config.json"))
    expected = hf_tensor_shapes(info)
    unexpected = [
        n for n in reader.file_of
        if n not in expected
        and not n.endswith(IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and info.tie_word_embeddings)
        and not (reader.fp8_block is not None and n.endswith(".weight_scale_inv"))
        and not _is_mtp_tensor(info, n)
    ]
    if unexpected:
        raise ValueError(f"{hf_dir}: unexpected tensors for {info.architecture}: {unexpected[:5]}")

    tp, rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    etp, erank = mpu.get_expert_tensor_parallel_world_size(), mpu.get_expert_tensor_parallel_rank()
    for name, param, unit in model_units(model, info):
        parts = [reader.get(n, expected[n]) for n in unit.hf_names]
        size, at = (etp, erank) if unit.is_expert else (tp, rank)
        shard = full_to_shard(info, unit, hf_to_full(info, unit, parts), size, at)
        if shard.shape != param.shape:
            raise ValueError(
                f"Megatron parameter {name!r}: shard shape {tuple(shard.shape)} from {unit.hf_names} "
                f"does not match the parameter's {tuple(param.shape)}"
            )
        param.data.copy_(shard)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _export_plan(model, info: ModelInfo) -> list[tuple[int, str, Unit]]:
    """(owner pipeline stage, Megatron name on the owner, unit) for every exported tensor, in HF order, agreed by
    all stages of this rank's pipeline group and all ranks of its expert-parallel group (a routed expert's entry
    comes from the rank that holds it)."""
    from megatron.core import parallel_state as mpu

    local = [(name, unit) for name, _, unit in model_units(model, info)]
    ep = mpu.get_expert_model_parallel_world_size()
    if ep > 1:
        per_rank: list = [None] * ep
        dist.all_gather_object(per_rank, local, group=mpu.get_expert_model_parallel_group())
        local = [entry for entries in per_rank for entry in entries]
    pp = mpu.get_pipeline_model_parallel_world_size()
    if pp > 1:
        gathered: list = [None] * pp
        dist.all_gather_object(gathered, local, group=mpu.get_pipeline_model_parallel_group())
    else:
        gathered = [local]
    owner: dict[str, tuple[int, str, Unit]] = {}
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

    Collective over the model-parallel group (tp x pp) and, for MoE models with expert parallelism,
    the expert-parallel group (which spans data-parallel replicas): every one of their ranks must
    iterate the generator to the end, together. Every rank receives every tensor: the owning stage
    all-gathers the TP shards of one parameter (a routed expert: the rank holding it broadcasts it
    over the expert-parallel group), then broadcasts the full tensor over the pipeline group.
    At most one full parameter (e.g. the fused QKV, or [gate; up]) exists at a time beyond the
    model itself, so the whole model is never materialised on one rank. Yielded tensors are on
    the model's device and may alias its parameters (TP=1, PP=1): copy what you keep.
    Data-parallel replicas export independently (identical streams) when there is no expert parallelism.
    """
    from megatron.core import parallel_state as mpu

    model = unwrap_model(model)
    info = _info(model)
    tp_group = mpu.get_tensor_model_parallel_group()
    tp = mpu.get_tensor_model_parallel_world_size()
    pp = mpu.get_pipeline_model_parallel_world_size()
    pp_group = mpu.get_pipeline_model_parallel_group()
    my_stage = mpu.get_pipeline_model_parallel_rank()
    ep = mpu.get_expert_model_parallel_world_size()
    ep_group = mpu.get_expert_model_parallel_group() if ep > 1 else None
    my_ep_rank = mpu.get_expert_model_parallel_rank()
    etp = mpu.get_expert_tensor_parallel_world_size()
    etp_group = mpu.get_expert_tensor_parallel_group() if etp > 1 else None
    tensors = {name: tensor for name, tensor, _ in model_units(model, info)}
    dtype = model.config.params_dtype
    device = next(model.parameters()).device

    for stage, name, unit in _export_plan(model, info):
        empty = torch.empty(unit.full_shape, dtype=torch.float32 if unit.fp32 else dtype, device=device)
        if stage != my_stage:
            full = empty
        elif unit.is_expert:  # one expert: on one expert-parallel rank, split over its expert-TP ranks
            if unit.expert_owner == my_ep_rank:
                shard = tensors[name].detach()
                shards = [shard]
                if etp > 1:
                    shards = [torch.empty_like(shard) for _ in range(etp)]
                    dist.all_gather(shards, shard.contiguous(), group=etp_group)
                full = shards_to_full(info, unit, shards)
            else:
                full = empty
            if ep > 1:
                full = full.contiguous()
                dist.broadcast(full, src=dist.get_global_rank(ep_group, unit.expert_owner), group=ep_group)
        else:
            shard = tensors[name].detach()
            if not tp_split(unit) or tp == 1:
                shards = [shard]
            else:
                shards = [torch.empty_like(shard) for _ in range(tp)]
                dist.all_gather(shards, shard.contiguous(), group=tp_group)
            full = shards_to_full(info, unit, shards)
        if pp > 1:
            full = full.contiguous()
            dist.broadcast(full, src=dist.get_global_rank(pp_group, stage), group=pp_group)
        for hf_name, tensor in zip(unit.hf_names, full_to_hf(info, unit, full)):
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
    # written unquantized and without multi-token-prediction layers, whatever the checkpoint read
    config.pop("quantization_config", None)
    if config.get("num_nextn_predict_layers"):
        config["num_nextn_predict_layers"] = 0
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
