"""Language-consistency reward (R1, reasoning RL stage): the share of the chain of thought's words that
are in the target language.

Words are classified by Unicode script, no language model involved:
- every CJK ideograph, kana or hangul character is one "zh" word (Chinese has no spaces);
- a run of Latin letters is one "en" word (internal apostrophes/hyphens keep it one word: "don't");
- a run of letters of any other script (Cyrillic, Arabic, ...) is one word of neither language;
- neutral, never counted: digits, punctuation, whitespace, math spans ($...$, \\(...\\), \\[...\\]),
  LaTeX commands (\\frac, \\cdot), math symbols and Greek letters (used as math variables).
The chain of thought (`chain_of_thought`) is, in R1's readable layout (engine/readable.py), the text between
`<|reasoning|>` and `<|summary|>`; with R1-Zero tags, the `<think>` block. In both, every such block counts, an
unterminated one runs to the end, and text before a closing marker with no opening one counts (the template
pre-filled the opening marker). With neither it is the whole completion. No countable word gives 1.0: nothing is
inconsistent.
"""
from __future__ import annotations

import re

from r1_engine.engine.readable import REASONING_TOKEN, SUMMARY_TOKEN

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
_THINK = ("<think>", "</think>")
_READABLE = (REASONING_TOKEN, SUMMARY_TOKEN)
_BLOCK = {markers: re.compile(re.escape(markers[0]) + r"(.*?)(?:" + re.escape(markers[1]) + r"|\Z)", re.DOTALL)
          for markers in (_THINK, _READABLE)}


def _blocks(completion: str, markers: tuple[str, str]) -> str:
    """Every opening...closing block (an unterminated one runs to the end), plus the text before a first closing
    marker that no opening one precedes, joined by newlines."""
    opening, closing = markers
    parts = []
    first_close, first_open = completion.find(closing), completion.find(opening)
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        parts.append(completion[:first_close])  # the template pre-filled the opening marker
    parts.extend(_BLOCK[markers].findall(completion))
    return "\n".join(parts)


def chain_of_thought(completion: str) -> str:
    """The reasoning part of a completion: readable layout first, then R1-Zero tags, else all of it."""
    for markers in (_READABLE, _THINK):
        if markers[0] in completion or markers[1] in completion:
            return _blocks(completion, markers)
    return completion


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
    counts = count_words_by_language(chain_of_thought(completion))
    total = sum(counts.values())
    return 1.0 if total == 0 else counts[target_language] / total
