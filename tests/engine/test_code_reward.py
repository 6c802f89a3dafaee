"""The code reward: program extraction, output comparison, correct and wrong Python and C++ programs (stdin/stdout and
assert-style tests, hand-counted pass fractions), the harness protocol, code rows in load_prompts, mixed batches in
RolloutScorer, 128 completions through the reward pool, the refusal of an unsandboxed judge, and a 2-step trainer run
on code prompts (hostile programs: test_sandbox.py)."""
import dataclasses
import json
import math
import os
import time

import pytest

from r1_engine.engine.data import load_prompts
from r1_engine.engine.rewards import build_reward_composer
from r1_engine.engine.rewards.code import (
    CodeJudge,
    CodeLimits,
    CodeTests,
    code_reward,
    extract_program,
    make_code_judge,
    parse_frames,
    same_output,
)
from r1_engine.engine.sandbox import Sandbox, find_cxx, get_sandbox
from r1_engine.engine.scoring import RolloutScorer, nanmean

LIMITS = CodeLimits(test_timeout_s=1.5, memory_mb=256, compile_timeout_s=20.0, completion_timeout_s=30.0)
SANDBOX = get_sandbox()
needs_sandbox = pytest.mark.skipif(not SANDBOX.contained, reason=f"no sandbox here: {SANDBOX.detail}")
needs_cxx = pytest.mark.skipif(find_cxx() is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def judge():
    return CodeJudge(SANDBOX, LIMITS, find_cxx())


def answer(source, language="python", think="plan"):
    return f" <think>{think}</think> <answer>```{language}\n{source}\n```</answer>"


DOUBLE = CodeTests(io=(("1\n", "2\n"), ("3\n", "6"), ("10\n", "20\n")))


# --------------------------------------------------------------------------- pure functions
def test_extract_program_takes_the_last_fenced_block_of_the_answer_section():
    completion = (" <think>```python\nprint('draft')\n```</think> ```py\nprint(1)\n``` then\n"
                  "```cpp\nint main() {}\n``` and ```python\nprint(2)")  # the last one is unterminated
    assert extract_program(completion) == ("cpp", "int main() {}\n")
    assert extract_program(" <think>```python\nprint(1)\n```</think> no code") is None
    assert extract_program("```Python3\nx = 1\n```") == ("python", "x = 1\n")
    assert extract_program("```c++\nint main(){}\n```")[0] == "cpp"
    assert extract_program("```javascript\nconsole.log(1)\n```") is None


def test_same_output_trims_trailing_whitespace_per_line_only():
    assert same_output(b"1 2  \n3\t\n\n\n", "1 2\n3")
    assert same_output(b"a\r\nb\r\n", "a\nb\n")
    assert not same_output(b"1  2\n", "1 2\n")  # inner whitespace counts
    assert not same_output(b" 1\n", "1\n")  # so does leading whitespace
    assert not same_output(b"1\n\n2\n", "1\n2\n")  # and blank lines in the middle


def test_parse_frames_stops_at_malformed_or_repeated_frames():
    good = b"R1C ok 0\nR1T 0 ok 0 2\n2\nR1T 1 exit 1 0\nR1END\n"
    assert parse_frames(good) == ({0: ("ok", b"2\n"), 1: ("exit", b"")}, "")
    repeated = b"R1C ok 0\nR1T 0 ok 0 1\n9R1T 0 ok 0 1\n2R1T 1 ok 0 1\n4R1END\n"
    assert parse_frames(repeated)[0] == {0: ("ok", b"9")}  # a second frame for test 0 ends it: test 1 is not run
    assert parse_frames(b"R1C error 5\noops!R1END\n") == ({}, "compile error: oops!")
    assert parse_frames(b"R1T 0 ok 0 50\nshort") == ({}, "")  # a frame cut off (killed mid-write) does not count


# --------------------------------------------------------------------------- judging
@needs_sandbox
def test_python_programs_are_scored_by_their_tests(judge):
    assert code_reward(answer("print(int(input()) * 2)"), DOUBLE, judge) == (1.0, {"code_pass_frac": 1.0})
    # right on 1 and 10, wrong on 3: reward 0, 2 of 3 passed
    wrong = "n = int(input())\nprint(n * 2 if n != 3 else 7)"
    assert code_reward(answer(wrong), DOUBLE, judge) == (0.0, {"code_pass_frac": pytest.approx(2 / 3)})
    crash = "n = int(input())\nif n == 10:\n    raise SystemExit(1)\nprint(2 * n)"
    assert code_reward(answer(crash), DOUBLE, judge)[1]["code_pass_frac"] == pytest.approx(2 / 3)
    slow = "import time\nn = int(input())\nif n == 1:\n    time.sleep(5)\nprint(2 * n)"
    verdict = judge.judge("python", slow, DOUBLE)
    assert verdict.statuses == ("timeout", "pass", "pass") and verdict.reward == 0.0
    assert code_reward(answer("print(int(input() * 2)"), DOUBLE, judge) == (0.0, {"code_pass_frac": 0.0})  # syntax
    assert code_reward(" <think>x</think> <answer>6</answer>", DOUBLE, judge) == (0.0, {"code_pass_frac": 0.0})


@needs_sandbox
def test_assert_style_tests(judge):
    tests = CodeTests(test_code="assert add(2, 3) == 5\nassert add(-1, 1) == 0")
    assert code_reward(answer("def add(a, b):\n    return a + b"), tests, judge)[0] == 1.0
    assert code_reward(answer("def add(a, b):\n    return a - b"), tests, judge)[0] == 0.0
    # both kinds in one row: 2 io tests + 1 assert test; the io tests pass, the asserts fail
    both = CodeTests(io=(("2 3\n", "5"), ("1 1\n", "2")), test_code="assert add(1, 2) == 4")
    source = "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(*map(int, input().split())))"
    verdict = judge.judge("python", source, both)
    assert verdict.statuses[:2] == ("pass", "pass") and verdict.statuses[2] == "exit" and verdict.pass_frac == 2 / 3


@needs_sandbox
@needs_cxx
def test_cpp_programs_compile_in_the_sandbox(judge):
    good = "#include <iostream>\nint main() { long n; std::cin >> n; std::cout << 2 * n << '\\n'; }"
    assert code_reward(answer(good, "cpp"), DOUBLE, judge) == (1.0, {"code_pass_frac": 1.0})
    off = "#include <cstdio>\nint main() { long n; scanf(\"%ld\", &n); printf(\"%ld\\n\", n == 10 ? 0 : 2 * n); }"
    assert code_reward(answer(off, "cpp"), DOUBLE, judge) == (0.0, {"code_pass_frac": pytest.approx(2 / 3)})
    verdict = judge.judge("cpp", "int main() { return 0 }", DOUBLE)
    assert verdict.passed == 0 and "compile error" in verdict.note
    asserts = CodeTests(test_code="#include <cassert>\nint main() { assert(sq(3) == 9); }")
    assert code_reward(answer("int sq(int x) { return x * x; }", "cpp"), asserts, judge)[0] == 1.0
    assert code_reward(answer("int sq(int x) { return x + x; }", "cpp"), asserts, judge)[0] == 0.0


# --------------------------------------------------------------------------- data and scoring
def test_load_prompts_reads_code_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"},
            {"prompt": "Double n.", "tests": [{"stdin": "1\n", "stdout": "2\n"}, {"stdout": "0"}]},
            {"prompt": "Write add.", "test_code": "assert add(1, 2) == 3"},
            {"prompt": "Triple n.", "tests": json.dumps([{"stdin": "2", "stdout": "6"}])}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    math_row, double, add, triple = load_prompts(path)
    assert math_row.kind == "reasoning" and math_row.reference == "5"
    assert double.kind == "code" and double.reference == CodeTests(io=(("1\n", "2\n"), ("", "0")))
    assert add.reference == CodeTests(test_code="assert add(1, 2) == 3") and add.answer is None
    assert triple.tests == (("2", "6"),)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "tests": []}, r"line 1: field 'tests' must be a non-empty list"),
    ({"prompt": "p", "tests": {"stdin": "1"}}, r"line 1: field 'tests' must be"),
    ({"prompt": "p", "tests": [{"stdin": "1", "stdout": "2"}, {"stdin": "1"}]}, r"line 1: field 'tests'\[1\]"),
    ({"prompt": "p", "tests": [{"stdin": 1, "stdout": "2"}]}, r"line 1: field 'tests'\[0\]"),
    ({"prompt": "p", "tests": "[{"}, r"line 1: field 'tests' is a string but not JSON"),
    ({"prompt": "p", "test_code": "  "}, r"line 1: field 'test_code' must be non-empty code"),
    ({"tests": [{"stdout": "1"}]}, r"line 1: missing field 'prompt'"),
])
def test_bad_code_rows_name_the_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, " + message) as err:
        load_prompts(path)
    assert "\n" not in str(err.value)


