"""Typed configuration: dataclasses, a YAML file for defaults, command-line overrides on top.

    torchrun recipes/r1_zero.py --config my.yaml --rollout.group-size 16 --loss.beta 0.001

`load_config(GRPOConfig)` reads `--config FILE.yaml` (if given) into the dataclass, then lets tyro
parse the rest of the command line against it, so every field is typed, documented in `--help`, and
overridable without a hand-written parser. Unknown YAML keys are an error naming the key.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from kernels import PolicyLossConfig


@dataclass
class ModelConfig:
    path: str | None = None
    """HF model directory (config.json, safetensors, tokenizer). None: the recipe's embedded default."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 through Transformer Engine (H100 only; unverified without TE)."""
    offload_reference: bool = False
    """Keep the frozen reference model on CPU between its uses."""


@dataclass
class DataConfig:
    path: str | None = None
    """Prompts (.jsonl or .parquet) with a prompt and a reference answer per row."""
    eval_path: str | None = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    template: str = "r1-zero"
    """r1-zero | chat | none | a custom string with {prompt}."""
    max_prompt_tokens: int = 512


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm"] = "hf"
    prompts_per_step: int = 16
    group_size: int = 8
    """G: completions sampled per prompt."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ("</answer>",)
    gpu_memory_utilization: float = 0.5
    num_threads: int | None = 1
    """CPU threads for the HF backend's generation (1 is fastest for tiny models on busy CPUs)."""


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    """Component -> weight; components: accuracy, format, language."""
    language: str = "en"
    overlong_buffer: int | None = None
    """DAPO soft overlong punishment: the last L_c tokens of rollout.max_new_tokens ramp the reward to -1."""
    num_workers: int = 2
    timeout_s: float = 10.0


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class AlgoConfig:
    advantage_scale: Literal["group", "none", "batch"] | None = None
    """None: "group" (std of the group) for GRPO, "none" for RLOO."""
    estimator: Literal["grpo", "rloo"] = "grpo"
    epochs_per_batch: int = 1
    """PPO epochs over each rollout batch; > 1 (or mini_batches > 1) makes the updates off-policy."""
    mini_batches: int = 1
    """Optimizer steps per epoch."""
    num_microbatches: int = 1
    """Gradient-accumulation micro-batches per optimizer step."""
    fused_lm_head: bool = True
    """Run the lm_head matmul fused with the loss (chunked over tokens): the logits never exist in training."""
    max_tokens_per_row: int | None = None
    """Sequence-packing row length (None: the longest sequence)."""


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    out: str = "outputs/r1_zero"
    save_every: int = 0
    """Checkpoint every k steps (0: only at the end)."""
    eval_every: int = 0
    """Held-out pass@1 every k steps (0: before and after only)."""
    eval_samples: int = 1
    """Completions per held-out question for pass@1."""
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_size: int | None = None
    resume: bool = True
    """Continue from the latest checkpoint in `out` when there is one."""
    export_hf: bool = True
    progress: bool = True


@dataclass
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from nested dicts; unknown keys raise a ValueError naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    hints = _type_hints(cls)
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _type_hints(cls):
    import typing

    return typing.get_type_hints(cls)


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    return from_dict(cls, data, str(path))


def load_config(cls: type[T] = GRPOConfig, args: list[str] | None = None, default: T | None = None) -> T:
    """YAML (from `--config FILE`) as the defaults, the rest of the command line as typed overrides."""
    import tyro

    args = list(sys.argv[1:] if args is None else args)
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ValueError("--config needs a YAML file path")
        default = load_yaml(cls, args[i + 1])
        del args[i:i + 2]
    return tyro.cli(cls, args=args, default=default if default is not None else cls())


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)
