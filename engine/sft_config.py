"""Typed configuration of supervised fine-tuning (engine.sft): the same dataclass / YAML / command-line machinery
as engine.config (`load_config(SFTConfig)`), and its range checks naming the flag.

    python recipes/r1.py sft --config sft.yaml --train.batch-size 64 --optim.lr 2e-5
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from r1_engine.engine.config import DataFiles, ModelConfig, OptimConfig, RunConfig, fail_first, optim_checks


@dataclass
class SFTDataConfig(DataFiles):
    """SFT's data section: the shared one (DataFiles), the completion field and a length cap."""

    completion_key: str = "completion"
    """Field of each row holding the text the model learns to write after the templated prompt (the eos token is
    appended: the model also learns to stop)."""
    max_tokens: int = 16384
    """Longer examples (templated prompt + completion + eos) are skipped, counted and reported, never truncated
    (16,384: a long chain of thought and its prompt)."""


@dataclass
class SFTTrainConfig(RunConfig):
    """SFT's run section: the shared one (RunConfig) and its epochs and batches."""

    out: str = "outputs/sft"
    save_every: int = 200
    epochs: int = 2
    """Passes over the examples (each in a fresh order drawn from (seed, epoch))."""
    batch_size: int = 32
    """Sequences per optimizer step over all data-parallel ranks (the last batch of an epoch may be smaller)."""
    max_tokens_per_row: int | None = None
    """Sequence-packing row length (None: the step's longest sequence)."""
    num_microbatches: int = 1
    """Gradient-accumulation micro-batches per optimizer step."""
    fused_lm_head: bool = True
    """Run the lm_head matmul fused with the loss (chunked over tokens): the logits never exist in training."""


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="cosine"))
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)


def check_sft_ranges(cfg: SFTConfig) -> None:
    """Every field with a valid range, checked before anything is built: a ValueError naming the first bad one as
    its command-line flag (YAML: the same section.key), e.g. "--optim.lr=0.0: must be > 0"."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train

    def at_least(x, low):  # a number >= low (NaN and inf fail)
        return x is not None and not isinstance(x, bool) and math.isfinite(x) and x >= low

    checks = [
        ("model.tensor_parallel", m.tensor_parallel >= 1, ">= 1"),
        ("model.pipeline_parallel", m.pipeline_parallel >= 1, ">= 1"),
        ("data.max_tokens", d.max_tokens >= 2, ">= 2 (a prompt token and the eos at least)"),
        *optim_checks(o),
        ("train.epochs", t.epochs >= 1, ">= 1"),
        ("train.batch_size", t.batch_size >= 1, ">= 1"),
        ("train.max_tokens_per_row", t.max_tokens_per_row is None or t.max_tokens_per_row >= 2,
         ">= 2 (or None: the step's longest sequence)"),
        ("train.num_microbatches", t.num_microbatches >= 1, ">= 1"),
        ("train.seed", 0 <= t.seed < 2**31, "in [0, 2**31)"),
        ("train.save_every", t.save_every >= 0, ">= 0 (0: only at the end)"),
        ("train.keep_checkpoints", t.keep_checkpoints >= 1, ">= 1"),
    ]
    fail_first(cfg, checks)