@needs_sandbox
def test_rollout_scorer_uses_each_rows_own_reward(judge):
    rules = build_reward_composer({"accuracy": 1.0, "format": 0.5, "code": 2.0}, num_workers=0, code_judge=judge)
    kinds = ["reasoning", "code", "code", "reasoning"]
    completions = [" <think>7+8=15</think> <answer>15</answer>", answer("print(int(input()) * 2)"),
                   answer("print(0)"), " <think>7+8=14</think> <answer>14</answer>"]
    out = RolloutScorer(rules).score(kinds, ["q"] * 4, completions, ["15", DOUBLE, DOUBLE, "15"])
    assert out.total == [1.5, 2.5, 0.5, 0.5]  # accuracy + 0.5 format; 2 * code + 0.5 format
    acc, code, frac = out.components["accuracy"], out.components["code"], out.components["code_pass_frac"]
    assert acc[0] == 1.0 and acc[3] == 0.0 and math.isnan(acc[1]) and math.isnan(acc[2])
    assert code[1:3] == [1.0, 0.0] and math.isnan(code[0]) and math.isnan(frac[3])
    assert frac[1:3] == [1.0, 0.0] and nanmean(frac) == 0.5
    # math-only batches never call the judge (code NaN everywhere), and code rows need the code reward
    only_math = RolloutScorer(rules).score(["reasoning"], ["q"], completions[:1], ["15"])
    assert only_math.total == [1.5] and math.isnan(only_math.components["code"][0])
    with pytest.raises(ValueError, match="code prompts .* need the code reward"):
        RolloutScorer(build_reward_composer({"accuracy": 1.0}, num_workers=0)).score(
            ["code"], ["q"], completions[1:2], [DOUBLE])


