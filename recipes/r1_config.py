"""The configuration of recipes/r1.py: the run's model, data and layout, and each stage's own settings (the
components' config dataclasses; the recipe sets each stage's model, data paths and out)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from r1_engine.engine.config import GRPOConfig, ModelConfig
from r1_engine.engine.model_eval import EvalSettings
from r1_engine.engine.rejection import RejectionConfig
from r1_engine.engine.reward_model_train import RewardModelTrainConfig
from r1_engine.engine.sft_config import SFTConfig

STAGES = {1: "cold start SFT", 2: "reasoning RL", 3: "rejection sampling + SFT", 4: "all-scenario RL"}
# R1's reasoning-RL reward (GRPO_SPEC.md, stage 2): accuracy and language consistency summed (format kept at 0.5 so
# the readable layout the cold start taught is not lost); stage 4 keeps them on its reasoning prompts
R1_REWARD_WEIGHTS = {"accuracy": 1.0, "format": 0.5, "language": 1.0}


def r1_rl_config() -> GRPOConfig:
    """GRPOConfig with R1's stage-2 reward weights (a plain GRPOConfig has R1-Zero's: language 0)."""
    base = GRPOConfig()
    return dataclasses.replace(base, reward=dataclasses.replace(base.reward, weights=dict(R1_REWARD_WEIGHTS)))


@dataclass
class R1Data:
    cold_start: str | None = None
    """Stage 1: prompt/completion rows (.jsonl), completions in the readable format."""
    reasoning: str | None = None
    """Stages 2-4: reasoning prompts with reference answers (.jsonl/.parquet)."""
    general_sft: str | None = None
    """Stage 3: non-reasoning prompt/completion rows (writing, QA, ...), added to the rejection-sampled data."""
    general: str | None = None
    """Stage 4: general prompts (no reference answer), scored by the reward models."""
    preferences: str | None = None
    """Stage 4 without --all-scenario-rl.reward.models: preference pairs (prompt/chosen/rejected) to train a
    helpfulness reward model on (Bradley-Terry) from the base model."""
    eval_reasoning: str | None = None
    """Held-out reasoning prompts, evaluated after every stage."""
    eval_general: str | None = None
    """Held-out general prompts, scored by the reward models after every stage."""
    template: str = "chat"
    """The prompt template of every stage: chat (the tokenizer's) | none | a custom string with {prompt}."""
    rejection_prompts: int | None = None
    """Stage 3 samples the first N reasoning prompts (None: all)."""
    general_fraction: float | None = None
    """Stage 4: general prompts repeated so that they make up this share of the prompts drawn (None: as the files
    give them)."""


@dataclass
class R1Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model and the parallel layout of every stage (path None: the embedded tiny world)."""
    data: R1Data = field(default_factory=R1Data)
    out: str = "outputs/r1"
    from_stage: int = 1
    """Start here (stage N-1's model must be in --out); finished stages are skipped either way."""
    until_stage: int = 4
    """Stop after this stage."""
    language: str = "en"
    """The run's target language, one setting for every use: the language reward of stages 2 and 4, the
    rejection filter's mixed-language rule and the evaluation's language rate (en, zh)."""
    language_ablation: bool = False
    """Also run stage 2 without the language-consistency reward (--out/stage_2_no_language) for the table."""
    cold_start: SFTConfig = field(default_factory=SFTConfig)
    reasoning_rl: GRPOConfig = field(default_factory=r1_rl_config)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward_model: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)
    all_scenario_rl: GRPOConfig = field(default_factory=r1_rl_config)
    eval: EvalSettings = field(default_factory=EvalSettings)


