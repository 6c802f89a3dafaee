"""Accuracy reward: is the completion's final answer mathematically equivalent to the reference?

Candidates come from the answer part of the completion only: in R1's readable layout (engine/readable.py) the
summary, the text after the last `<|summary|>` (none when the completion has a `<|reasoning|>` but no summary: it
was cut off in its reasoning); otherwise the text after the last `</think>` (the whole completion when it has no
think tags); reasoning inside `<think>` never counts. They are
the contents of every `\\boxed{...}` / `\\fbox{...}` there and of every `<answer>...</answer>` section
that holds no box. The last candidate is the final answer.

Rules against reward hacking:
- several candidates that are not equivalent to each other ("box every guess") score 0;
- an empty box or empty answer section anywhere scores 0;
- an answer longer than MAX_ANSWER_CHARS, or more than MAX_DISTINCT_ANSWERS distinct candidates, scores 0;
- answers that could make sympy compute a giant number (power towers, huge exponents or factorials) are
  compared as normalised strings only, never handed to sympy (the price: a factorial of a bracketed
  expression such as "(n+1)!" only matches its own spelling).

Equivalence (`answers_equivalent`): normalised exact string match, then an integer fast path, then
math-verify's `parse` + `verify`. Decisions inherited from math-verify, on purpose:
- percent is lenient: "50\\%" matches both "50" and "0.5";
- units and text after a number are dropped: "5 cm" and "5\\,\\text{cm}" match "5" (and so would "5 m");
- floats are compared after rounding to 6 decimals: "0.333333" matches "\\frac13", "0.333" does not;
- "(1,2)" is ambiguous (interval or pair) and matches both the interval and the set {1,2}.
"""
from __future__ import annotations

import functools
import re
import threading

from math_verify import parse, verify

from r1_engine.engine.readable import REASONING_TOKEN, SUMMARY_TOKEN

