"""Rejection sampling (R1 stage 3, and the teacher's side of distillation): k samples a prompt from a checkpoint,
filtered by the rule rewards and the readability filters of GRPO_SPEC.md, written as an SFT dataset.

    summary = rejection_sample(trainer.generate_and_score, dataset.items, RejectionConfig(max_per_prompt=2),
                               checkpoint="runs/r1/hf", out_path="data/rs.jsonl")
    print(summary.table())

(any callback of that shape works: an engine's generate() followed by a RewardComposer's score()).

A sample is dropped under the first rule it fails, in this order (DROP_REASONS):
  truncated        it hit the generation budget (finish reason "length"): SFT would append EOS to a text that never
                   ended and teach the model to stop mid-thought;
  incorrect        the accuracy reward is < 1;
  format           require_format and the format reward is < 1;
  mixed_language   the chain of thought mixes languages: its share of cfg.language words (the language-consistency
                   reward) is below min_language_share (0.75: a chain in the target language that names a few
                   variables or units in another script is kept, a Chinese chain with x and y scores 0.75; one
                   that switches language for a sentence is not, the tiny world's mixed chains score 0.33-0.5);
  long_paragraph   a paragraph of the chain of thought (split on blank lines) is longer than max_paragraph_chars;
  code_block       the chain of thought holds a code fence (```);
  duplicate        the same completion text was already kept for this prompt;
  over_limit       max_per_prompt samples of this prompt are already kept.
The chain of thought is the reasoning part of the layout (engine.rewards.language.chain_of_thought): between the
readable markers, inside `<think>`, or the whole completion. Format and language consistency are the reward
components of the same names when the caller's scores hold them, else computed here with those rules.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from r1_engine.engine.rewards.format import format_reward
from r1_engine.engine.rewards.language import (
    SUPPORTED_LANGUAGES,
    chain_of_thought,
    language_consistency_reward,
)
from r1_engine.engine.rollout.base import SamplingParams
from r1_engine.engine.scoring import row_correct

DROP_REASONS = ("truncated", "incorrect", "format", "mixed_language", "long_paragraph", "code_block", "duplicate", "over_limit")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_CODE_FENCE = "```"


@dataclass(frozen=True)
class RejectionConfig:
    """samples_per_prompt (k) are drawn a prompt; at most max_per_prompt of them are kept. The sampling settings
    (temperature, top_p, max_new_tokens, stop_strings, seed) go to the rollout engine; prompts are sampled in
    chunks, chunk starting at prompt p with seed `seed + p * k`, so the samples do not depend on the chunk size."""

    samples_per_prompt: int = 4
    max_per_prompt: int = 2
    max_paragraph_chars: int = 2000
    language: str = "en"
    min_language_share: float = 0.75
    require_format: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8192  # engine.config.GENERATION_BUDGET (a reasoning-length budget)
    seed: int = 0
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("samples_per_prompt", "max_per_prompt", "max_paragraph_chars", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"rejection.{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.min_language_share <= 1.0:
            raise ValueError(f"rejection.min_language_share must be in [0, 1], got {self.min_language_share!r}")
        if self.language not in SUPPORTED_LANGUAGES:
            raise ValueError(f"rejection.language: unsupported language {self.language!r}; supported: "
                             f"{', '.join(SUPPORTED_LANGUAGES)}")
        self.sampling_params(0)  # SamplingParams checks temperature, top_p and the stop strings

    def sampling_params(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                              stop_strings=tuple(self.stop_strings), seed=seed)


@dataclass
class RejectionSummary:
    prompts: int
    samples: int
    kept: int
    prompts_with_kept: int
    drop_reasons: dict[str, int]  # every reason of DROP_REASONS, in that order, with its count

    def table(self) -> str:
        """The numbers as a markdown table (shares of all samples for the kept and dropped ones)."""
        def share(count: int) -> str:
            return f"{count / self.samples:.1%}" if self.samples else "-"

        rows = [("prompts", str(self.prompts), ""), ("samples", str(self.samples), ""),
                ("kept", str(self.kept), share(self.kept)),
                ("prompts with a kept sample", str(self.prompts_with_kept),
                 f"{self.prompts_with_kept / self.prompts:.1%}" if self.prompts else "-")]
        rows += [(f"dropped: {reason}", str(count), share(count)) for reason, count in self.drop_reasons.items()]
        return "\n".join(["| | count | share |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows])


# --------------------------------------------------------------------------- the filters
def _longest_paragraph(text: str) -> int:
    return max((len(paragraph.strip()) for paragraph in _PARAGRAPH_BREAK.split(text)), default=0)


def _component(scores: dict[str, Sequence[float]], name: str, n: int) -> Sequence[float] | None:
    values = scores.get(name)
    if values is not None and len(values) != n:
        raise ValueError(f"filter_samples: score {name!r} has {len(values)} values for {n} completions")
    return values


def drop_reason(completion: str, accuracy: float, fmt: float, language: float, cfg: RejectionConfig) -> str | None:
    """The first content rule (incorrect .. code_block) a sample fails, or None; duplicate and over_limit depend
    on the other samples of the prompt (filter_samples)."""
    if accuracy < 1.0:
        return "incorrect"
    if cfg.require_format and fmt < 1.0:
        return "format"
    if language < cfg.min_language_share:
        return "mixed_language"
    thought = chain_of_thought(completion)
    if _longest_paragraph(thought) > cfg.max_paragraph_chars:
        return "long_paragraph"
    if _CODE_FENCE in thought:
        return "code_block"
    return None


def filter_samples(completions: Sequence[str], scores: dict[str, Sequence[float]],
                   cfg: RejectionConfig, truncated: Sequence[bool] | None = None) -> tuple[list[int], Counter]:
    """One prompt's k completions and their rule-reward components ("accuracy" required; "format" and "language"
    computed here when absent), and which of them hit the generation budget (None: none did): the indices kept, in
    sample order, and a Counter of drop reasons (each dropped sample under its first failing reason, DROP_REASONS
    order)."""
    n = len(completions)
    if truncated is not None and len(truncated) != n:
        raise ValueError(f"filter_samples: {len(truncated)} truncation flags for {n} completions")
    accuracy = _component(scores, "accuracy", n)
    if accuracy is None:
        raise ValueError(f"filter_samples: scores need an 'accuracy' component, got {sorted(scores)}")
    fmt = _component(scores, "format", n)
    language = _component(scores, "language", n)
    kept: list[int] = []
    seen: set[str] = set()
    reasons: Counter = Counter()
    for i, text in enumerate(completions):
        if truncated is not None and truncated[i]:
            reasons["truncated"] += 1
            continue
        reason = drop_reason(text, accuracy[i], format_reward(text) if fmt is None else fmt[i],
                             language_consistency_reward(text, cfg.language) if language is None else language[i],
                             cfg)
        if reason is None and text in seen:
            reason = "duplicate"
        if reason is None and len(kept) >= cfg.max_per_prompt:
            reason = "over_limit"
        if reason is None:
            kept.append(i)
            seen.add(text)
        else:
            reasons[reason] += 1
    return kept, reasons


# --------------------------------------------------------------------------- sampling and writing
def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def summary_path(out_path: str | Path) -> Path:
    """Where rejection_sample writes the summary of `out_path`: `<out_path>.summary.json`."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".summary.json")