@needs_sandbox
def test_128_completions_through_the_reward_pool(judge):
    tests = CodeTests(io=tuple((f"{i}\n", f"{2 * i}\n") for i in range(10)))
    good, bad = answer("print(2 * int(input()))"), answer("print(2 * int(input()) + 1)")
    completions = [good if i % 4 else bad for i in range(128)]
    with build_reward_composer({"code": 1.0, "format": 0.0}, num_workers=2, code_judge=judge) as pool:
        pool.score(completions[:2], [tests] * 2)  # workers started
        started = time.monotonic()
        out = pool.score(completions, [tests] * 128)
        seconds = time.monotonic() - started
    assert out.components["code"] == [1.0 if i % 4 else 0.0 for i in range(128)]
    assert out.num_errors == out.num_timeouts == 0
    print(f"128 completions x 10 tests through 2 reward workers: {seconds:.1f} s")
    assert seconds < 90  # a few seconds on 2 idle cores; generous for loaded CI machines


# --------------------------------------------------------------------------- without a sandbox
def test_unsandboxed_judge_is_refused_unless_allowed(monkeypatch, capsys):
    from r1_engine.engine.rewards import code

    weak = Sandbox(None, "rlimits", "no C compiler found", get_sandbox().python)
    monkeypatch.setattr(code, "get_sandbox", lambda: weak)
    monkeypatch.setattr(code, "_WARNED", False)
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: .*--reward\.allow-unsandboxed-code") as err:
        make_code_judge(where="rows.jsonl:3")
    assert "\n" not in str(err.value)
    judge = make_code_judge(LIMITS, allow_unsandboxed=True)
    make_code_judge(LIMITS, allow_unsandboxed=True)
    assert capsys.readouterr().err.count("UNSANDBOXED") == 1  # loud, once per run
    assert code_reward(answer("print(int(input()) * 2)"), DOUBLE, judge) == (1.0, {"code_pass_frac": 1.0})
    verdict = judge.judge("python", "import time\ntime.sleep(10)", CodeTests(io=(("", ""),)))
    assert verdict.statuses in (("timeout",), ("signal",))


