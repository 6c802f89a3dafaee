"""Rule-based rewards: every expected value below is worked out by hand from the rules in
engine/rewards (and GRPO_SPEC.md "Rewards"), not read back from the code."""
import math
import os
import threading
import time

import pytest

from r1_engine.engine.rewards import (
    REWARDS,
    RewardComposer,
    RewardSpec,
    accuracy_reward,
    build_reward_composer,
    chain_of_thought,
    count_words_by_language,
    extract_final_answers,
    format_reward,
    language_consistency_reward,
)

# --------------------------------------------------------------------------- extraction
EXTRACTION_CASES = [
    (r"so \boxed{\frac{1}{2}}.", [r"\frac{1}{2}"]),
    (r"\boxed {12}", ["12"]),
    (r"\fbox{7}", ["7"]),
    (r"\boxed{\{1,2\}}", [r"\{1,2\}"]),  # escaped braces do not close the box
    (r"\boxed{\frac{a}{b^{2}}}", [r"\frac{a}{b^{2}}"]),  # nested braces
    (r"\boxed{a} then \boxed{b}", ["a", "b"]),
    (r"<think>\boxed{1}</think>\boxed{2} <answer>3</answer>", ["2", "3"]),
    (r"<think>r</think><answer>so \boxed{4}</answer>", ["4"]),  # a section holding a box gives the box
    (r"<think>r</think><answer> x=2 </answer>", ["x=2"]),
    (r"\boxed{5", []),  # never closed (truncated generation)
    ("no answer here", []),
    (r"<think>only reasoning \boxed{9}", []),  # unterminated think: everything after it is reasoning
]


@pytest.mark.parametrize("completion, expected", EXTRACTION_CASES)
def test_extract_final_answers(completion, expected):
    assert extract_final_answers(completion) == expected


# --------------------------------------------------------------------------- accuracy: equivalent forms
def boxed(answer: str) -> str:
    return f"<think>some reasoning</think> <answer>The answer is \\boxed{{{answer}}}</answer>"


EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac{3}{4}", "0.75"),
    ("0.5", r"\frac12"),
    ("1/2", r"\frac{1}{2}"),
    (r"-\frac{1}{2}", r"\frac{-1}{2}"),
    (r"50\%", "50"),  # percent is lenient (math-verify): 50% matches 50 ...
    (r"50\%", "0.5"),  # ... and 0.5
    (r"5 \text{ cm}", "5"),  # units dropped
    (r"5\,\text{cm}", "5"),
    ("[1, 2)", "[1,2)"),
    (r"\left[ 0 , 1 \right]", "[0,1]"),
    (r"(-\infty, 2]", r"(-\infty,2]"),
    (r"\{2,1\}", r"\{1,2\}"),  # sets ignore order
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    ("1,000", "1000"),  # thousands separator
    ("1{,}000", "1000"),
    ("42.", "42"),  # trailing period
    ("x = 3", "3"),
    ("-7", "-7"),
    (r"3\!\cdot\!4", "12"),
    ("x^{2}+2x+1", "(x+1)^2"),
    (r"\pi/2", r"\frac{\pi}{2}"),
    ("0.333333", r"\frac{1}{3}"),  # floats compared at 6 decimals
    ("007", "7"),  # integer fast path
]


@pytest.mark.parametrize("answer, reference", EQUIVALENT)
def test_accuracy_equivalent_forms(answer, reference):
    assert accuracy_reward(boxed(answer), reference) == 1.0


NEAR_MISSES = [
    ("0.33", r"\frac13"),
    ("0.333", r"\frac13"),
    ("-2", "2"),
    ("[1,2]", "[1,2)"),
    ("(1,2]", "(1,2)"),
    (r"\{1,2,3\}", r"\{1,2\}"),
    (r"\sqrt{3}", r"\sqrt{2}"),
    ("3.14", r"\pi"),
    ("1001", "1000"),
    ("10", "1,000"),
    (r"\frac{2}{3}", r"\frac{3}{2}"),
    ("x^2+1", "(x+1)^2"),
    (r"5\%", "0.5"),  # 5% is 0.05
    ("A", "B"),
]


