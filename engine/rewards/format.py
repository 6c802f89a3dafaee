"""Format reward: the completion follows one of the two layouts of DeepSeek-R1, and nothing else.

R1-Zero's tags, `<think> reasoning </think> <answer> answer </answer>`: each of the four tags exactly once, in
that order, the answer section not blank, and only whitespace before `<think>`, between `</think>` and
`<answer>`, and after `</answer>`. The reasoning itself may be empty; the accuracy reward is what pays for
reasoning well.

R1's readable layout (cold start, engine/readable.py), `<|reasoning|> reasoning <|summary|> summary`: each marker
exactly once, in that order, only whitespace before `<|reasoning|>`, and a non-blank summary that holds a final
answer (a non-empty `\\boxed{...}` or `<answer>` section, the accuracy reward's candidates). No R1-Zero tag may be
mixed in: no `<think>` / `</think>` anywhere, and `<answer>` only inside the summary.

A leading space or newline is normal in both: completions start right after the prompt ("Assistant:").
"""
from __future__ import annotations

import re

from r1_engine.engine.readable import READABLE_TOKENS, split_readable
from r1_engine.engine.rewards.accuracy import extract_final_answers

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_THINK_TAGS = _TAGS[:2]
_LAYOUT = re.compile(r"\s*<think>.*?</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


def _r1_zero_format(completion: str) -> bool:
    if any(completion.count(tag) != 1 for tag in _TAGS):
        return False
    match = _LAYOUT.fullmatch(completion)
    return match is not None and bool(match.group("answer").strip())


def _readable_format(completion: str) -> bool:
    parts = split_readable(completion)
    if parts is None:
        return False
    reasoning, summary = parts
    if any(tag in completion for tag in _THINK_TAGS) or any(tag in reasoning for tag in _TAGS):
        return False
    candidates = extract_final_answers(summary)
    return bool(summary.strip()) and bool(candidates) and bool(candidates[-1])


def format_reward(completion: str) -> float:
    """1.0 if the completion follows R1-Zero's `<think>...</think><answer>...</answer>` layout or the readable
    `<|reasoning|>...<|summary|>...` one, else 0.0."""
    if any(marker in completion for marker in READABLE_TOKENS):
        return 1.0 if _readable_format(completion) else 0.0
    return 1.0 if _r1_zero_format(completion) else 0.0
