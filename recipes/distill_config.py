"""The configuration of recipes/distill.py: teacher, student, data, mode, and each phase's own settings (the
components' config dataclasses; the recipe sets each phase's model, data and out)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from r1_engine.engine.config import GRPOConfig, ModelConfig
from r1_engine.engine.model_eval import EvalSettings
from r1_engine.engine.rejection import RejectionConfig
from r1_engine.engine.sft_config import SFTConfig

PHASES = {"offline": "offline distillation (teacher samples, rejection sampling, SFT)",
          "onpolicy": "on-policy distillation (student samples, teacher scores each token)",
          "rl": "GRPO with the rule rewards, the distillation's time"}


@dataclass
class DistillConfig:
    teacher: str | None = None
    """The teacher's HF model dir (without --teacher and --student: the embedded tiny world's R1-Zero model)."""
    student: str | None = None
    """The student's HF model dir; every phase starts from it."""
    data: str | None = None
    """Prompts with reference answers (.jsonl/.parquet): the teacher samples them (offline), the student samples
    them (on-policy, GRPO)."""
    eval_data: str | None = None
    """Held-out prompts with reference answers: every model of the table is evaluated on them."""
    out: str = "outputs/distill"
    mode: Literal["offline", "onpolicy", "both"] = "both"
    """offline: SFT on the teacher's rejection-sampled samples; onpolicy: the student samples and the teacher
    scores every token (reverse KL); both: each from the same student."""
    template: str = "r1-zero"
    """The prompt template of every phase: r1-zero | chat | none | a custom string with {prompt}."""
    offline_prompts: int | None = None
    """Offline: the teacher samples the first N prompts of --data (None: all)."""
    baseline: bool = True
    """Also run GRPO with the rule rewards on the student for the distillation's wall time (the paper's
    comparison); --no-baseline skips it."""
    baseline_seconds: float | None = None
    """The GRPO baseline's budget in seconds of --baseline-clock (None: the longest distillation phase's)."""
    baseline_clock: Literal["wall", "cpu"] = "wall"
    """What the budget counts: wall time, or this process's CPU time (rank 0's). CPU time is the compute spent
    whatever else runs on the machine (with one torch thread; on a GPU only wall time means anything): the tiny
    world uses it because a shared CPU box's load changes between phases."""
    teacher_backend: Literal["megatron", "hf"] = "megatron"
    """On-policy teacher: megatron builds it with the student's layout (its heads must split over the student's
    --model.tensor-parallel); hf scores with an unsharded transformers model on each replica's first rank, so
    any student layout works (the teacher must fit one device)."""
    teacher_offload: bool = False
    """With --teacher-backend hf: keep the teacher on the CPU between its uses."""
    threads: int | None = None
    """torch's CPU threads in every phase (None: torch's default). The tiny world runs one: its models gain nothing
    from a second, and on a busy machine two threads waiting on each other are several times slower."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The student's parallel layout and dtype (model.path is unused: --student names the model)."""
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    """Offline: the teacher's k samples a prompt and the filter (correct, formatted, readable); the sampling runs on
    --onpolicy.rollout's backend and threads, the rewards on --onpolicy.reward's workers."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Offline: the student's SFT on the kept samples."""
    onpolicy: GRPOConfig = field(default_factory=GRPOConfig)
    """On-policy distillation (the trainer's algo.teacher; the recipe sets it)."""
    rl: GRPOConfig = field(default_factory=GRPOConfig)
    """The GRPO baseline (train.steps is a cap; the wall-time budget stops it)."""
    eval: EvalSettings = field(default_factory=EvalSettings)