@pytest.mark.parametrize("answer, reference", NEAR_MISSES)
def test_accuracy_near_misses(answer, reference):
    assert accuracy_reward(boxed(answer), reference) == 0.0


def test_accuracy_answer_section_without_box_and_worked_reference():
    assert accuracy_reward("<think>r</think><answer>The answer is 5</answer>", "5") == 1.0
    assert accuracy_reward("<think>r</think><answer>6</answer>", "5") == 0.0
    # A worked solution as reference: its last box is the answer.
    assert accuracy_reward(boxed("7"), r"Adding gives $3+4=\boxed{7}$.") == 1.0


def test_accuracy_off_the_main_thread():
    # math-verify's SIGALRM timeout raises ValueError outside the main thread unless it is turned off.
    results = []
    worker = threading.Thread(target=lambda: results.append(
        [accuracy_reward(boxed(r"\frac{7}{8}"), "0.875"), accuracy_reward(boxed(r"\frac{7}{9}"), "0.875")]))
    worker.start()
    worker.join()
    assert results == [[1.0, 0.0]]


def test_accuracy_needs_a_reference():
    with pytest.raises(ValueError, match="reference"):
        accuracy_reward(boxed("1"), None)


# --------------------------------------------------------------------------- accuracy: reward hacking
HACKS = [
    (r"\boxed{3} or maybe \boxed{4}", "4", 0.0),  # two distinct answers
    (r"\boxed{4} or maybe \boxed{3}", "3", 0.0),
    (r"\boxed{4}, again: \boxed{4}", "4", 1.0),  # the same answer twice is fine
    (r"\boxed{0.5}, i.e. \boxed{\frac12}", "1/2", 1.0),  # equivalent forms are one answer
    (" ".join(rf"\boxed{{{k}}}" for k in range(1, 10)) + r" \boxed{10}", "10", 0.0),  # box every guess
    (r"\boxed{}", "0", 0.0),  # empty box
    (r"\boxed{ } \boxed{5}", "5", 0.0),  # an empty box anywhere
    ("<think>r</think><answer></answer>", "0", 0.0),
    ("<think>r</think><answer>   </answer>", "0", 0.0),
    (r"<think>it is \boxed{5}</think>", "5", 0.0),  # answer only in the reasoning
    ("<think>it is <answer>5</answer></think>", "5", 0.0),
    ("<think>5</think><answer>6</answer>", "5", 0.0),
    (r"<think>it is \boxed{5}", "5", 0.0),  # truncated inside the reasoning
    (r"pre-filled reasoning: \boxed{4}?</think> <answer>5</answer>", "5", 1.0),  # its box is ignored
]


@pytest.mark.parametrize("completion, reference, expected", HACKS)
def test_accuracy_reward_hacking(completion, reference, expected):
    assert accuracy_reward(completion, reference) == expected


GIANT = [
    (r"10^{100000}", "1"),
    ("9" * 100_000, "1"),  # 100k-digit literal: over the length cap
    ("9" * 999, "1"),  # under the cap: integer fast path, no sympy
    (r"2^{2^{2^{2^{2}}}}", "4"),
    (r"9^{9^{9}}", "3"),  # math-verify alone would spend its whole timeout on this
    (r"(10^{9})!", "1"),
    ("2**2**100", "2"),
]


@pytest.mark.parametrize("answer, reference", GIANT)
def test_accuracy_giant_numbers_are_fast_and_wrong(answer, reference):
    start = time.perf_counter()
    assert accuracy_reward(boxed(answer), reference) == 0.0
    assert time.perf_counter() - start < 1.0


def test_accuracy_giant_numbers_still_match_themselves():
    assert accuracy_reward(boxed(r"10^{100000}"), r"10^{100000}") == 1.0
    assert accuracy_reward(boxed("9" * 999), "9" * 999) == 1.0
    assert accuracy_reward(boxed("9" * 1001), "9" * 1001) == 0.0  # over MAX_ANSWER_CHARS


