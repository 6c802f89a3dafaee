"""A rollout engine and its scorer in a process of their own, so that generation overlaps training.

    worker = RolloutWorker(WorkerSpec(model_dir, reward_config, plan, num_threads=1))
    worker.publish(convert.export_hf_state(policy), version=step)   # weights in, through shared memory
    ticket = worker.submit(items, n, params, version=step)           # returns at once; the worker generates
    scored = worker.result(ticket)                                   # (RolloutBatch, RewardOutput), in order

Weights: the first `publish` copies every tensor into a shared-memory buffer and hands the buffers to the worker
once; later ones copy in place. A request names the weights version it must be generated with, always the version
published when it was submitted; the worker loads the buffers into its own model when a request needs a version it
does not hold. `publish` first waits until the worker has started every request submitted so far (it has then
copied what it needs), so a new version never overwrites weights a queued request still has to read.

Requests run one at a time, in order. An error in the worker comes back as a RuntimeError naming the request; a
worker that died (killed, out of memory) is reported by `result` instead of waited for. The worker exits when its
parent dies (kill -9 included): it checks every second.

CPU: the worker is a process with its own torch threads (WorkerSpec.num_threads). A GPU placement (rollouts on
their own devices, weights over NCCL) is not built yet: the trainer refuses max_staleness > 0 with CUDA.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from r1_engine.engine.rollout.base import SamplingParams

_POLL_S = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """What the worker builds: an HF rollout engine on `model_dir` (its tokenizer too) and the scorer of `plan`
    (engine.sampling.plan_scoring) under `reward_config`."""

    model_dir: str
    reward_config: Any
    plan: Any
    dtype: str = "float32"
    num_threads: int | None = 1
    record_routing: bool = False


def _build_sampler(spec: WorkerSpec):
    from r1_engine.engine.data import load_tokenizer
    from r1_engine.engine.rollout.hf import HFRolloutEngine
    from r1_engine.engine.sampling import RolloutSampler, build_scorer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.dtype]
    engine = HFRolloutEngine(spec.model_dir, load_tokenizer(Path(spec.model_dir)), dtype=dtype,
                             num_threads=spec.num_threads, record_routing=spec.record_routing)
    return RolloutSampler(engine, build_scorer(spec.reward_config, spec.plan, device=torch.device("cpu"), dtype=dtype))


def _serve(spec: WorkerSpec, requests, results, started, parent: int) -> None:
    """The worker's loop: ("weights", buffers) once, then ("generate", ticket, items, n, params, version) until None."""
    if spec.num_threads is not None:
        torch.set_num_threads(spec.num_threads)
    try:
        sampler = _build_sampler(spec)
    except BaseException as err:  # noqa: BLE001 - reported to the trainer, which raises it
        results.put(("error", -1, f"building the rollout worker failed: {err!r}\n{traceback.format_exc()}"))
        return
    results.put(("ready", -1, None))
    buffers: dict[str, torch.Tensor] | None = None
    loaded = 0  # the weights the engine holds: model_dir's, version 0, until a version is loaded
    try:
        while True:
            try:
                message = requests.get(timeout=_POLL_S)
            except queue.Empty:
                if os.getppid() != parent:  # the trainer is gone (kill -9): nobody will read our results
                    return
                continue
            if message is None:
                return
            if message[0] == "weights":
                buffers = message[1]
                continue
            _, ticket, items, n, params, version = message
            try:
                if version != loaded:
                    if buffers is None:
                        raise RuntimeError(f"request {ticket} needs weights version {version}, none was published")
                    sampler.engine.update_weights(buffers.items())
                    loaded = version
                with started.get_lock():
                    started.value = ticket
                scored = sampler.generate_and_score(items, n, params)
                results.put(("done", ticket, (scored.rollout, scored.rewards)))
            except BaseException as err:  # noqa: BLE001
                with started.get_lock():
                    started.value = max(started.value, ticket)
                results.put(("error", ticket, f"{err!r}\n{traceback.format_exc()}"))
    finally:
        sampler.close()


def _stop(process, requests, grace_s: float) -> None:
    """Ask the worker to exit (it does after the request it is on), wait up to grace_s, then kill it."""
    if process.is_alive():
        try:
            requests.put(None)
        except (OSError, ValueError):  # the queue is closed already
            pass
        process.join(timeout=grace_s)
        if process.is_alive():
            process.kill()
            process.join()


