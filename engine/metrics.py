"""Training metrics: one jsonl line per step, TensorBoard scalars, a PNG of the curves, and phase timers.

metrics.jsonl is the source of truth (plain text, flushed every step so a crashed run keeps its history;
append-only but for a resume, which drops the rows logged after its checkpoint); TensorBoard is a
convenience that is skipped with one warning when unavailable.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from r1_engine.parallel.nvtx import nvtx_range


class MetricsLogger:
    """`log(step, {name: value})` appends {"step": step, **values} to out_dir/metrics.jsonl.

    Values must be real numbers (Python/NumPy scalars or one-element tensors); NaN/inf are written as
    JSON's NaN/Infinity extensions (Python's json reads them back), since a NaN loss is information.
    """

    def __init__(self, out_dir: str | Path, use_tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if use_tensorboard:
            try:
                self._writer = self._open_writer()
            except Exception as err:  # ImportError, or a broken tensorboard/protobuf install
                warnings.warn(f"TensorBoard logging disabled ({type(err).__name__}: {err}); metrics.jsonl "
                              f"is still written", stacklevel=2)

    def _open_writer(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=purge_step)

    def truncate_after(self, step: int) -> int:
        """Forget what was logged for steps > `step` (a resumed run redoes them): metrics.jsonl is rewritten
        atomically without those lines, and TensorBoard gets a new event file with purge_step=step + 1, which
        makes readers hide the older files' events at steps >= step + 1. Returns the number of lines dropped."""
        self._file.close()
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                if not line.strip() or int(json.loads(line)["step"]) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")  # the next record starts a line
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if number == len(lines) and not line.endswith("\n"):
                    continue  # the line a crash cut short: its step is redone
                raise ValueError(f"{self.path}, line {number}: not a metrics record ({line.strip()[:80]!r})") from None
        if kept != lines:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        # log() writes the jsonl line before the TensorBoard event, so nothing dropped here means nothing to purge
        if self._writer is not None and kept != lines:
            self._writer.close()
            self._writer = self._open_writer(purge_step=step + 1)
        return len(lines) - len(kept)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if "step" in metrics:
            raise ValueError("metric name 'step' is reserved for the step number")
        record: dict[str, float | int] = {"step": int(step)}
        for name, value in metrics.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"metric names must be non-empty strings, got {name!r}")
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"metric {name!r} is a tensor of shape {tuple(value.shape)}, expected a scalar")
                value = value.item()
            if isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "__float__")):
                raise ValueError(f"metric {name!r} must be a number, got {type(value).__name__}")
            record[name] = float(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name != "step":
                    self._writer.add_scalar(name, value, global_step=int(step))
            self._writer.flush()

    def read(self) -> list[dict[str, float]]:
        """All records of metrics.jsonl; when a resumed run re-logged a step, the later line wins."""
        self._file.flush()
        return read_metrics(self.path)

    def plot(self, path: str | Path | None = None, keys: Sequence[str] | None = None) -> Path:
        """Draw one subplot per metric (x = step) into a PNG; returns its path."""
        return plot_metrics(self.path, path or self.out_dir / "curves.png", keys)

    def plot_logged(self, keys: Sequence[str]) -> Path | None:
        """curves.png of those of `keys` that were logged (every logged metric when none of them was); None when
        nothing was logged."""
        logged = {k for record in self.read() for k in record}
        if not logged:
            return None
        return self.plot(keys=[k for k in keys if k in logged] or None)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    by_step: dict[int, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {line_number}: invalid JSON ({err.msg})") from None
            # a repeated step merges: eval metrics logged beside the train metrics, or a resume re-logging a step
            by_step.setdefault(int(record["step"]), {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


def plot_metrics(jsonl_path: str | Path, png_path: str | Path, keys: Sequence[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    records = read_metrics(jsonl_path)
    if keys is None:
        keys = sorted({name for record in records for name in record if name != "step"})
    else:
        present = {name for record in records for name in record}
        unknown = [k for k in keys if k not in present]
        if unknown:
            raise ValueError(f"{jsonl_path}: no metric named {unknown}")
    if not keys:
        raise ValueError(f"{jsonl_path}: no metrics to plot")
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


class PhaseTimer:
    """Wall-clock seconds per phase: `with timer("rollout"): ...`; repeated phases accumulate until reset().

    With sync_cuda=True the timer synchronises CUDA at each boundary, so asynchronous kernels are
    charged to the phase that launched them. Each phase is also an NVTX range of its name (parallel/nvtx.py).
    """

    def __init__(self, sync_cuda: bool = False):
        self.sync_cuda = sync_cuda and torch.cuda.is_available()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.sync_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            with nvtx_range(phase):
                yield
        finally:
            if self.sync_cuda:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        """{prefix + phase: seconds} for logging."""
        return {f"{prefix}{phase}": seconds for phase, seconds in self.seconds.items()}

    def reset(self) -> None:
        self.seconds = defaultdict(float)