# --------------------------------------------------------------------------- format
FORMAT_CASES = [
    ("<think>r</think><answer>a</answer>", 1.0),
    (" <think>\nreasoning\n</think>\n<answer>\n5\n</answer>\n", 1.0),  # leading space after "Assistant:"
    ("<think></think><answer>5</answer>", 1.0),  # empty reasoning is allowed; empty answer is not
    ("<think>r</think>", 0.0),
    ("<answer>5</answer>", 0.0),
    ("<think>r</think><answer>5", 0.0),
    ("<think>r<think>s</think><answer>5</answer>", 0.0),
    ("<think>r</think><think>s</think><answer>5</answer>", 0.0),
    ("<think>r</think><answer>5</answer><answer>6</answer>", 0.0),
    ("<answer>5</answer><think>r</think>", 0.0),
    ("<think>r<answer>5</answer></think>", 0.0),
    ("<think>r</think><answer> \n </answer>", 0.0),
    ("<think>r</think><answer>5</answer> extra", 0.0),
    ("Sure! <think>r</think><answer>5</answer>", 0.0),
    ("<think>r</think> so <answer>5</answer>", 0.0),
    ("<Think>r</Think><answer>5</answer>", 0.0),
    ("", 0.0),
]


@pytest.mark.parametrize("completion, expected", FORMAT_CASES)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


# --------------------------------------------------------------------------- language consistency
LANGUAGE_CASES = [
    # completion, fraction "en", fraction "zh"
    ("<think>Let me compute the sum.</think><answer>5</answer>", 1.0, 0.0),
    ("<think>我们计算</think>", 0.0, 1.0),  # 4 CJK characters = 4 words
    ("<think>First 我们 add</think>", 2 / 4, 2 / 4),
    ("<think>The 答案 is 5.</think>", 2 / 4, 2 / 4),
    ("<think>$x^2 + y^2 = 1$ 所以 x = 1</think>", 1 / 3, 2 / 3),  # math span neutral, bare x is Latin
    (r"<think>\frac{1}{2} 123 + 456 = 579 !!!</think>", 1.0, 1.0),  # nothing countable
    ("hello 世界", 1 / 3, 2 / 3),  # no think tags: the whole text
    ("<think>hello world</think><answer>答案</answer>", 1.0, 0.0),  # only the reasoning counts
    ("<think>don't re-check 停</think>", 2 / 3, 1 / 3),  # don't, re-check: one word each
    ("<think>привет world</think>", 1 / 2, 0.0),  # Cyrillic is neither
    ("<think>angle α is 30 degrees</think>", 1.0, 0.0),  # Greek letters are math symbols
    ("<think>これは test</think>", 1 / 4, 3 / 4),  # kana count as "zh" script
    ("<think>안녕 hi</think>", 1 / 3, 2 / 3),  # hangul too
    ("reasoning 然后</think><answer>5</answer>", 1 / 3, 2 / 3),  # template pre-filled <think>
    ("<think>step one 第二", 2 / 4, 2 / 4),  # unterminated think runs to the end
    (r"<think>\alpha \sqrt{2} 因此 \text{so}</think>", 1 / 3, 2 / 3),  # commands neutral, their text not
    ("<think>café naïve 咖啡</think>", 2 / 4, 2 / 4),
    ("<think>因此，答案是五。</think>", 0.0, 1.0),  # full-width punctuation is neutral
    ("", 1.0, 1.0),
]


@pytest.mark.parametrize("completion, expected_en, expected_zh", LANGUAGE_CASES)
def test_language_consistency(completion, expected_en, expected_zh):
    assert language_consistency_reward(completion, "en") == pytest.approx(expected_en, abs=1e-12)
    assert language_consistency_reward(completion, "zh") == pytest.approx(expected_zh, abs=1e-12)


def test_language_word_counts_and_bad_target():
    assert count_words_by_language("I 爱 math, да!") == {"zh": 1, "en": 2, "other": 1}
    with pytest.raises(ValueError, match="fr"):
        language_consistency_reward("bonjour", "fr")


