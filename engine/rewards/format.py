"""Format reward (R1-Zero): `<think> reasoning </think> <answer> answer </answer>` and nothing else.

1.0 iff each of the four tags occurs exactly once, in that order, the answer section is not blank,
and only whitespace comes before `<think>`, between `</think>` and `<answer>`, and after `</answer>`.
A leading space or newline is normal: R1-Zero completions start right after "Assistant:".
The reasoning itself may be empty; the accuracy reward is what pays for reasoning well.
"""
from __future__ import annotations

import re

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_LAYOUT = re.compile(r"\s*<think>.*?</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


def format_reward(completion: str) -> float:
    """1.0 if the completion follows the R1-Zero `<think>...</think><answer>...</answer>` layout, else 0.0."""
    if any(completion.count(tag) != 1 for tag in _TAGS):
        return 0.0
    match = _LAYOUT.fullmatch(completion)
    if match is None or not match.group("answer").strip():
        return 0.0
    return 1.0
