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

__all__ = ["RolloutBatch", "RolloutEngine", "SamplingParams", "HFRolloutEngine", "build_rollout_engine"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_rollout_engine(backend: Literal["hf", "vllm"], model_dir: str | Path, tokenizer: Any, *,
                         device: torch.device, dtype: Literal["float32", "bfloat16"], seed: int,
                         gpu_memory_utilization: float, num_threads: int | None,
                         record_routing: bool = False) -> RolloutEngine:
    """The rollout engine of `backend` on `model_dir`, using the caller's tokenizer object (the trainer's and the
    evaluation's one tokenizer). vLLM's options are used by vllm only, num_threads by hf only.

    vllm on a torch.distributed world of more than one rank: every rank must call this together and gets its part
    of a colocated engine (engine.rollout.colocate: vLLM's TP = the initialised Megatron TP, one replica per TP
    group); its generate() etc. are collective (`engine.collective` is True)."""
    if backend == "vllm":
        import torch.distributed as dist

        from r1_engine.engine.rollout.vllm import VLLMRolloutEngine

        if dist.is_initialized() and dist.get_world_size() > 1:
            from r1_engine.engine.rollout.colocate import build_colocated_vllm

            return build_colocated_vllm(model_dir, tokenizer, dtype=dtype, seed=seed,
                                        gpu_memory_utilization=gpu_memory_utilization, record_routing=record_routing)

        return VLLMRolloutEngine(str(model_dir), gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                                 seed=seed, tokenizer=tokenizer, record_routing=record_routing)
    return HFRolloutEngine(str(model_dir), tokenizer, device=device, dtype=_DTYPES[dtype], num_threads=num_threads,
                           record_routing=record_routing)