# --------------------------------------------------------------------------- the readable layout (R1 cold start)
R, S = "<|reasoning|>", "<|summary|>"

READABLE_EXTRACTION_CASES = [
    (rf"{R}try \boxed{{3}}{S}So \boxed{{4}}.", ["4"]),  # the reasoning's box is not a candidate
    (rf"{R}r{S}<answer>5</answer>", ["5"]),
    (rf"{R}r{S}a \boxed{{1}}{S}b \boxed{{2}}", ["2"]),  # after the last summary marker
    (rf"{R}r{S}\boxed{{1}}{R}more \boxed{{2}}", ["1"]),  # a new reasoning after the summary is not summary
    (rf"{R}cut off in the reasoning \boxed{{7}}", []),  # no summary: no answer
    (rf"pre-filled reasoning \boxed{{6}}{S} \boxed{{8}}", ["8"]),  # the template wrote the first marker
    (rf"<think>\boxed{{1}}</think>{S}\boxed{{2}}", ["2"]),
]


@pytest.mark.parametrize("completion, expected", READABLE_EXTRACTION_CASES)
def test_extract_final_answers_readable(completion, expected):
    assert extract_final_answers(completion) == expected


def test_accuracy_readable():
    assert accuracy_reward(rf"{R}4+4=8{S} The answer is \boxed{{8}}.", "8") == 1.0
    assert accuracy_reward(rf"{R}it is \boxed{{8}}{S} The answer is \boxed{{9}}.", "8") == 0.0
    assert accuracy_reward(rf"{R}it is \boxed{{8}}", "8") == 0.0  # truncated in its reasoning
    assert accuracy_reward(rf"{R}r{S}\boxed{{8}} or \boxed{{9}}", "8") == 0.0  # hedging, as in the tag layout


READABLE_FORMAT_CASES = [
    (rf"{R}r{S}So \boxed{{5}}.", 1.0),
    (f" \n{R}\nreasoning\n{S}\nThe answer is \\boxed{{5}}.\n", 1.0),  # whitespace before the marker
    (rf"{R}r{S}<answer>5</answer>", 1.0),  # an <answer> section in the summary holds the answer too
    (rf"{R}{S}\boxed{{5}}", 1.0),  # empty reasoning is allowed, as with the tags
    (rf"{R}r{S}", 0.0),  # blank summary
    (f"{R}r{S}  \n", 0.0),
    (rf"{R}r{S}The answer is 5.", 0.0),  # no final answer candidate in the summary
    (rf"{R}r{S}So \boxed{{}}.", 0.0),  # an empty box is no answer
    (rf"{R}r{S}<answer> </answer>", 0.0),
    (rf"{R}r \boxed{{5}}", 0.0),  # no summary marker (cut off)
    (rf"{S}\boxed{{5}}", 0.0),  # no reasoning marker
    (rf"{S}\boxed{{5}}{R}r", 0.0),  # wrong order
    (rf"{R}a{R}b{S}\boxed{{5}}", 0.0),  # a marker twice
    (rf"{R}r{S}\boxed{{5}}{S}\boxed{{5}}", 0.0),
    (rf"Sure! {R}r{S}\boxed{{5}}", 0.0),  # text before the reasoning marker
    (rf"{R}<think>r</think>{S}\boxed{{5}}", 0.0),  # R1-Zero tags mixed in
    (rf"{R}r{S}<think>x</think>\boxed{{5}}", 0.0),
    (rf"{R}r <answer>5</answer>{S}\boxed{{5}}", 0.0),  # an answer section inside the reasoning
    (rf"<think>r</think><answer>{S}5</answer>", 0.0),  # a marker inside the tag layout
    (rf"<think>{R}r</think><answer>5</answer>", 0.0),
]


@pytest.mark.parametrize("completion, expected", READABLE_FORMAT_CASES)
def test_format_reward_readable(completion, expected):
    assert format_reward(completion) == expected


