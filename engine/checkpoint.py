"""Atomic checkpoints with exact resume.

Layout of `out/checkpoints/step_000012/`:
    rank00000.pt    this rank's model shard (Megatron state dict), optimizer state and RNG states
    trainer.json    step, data-sampler position and what else the trainer needs (written by rank 0)
Every rank writes into `step_000012.tmp/`; after a barrier rank 0 renames it to `step_000012/` and
then replaces `latest` (a one-line file) with os.replace. A crash mid-save leaves a `.tmp` dir that
is never read, so the previous checkpoint stays the latest one.

Megatron's DistributedOptimizer (the GPU default) keeps the Adam moments and fp32 master weights sharded
over DP ranks, outside `state_dict()`: they go to `optimizer_params_tpXX_ppYYY.pt` (one file per tensor/pipeline
slice: Megatron writes it from DP rank 0 of each slice) through its
`save_parameter_state` / `load_parameter_state` (collective). After loading, `reload_model_params()`
copies the restored model weights into any fp32 master copy. The CPU path (FP32Optimizer) is tested
here; the DistributedOptimizer path is UNVERIFIED (no GPU yet).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _is_distributed_optimizer(optimizer: Any) -> bool:
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(type(p).__name__ == "DistributedOptimizer" for p in parts)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _parameter_state_name() -> str:
    """DistributedOptimizer state file of this rank's tensor/pipeline slice (all its DP ranks share it)."""
    from megatron.core import parallel_state as mpu

    return (f"optimizer_params_tp{mpu.get_tensor_model_parallel_rank():02d}"
            f"_pp{mpu.get_pipeline_model_parallel_rank():03d}.pt")


def step_dir(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(out: str | Path, step: int, *, model: torch.nn.Module, optimizer: Any,
                    trainer_state: dict[str, Any]) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = step_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state()},
               tmp / f"rank{rank:05d}.pt")
    if _is_distributed_optimizer(optimizer):
        optimizer.save_parameter_state(str(tmp / _parameter_state_name()))
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = final.parent / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, final.parent / "latest")
    _barrier()
    return final


def latest_checkpoint(out: str | Path) -> Path | None:
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise ValueError(f"{pointer} names {path.name}, which has no trainer.json: the checkpoint is incomplete")
    return path


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Restore this rank's model, optimizer and RNG states; returns the trainer state."""
    path = Path(path)
    rank_file = path / f"rank{_rank():05d}.pt"
    if not rank_file.is_file():
        world = dist.get_world_size() if dist.is_initialized() else 1
        raise ValueError(f"{rank_file} is missing: the checkpoint was written by a different number of ranks "
                         f"than this run's {world}")
    blob = torch.load(rank_file, map_location="cpu", weights_only=False)
    model.load_state_dict(blob["model"])
    optimizer.reload_model_params()  # fp32 master weights follow the restored model
    optimizer.load_state_dict(blob["optimizer"])
    if _is_distributed_optimizer(optimizer):
        optimizer.load_parameter_state(str(path / _parameter_state_name()))
    _set_rng_state(blob["rng"])
    return json.loads((path / "trainer.json").read_text())