def rejection_sample(generate_and_score: Callable, items: Sequence, cfg: RejectionConfig, *, checkpoint: str,
                     out_path: str | Path, prompts_per_call: int = 32, dp_rank: int = 0, dp_size: int = 1,
                     group=None) -> RejectionSummary:
    """Sample cfg.samples_per_prompt completions for each of `items` (engine.data.TokenizedPrompt, with reference
    answers), filter them (filter_samples) and write the kept ones to the jsonl `out_path`, one row each:
    {"prompt", "completion", "answer", "prompt_id" (the example's "file:row"), "checkpoint", "reward" (the total
    reward), "length" (completion tokens)}, with the RejectionSummary beside it (summary_path). Both files are
    written whole or not at all (temporary file, then rename).

    generate_and_score(chunk, k, SamplingParams) -> (RolloutBatch, RewardOutput) is an
    engine.sampling.RolloutSampler (a row is correct by its accuracy reward, or by its code reward on a code row).
    ValueError, and nothing written, when nothing is kept: the message names the checkpoint and the drop reasons.
    dp_size > 1: every rank calls this together (group: theirs); call c of `prompts_per_call` prompts runs on rank
    c % dp_size with the seed it has in one process, so the rows are the same for any dp_size; rank 0 writes them."""
    if prompts_per_call < 1:
        raise ValueError(f"rejection sampling: prompts_per_call must be >= 1, got {prompts_per_call}")
    if not items:
        raise ValueError(f"rejection sampling from {checkpoint}: no prompts")
    missing = [item.example.source for item in items if item.example.reference is None]
    if missing:
        raise ValueError(f"rejection sampling from {checkpoint}: {missing[0]} has no reference answer or tests (the "
                         f"correctness filter needs one per prompt; {len(missing)} prompt(s) lack one)")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"rejection sampling: output {out_path} is a directory; a .jsonl file path is needed")
    k = cfg.samples_per_prompt
    local = []  # (call, kept rows, drop reasons, prompts with a kept sample) of this rank's calls
    for call, start in enumerate(range(0, len(items), prompts_per_call)):
        if call % dp_size != dp_rank:
            continue
        rows: list[dict] = []
        reasons: Counter = Counter()
        prompts_with_kept = 0
        chunk = items[start:start + prompts_per_call]
        rollout, scores = generate_and_score(chunk, k, cfg.sampling_params(cfg.seed + start * k))
        if rollout.num_completions != len(chunk) * k:
            raise RuntimeError(f"rejection sampling: generate_and_score returned {rollout.num_completions} "
                               f"completions for {len(chunk)} prompts x {k}")
        for q, item in enumerate(chunk):
            span = range(q * k, (q + 1) * k)
            components = {name: [values[i] for i in span] for name, values in scores.components.items()}
            # correct: the accuracy reward on a reasoning row, every test passed on a code row
            components["accuracy"] = [float(row_correct(scores, i)) for i in span]
            kept, dropped = filter_samples([rollout.completion_text[i] for i in span], components, cfg,
                                           truncated=[bool(rollout.truncated[i]) for i in span])
            reasons.update(dropped)
            prompts_with_kept += bool(kept)
            for j in kept:
                i = q * k + j
                rows.append({"prompt": item.example.prompt, "completion": rollout.completion_text[i],
                             "answer": item.example.answer, "prompt_id": item.example.source,
                             "checkpoint": checkpoint, "reward": float(scores.total[i]),
                             "length": len(rollout.completion_ids[i])})
        local.append((call, rows, reasons, prompts_with_kept))
    if dp_size > 1:
        parts: list = [None] * dp_size
        dist.all_gather_object(parts, local, group=group)
        local = sorted((c for part in parts for c in part), key=lambda c: c[0])
    rows = [row for _, part_rows, _, _ in local for row in part_rows]
    reasons = sum((part[2] for part in local), Counter())
    prompts_with_kept = sum(part[3] for part in local)
    summary = RejectionSummary(prompts=len(items), samples=len(items) * k, kept=len(rows),
                               prompts_with_kept=prompts_with_kept,
                               drop_reasons={reason: reasons[reason] for reason in DROP_REASONS})
    if not rows:
        dropped = ", ".join(f"{reason} {count}" for reason, count in summary.drop_reasons.items() if count)
        raise ValueError(f"rejection sampling from {checkpoint}: no sample kept of {summary.samples} "
                         f"({summary.prompts} prompts x {k}); dropped: {dropped}")
    if dp_rank != 0:
        return summary
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    record = dataclasses.asdict(summary) | {"checkpoint": checkpoint, "out": str(out_path),
                                            "config": dataclasses.asdict(cfg)}
    _write_atomically(summary_path(out_path), json.dumps(record, indent=2) + "\n")
    return summary