READABLE_LANGUAGE_CASES = [
    # completion, fraction "en" (of the chain of thought: between the markers)
    (f"{R}Let me add 我们{S}答案是 \\boxed{{5}}", 3 / 5),  # the summary's words do not count
    (f"{R}all english here{S}全部中文", 1.0),
    (f"{R}first 一{S}s{R}second 二{S}t", 2 / 4),  # every reasoning block
    (f"{R}cut off 中", 2 / 3),  # unterminated: to the end
    (f"pre-filled 中文{S}summary", 1 / 3),  # the template wrote the reasoning marker
    (f"{R}<think>english</think> words{S}中", 1.0),  # the readable markers win over think tags
]


@pytest.mark.parametrize("completion, expected_en", READABLE_LANGUAGE_CASES)
def test_language_consistency_readable(completion, expected_en):
    assert language_consistency_reward(completion, "en") == pytest.approx(expected_en, abs=1e-12)


def test_chain_of_thought_layouts():
    assert chain_of_thought(f"{R} reasoning {S} summary") == " reasoning "
    assert chain_of_thought("<think>a</think><answer>b</answer>") == "a"
    assert chain_of_thought("no layout") == "no layout"


# --------------------------------------------------------------------------- compose
# Module-level so spawned workers can unpickle them (by reference to this module).
def constant_one(completion, reference):
    return 1.0


def length_reward(completion, reference):
    return len(completion) / 10


def raise_on_bad(completion, reference):
    if "bad" in completion:
        raise RuntimeError("boom")
    return 1.0


def sleep_on_slow(completion, reference):
    if "slow" in completion:
        time.sleep(60)
    return 1.0


def nan_on_nan(completion, reference):
    return math.nan if "nan" in completion else 0.25


def exit_on_crash(completion, reference):
    if "crash" in completion:
        os._exit(3)
    return 1.0


COMPLETIONS = [
    "<think>x</think><answer>4</answer>",  # format 1, accuracy 1 (ref 4), language 1
    "<think>x</think><answer>5</answer>",  # format 1, accuracy 0 (ref 4)
    r"\boxed{4}",  # format 0, accuracy 1
    "<think>计算 sum</think><answer>1/2</answer>",  # format 1, accuracy 1 (ref 0.5), language en 1/3
]
REFERENCES = ["4", "4", "4", "0.5"]


def test_compose_weights_inline():
    composer = build_reward_composer({"accuracy": 1.0, "format": 0.5, "language": 0.25}, num_workers=0)
    out = composer.score(COMPLETIONS, REFERENCES)
    assert out.components["accuracy"] == [1.0, 0.0, 1.0, 1.0]
    assert out.components["format"] == [1.0, 1.0, 0.0, 1.0]
    assert out.components["language"] == pytest.approx([1.0, 1.0, 1.0, 1 / 3])
    assert out.total == pytest.approx([1.75, 0.75, 1.25, 1.5 + 0.25 / 3])
    assert (out.num_errors, out.num_timeouts) == (0, 0)
    zh = build_reward_composer({"language": 2.0}, language="zh", num_workers=0)
    assert zh.score(COMPLETIONS, [None] * 4).total == pytest.approx([0.0, 0.0, 2.0, 2 * 2 / 3])


def test_compose_errors_inline():
    specs = [RewardSpec("ok", constant_one, 1.0), RewardSpec("fragile", raise_on_bad, 2.0),
             RewardSpec("nan", nan_on_nan, 4.0)]
    out = RewardComposer(specs, num_workers=0).score(["good", "bad", "nan"], [None] * 3)
    assert out.components["fragile"] == [1.0, 0.0, 1.0]
    assert out.components["nan"] == [0.25, 0.25, 0.0]
    assert out.total == [4.0, 2.0, 3.0]
    assert (out.num_errors, out.num_timeouts) == (2, 0)
    assert any("boom" in message for message in out.error_messages)


