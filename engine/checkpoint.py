"""Atomic, durable checkpoints with exact resume.

Layout of `out/checkpoints/step_000012/`:
    rank00000.pt    this rank's model shard (Megatron state dict), optimizer state and RNG states
    trainer.json    step, data-sampler position and what else the trainer needs (written by rank 0)
Every rank writes into `step_000012.tmp/` and fsyncs its files; after a barrier rank 0 fsyncs the directory,
renames it to `step_000012/`, fsyncs `checkpoints/`, then replaces `latest` (a one-line file, itself written
to a temporary file and fsynced first) and fsyncs `checkpoints/` again. A crash or power cut mid-save leaves
a `.tmp` dir that is never read, so `latest` always names a complete checkpoint. After a successful save rank 0
deletes the checkpoints older than the newest `keep` (never the one `latest` names) and crashed saves' leftovers.

Files are read with torch.load(weights_only=True): tensors and plain data only (RNG states are stored as
tensors, ints and strings), so a tampered or foreign checkpoint is refused instead of running its code.

What a rank's state is (the model shard, the optimizer, and Megatron's DistributedOptimizer state sharded over
DP ranks, one more file per tensor/pipeline slice) is parallel.optim's business (`training_state`,
`save_sharded_optimizer_state`, `load_training_state`; with expert parallelism the experts' optimizer state has its
own file per expert-parallel rank); this module makes the files durable and atomic. The
CPU path (FP32Optimizer) is tested here; the DistributedOptimizer path is UNVERIFIED (no GPU yet).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from r1_engine.parallel.optim import (
    load_training_state,
    save_sharded_optimizer_state,
    training_state,
)


def _rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain values (weights_only-loadable)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:  # checkpoints written before the plain-data format: random.getstate() and np.random.get_state() tuples
        random.setstate((py[0], tuple(py[1]), py[2]))
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(out: str | Path, step: int, *, model: torch.nn.Module, optimizer: Any,
                    trainer_state: dict[str, Any], keep: int | None = None, rank_state: Any = None) -> Path:
    """Collective: every rank calls it. Returns the final directory. keep: checkpoints kept (None: all).
    rank_state: this rank's own trainer data (tensors and plain data), in its rank file; load_checkpoint returns
    it as the trainer state's "rank_state"."""
    final = step_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    blob = {**training_state(model, optimizer), "rng": _rng_state()}
    if rank_state is not None:
        blob["rank_state"] = rank_state
    _save_synced(blob, tmp / f"rank{rank:05d}.pt")
    for sharded in save_sharded_optimizer_state(optimizer, tmp):  # written by DP rank 0 of each slice and part
        _fsync(sharded)
    if rank == 0:
        _write_text_synced(tmp / "trainer.json", json.dumps(trainer_state, indent=1))
    _barrier()
    if rank == 0:
        _fsync(tmp)
        old = final.with_name(final.name + ".old")
        if final.exists():  # the same step saved again: the old copy stays until `latest` is rewritten
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent)
        latest_tmp = final.parent / "latest.tmp"
        _write_text_synced(latest_tmp, final.name + "\n")
        os.replace(latest_tmp, final.parent / "latest")
        _fsync(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        if keep is not None:
            _prune(final.parent, step, keep)
    _barrier()
    return final


def _prune(ckpt_dir: Path, step: int, keep: int) -> None:
    """Delete step_* dirs beyond the newest `keep` of those up to `step` (which `latest` now names), and the
    .tmp/.old dirs crashed saves left. Dirs past `step` (a save whose `latest` update a crash lost) are left."""
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    done = []
    for p in ckpt_dir.iterdir():
        m = re.fullmatch(r"step_(\d+)(\.tmp|\.old)?", p.name)
        if m is None or not p.is_dir():
            continue
        if m.group(2):
            shutil.rmtree(p, ignore_errors=True)
        elif int(m.group(1)) <= step:
            done.append((int(m.group(1)), p))
    for s, p in sorted(done)[:-keep]:
        if s != step:
            shutil.rmtree(p)


def latest_checkpoint(out: str | Path) -> Path | None:
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.exists() and (path.with_name(path.name + ".old") / "trainer.json").is_file():
        return path.with_name(path.name + ".old")  # a crash while the same step was saved again
    if not (path / "trainer.json").is_file():
        raise ValueError(f"{pointer} names {path.name}, which has no trainer.json: the checkpoint is incomplete")
    return path


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Restore this rank's model, optimizer and RNG states; returns the trainer state (with this rank's own
    "rank_state" where one was saved)."""
    path = Path(path)
    rank_file = path / f"rank{_rank():05d}.pt"
    if not rank_file.is_file():
        world = dist.get_world_size() if dist.is_initialized() else 1
        raise ValueError(f"{rank_file} is missing: the checkpoint was written by a different number of ranks "
                         f"than this run's {world}")
    try:  # tensors and plain data only: unpickling anything else could run code
        blob = torch.load(rank_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        why = next((x.strip() for x in str(err).splitlines() if "GLOBAL" in x), str(err).splitlines()[0])
        raise ValueError(f"{rank_file}: refused: it holds objects other than tensors and plain data, which could "
                         f"run code when loaded (not a checkpoint of this trainer, or tampered with): {why}") from None
    except (EOFError, RuntimeError, OSError) as err:
        raise ValueError(f"{rank_file}: cannot be read, truncated or corrupt ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    load_training_state(model, optimizer, blob, path)
    _set_rng_state(blob["rng"])
    state = json.loads((path / "trainer.json").read_text())
    if "rank_state" in blob:
        state["rank_state"] = blob["rank_state"]
    return state
