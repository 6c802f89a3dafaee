"""Capture chosen steps: `--train.profile-steps A:B` wraps steps A..B (inclusive, numbered as metrics.jsonl
numbers them) in the CUDA profiler API, so

    nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx,osrt \
        python recipes/r1_zero.py --train.profile-steps 3:4

records only those steps; `--train.torch-profiler` also runs the PyTorch profiler over them and writes a Chrome
trace per rank to <run dir>/profile/. Each step of the loop is an NVTX range "step N" (parallel/nvtx.py lists the
ranges inside it). Without CUDA the profiler API calls are skipped (the torch profiler still records CPU ops).
"""
from __future__ import annotations

from pathlib import Path

import torch

from r1_engine.engine.config import parse_profile_steps
from r1_engine.parallel.nvtx import enabled as nvtx_enabled

__all__ = ["StepProfiler", "parse_profile_steps"]


def _cuda_profiler_api():
    """torch.cuda.profiler (start/stop) with CUDA, else None: the calls are skipped (tests stand a recorder in)."""
    return torch.cuda.profiler if torch.cuda.is_available() else None


class StepProfiler:
    """`begin(step)` before a step of the loop, `end(step)` after it (its eval and checkpoint included).

    The CUDA profiler starts at the beginning of step A and stops at the end of step B, on this rank if `ranks`
    is empty or names it; a run resumed inside A..B captures from its first step on, once."""

    def __init__(self, steps: tuple[int, int] | None, rank: int = 0, ranks=(), out_dir: str | Path | None = None,
                 torch_profiler: bool = False):
        self.steps = steps
        self.active_rank = not ranks or rank in ranks
        self.rank = rank
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.torch_profiler = torch_profiler
        self.cuda_api = _cuda_profiler_api()
        self._torch_prof = None
        self.capturing = self.done = False
        self.trace_path: Path | None = None

    @classmethod
    def from_config(cls, train_cfg, rank: int, out_dir) -> StepProfiler:
        return cls(parse_profile_steps(train_cfg.profile_steps), rank, tuple(train_cfg.profile_ranks), out_dir,
                   train_cfg.torch_profiler)

    def begin(self, step: int) -> None:
        if nvtx_enabled():
            torch.cuda.nvtx.range_push(f"step {step}")
        if (self.steps is not None and self.active_rank and not (self.capturing or self.done)
                and self.steps[0] <= step <= self.steps[1]):
            self._start()

    def end(self, step: int) -> None:
        if self.capturing and step >= self.steps[1]:
            self._stop()
        if nvtx_enabled():
            torch.cuda.nvtx.range_pop()

    def close(self) -> None:
        """Stop a capture the loop left running (fewer steps than B); a no-op otherwise."""
        if self.capturing:
            self._stop()

    def _start(self) -> None:
        if self.torch_profiler:
            self._torch_prof = self._make_torch_profiler()
            self._torch_prof.__enter__()
        if self.cuda_api is not None:
            self.cuda_api.start()
        self.capturing = True

    def _stop(self) -> None:
        if self.cuda_api is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the captured steps' kernels finish inside the capture
            self.cuda_api.stop()
        if self._torch_prof is not None:
            self._torch_prof.__exit__(None, None, None)
            a, b = self.steps
            self.trace_path = self.out_dir / "profile" / f"trace_steps{a}-{b}_rank{self.rank}.json"
            self.trace_path.parent.mkdir(parents=True, exist_ok=True)
            self._torch_prof.export_chrome_trace(str(self.trace_path))
            self._torch_prof = None
        self.capturing, self.done = False, True

    def _make_torch_profiler(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        return profile(activities=activities, record_shapes=False, with_stack=False)