def test_trainer_refuses_code_prompts_without_a_sandbox(tmp_path, monkeypatch):
    from r1_engine.engine.config import GRPOConfig
    from r1_engine.engine.rewards import code
    from r1_engine.engine.scoring import build_code_judge

    monkeypatch.setattr(code, "get_sandbox", lambda: Sandbox(None, "rlimits", "no C compiler found", "python3"))
    path = tmp_path / "code.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "Double.", "tests": [{"stdin": "1", "stdout": "2"}]}\n')
    examples = load_prompts(path)
    assert build_code_judge(GRPOConfig().reward, examples[:1]) is None  # no code prompt: no judge, no check
    with pytest.raises(ValueError, match=r"code\.jsonl:2 \(a code prompt\).*--reward\.allow-unsandboxed-code"):
        build_code_judge(GRPOConfig().reward, examples)


@pytest.mark.parametrize("key, value, message", [
    ("code_test_timeout_s", 0.0, "--reward.code-test-timeout-s=0.0: must be > 0"),
    ("code_timeout_s", 1.0, "--reward.code-timeout-s=1.0: must be >= --reward.code-test-timeout-s"),
    ("code_memory_mb", 16, "--reward.code-memory-mb=16: must be >= 64"),
    ("code_workers", 0, "--reward.code-workers=0: must be >= 1"),
])
def test_code_settings_are_range_checked(key, value, message):
    from r1_engine.engine.config import GRPOConfig, check_ranges

    cfg = GRPOConfig()
    cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, **{key: value}))
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("+", r"\+")):
        check_ranges(cfg)


# --------------------------------------------------------------------------- the trainer on code prompts
@needs_sandbox
def test_trainer_smoke_run_on_code_prompts(tmp_path):
    from r1_engine.engine.trainer import GRPOTrainer
    from tests.engine._trainer_common import tiny_config, write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model")
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": f"Print {i} doubled.", "tests": [{"stdin": f"{i}", "stdout": f"{2 * i}"}]} for i in range(3)]
    rows += [{"prompt": "What is 2 + 3?", "answer": "5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path / "run", steps=2)
    cfg = dataclasses.replace(  # one epoch, no reference model: fewer kernel runs in Triton's CPU interpreter
        cfg, reward=dataclasses.replace(cfg.reward, code_test_timeout_s=1.0, code_timeout_s=5.0),
        algo=dataclasses.replace(cfg.algo, epochs_per_batch=1), loss=dataclasses.replace(cfg.loss, beta=0.0))
    trainer = GRPOTrainer(cfg, model_dir, load_prompts(path))
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    assert len(history) == 2
    for metrics in history:  # a random model writes no program: the code reward is there, and 0
        assert metrics["reward/code"] == 0.0 and metrics["reward/code_pass_frac"] == 0.0
        assert math.isfinite(metrics["reward/mean"])
    assert any("reward/accuracy" in m for m in history)  # the math row keeps the accuracy reward
    assert os.path.exists(tmp_path / "run" / "metrics.jsonl")
