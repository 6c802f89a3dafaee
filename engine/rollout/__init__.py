"""Rollout engines: sample G completions per prompt and record their log-probs.

`HFRolloutEngine` (transformers, CPU or one GPU) is the reference and the CPU default; `VLLMRolloutEngine`
(colocated vLLM) is the fast path on GPUs and is imported lazily from engine.rollout.vllm.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from r1_engine.engine.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from r1_engine.engine.rollout.hf import HFRolloutEngine

__all__ = ["RolloutBatch", "RolloutEngine", "SamplingParams", "HFRolloutEngine", "build_rollout_engine",
           "rollout_model_dir"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_rollout_engine(backend: Literal["hf", "vllm"], model_dir: str | Path, tokenizer: Any, *,
                         device: torch.device, dtype: Literal["float32", "bfloat16"], seed: int,
                         gpu_memory_utilization: float, num_threads: int | None,
                         record_routing: bool = False, max_model_len: int | None = None) -> RolloutEngine:
    """The rollout engine of `backend` on `model_dir`, using the caller's tokenizer object (the trainer's and the
    evaluation's one tokenizer). vLLM's options are used by vllm only, num_threads by hf only.

    vllm on a torch.distributed world of more than one rank: every rank must call this together and gets its part
    of a colocated engine (engine.rollout.colocate: vLLM's TP = the initialised Megatron TP, one replica per TP
    group); its generate() etc. are collective (`engine.collective` is True). max_model_len (vllm): the longest
    prompt + completion the caller will ask for; vLLM sizes its KV cache and checks requests by it."""
    if backend == "vllm":
        import torch.distributed as dist

        from r1_engine.engine.rollout.vllm import VLLMRolloutEngine

        if dist.is_initialized() and dist.get_world_size() > 1:
            from r1_engine.engine.rollout.colocate import build_colocated_vllm

            return build_colocated_vllm(model_dir, tokenizer, dtype=dtype, seed=seed,
                                        gpu_memory_utilization=gpu_memory_utilization, record_routing=record_routing,
                                        max_model_len=max_model_len)

        return VLLMRolloutEngine(str(model_dir), gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                                 seed=seed, tokenizer=tokenizer, record_routing=record_routing,
                                 max_model_len=max_model_len)
    return HFRolloutEngine(str(model_dir), tokenizer, device=device, dtype=_DTYPES[dtype], num_threads=num_threads,
                           record_routing=record_routing)


def rollout_model_dir(backend: str, model_dir: Path, hf_config: dict, policy: Any, out: Path) -> Path:
    """The directory the rollout engine starts from. A quantized checkpoint (DeepSeek-V3/R1's block-scaled FP8)
    under vLLM: vLLM would build FP8 layers from its quantization_config and then receive the trainer's bf16 weights
    without their scales (and MLA's dequantized copies made at load would go stale), so it starts from the policy's
    own unquantized export, written once to `out/rollout_model` (collective: every rank calls this). The HF engine
    dequantizes on load like the trainer, and an unquantized checkpoint is used as it is."""
    if backend != "vllm" or "quantization_config" not in hf_config:
        return Path(model_dir)
    from r1_engine.parallel.convert import save_hf_checkpoint

    target = Path(out) / "rollout_model"
    save_hf_checkpoint(policy, target, tokenizer_dir=model_dir)  # drops quantization_config and MTP layers
    import torch.distributed as dist

    if dist.is_initialized():  # every data-parallel replica's vLLM reads what the first one wrote
        dist.barrier()
    return target
