"""Run a function on N local processes over gloo, as torchrun would, and collect what each returns.

    results = run_distributed(worker, 4, arg1, arg2)   # results[rank] = worker(arg1, arg2) on rank

`worker` must be importable by the spawned children (a module-level function of a module under
tests/, not a lambda or a closure). Each child gets torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one intra-op thread (the test machine
has few cores), and is torn down with `parallel.state.destroy_parallel()` afterwards. Return
values travel through `torch.save`, so tensors are fine. A failure on any rank raises
RuntimeError carrying that rank's traceback.
"""
from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

__all__ = ["run_distributed", "free_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        value = fn(*args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # report everything, including assertion failures, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from r1_engine.parallel.state import destroy_parallel

            destroy_parallel()
        except Exception:
            pass
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run `fn(*args)` on `world_size` spawned gloo processes; return the per-rank results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, fn, args, results), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size and not failures:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue_module.Empty:
                # A child that died without reporting (crash at start-up, killed) would
                # otherwise leave us waiting for the whole timeout.
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in collected]
                if dead:
                    failures.append(f"ranks {dead} exited with codes {[procs[i].exitcode for i in dead]}")
                elif time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(collected))
                    failures.append(f"timed out after {timeout:.0f}s waiting for ranks {missing}")
                continue
            if ok:
                collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                failures.append(f"rank {rank} failed:\n{payload}")  # others may be stuck in a collective
    finally:
        for proc in procs:
            proc.join(timeout=5 if failures else 60)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    if failures:
        raise RuntimeError("\n".join(failures))
    bad_exit = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (0, None)]
    if bad_exit:
        raise RuntimeError(f"processes exited abnormally (rank, exitcode): {bad_exit}")
    return [collected[rank] for rank in range(world_size)]
