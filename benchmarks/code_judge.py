"""Throughput of the code judge: `python -m benchmarks.code_judge` judges 128 trivial Python programs with 10
stdin/stdout tests each through 2 reward workers and prints wall and CPU seconds (a completion costs one launcher
start, one interpreter start and a fork per test)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from r1_engine.engine.data import CodeTests
from r1_engine.engine.rewards.code import make_code_judge


def benchmark(completions: int = 128, tests: int = 10, workers: int = 2) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the workers and everything they ran) to judge `completions` trivial Python
    programs with `tests` stdin/stdout tests each through a reward pool of `workers` processes."""
    import time

    from r1_engine.engine.rewards.compose import build_reward_composer

    def cpu(pids):  # utime + stime + reaped children's
        fields = [Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() for pid in pids]
        return sum(int(x) for f in fields for x in f[11:15]) / os.sysconf("SC_CLK_TCK")

    program = " <think>x</think> <answer>```python\nn = int(input())\nprint(2 * n)\n```</answer>"
    io = CodeTests(io=tuple((f"{i}\n", f"{2 * i}\n") for i in range(tests)))
    with build_reward_composer({"code": 1.0}, num_workers=workers, code_judge=make_code_judge()) as pool:
        pool.score([program] * workers, [io] * workers)  # workers started
        pids = [worker.process.pid for worker in pool._workers]
        before, started = cpu(pids), time.monotonic()
        out = pool.score([program] * completions, [io] * completions)
        wall, spent = time.monotonic() - started, cpu(pids) - before
    if out.total != [1.0] * completions:
        raise RuntimeError(f"benchmark: a correct program failed: {out.error_messages}")
    return wall, spent



def main() -> int:
    wall, cpu = benchmark(completions=128, tests=10, workers=2)
    print(f"code judge: 128 completions x 10 tests through 2 reward workers: {wall:.2f} s wall, {cpu:.2f} "
          f"CPU-seconds (load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
