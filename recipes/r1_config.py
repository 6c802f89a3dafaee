"""The configuration of recipes/r1.py: the run's model, data and layout, and each stage's own settings (the
components' config dataclasses; the recipe sets each stage's model, data paths and out)."""
from __future__ import annotations

from dataclasses import dataclass, field

from r1_engine.engine.config import GRPOConfig, ModelConfig
from r1_engine.engine.model_eval import EvalSettings
from r1_engine.engine.rejection import RejectionConfig
from r1_engine.engine.reward_model_train import RewardModelTrainConfig
from r1_engine.engine.sft_config import SFTConfig

STAGES = {1: "cold start SFT", 2: "reasoning RL", 3: "rejection sampling + SFT", 4: "all-scenario RL"}


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
    language_ablation: bool = False
    """Also run stage 2 without the language-consistency reward (--out/stage_2_no_language) for the table."""
    cold_start: SFTConfig = field(default_factory=SFTConfig)
    reasoning_rl: GRPOConfig = field(default_factory=GRPOConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward_model: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)
    all_scenario_rl: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)


