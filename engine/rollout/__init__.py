"""Rollout engines: sample G completions per prompt and record their log-probs.

`HFRolloutEngine` (transformers, CPU or one GPU) is the reference and the CPU default; `VLLMRolloutEngine`
(colocated vLLM) is the fast path on GPUs and is imported lazily from engine.rollout.vllm.
"""
from engine.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from engine.rollout.hf import HFRolloutEngine

__all__ = ["RolloutBatch", "RolloutEngine", "SamplingParams", "HFRolloutEngine"]
