"""One HF checkpoint on held-out reasoning and general prompts: the numbers recipes/r1.py reports after each stage.

    with ModelEvaluator(settings, reward_models) as ev:
        row = ev.evaluate(model_dir, reasoning_examples, general_examples)
        # {"pass@1", "cons@k", "format_rate", "language_rate", "length/mean", "rm/<name>", ...}

Reasoning prompts: k samples a question through engine.eval (pass@1 over the k, cons@k by answer equivalence), the
rule rewards' format and language-consistency rates and the response length. General prompts: k samples a prompt,
each reward model's mean score (helpfulness reads the summary only, harmlessness the whole response). One process
(the caller's rank 0): the stages' checkpoints are exported HF directories, sampled by the rollout engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from r1_engine.engine.data import PromptDataset, PromptExample, load_tokenizer
from r1_engine.engine.eval import EquivalenceJudge, results_to_json, sample_questions, summarize
from r1_engine.engine.config import GENERATION_BUDGET, RewardConfig, device_dtype
from r1_engine.engine.rollout import SamplingParams, build_rollout_engine
from r1_engine.engine.sampling import EVAL_WEIGHTS, build_sampler


@dataclass
class EvalSettings:
    samples: int = 4
    """k: completions a held-out prompt (pass@1 is their mean correctness; cons@k their majority vote)."""
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = GENERATION_BUDGET
    size: int | None = None
    """Held-out reasoning questions used (None: all)."""
    template: str = "chat"
    language: str = "en"
    backend: Literal["hf", "vllm"] = "hf"
    dtype: Literal["float32", "bfloat16"] = field(default_factory=lambda: device_dtype())
    seed: int = 1234
    num_workers: int = 2
    """Reward/judge worker processes (0: in this process)."""


class ModelEvaluator:
    def __init__(self, settings: EvalSettings, reward_models=None,
                 general_metric: Callable[[list[str], list[str]], dict[str, float]] | None = None):
        """reward_models: an engine.reward_model.RewardModelSet for the general prompts (None: not scored);
        general_metric(prompts, responses) -> extra numbers on the general samples (e.g. a known-answer rate)."""
        self.settings = settings
        self.reward_models = reward_models
        self.general_metric = general_metric
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # the rule rewards (and the code judge for code prompts) as every evaluation scores them (engine.sampling)
        self.reward = RewardConfig(weights=dict(EVAL_WEIGHTS), language=settings.language,
                                   num_workers=settings.num_workers)
        self.judge = EquivalenceJudge(settings.num_workers)

    def _params(self) -> SamplingParams:
        s = self.settings
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=s.seed)

    def evaluate(self, model_dir: str | Path, reasoning: Sequence[PromptExample],
                 general: Sequence[PromptExample] = ()) -> dict:
        """{"summary": flat numbers, "questions": per-question records, "general": samples} for one checkpoint."""
        s = self.settings
        tokenizer = load_tokenizer(model_dir)
        engine = build_rollout_engine(s.backend, model_dir, tokenizer, device=self.device, dtype=s.dtype, seed=s.seed,
                                      gpu_memory_utilization=0.5, num_threads=1)
        report: dict = {"summary": {}, "questions": [], "general": []}
        if reasoning:
            items = PromptDataset(list(reasoning), tokenizer, s.template).items[:s.size]
            with build_sampler(engine, self.reward, [it.example for it in items], weights=EVAL_WEIGHTS) as sampler:
                results = sample_questions(sampler, items, s.samples, self._params())
            summary = summarize(results, self.judge)
            keep = [k for k in summary if k.startswith(("pass@", "cons@", "se/"))]
            keep += ["format_rate", "language_rate", "answer_rate", "length/mean", "truncated_frac"]
            report["summary"].update({k: summary[k] for k in keep if k in summary})
            report["questions"] = results_to_json(results)
        if general:
            items = PromptDataset(list(general), tokenizer, s.template).items
            rollout = engine.generate([it.prompt_ids for it in items], s.samples, self._params())
            prompts = [it.example.prompt for it in items for _ in range(s.samples)]
            texts = [it.text for it in items for _ in range(s.samples)]
            report["summary"]["general/length/mean"] = rollout.lengths.double().mean().item()
            if self.reward_models is not None:
                # raw scores (no group normalisation: a mean over prompts); questions: a chat-format model's user turn
                for name, values in self.reward_models.score(texts, rollout.completion_text, prompts).items():
                    report["summary"][f"rm/{name}"] = sum(values) / len(values)
            if self.general_metric is not None:
                report["summary"].update(self.general_metric(prompts, rollout.completion_text))
            report["general"] = [{"prompt": p, "response": r} for p, r in zip(prompts, rollout.completion_text)]
        report["summary"] = {k: v for k, v in report["summary"].items() if not math.isnan(v)}
        return report

    def close(self) -> None:
        self.judge.close()

    def __enter__(self) -> "ModelEvaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
