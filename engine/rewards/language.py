"""Language-consistency reward (R1, reasoning RL stage): the share of the chain of thought's words that
are in the target language.

Words are classified by Unicode script, no language model involved:
- every CJK ideograph, kana or hangul character is one "zh" word (Chinese has no spaces);
- a run of Latin letters is one "en" word (internal apostrophes/hyphens keep it one word: "don't");
- a run of letters of any other script (Cyrillic, Arabic, ...) is one word of neither language;
- neutral, never counted: digits, punctuation, whitespace, math spans ($...$, \\(...\\), \\[...\\]),
  LaTeX commands (\\frac, \\cdot), math symbols and Greek letters (used as math variables).
The chain of thought is the `<think>` block (all of them, an unterminated one runs to the end, and text
before a `</think>` with no opening tag counts, as when the template pre-fills `<think>`); with no think
tags it is the whole completion. No countable word gives 1.0: nothing is inconsistent.
"""
from __future__ import annotations

import re

SUPPORTED_LANGUAGES = ("en", "zh")

_CJK = (
    "\u1100-\u11ff"  # hangul jamo
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3130-\u318f"  # hangul compatibility jamo
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0003134f"  # CJK extensions B-G
)
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"  # ASCII, Latin-1 letters (not × ÷), Extended A/B
_GREEK = "\u0370-\u03ff\u1f00-\u1fff"
_WORD = re.compile(
    rf"(?P<zh>[{_CJK}])"
    rf"|(?P<en>[{_LATIN}]+(?:['\u2019\-][{_LATIN}]+)*)"
    rf"|(?P<greek>[{_GREEK}]+)"
    rf"|(?P<other>(?:(?![{_CJK}{_LATIN}{_GREEK}])[^\W\d_])+)"
)
_MATH_SPAN = re.compile(r"\$\$.*?\$\$|(?<!\\)\$.*?(?<!\\)\$|\\\(.*?\\\)|\\\[.*?\\\]", re.DOTALL)
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_THINK_BLOCK = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.DOTALL)


def _chain_of_thought(completion: str) -> str:
    if "<think>" not in completion and "</think>" not in completion:
        return completion
    parts = []
    first_close, first_open = completion.find("</think>"), completion.find("<think>")
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        parts.append(completion[:first_close])  # the template pre-filled the opening tag
    parts.extend(_THINK_BLOCK.findall(completion))
    return "\n".join(parts)


def count_words_by_language(text: str) -> dict[str, int]:
    """Counts of "zh", "en" and "other" words in `text`, neutral tokens left out (see module docstring)."""
    text = _LATEX_COMMAND.sub(" ", _MATH_SPAN.sub(" ", text))
    counts = {"zh": 0, "en": 0, "other": 0}
    for match in _WORD.finditer(text):
        if match.lastgroup != "greek":
            counts[match.lastgroup] += 1
    return counts


def language_consistency_reward(completion: str, target_language: str = "en") -> float:
    """Fraction of the chain of thought's words that are in `target_language` ("en" or "zh")."""
    if target_language not in SUPPORTED_LANGUAGES:
        raise ValueError(
            f"language_consistency_reward: unsupported target_language {target_language!r}; "
            f"supported: {', '.join(SUPPORTED_LANGUAGES)}"
        )
    counts = count_words_by_language(_chain_of_thought(completion))
    total = sum(counts.values())
    return 1.0 if total == 0 else counts[target_language] / total
