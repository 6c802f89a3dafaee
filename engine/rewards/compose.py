"""Weighted sum of rule-based rewards, computed in a pool of worker processes with a per-sample timeout.

    with build_reward_composer({"accuracy": 1.0, "format": 0.5}) as composer:
        out = composer.score(completions, references)     # out.total[i] = sum_k w_k * component_k[i]

Each (component, completion) pair is one task; `score(..., select=)` limits a row to some components (the others
are NaN for it: a code row has no accuracy). A component may return (value, {metric: number}) to report per-row
metrics beside its value (the code reward's pass fraction): they join `components` (NaN on other rows) and add
nothing to the total. A task that raises, returns a non-finite value, or
crashes its worker scores 0 and counts in `num_errors`; one that runs past `timeout_s` scores 0 and
counts in `num_timeouts` (a spec may set its own timeout: the code judge's budget): its worker is killed (a hang in C code, e.g. sympy on a giant integer,
cannot be interrupted any other way) and a fresh one is spawned. Workers stay alive between calls,
so their imports (sympy, math-verify) and parse caches are paid for once. `num_workers=0` runs
everything inline in the calling process, without timeouts (tests, debugging).
"""
from __future__ import annotations

import functools
import math
import multiprocessing as mp
import pickle
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Callable, Sequence

from r1_engine.engine.rewards.accuracy import accuracy_reward
from r1_engine.engine.rewards.code import CodeJudge, code_reward
from r1_engine.engine.rewards.format import format_reward
from r1_engine.engine.rewards.language import SUPPORTED_LANGUAGES, language_consistency_reward

WORKER_START_TIMEOUT_S = 180.0  # spawning a worker imports sympy; generous for loaded machines
MAX_ERROR_MESSAGES = 8


# --------------------------------------------------------------------------- the registry
# Every registered reward takes (completion, reference) so the composer can call them alike.
def accuracy_component(completion: str, reference: str | None) -> float:
    return accuracy_reward(completion, reference)


def format_component(completion: str, reference: str | None = None) -> float:
    return format_reward(completion)


def language_component(completion: str, reference: str | None = None, *, target_language: str = "en") -> float:
    return language_consistency_reward(completion, target_language)


def code_component(completion: str, reference, *, judge: CodeJudge | None = None) -> tuple[float, dict[str, float]]:
    """reference: the row's engine.rewards.code.CodeTests; judge None: probed in this process."""
    return code_reward(completion, reference, judge)


REWARDS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy_component,
    "format": format_component,
    "language": language_component,
    "code": code_component,
}
_NEEDS_REFERENCE = {"accuracy", "code"}
CODE_TIMEOUT_SLACK_S = 30.0  # the code task's timeout: the judge's completion budget plus this (launcher start-up)
NAN = float("nan")


@dataclass(frozen=True)
class RewardSpec:
    """One weighted component. `fn(completion, reference) -> float` must be picklable (a module-level
    function or a functools.partial of one) when the composer uses worker processes."""

    name: str
    fn: Callable[[str, str | None], float]
    weight: float
    needs_reference: bool = False  # score() rejects a None reference up front instead of scoring 0
    timeout_s: float | None = None  # None: the composer's


@dataclass
class RewardOutput:
    total: list[float]
    components: dict[str, list[float]]
    num_errors: int = 0
    num_timeouts: int = 0
    error_messages: list[str] = field(default_factory=list)  # the first few, for logs


# --------------------------------------------------------------------------- worker processes
def _worker_main(conn, fns) -> None:
    """Loop of one worker process: receive (task_id, spec_index, completion, reference), send back
    (task_id, ok, value_or_message). None or a closed pipe ends it."""
    from r1_engine.engine.rewards.accuracy import answers_equivalent

    answers_equivalent("1/2", "0.5")  # warm up math-verify's lazily built parser before taking work
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, spec_index, completion, reference = message
        try:
            conn.send((task_id, True, _checked(fns[spec_index](completion, reference))))
        except Exception as exc:  # a reward's bug must not kill the worker
            conn.send((task_id, False, f"{type(exc).__name__}: {exc}"))


def _checked(value) -> tuple[float, dict[str, float]]:
    """(value, extra metrics) from a component's number or (number, {metric: number})."""
    extras = {}
    if isinstance(value, tuple):
        value, extras = value
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"reward returned a non-finite value {value}")
    return value, {str(k): float(v) for k, v in extras.items()}