@contextlib.contextmanager
def _main_module_hidden():
    """Start a spawned child without re-running the parent's __main__: the worker needs nothing from it, and a
    script read from stdin, a notebook or a script without an `if __name__ == "__main__"` guard would break it."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    if main is not None:
        main.__dict__.pop("__file__", None)
        main.__spec__ = None  # multiprocessing reads it; None: nothing to import
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


class RolloutWorker:
    """A rollout engine + scorer in its own process (see the module docstring). A context manager."""

    def __init__(self, spec: WorkerSpec, start_timeout_s: float = 600.0):
        ctx = mp.get_context("spawn")  # a clean interpreter: no copy of the trainer's threads, groups or models
        self._requests = ctx.Queue()
        self._results = ctx.Queue()
        self._started = ctx.Value("q", 0)
        # not a daemon: the worker starts the reward pool's processes; it exits by itself when its parent dies
        self._process = ctx.Process(target=_serve, args=(spec, self._requests, self._results, self._started,
                                                         os.getpid()), name="rollout-worker", daemon=False)
        with _main_module_hidden():
            self._process.start()
        # a trainer that dies of an exception never calls close(), and at exit multiprocessing joins its non-daemon
        # children: without this the process would wait for the worker forever
        self._finalizer = weakref.finalize(self, _stop, self._process, self._requests, 0.0)
        self._buffers: dict[str, torch.Tensor] | None = None
        self.version = 0  # the weights published last (0: model_dir's, which the worker starts from)
        self._next_ticket = 1
        self._submitted = 0  # the last ticket submitted
        self._done: dict[int, Any] = {}
        self._received = 0  # the last ticket whose result came back
        self._receive(-1, timeout_s=start_timeout_s)  # "ready", or the build error

    # ------------------------------------------------------------------------------------------ weights
    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Make `named_tensors` (HF names, full tensors) the weights of requests submitted from now on, as
        `version`. Waits until the worker has started every request submitted before (they read older weights)."""
        self._wait_started(self._submitted)
        if self._buffers is None:
            self._buffers = {name: t.detach().to("cpu", copy=True).contiguous().share_memory_()
                             for name, t in named_tensors}
            self._requests.put(("weights", self._buffers))
        else:
            seen = set()
            for name, t in named_tensors:
                buffer = self._buffers.get(name)
                if buffer is None or buffer.shape != t.shape:
                    raise ValueError(f"publish: {name!r} was not in the first published weights or changed shape")
                buffer.copy_(t.detach())
                seen.add(name)
            missing = set(self._buffers) - seen
            if missing:
                raise ValueError(f"publish: {sorted(missing)[:3]} were not streamed this time")
        self.version = version

    def _wait_started(self, ticket: int) -> None:
        while self._started.value < ticket:
            self._check_alive()
            time.sleep(0.001)

    # ------------------------------------------------------------------------------------------ requests
    def submit(self, items: Sequence, n: int, params: SamplingParams, version: int) -> int:
        """Queue n completions for each of `items` (engine.data.TokenizedPrompt) with weights `version` (0: the
        model directory's, or what was published as it); returns the ticket `result` takes."""
        ticket = self._next_ticket
        self._next_ticket += 1
        self._requests.put(("generate", ticket, list(items), n, params, version))
        self._submitted = ticket
        return ticket

    def result(self, ticket: int):
        """(RolloutBatch, RewardOutput) of `ticket`; waits for it."""
        while ticket not in self._done:
            self._receive(ticket)
        return self._done.pop(ticket)

    def generate_and_score(self, items: Sequence, n: int, params: SamplingParams):
        """Submit with the published version and wait: the synchronous call evaluations use."""
        from r1_engine.engine.sampling import ScoredRollout

        return ScoredRollout(*self.result(self.submit(items, n, params, self.version)))

    __call__ = generate_and_score

    def _receive(self, ticket: int, timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                kind, got, payload = self._results.get(timeout=_POLL_S)
                break
            except queue.Empty:
                self._check_alive()
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeError(f"the rollout worker did not start within {timeout_s:.0f} s")
        if kind == "error":
            what = "building the rollout worker" if got == -1 else f"rollout request {got}"
            raise RuntimeError(f"{what} failed in the rollout worker: {payload}")
        if kind == "done":
            self._done[got] = payload
            self._received = max(self._received, got)

    def _check_alive(self) -> None:
        if not self._process.is_alive():
            raise RuntimeError(f"the rollout worker (pid {self._process.pid}) died with exit code "
                               f"{self._process.exitcode} (killed, or out of memory)")

    # ------------------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self._finalizer.detach()
        # after any queued request: a worker with work left is stopped instead
        _stop(self._process, self._requests, 30.0 if self._received >= self._submitted else 0.0)
        for q in (self._requests, self._results):
            q.close()
            q.cancel_join_thread()

    def __enter__(self) -> RolloutWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
