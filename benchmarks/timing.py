"""Timing and memory of one Runner: CUDA events (wall clock on CPU), peak extra memory, device sync."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from benchmarks.runners import Runner


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    clock: str  # "cuda-events" or "wall"


def measure(runner: Runner, device, *, warmup: int = 2, min_reps: int = 5, max_reps: int = 30,
            target_s: float = 1.0) -> Timing:
    """Median time of runner.fn() over reps; runner.setup() before each call, outside the timed region.

    CUDA: events around each call (METHOD.md). CPU: wall clock after the call returns. The rep count is set
    from the last warm-up so that a measurement takes about target_s."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    last = 0.0
    for _ in range(max(1, warmup)):
        runner.setup()
        sync(device)
        t0 = time.perf_counter()
        runner.fn()
        sync(device)
        last = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, target_s / max(last, 1e-6))))
    times = []
    for _ in range(reps):
        runner.setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync(device)
            start.record()
            runner.fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            runner.fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(median_ms=times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1]
                                                                                 + times[len(times) // 2]),
                  min_ms=times[0], max_ms=times[-1], reps=reps, clock="cuda-events" if cuda else "wall")


def peak_extra_memory(runner: Runner, device) -> int | None:
    """Bytes allocated at the peak of one call beyond what was allocated before it (outputs included)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    runner.setup()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = runner.fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def free_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
