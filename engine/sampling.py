"""Sample and score: the one place where completions are generated and rewarded. The GRPO trainer, the held-out
evaluation (engine.model_eval, recipes/eval.py), rejection sampling and distillation all go through it.

    sampler = build_sampler(engine, reward_config, examples, device=device)   # checks, then the scorer
    rollout, rewards = sampler.generate_and_score(items, n, params)           # a ScoredRollout

Every row is scored by its kind (engine.scoring.RolloutScorer): the rule rewards for reasoning prompts, the sandboxed
code judge for code prompts (rows with tests), the reward models for general prompts. Stop strings are the caller's
SamplingParams; every caller's default is none, so a completion ends with the EOS the model samples (a model that
does not stop is then seen as such, by the trainer and by every evaluation alike).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from r1_engine.engine.rewards import build_reward_composer, check_reward_weights
from r1_engine.engine.rewards.compose import RewardOutput
from r1_engine.engine.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from r1_engine.engine.scoring import (
    RolloutScorer,
    build_code_judge,
    build_reward_models,
    check_reward_models,
    reward_workers,
)


# what an evaluation scores: correctness (accuracy; the code reward on code rows), with format and language
# consistency computed for the metrics at weight 0
EVAL_WEIGHTS = {"accuracy": 1.0, "format": 0.0, "language": 0.0}


class ScoredRollout(NamedTuple):
    rollout: RolloutBatch
    rewards: RewardOutput


class RolloutSampler:
    """A rollout engine and a scorer: `generate_and_score(items, n, params)` samples n completions for each of
    `items` (engine.data.TokenizedPrompt) and scores them. Counts the tokens it generated (`generated_tokens`).
    A context manager; close() stops the scorer's workers (the engine is the caller's)."""

    def __init__(self, engine: RolloutEngine, scorer: RolloutScorer):
        self.engine = engine
        self.scorer = scorer
        self.generated_tokens = 0

    def generate_and_score(self, items: Sequence, n: int, params: SamplingParams) -> ScoredRollout:
        rollout = self.engine.generate([it.prompt_ids for it in items], n, params)
        self.generated_tokens += int(rollout.lengths.sum())
        rows = [it for it in items for _ in range(n)]
        rewards = self.scorer.score([it.example.kind for it in rows], [it.text for it in rows],
                                    rollout.completion_text, [it.example.reference for it in rows],
                                    questions=[it.example.prompt for it in rows], group_size=n)
        return ScoredRollout(rollout, rewards)

    __call__ = generate_and_score  # the callable engine.eval.sample_questions and engine.rejection take

    def close(self) -> None:
        self.scorer.close()

    def __enter__(self) -> RolloutSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class ScoringPlan:
    """What a scorer for a set of prompts is made of, decided (and checked) before anything is built."""

    rule_weights: dict[str, float]  # the rule composer's components (reward models' names left out)
    code_judge: Any  # the sandboxed judge when there are code prompts, else None
    general: bool  # general prompts are among them (the reward models are loaded)


def plan_scoring(reward_config: Any, examples: Sequence, weights: Mapping[str, float] | None = None) -> ScoringPlan:
    """Every check a scorer needs, one line each and before any model is built (call it on every rank): the rule
    weights and target language, the reward-model dirs (and one for general prompts), a sandbox that can contain
    code prompts' programs. `weights` replace reward_config.weights (an evaluation scores accuracy alone). Accuracy
    and format are always scored (weight 0 unless given) for the metrics; code rows take the code reward in place of
    accuracy, at accuracy's weight unless "code" is given."""
    weights = dict(reward_config.weights if weights is None else weights)
    rule_weights = {"accuracy": 0.0, "format": 0.0,
                    **{k: v for k, v in weights.items() if k not in reward_config.models}}
    check_reward_weights(rule_weights, reward_config.language)
    check_reward_models(reward_config.models, examples, reward_config.model_scope)
    code_judge = build_code_judge(reward_config, examples)  # None without code prompts
    if code_judge is not None:
        rule_weights.setdefault("code", rule_weights["accuracy"])
    general = any(getattr(e, "kind", "reasoning") == "general" for e in examples)
    return ScoringPlan(rule_weights, code_judge, general)


def build_scorer(reward_config: Any, plan: ScoringPlan, *, device=None, dtype=None) -> RolloutScorer:
    """The scorer of a plan (engine.config.RewardConfig for the language, workers, timeouts and reward models):
    the rule composer (with the code judge when there are code prompts) and reward_config.models when there are
    general prompts, weighted by reward_config.weights (default 1)."""
    rules = build_reward_composer(plan.rule_weights, language=reward_config.language, code_judge=plan.code_judge,
                                  num_workers=reward_workers(reward_config, plan.code_judge),
                                  timeout_s=reward_config.timeout_s)
    models = build_reward_models(reward_config, device, dtype) if plan.general else None  # loaded only when used
    return RolloutScorer(rules, models, {k: reward_config.weights.get(k, 1.0) for k in reward_config.models},
                         normalization=getattr(reward_config, "model_normalization", "group"))


def build_sampler(engine: RolloutEngine, reward_config: Any, examples: Sequence, *,
                  weights: Mapping[str, float] | None = None, device=None, dtype=None) -> RolloutSampler:
    """plan_scoring + build_scorer + RolloutSampler, for the callers that build everything in one place."""
    plan = plan_scoring(reward_config, examples, weights)
    return RolloutSampler(engine, build_scorer(reward_config, plan, device=device, dtype=dtype))
