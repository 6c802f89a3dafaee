"""One HF checkpoint on held-out reasoning and general prompts: the numbers recipes/r1.py reports after each stage.

    with ModelEvaluator(settings, reward_models) as ev:
        row = ev.evaluate(model_dir, reasoning_examples, general_examples)
        # {"pass@1", "cons@k", "format_rate", "language_rate", "length/mean", "rm/<name>", ...}

Reasoning prompts: k samples a question through engine.eval (pass@1 over the k, cons@k by answer equivalence), the
rule rewards' format and language-consistency rates and the response length. General prompts: k samples a prompt,
each reward model's mean score (helpfulness reads the summary only, harmlessness the whole response). The stages'
checkpoints are exported HF directories, sampled by the rollout engine; every rank of a job takes its share of the
reasoning samples (dp_rank / dp_size), rank 0 the general prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import torch
import torch.distributed as dist

from r1_engine.engine.data import PromptDataset, PromptExample, load_tokenizer
from r1_engine.engine.eval import (
    SAMPLES_PER_CALL,
    EquivalenceJudge,
    gather_results,
    results_to_json,
    sample_questions,
    summarize,
)
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
    timeout_s: float = 10.0
    """Per-sample reward and per-comparison equivalence timeout."""
    stop_strings: tuple[str, ...] = ()
    """None by default: a completion ends with its EOS, as a user sampling the model sees it."""
    max_prompt_tokens: int = 512
    """Longer prompts are skipped (counted and warned about)."""
    samples_per_call: int = SAMPLES_PER_CALL
    """(question, sample) pairs a generate() call; fixed calls keep the results independent of the DP size."""
    gpu_memory_utilization: float = 0.5
    num_threads: int | None = 1
    """CPU threads of the hf backend."""


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
                                   num_workers=settings.num_workers, timeout_s=settings.timeout_s)
        self.judge = EquivalenceJudge(settings.num_workers, settings.timeout_s)

    def _params(self) -> SamplingParams:
        s = self.settings
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                              stop_strings=tuple(s.stop_strings), seed=s.seed)

    def _engine(self, model_dir: Path, tokenizer, device):
        s = self.settings
        return build_rollout_engine(s.backend, model_dir, tokenizer, device=device, dtype=s.dtype, seed=s.seed,
                                    gpu_memory_utilization=s.gpu_memory_utilization, num_threads=s.num_threads)

    def evaluate_datasets(self, model_dir: str | Path, datasets: Mapping[str, Sequence[PromptExample]], *,
                          dp_rank: int = 0, dp_size: int = 1, group=None, device=None) -> dict[str, dict] | None:
        """Every dataset of reasoning (or code) prompts on one checkpoint, the (question, sample) pairs spread over
        `dp_size` ranks (group: their data-parallel group; every rank calls this together): {name: {"summary": every
        number of engine.eval.summarize, "questions": per-question records}} on rank 0, None on the others."""
        tokenizer = load_tokenizer(model_dir)
        engine = self._engine(Path(model_dir), tokenizer, device or self.device)
        return self._score_datasets(engine, tokenizer, datasets, dp_rank, dp_size, group)

    def _score_datasets(self, engine, tokenizer, datasets: Mapping[str, Sequence[PromptExample]], dp_rank: int = 0,
                        dp_size: int = 1, group=None) -> dict[str, dict] | None:
        s = self.settings
        report = {}
        # the sampler every evaluation uses: a reasoning row by its answer, a code row by the sandboxed judge
        with build_sampler(engine, self.reward, [e for rows in datasets.values() for e in rows],
                           weights=EVAL_WEIGHTS) as sampler:
            for name, rows in datasets.items():
                items = PromptDataset(list(rows), tokenizer, s.template, s.max_prompt_tokens).items[:s.size]
                local = sample_questions(sampler, items, s.samples, self._params(), dp_rank=dp_rank, dp_size=dp_size,
                                         samples_per_call=s.samples_per_call)
                results = gather_results(local, group if group is not None or dp_size == 1 else dist.group.WORLD)
                if dp_rank == 0:
                    report[name] = {"summary": summarize(results, self.judge), "questions": results_to_json(results)}
        return report if dp_rank == 0 else None

    def evaluate(self, model_dir: str | Path, reasoning: Sequence[PromptExample],
                 general: Sequence[PromptExample] = (), *, dp_rank: int = 0, dp_size: int = 1,
                 group=None) -> dict | None:
        """{"summary": flat numbers, "questions": per-question records, "general": samples} for one checkpoint (the
        R1 and distillation recipes' per-stage evaluation). The reasoning prompts' (question, sample) pairs are
        spread over `dp_size` ranks (every rank calls this together; group: theirs), with the same numbers for any
        dp_size; the general prompts are sampled and scored on rank 0. The report on rank 0, None on the others."""
        if dp_rank != 0 and not reasoning:
            return None  # the general prompts are rank 0's: nothing to load here
        s = self.settings
        report: dict = {"summary": {}, "questions": [], "general": []}
        tokenizer = load_tokenizer(model_dir)
        engine = self._engine(Path(model_dir), tokenizer, self.device)  # one model load for both kinds of prompts
        if reasoning:
            scored = self._score_datasets(engine, tokenizer, {"reasoning": reasoning}, dp_rank, dp_size, group)
            if dp_rank != 0:
                return None
            result = scored["reasoning"]
            summary = result["summary"]
            keep = [k for k in summary if k.startswith(("pass@", "cons@", "se/"))]
            keep += ["format_rate", "language_rate", "answer_rate", "length/mean", "truncated_frac"]
            report["summary"].update({k: summary[k] for k in keep if k in summary})
            report["questions"] = result["questions"]
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
