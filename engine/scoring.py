"""One batch, three kinds of rows: rule rewards score the reasoning prompts, the same rules with the sandboxed code
judge in place of accuracy score the code prompts, reward models the general ones (R1's all-scenario RL, GRPO_SPEC.md).

    scorer = RolloutScorer(rules, reward_models, weights={"accuracy": 1, "format": 0.5, "helpfulness": 1})
    out = scorer.score(kinds, prompt_texts, completions, references)   # a RewardOutput over every row

A row's kind comes from its prompt (engine.data.PromptExample.kind; its reference: PromptExample.reference). Reasoning
rows get the rule composer's weighted total; code rows the same without accuracy and with the composer's "code"
component (its pass fraction joins the components as code_pass_frac); general rows the weighted sum of the reward
models' scores (each model's scores z-scored within the prompt's group by default, RewardConfig.model_normalization;
the component keeps the raw score). Components that do not apply to a row are NaN in `components` (so a metric is
the mean over the rows it describes: `nanmean`), never 0: an accuracy of 0 on a greeting would read as a wrong
answer. Groups never mix kinds (one prompt, G completions), so the group normalisation of the advantages puts rule
rewards and reward-model scores on one scale per group; under --algo.advantage-scale none|batch the z-scoring of the
reward models' scores ("group") is what keeps a reward model's raw logits from outweighing the rule rewards.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from r1_engine.engine.rewards.compose import RewardComposer, RewardOutput
from r1_engine.parallel.nvtx import nvtx_range

KINDS = ("reasoning", "general", "code")
NAN = float("nan")
_NOT_FOR = {"reasoning": {"code"}, "code": {"accuracy"}}  # rule components a kind of row is not scored with
NORMALIZATIONS = ("group", "none")
NORM_EPS = 1e-6


def group_zscore(values: Sequence[float], groups: Sequence[int]) -> list[float]:
    """(v - mean) / (std + NORM_EPS) within each group (groups[i]: row i's group; population std); a group whose
    scores are all equal gets 0s."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(values)
    for rows in members.values():
        mean = math.fsum(values[i] for i in rows) / len(rows)
        std = math.sqrt(math.fsum((values[i] - mean) ** 2 for i in rows) / len(rows))
        for i in rows:
            out[i] = (values[i] - mean) / (std + NORM_EPS)
    return out


class RolloutScorer:
    def __init__(self, rules: RewardComposer, reward_models=None, weights: Mapping[str, float] | None = None,
                 normalization: str = "none"):
        """rules: the rule-reward composer (reasoning rows); reward_models: an engine.reward_model.RewardModelSet
        or None; weights: reward-model name -> weight (default 1); normalization: "group" z-scores each reward
        model's scores within a group of completions before weighting them (RewardConfig.model_normalization),
        "none" weights the raw scores."""
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"RolloutScorer: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.rules = rules
        self.reward_models = reward_models
        self.weights = dict(weights or {})
        self.normalization = normalization

    @nvtx_range("rewards")
    def score(self, kinds: Sequence[str], prompts: Sequence[str], completions: Sequence[str],
              references: Sequence[str | None], *, questions: Sequence[str] | None = None,
              group_size: int = 1) -> RewardOutput:
        """Every row scored by its kind. questions: the raw user questions (a chat-format reward model's user turn;
        default: the prompts); group_size: consecutive rows sharing a prompt (the "group" normalisation's groups;
        1: nothing to normalise against, raw scores)."""
        n = len(completions)
        if not len(kinds) == len(prompts) == len(references) == n or (questions is not None and len(questions) != n):
            raise ValueError(f"RolloutScorer.score: {len(kinds)} kinds, {len(prompts)} prompts, {n} completions and "
                             f"{len(references)} references"
                             + ("" if questions is None else f" and {len(questions)} questions"))
        if group_size < 1 or n % group_size:
            raise ValueError(f"RolloutScorer.score: {n} rows are not whole groups of {group_size}")
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"RolloutScorer.score: unknown row kind(s) {unknown}; expected {KINDS}")
        reasoning = [i for i, k in enumerate(kinds) if k != "general"]  # the rule composer's rows (code rows too)
        general = [i for i, k in enumerate(kinds) if k == "general"]
        names = [spec.name for spec in getattr(self.rules, "specs", ())]
        if "code" in kinds and "code" not in names:
            raise ValueError("code prompts (rows with tests) need the code reward in the rule composer: "
                             "build_reward_composer(..., code_judge=make_code_judge())")
        select = None
        if "code" in names:  # each row scored with its kind's components only
            select = [{x for x in names if x not in _NOT_FOR[kinds[i]]} for i in reasoning]
        if len(reasoning) == n:  # the R1-Zero case: the rule composer's output as it is
            return self.rules.score(completions, references, select=select)
        total = [0.0] * n
        components: dict[str, list[float]] = {}
        out = RewardOutput(total=total, components=components)
        if reasoning:
            rules = self.rules.score([completions[i] for i in reasoning], [references[i] for i in reasoning],
                                     select=select)
            for name, values in rules.components.items():
                full = components.setdefault(name, [NAN] * n)
                for i, v in zip(reasoning, values):
                    full[i] = v
            for i, v in zip(reasoning, rules.total):
                total[i] = v
            out.num_errors, out.num_timeouts = rules.num_errors, rules.num_timeouts
            out.error_messages = list(rules.error_messages)
        else:
            for name in getattr(self.rules, "specs", ()):  # the rule components exist (all NaN): same metric keys
                components[name.name] = [NAN] * n
        if general:
            if self.reward_models is None:
                raise ValueError("general prompts (no reference answer) need a reward model: --reward.models "
                                 "NAME=HF_DIR (an AutoModelForSequenceClassification checkpoint)")
            rows_prompts, rows_completions = [prompts[i] for i in general], [completions[i] for i in general]
            if questions is None:
                scores = self.reward_models.score(rows_prompts, rows_completions)
            else:
                scores = self.reward_models.score(rows_prompts, rows_completions, [questions[i] for i in general])
            for name, values in scores.items():
                full = components.setdefault(name, [NAN] * n)
                weight = float(self.weights.get(name, 1.0))
                for v in values:
                    if not math.isfinite(v):
                        raise ValueError(f"reward model {name!r} returned a non-finite score {v}")
                used = values
                if self.normalization == "group" and group_size > 1:
                    used = group_zscore(values, [i // group_size for i in general])
                for i, v, u in zip(general, values, used):
                    full[i] = v
                    total[i] += weight * u
        return out

    def close(self) -> None:
        self.rules.close()
        if self.reward_models is not None:
            self.reward_models.close()


def row_correct(rewards: RewardOutput, i: int) -> bool:
    """Whether completion i solved its prompt: the accuracy reward for a reasoning row, every test passed (the code
    reward) for a code row (whose accuracy is NaN: not its kind)."""
    accuracy = rewards.components.get("accuracy")
    if accuracy is not None and not math.isnan(accuracy[i]):
        return accuracy[i] == 1.0
    code = rewards.components.get("code")
    return code is not None and not math.isnan(code[i]) and code[i] == 1.0


def nanmean(values: Sequence[float]) -> float:
    """Mean over the rows a component describes (NaN: not this row's kind); NaN when it describes none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else NAN


def check_reward_models(models: Mapping[str, str], examples: Sequence,
                        scopes: Mapping[str, str] | None = None) -> None:
    """Before anything is built: every reward-model dir is a sequence-classification checkpoint whose recorded scope
    (a reward model trained here) agrees with `scopes` (reward.model_scope), and general prompts come with at least
    one reward model (a ValueError naming the flag, path or file otherwise)."""
    from r1_engine.engine.reward_model import check_reward_model_dir, resolve_scope

    for name, path in models.items():
        check_reward_model_dir(f"--reward.models {name}", path)
        resolve_scope(name, path, (scopes or {}).get(name))
    general = [e for e in examples if getattr(e, "kind", "reasoning") == "general"]
    if general and not models:
        raise ValueError(f"{general[0].source}: a general prompt (no reference answer) but no reward model to score "
                         f"it: give --reward.models NAME HF_DIR")


def build_code_judge(reward_config, examples: Sequence):
    """The code reward's judge when `examples` hold code prompts (None otherwise), checked before anything is built:
    a ValueError naming the first code prompt's file:row when this machine has no sandbox that can contain a program
    and --reward.allow-unsandboxed-code is off."""
    code = [e for e in examples if getattr(e, "kind", "reasoning") == "code"]
    if not code:
        return None
    from r1_engine.engine.rewards.code import CodeLimits, make_code_judge

    rw = reward_config
    limits = CodeLimits(test_timeout_s=rw.code_test_timeout_s, memory_mb=rw.code_memory_mb,
                        completion_timeout_s=rw.code_timeout_s)
    return make_code_judge(limits, allow_unsandboxed=rw.allow_unsandboxed_code, where=f"{code[0].source} (a code prompt)")


def reward_workers(reward_config, code_judge) -> int:
    """Reward worker processes: reward.num_workers, raised to reward.code_workers (None: the cores) with code prompts
    (the judge is CPU-bound, one completion per worker); 0 stays 0 (inline scoring)."""
    if code_judge is None or reward_config.num_workers == 0:
        return reward_config.num_workers
    return max(reward_config.num_workers, reward_config.code_workers or len(os.sched_getaffinity(0)))


def build_reward_models(reward_config, device, dtype):
    """The RewardModelSet of reward_config.models (None when there are none), on the rollout device."""
    if not reward_config.models:
        return None
    from r1_engine.engine.reward_model import RewardModelSet, RewardModelSpec

    # scope None: the one the model recorded when it was trained here, else "summary" (RewardModelSpec)
    specs = [RewardModelSpec(name=name, path=path, weight=float(reward_config.weights.get(name, 1.0)),
                             scope=reward_config.model_scope.get(name))
             for name, path in reward_config.models.items()]
    return RewardModelSet(specs, device=device, dtype=dtype)