MAX_ANSWER_CHARS = 1000  # longer answers score 0 (also keeps sympy away from 100k-digit strings)
MAX_DISTINCT_ANSWERS = 8  # more distinct candidates than this score 0 without being compared
MATH_VERIFY_TIMEOUT_S = 2  # math-verify's own signal-based timeout (whole seconds), main thread only

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_SECTION = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INTEGER = re.compile(r"[-+]?\d+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LATEX_SPACING = re.compile(r"\\[,!;:>]|\\q?quad(?![a-zA-Z])|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])")
_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\\(|\\\[")

# Giant-number guards: an exponent literal with >= 5 digits (^ or **), a bare power tower (2^2^9),
# a factorial of a >= 5-digit literal or of a bracketed expression. Numeric towers inside braces
# (2^{2^{100}}) are found by _is_giant.
_BIG_EXPONENT = re.compile(r"(?:\^|\*\*)\s*[{(]?\s*[-+]?\d{5,}")
_BARE_TOWER = re.compile(r"(?:\^|\*\*)\s*\d+\s*(?:\^|\*\*)")
_BIG_FACTORIAL = re.compile(r"(?:\d{5,}|[)}\]])\s*!")


# --------------------------------------------------------------------------- extraction
def answer_region(completion: str) -> str:
    """The part of a completion that may hold the final answer. Readable layout: after the last summary marker and
    before a reasoning marker that follows it; a completion cut off in its reasoning (a reasoning marker, no
    summary) has none. R1-Zero tags: after the last `</think>`, and before an unterminated `<think>`."""
    if SUMMARY_TOKEN in completion:
        return completion.rsplit(SUMMARY_TOKEN, 1)[1].split(REASONING_TOKEN, 1)[0]
    if REASONING_TOKEN in completion:
        return ""
    if "</think>" in completion:
        completion = completion.rsplit("</think>", 1)[1]
    return completion.split("<think>", 1)[0]


def _boxes(text: str) -> list[tuple[int, str]]:
    """(start, content) of every outermost `\\boxed{...}` / `\\fbox{...}` with balanced braces.
    Escaped braces `\\{ \\}` do not count; a box whose braces never close (truncated) is skipped."""
    found = []
    pos = 0
    while (match := _BOX_OPEN.search(text, pos)) is not None:
        depth, i = 1, match.end()
        while i < len(text):
            char = text[i]
            if char == "\\":
                i += 2  # skip the escaped character (\{, \}, \\)
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        if depth != 0:
            pos = match.end()
            continue
        found.append((match.start(), text[match.end() : i]))
        pos = i + 1
    return found


def extract_final_answers(completion: str) -> list[str]:
    """All candidate final answers of a completion, in order of appearance (stripped strings).

    Candidates are the contents of the boxes in the answer region and of the `<answer>` sections that
    contain no box (a section holding boxes contributes its boxes). Text inside `<think>...</think>`
    is never a candidate."""
    region = answer_region(completion)
    candidates = [(start, content) for start, content in _boxes(region)]
    for section in _ANSWER_SECTION.finditer(region):
        if not _BOX_OPEN.search(section.group(1)):
            candidates.append((section.start(), section.group(1)))
    candidates.sort(key=lambda item: item[0])
    return [content.strip() for _, content in candidates]


# --------------------------------------------------------------------------- equivalence
def normalize_answer(answer: str) -> str:
    """Cheap canonical form for the exact-match fast path: strip `$`, LaTeX spacing (\\, \\! \\quad
    \\left \\right), `\\dfrac`/`\\tfrac`, extra whitespace, one trailing period and thousands separators."""
    text = answer.strip()
    while len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text[1:-1].strip()
    if text.startswith("\\(") and text.endswith("\\)") or text.startswith("\\[") and text.endswith("\\]"):
        text = text[2:-2].strip()
    text = _LATEX_SPACING.sub(" ", text)
    text = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", text)
    text = " ".join(text.split())
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    compact = text.replace("{,}", ",")
    if _THOUSANDS.fullmatch(compact):
        text = compact.replace(",", "")
    return text


def _is_giant(answer: str) -> bool:
    """True when sympy might try to build an astronomically large number from this answer."""
    if _BIG_EXPONENT.search(answer) or _BARE_TOWER.search(answer) or _BIG_FACTORIAL.search(answer):
        return True
    # A power tower with a purely numeric exponent (2^{2^{100}}); symbolic ones (e^{x^2}) are fine.
    for match in re.finditer(r"\^\s*\{", answer):
        depth, i = 1, match.end()
        while i < len(answer) and depth:
            depth += {"{": 1, "}": -1}.get(answer[i], 0)
            i += 1
        exponent = answer[match.end() : i - 1]
        if ("^" in exponent or "**" in exponent) and not re.search(r"[a-zA-Z]", exponent):
            return True
    return False


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=4096)
def _parse(answer: str, use_timeout: bool) -> tuple:
    """math-verify's parse of one normalised answer (cached: a group's G completions share a reference)."""
    text = answer if _MATH_DELIMITER.search(answer) else f"${answer}$"
    timeout = MATH_VERIFY_TIMEOUT_S if use_timeout else None
    return tuple(parse(text, parsing_timeout=timeout))


def verdict_without_parsing(gold: str, pred: str) -> bool | None:
    """The equivalence of two normalised answers where no math parse is needed (an empty one, equal strings, two
    integers, one too large for sympy), or None: then only math-verify can tell."""
    if not gold or not pred:
        return False
    if gold == pred:
        return True
    if _INTEGER.fullmatch(gold) and _INTEGER.fullmatch(pred):
        return int(gold) == int(pred)
    if _is_giant(gold) or _is_giant(pred):
        return False  # already compared as strings above; sympy could hang on these
    return None


def answers_equivalent(gold: str, pred: str) -> bool:
    """Whether `pred` is mathematically equivalent to `gold` (asymmetric like math-verify's verify:
    pass the reference, or the answer held fixed, as `gold`). Empty answers are never equivalent."""
    gold, pred = normalize_answer(gold), normalize_answer(pred)
    verdict = verdict_without_parsing(gold, pred)
    if verdict is not None:
        return verdict
    # math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere the caller
    # (the RewardComposer's worker pool) enforces the time limit.
    return _math_verify_equivalent(gold, pred, _in_main_thread())


@functools.lru_cache(maxsize=8192)
def _math_verify_equivalent(gold: str, pred: str, use_timeout: bool) -> bool:
    """Cached: the G completions of a group often repeat one answer."""
    gold_parsed, pred_parsed = _parse(gold, use_timeout), _parse(pred, use_timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(
        verify(
            list(gold_parsed),
            list(pred_parsed),
            timeout_seconds=MATH_VERIFY_TIMEOUT_S if use_timeout else None,
        )
    )


def _reference_answer(reference: str) -> str:
    """The answer part of a reference: the last box if the reference is a worked solution."""
    boxes = _boxes(reference)
    return boxes[-1][1] if boxes else reference


def accuracy_reward(completion: str, reference: str) -> float:
    """1.0 if the completion's single final answer is equivalent to `reference`, else 0.0."""
    if reference is None:
        raise ValueError("accuracy_reward needs a reference answer, got None")
    candidates = extract_final_answers(completion)
    if not candidates:
        return 0.0
    normalized = [normalize_answer(candidate) for candidate in candidates]
    if any(not answer or len(answer) > MAX_ANSWER_CHARS for answer in normalized):
        return 0.0
    distinct = list(dict.fromkeys(normalized))
    if len(distinct) > MAX_DISTINCT_ANSWERS:
        return 0.0
    final = normalized[-1]
    if any(other != final and not answers_equivalent(final, other) for other in distinct):
        return 0.0  # several different final answers: no credit for hedging
    return 1.0 if answers_equivalent(_reference_answer(reference), final) else 0.0