class _Worker:
    def __init__(self, context, fns) -> None:
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_conn, fns), daemon=True)
        self.process.start()
        child_conn.close()
        self.spawned_at = time.monotonic()
        self.ready = False
        self.task: tuple[int, int] | None = None  # (spec_index, sample_index) in flight
        self.task_started = 0.0

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=2)
        self.kill()


# --------------------------------------------------------------------------- the composer
class RewardComposer:
    def __init__(self, specs: Sequence[RewardSpec], num_workers: int = 2, timeout_s: float = 10.0) -> None:
        specs = list(specs)
        if not specs:
            raise ValueError("RewardComposer: no reward specs given")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"RewardComposer: duplicate reward names in {names}")
        for spec in specs:
            if not math.isfinite(spec.weight):
                raise ValueError(f"RewardComposer: reward {spec.name!r} has non-finite weight {spec.weight}")
        if num_workers < 0:
            raise ValueError(f"RewardComposer: num_workers must be >= 0, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"RewardComposer: timeout_s must be > 0, got {timeout_s}")
        self.specs = specs
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self._fns = [spec.fn for spec in specs]
        self._timeouts = [float(spec.timeout_s or timeout_s) for spec in specs]
        self._workers: list[_Worker] = []
        self._closed = False
        if num_workers > 0:
            for spec in specs:
                try:
                    pickle.dumps(spec.fn)
                except Exception as exc:
                    raise ValueError(
                        f"RewardComposer: reward {spec.name!r} is not picklable ({exc}); use a module-level "
                        "function or functools.partial, or num_workers=0"
                    ) from exc
            self._context = mp.get_context("spawn")  # fork is unsafe once torch/CUDA threads exist
            self._workers = [_Worker(self._context, self._fns) for _ in range(num_workers)]

    # ---- public API
    def score(self, completions: Sequence[str], references: Sequence, select=None) -> RewardOutput:
        """select: per row, the names of the components to score it with (None: all of them, every row)."""
        if self._closed:
            raise RuntimeError("RewardComposer.score called after close()")
        if len(completions) != len(references):
            raise ValueError(
                f"RewardComposer.score: {len(completions)} completions but {len(references)} references"
            )
        n = len(completions)
        if select is not None and len(select) != n:
            raise ValueError(f"RewardComposer.score: {n} completions but {len(select)} rows in select")
        chosen = [[select is None or spec.name in select[i] for spec in self.specs] for i in range(n)]
        for k, spec in enumerate(self.specs):
            if spec.needs_reference:
                missing = [i for i, reference in enumerate(references) if reference is None and chosen[i][k]]
                if missing:
                    raise ValueError(
                        f"RewardComposer.score: reward {spec.name!r} needs a reference, but references"
                        f"{missing[:10]} are None"
                    )
        values = [[0.0 if chosen[i][k] else NAN for i in range(n)] for k in range(len(self.specs))]
        tally = {"errors": 0, "timeouts": 0, "messages": [], "extras": {}, "n": n}
        tasks = [(k, i) for i in range(n) for k in range(len(self.specs)) if chosen[i][k]]
        if self.num_workers == 0:
            self._run_inline(tasks, completions, references, values, tally)
        else:
            try:
                self._run_pool(tasks, completions, references, values, tally)
            except BaseException:
                # Interrupted mid-batch (Ctrl-C, start-up failure): workers still busy would later send
                # results nobody expects, so replace them before re-raising.
                for index, worker in enumerate(self._workers):
                    if worker.task is not None:
                        self._replace(index)
                raise
        total = [sum(spec.weight * values[k][i] for k, spec in enumerate(self.specs) if chosen[i][k])
                 for i in range(n)]
        return RewardOutput(
            total=total,
            components={**{spec.name: values[k] for k, spec in enumerate(self.specs)}, **tally["extras"]},
            num_errors=tally["errors"],
            num_timeouts=tally["timeouts"],
            error_messages=tally["messages"],
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def __enter__(self) -> "RewardComposer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- execution
    @staticmethod
    def _fail(tally: dict, kind: str, message: str) -> None:
        tally[kind] += 1
        if len(tally["messages"]) < MAX_ERROR_MESSAGES:
            tally["messages"].append(message)

    @staticmethod
    def _record(values, tally, k: int, i: int, result: tuple[float, dict[str, float]]) -> None:
        values[k][i] = result[0]
        for name, value in result[1].items():
            tally["extras"].setdefault(name, [NAN] * tally["n"])[i] = value

    def _run_inline(self, tasks, completions, references, values, tally) -> None:
        for k, i in tasks:
            try:
                self._record(values, tally, k, i, _checked(self._fns[k](completions[i], references[i])))
            except Exception as exc:
                self._fail(tally, "errors", f"{self.specs[k].name}[{i}]: {type(exc).__name__}: {exc}")

    def _replace(self, index: int) -> None:
        self._workers[index].kill()
        self._workers[index] = _Worker(self._context, self._fns)

    def _run_pool(self, tasks, completions, references, values, tally) -> None:
        pending = deque(tasks)
        next_id = 0
        task_ids: dict[int, tuple[int, int]] = {}
        while pending or any(worker.task is not None for worker in self._workers):
            for index, worker in enumerate(self._workers):  # hand work to every idle, ready worker
                if worker.ready and worker.task is None and pending:
                    k, i = pending.popleft()
                    try:
                        worker.conn.send((next_id, k, completions[i], references[i]))
                    except OSError:  # the worker died while idle: the task never started, so re-queue it
                        pending.appendleft((k, i))
                        self._replace(index)
                        continue
                    task_ids[next_id] = (k, i)
                    worker.task, worker.task_started = (k, i), time.monotonic()
                    next_id += 1

            now = time.monotonic()
            deadlines = [w.task_started + self._timeouts[w.task[0]] for w in self._workers if w.task is not None]
            deadlines += [w.spawned_at + WORKER_START_TIMEOUT_S for w in self._workers if not w.ready]
            wait(
                [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers],
                timeout=max(0.0, min(deadlines) - now) if deadlines else None,
            )

            for index, worker in enumerate(self._workers):
                # Drain what the worker sent before looking at whether it is alive.
                try:
                    while worker.conn.poll():
                        message = worker.conn.recv()
                        if message == "ready":
                            worker.ready = True
                            continue
                        task_id, ok, result = message
                        k, i = task_ids.pop(task_id)
                        worker.task = None
                        if ok:
                            self._record(values, tally, k, i, result)
                        else:
                            self._fail(tally, "errors", f"{self.specs[k].name}[{i}]: {result}")
                except (EOFError, OSError):
                    pass
                now = time.monotonic()
                if not worker.process.is_alive():
                    if not worker.ready:
                        raise RuntimeError(
                            f"RewardComposer: a reward worker exited during start-up (exit code "
                            f"{worker.process.exitcode}); see its stderr above. Workers are spawned: the "
                            "main script must start the run under `if __name__ == \"__main__\":`"
                        )
                    if worker.task is not None:
                        k, i = worker.task
                        self._fail(
                            tally, "errors",
                            f"{self.specs[k].name}[{i}]: worker died (exit code {worker.process.exitcode})",
                        )
                    self._replace(index)
                elif worker.task is not None and now - worker.task_started > self._timeouts[worker.task[0]]:
                    k, i = worker.task
                    self._fail(tally, "timeouts", f"{self.specs[k].name}[{i}]: timed out after {self._timeouts[k]}s")
                    self._replace(index)
                elif not worker.ready and now - worker.spawned_at > WORKER_START_TIMEOUT_S:
                    raise RuntimeError(
                        f"RewardComposer: a reward worker did not start within {WORKER_START_TIMEOUT_S}s"
                    )


def check_reward_weights(weights: dict[str, float], language: str = "en") -> None:
    """Reward names and the target language, checked before anything expensive is built."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"reward.weights: unknown reward(s) {unknown}; known rewards: {', '.join(REWARDS)}")
    if "language" in weights and language not in SUPPORTED_LANGUAGES:
        raise ValueError(
            f"reward.language: unsupported language {language!r} for the language reward; supported: "
            f"{SUPPORTED_LANGUAGES}"
        )


def build_reward_composer(
    weights: dict[str, float],
    *,
    language: str = "en",
    num_workers: int = 2,
    timeout_s: float = 10.0,
    code_judge: CodeJudge | None = None,
) -> RewardComposer:
    """A composer of the registered rewards named in `weights` (name -> weight). code_judge: the code reward's
    (engine.rewards.code.make_code_judge; None: each worker probes its own sandbox)."""
    check_reward_weights(weights, language)
    specs = []
    for name, weight in weights.items():
        fn, timeout = REWARDS[name], None
        if name == "language":
            fn = functools.partial(fn, target_language=language)
        if name == "code":
            fn = functools.partial(fn, judge=code_judge)
            budget = code_judge.limits.completion_timeout_s if code_judge is not None else 60.0
            timeout = max(timeout_s, budget + CODE_TIMEOUT_SLACK_S)
        specs.append(RewardSpec(name, fn, float(weight), needs_reference=name in _NEEDS_REFERENCE, timeout_s=timeout))
    return RewardComposer(specs, num_workers=num_workers, timeout_s=timeout_s)
