"""Code reward: the completion's final program passes the row's tests in the sandboxed judge (GRPO_SPEC.md, Rewards).

    judge = make_code_judge(CodeLimits(test_timeout_s=2))          # probes the sandbox once; refuses a weak one
    reward, metrics = code_reward(completion, CodeTests(io=(("1 2\\n", "3\\n"),)), judge)
    # reward 1.0 iff every test passes; metrics["code_pass_frac"]: the fraction that did

The program is the last fenced ```python (py, python3) or ```cpp (c++, cc, cxx) block of the answer section (the
accuracy reward's answer region: after </think>, or the readable summary); an unterminated block does not count. A
row's tests are (stdin, expected stdout) pairs, an assert-style test_code appended to the program (MBPP / HumanEval
shape), or both. A test fails on a wrong output (compared after trimming trailing whitespace per line and trailing
blank lines), a non-zero exit, a timeout or a limit hit. C++ is compiled (g++/clang++, -O2 -std=c++17) inside the
sandbox under its own limits. Python programs get the standard library only.

One completion is one sandbox run (engine/sandbox.py) of the harness (code_harness.py), which runs every test in a
fork of itself; the expected outputs stay outside the sandbox, and each test's input is sent as its own frame that
the harness reads only right before that test (a test never holds a later test's input). Between tests the harness
kills the test's whole process tree and empties the cwd. Many completions run concurrently in the reward worker
pool (one per worker: size the pool by the cores, reward.code_workers). The run's wall clock is the completion's
budget: compile + tests x per-test limit, at most completion_timeout_s; tests it cuts off fail.

Not guaranteed (docs/code_judge.md lists what was tested per isolation): a failed assert-style test is trustworthy,
a passed one only shows that the program exited 0 after printing a nonce the harness adds once the test code ran to
its end; a program can still defeat it from inside its own process (overriding __eq__, reading the harness's
frames). C++ test_code passes on exit status 0 alone.
"""
from __future__ import annotations

import marshal
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from r1_engine.engine.data import CodeTests  # a row's tests live with the data (engine.data)
from r1_engine.engine.rewards.accuracy import answer_region
from r1_engine.engine.sandbox import Limits, Sandbox, describe, find_cxx, get_sandbox