def test_compose_bad_input():
    with pytest.raises(ValueError, match="accuracy, format, language"):
        build_reward_composer({"accuracy": 1.0, "helpfulness": 1.0})
    with pytest.raises(ValueError, match="klingon"):
        build_reward_composer({"language": 1.0}, language="klingon", num_workers=0)
    composer = build_reward_composer({"accuracy": 1.0}, num_workers=0)
    with pytest.raises(ValueError, match="references"):
        composer.score(["a", "b"], ["1"])
    with pytest.raises(ValueError, match=r"\[1\]"):
        composer.score(["a", "b"], ["1", None])
    with pytest.raises(ValueError, match="picklable"):
        RewardComposer([RewardSpec("lam", lambda c, r: 1.0, 1.0)], num_workers=1)
    assert set(REWARDS) == {"accuracy", "format", "language", "code"}


@pytest.mark.multiproc
def test_compose_pool_matches_inline():
    completions = COMPLETIONS + [boxed(a) for a, _ in EQUIVALENT[:8]] + [boxed(a) for a, _ in NEAR_MISSES[:8]]
    references = REFERENCES + [r for _, r in EQUIVALENT[:8]] + [r for _, r in NEAR_MISSES[:8]]
    weights = {"accuracy": 1.0, "format": 0.5, "language": 0.25}
    inline = build_reward_composer(weights, num_workers=0).score(completions, references)
    with build_reward_composer(weights, num_workers=2, timeout_s=30.0) as composer:
        pooled = composer.score(completions, references)
        again = composer.score(completions, references)  # workers are reused
    assert pooled.total == inline.total == again.total
    assert pooled.components == inline.components
    assert inline.components["accuracy"] == [1.0, 0.0, 1.0, 1.0] + [1.0] * 8 + [0.0] * 8
    assert (pooled.num_errors, pooled.num_timeouts) == (0, 0)


@pytest.mark.multiproc
def test_compose_pool_timeouts_errors_and_crashes():
    specs = [RewardSpec("ok", constant_one, 1.0), RewardSpec("len", length_reward, 0.5),
             RewardSpec("slow", sleep_on_slow, 10.0), RewardSpec("fragile", raise_on_bad, 100.0),
             RewardSpec("crashy", exit_on_crash, 1000.0)]
    completions = ["a" * 10, "slow", "bad", "crash", "b" * 20]
    with RewardComposer(specs, num_workers=2, timeout_s=0.5) as composer:
        start = time.perf_counter()
        out = composer.score(completions, [None] * 5)
        assert time.perf_counter() - start < 20.0  # a 60 s sleeper did not block the run
        assert out.components["slow"] == [1.0, 0.0, 1.0, 1.0, 1.0]
        assert out.components["fragile"] == [1.0, 1.0, 0.0, 1.0, 1.0]
        assert out.components["crashy"] == [1.0, 1.0, 1.0, 0.0, 1.0]
        assert out.components["len"] == [1.0, 0.4, 0.3, 0.5, 2.0]
        # 1 + 0.5 len + 10 slow + 100 fragile + 1000 crashy, minus what failed
        assert out.total == pytest.approx([1111.5, 1101.2, 1011.15, 111.25, 1112.0])
        assert (out.num_errors, out.num_timeouts) == (2, 1)
        # The pool recovered: replaced workers serve the next call.
        out = composer.score(["fine", "fine"], [None, None])
        assert out.total == pytest.approx([1111.2, 1111.2])  # len("fine") / 10 * 0.5 = 0.2
        assert (out.num_errors, out.num_timeouts) == (0, 0)
    with pytest.raises(RuntimeError, match="close"):
        composer.score(["x"], [None])


@pytest.mark.multiproc
def test_compose_pool_survives_a_worker_killed_between_calls():
    with RewardComposer([RewardSpec("len", length_reward, 2.0)], num_workers=1, timeout_s=30.0) as composer:
        assert composer.score(["abcde"], [None]).total == [1.0]
        victim = composer._workers[0].process
        victim.kill()  # e.g. the OOM killer, while the worker was idle
        victim.join()
        out = composer.score(["abcde", "ab"], [None, None])
    assert out.total == pytest.approx([1.0, 0.4])
    assert (out.num_errors, out.num_timeouts) == (0, 0)