HARNESS = (Path(__file__).with_name("code_harness.py")).read_text()
_FENCE = re.compile(r"```[ \t]*(python3?|py|cpp|c\+\+|cc|cxx)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_LANGUAGES = {"python": "python", "python3": "python", "py": "python"}  # everything else matched is C++


@dataclass(frozen=True)
class CodeLimits:
    test_timeout_s: float = 2.0  # wall clock of one test run (CPU: the same, rounded up)
    memory_mb: int = 512  # the program's address space
    compile_timeout_s: float = 20.0
    compile_memory_mb: int = 2048
    completion_timeout_s: float = 60.0  # the most one completion's judging takes
    output_bytes: int = 1 << 16  # stdout allowed per test (at least twice the expected output); more fails it
    processes: int = 32  # threads included
    file_size_mb: int = 16
    work_mb: int = 64


@dataclass(frozen=True)
class Verdict:
    passed: int
    total: int
    statuses: tuple[str, ...] = ()  # per test: pass, wrong_output, exit, signal, timeout, output_limit, ...
    note: str = ""  # the compile error or why the judge itself failed

    @property
    def reward(self) -> float:
        return 1.0 if self.total and self.passed == self.total else 0.0

    @property
    def pass_frac(self) -> float:
        return self.passed / self.total if self.total else 0.0


@dataclass(frozen=True)
class CodeJudge:
    """Everything a reward worker needs to judge (picklable): the probed sandbox, the limits, the C++ compiler."""

    sandbox: Sandbox
    limits: CodeLimits = field(default_factory=CodeLimits)
    cxx: str | None = None

    def judge(self, language: str, source: str, tests: CodeTests) -> Verdict:
        """Run `source` on every test of `tests` in one sandbox run."""
        lim = self.limits
        if language == "cpp" and self.cxx is None:
            return Verdict(0, tests.count, ("no_compiler",) * tests.count, "no C++ compiler (g++, clang++) here")
        programs, inputs = [], []  # inputs: (stdin, stdout cap) per test, sent after the job, one frame each
        if tests.io:
            inputs += [(s, max(lim.output_bytes, 2 * len(out.encode()) + 4096)) for s, out in tests.io]
            programs.append({"language": language, "source": source, "tests": len(tests.io), "asserts": False})
        if tests.test_code is not None:
            inputs.append(("", lim.output_bytes))
            programs.append({"language": language, "source": f"{source}\n\n{tests.test_code}\n", "tests": 1,
                             "asserts": True})
        compile_s = lim.compile_timeout_s * len(programs) if language == "cpp" else 0.0
        wall = min(lim.completion_timeout_s, 1.0 + compile_s + tests.count * (lim.test_timeout_s + 0.3))
        job = {"programs": programs, "test_timeout_s": lim.test_timeout_s, "test_cpu_s": math.ceil(lim.test_timeout_s),
               "memory_mb": lim.memory_mb, "file_size_mb": lim.file_size_mb,
               "compile": {"argv": [self.cxx or "c++", "-O2", "-std=c++17", "-o", "prog", "prog.cpp"],
                           "timeout_s": lim.compile_timeout_s, "cpu_s": math.ceil(lim.compile_timeout_s),
                           "memory_mb": lim.compile_memory_mb, "file_size_mb": max(64, lim.file_size_mb)}}
        outer = Limits(wall_s=wall, cpu_s=math.ceil(wall), memory_mb=max(lim.memory_mb, lim.compile_memory_mb),
                       processes=lim.processes, file_size_mb=max(64, lim.file_size_mb), open_files=64,
                       work_mb=lim.work_mb,
                       output_bytes=sum(c for _, c in inputs) + 64 * tests.count + 8192 * len(programs))
        stream = b"".join(_frame(marshal.dumps(item, 4)) for item in (job, *inputs))
        run = self.sandbox.run([self.sandbox.python, "-I", "-S", "-c", HARNESS], stdin=stream, limits=outer)
        outputs, note = parse_frames(run.stdout)
        if run.status not in ("exited", "timeout") or (run.status == "exited" and run.exit_code != 0):
            note = note or f"judge run {run.status} (exit {run.exit_code}): {run.note} {run.stderr[-300:]!r}"
        expected = [out for _, out in tests.io] + ([None] if tests.test_code is not None else [])
        statuses = []
        for index, want in enumerate(expected):
            status, got = outputs.get(index, ("not_run" if run.status != "timeout" else "timeout", b""))
            if status == "ok":
                status = "pass" if want is None or same_output(got, want) else "wrong_output"
            statuses.append(status)
        return Verdict(statuses.count("pass"), len(statuses), tuple(statuses), note)


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


def parse_frames(data: bytes) -> tuple[dict[int, tuple[str, bytes]], str]:
    """The harness's results: test index -> (status, stdout), and the first compile error. A malformed or repeated
    frame ends the parse (what came before stands; the rest count as not run)."""
    outputs: dict[int, tuple[str, bytes]] = {}
    note, pos = "", 0
    while (end := data.find(b"\n", pos)) >= 0:
        parts = data[pos:end].split(b" ")
        pos = end + 1
        try:
            if parts[0] == b"R1C" and len(parts) == 3:
                size = int(parts[2])
            elif parts[0] == b"R1T" and len(parts) == 5:
                size, index = int(parts[4]), int(parts[1])
            else:
                break  # R1END, or garbage
        except ValueError:
            break
        payload, pos = data[pos:pos + size], pos + size
        if parts[0] == b"R1C":
            if parts[1] != b"ok" and not note:
                note = "compile error: " + payload.decode("utf-8", "replace")[:500]
            continue
        if index in outputs or len(payload) != size:
            break
        outputs[index] = (parts[2].decode("ascii", "replace"), payload)
    return outputs, note


def same_output(got: bytes, expected: str) -> bool:
    """Equal after trimming trailing whitespace on every line and trailing blank lines."""
    def norm(text: str) -> list[str]:
        lines = [line.rstrip() for line in text.split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(got.decode("utf-8", "replace")) == norm(expected)


def extract_program(completion: str) -> tuple[str, str] | None:
    """(language, source) of the last fenced python/cpp block in the answer section, or None."""
    blocks = _FENCE.findall(answer_region(completion))
    if not blocks:
        return None
    tag, source = blocks[-1]
    return _LANGUAGES.get(tag.lower(), "cpp"), source


_WARNED = False


def make_code_judge(limits: CodeLimits = CodeLimits(), *, allow_unsandboxed: bool = False,
                    where: str = "code prompts") -> CodeJudge:
    """The judge on this machine's best sandbox (the launcher is built here if needed). ValueError when that sandbox
    cannot contain a program and allow_unsandboxed is off; with it on, a loud warning, once per process."""
    global _WARNED
    sandbox = get_sandbox()
    if not sandbox.contained:
        if not allow_unsandboxed:
            raise ValueError(f"{where}: code rewards need the sandboxed judge, but here programs would run under "
                             f"{describe(sandbox)}; install a C compiler and run `python -m r1_engine.engine.sandbox --build`, "
                             f"or pass --reward.allow-unsandboxed-code to judge programs anyway (a hostile program "
                             f"can then read and write your files and use the network)")
        if not _WARNED:
            _WARNED = True
            bar = "!" * 100
            print(f"{bar}\nWARNING: code rewards run UNSANDBOXED programs: {describe(sandbox)}.\nA program the policy "
                  f"writes can read and write your files, reach the network and signal your processes.\n{bar}",
                  file=sys.stderr, flush=True)
    return CodeJudge(sandbox, limits, find_cxx())


def code_reward(completion: str, tests: CodeTests, judge: CodeJudge | None = None) -> tuple[float, dict[str, float]]:
    """(1.0 if the completion's program passes every test else 0.0, {"code_pass_frac": fraction passed})."""
    if not isinstance(tests, CodeTests):
        raise TypeError(f"the code reward's reference must be CodeTests (a code row's tests), got {type(tests).__name__}")
    program = extract_program(completion)
    if program is None or not program[1].strip():
        return 0.0, {"code_pass_frac": 0.0}
    verdict = (judge or make_code_judge()).judge(*program, tests)
    return verdict.reward, {"code_pass_frac": verdict.pass_frac}
