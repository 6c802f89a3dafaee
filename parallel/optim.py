"""Wrap a pipeline stage for training (Megatron DDP) and build its Megatron optimizer.

    model = wrap_for_training(build_gpt_model(...))      # after load_hf_checkpoint
    optimizer = build_optimizer(model, lr=1e-6, weight_decay=0.0, grad_clip=1.0)
    metrics = parallel.step.train_step(model, optimizer, batch, loss_config, num_microbatches=4)

GPU: Megatron `DistributedDataParallel` (contiguous fp32 grad buffers, reduce-scatter over DP) with
Megatron's `DistributedOptimizer` (fp32 main weights and Adam state sharded over DP, bf16 model
weights when the model is bf16), via `get_megatron_optimizer`.

CPU (tests): the same Megatron DDP wrapper (the CPU shim of parallel.state lets it allocate its
buffers on CPU; the grad all-reduce runs over gloo) and Megatron's `FP32Optimizer` around
torch.optim.AdamW (Megatron's own fallback when neither TE nor Apex is installed), whose grad-norm
clip reduces over the model-parallel group, so it is TP/PP-correct. The DistributedOptimizer and
the bf16 optimizers are not used on CPU: they check `param.type() == "torch.cuda.FloatTensor"`.
So on CPU the model must be fp32, and each DP rank keeps the full Adam state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["wrap_for_training", "build_optimizer", "optimizer_step", "set_learning_rate", "training_state",
           "save_sharded_optimizer_state", "load_sharded_optimizer_state", "load_training_state"]


def wrap_for_training(
    model: torch.nn.Module,
    *,
    use_distributed_optimizer: bool | None = None,
    overlap_grad_reduce: bool = False,
    grad_reduce_in_fp32: bool = True,
    broadcast_params: bool = True,
) -> torch.nn.Module:
    """Megatron DistributedDataParallel around this stage's GPTModel, and the model-config hooks
    Megatron's schedules call (no_sync during micro-batches, finalize_model_grads after the last:
    DP reduction, tied-embedding gradient sum between first and last stage, sequence-parallel
    norm grads).

    use_distributed_optimizer: default True with CUDA, False on CPU (see module docstring); it
        must match `build_optimizer`, which reads it back from the wrapper.
    broadcast_params: copy DP rank 0's weights to the other DP ranks (they must start equal).
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from r1_engine.parallel.moe import defer_expert_bias_update

    if use_distributed_optimizer is None:
        use_distributed_optimizer = torch.cuda.is_available()
    if use_distributed_optimizer and not torch.cuda.is_available():
        raise ValueError("use_distributed_optimizer=True needs CUDA (Megatron's DistributedOptimizer "
                         "only accepts torch.cuda tensors)")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    if broadcast_params:
        ddp.broadcast_params()

    config = model.config
    config.no_sync_func = ddp.no_sync
    # the expert bias (DeepSeek-V3) moves when parallel.step / the trainer says, not inside every schedule
    config.finalize_model_grads_func = defer_expert_bias_update(finalize_model_grads)
    if overlap_grad_reduce:
        config.grad_sync_func = ddp.start_grad_sync
    return ddp


def build_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    grad_clip: float = 1.0,
    loss_scale: float | None = None,
) -> Any:
    """Megatron's optimizer (AdamW, decoupled weight decay) for a `wrap_for_training` model.

    Distributed (DP-sharded) optimizer when the wrapper was built with it; bf16/fp16 mixed
    precision follows the model's parameter dtype (fp32 main weights). `grad_clip` is the global
    L2 grad-norm clip (0 disables). Biases and norm weights get no weight decay: Megatron's standard
    param groups mark them `wd_mult=0.0`, which `_apply_group_weight_decay` turns into each group's
    decay. `loss_scale` only matters for fp16 (None = dynamic)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = getattr(model, "ddp_config", None)
    if ddp_config is None:
        raise ValueError("build_optimizer needs the model returned by wrap_for_training "
                         "(a Megatron DistributedDataParallel)")
    if lr <= 0:
        raise ValueError(f"build_optimizer: lr must be > 0, got {lr}")
    if grad_clip < 0:
        raise ValueError(f"build_optimizer: grad_clip must be >= 0, got {grad_clip}")
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    if not dtypes:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    if len(dtypes) > 1:
        raise ValueError(f"build_optimizer: mixed parameter dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    if dtype != torch.float32 and not torch.cuda.is_available():
        raise ValueError(f"build_optimizer: {dtype} parameters need CUDA (Megatron's mixed-precision "
                         "optimizers are CUDA-only); build the model in float32 on CPU")

    config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=lr,
        weight_decay=weight_decay,
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        adam_eps=eps,
        clip_grad=grad_clip,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        loss_scale=loss_scale,
        use_distributed_optimizer=ddp_config.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [model], use_gloo_process_groups=_have_gloo_groups())
    _apply_group_weight_decay(optimizer)
    # Megatron's schedules multiply the last stage's loss by this before backward (fp16 loss
    # scaling; a no-op scale of 1 otherwise), as megatron/training does at setup.
    model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _apply_group_weight_decay(optimizer: Any) -> None:
    """Each param group's decay = config.weight_decay * the group's `wd_mult`. Megatron builds the inner
    AdamW with one default decay for every group and leaves `wd_mult` to its OptimizerParamScheduler,
    which this project does not use (the trainer drives the learning rate itself)."""
    for part in _parts(optimizer):
        config, groups = getattr(part, "config", None), getattr(part, "param_groups", None)
        if config is None or groups is None:  # not a Megatron optimizer (a caller's stand-in): nothing to scale
            continue
        for group in groups:
            group["weight_decay"] = config.weight_decay * group.get("wd_mult", 1.0)


def _have_gloo_groups() -> bool:
    """Megatron's extra gloo copies of the DP groups (parallel.state always asks for them; the
    DistributedOptimizer's parameter-state save/load gathers over them)."""
    from megatron.core import parallel_state as mpu

    try:
        mpu.get_data_parallel_group_gloo(with_context_parallel=True)
    except AssertionError:
        return False
    return True


def _parts(optimizer: Any) -> list[Any]:
    """The optimizers inside Megatron's ChainedOptimizer (dense / expert), or just this one."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


@torch.no_grad()
def optimizer_step(optimizer: Any, grad_clip: float | None = None) -> tuple[bool, float | None]:
    """Clip the global grad norm and step; returns (update_successful, grad norm before clipping).

    `grad_clip` overrides the optimizer's clip for this step (0 = no clip). With CUDA this is
    Megatron's own `optimizer.step()`. On CPU it is the same sequence (prepare_grads, the global
    grad norm over the model-parallel group, scale, step_with_ready_grads) with the scaling done
    here, because Megatron's clip asserts `param.grad.type() == "torch.cuda.FloatTensor"`."""
    parts = _parts(optimizer)
    saved = [part.config.clip_grad for part in parts]
    if grad_clip is not None:
        if grad_clip < 0:
            raise ValueError(f"optimizer_step: grad_clip must be >= 0, got {grad_clip}")
        for part in parts:
            part.config.clip_grad = float(grad_clip)
    try:
        if torch.cuda.is_available():
            update_successful, grad_norm, _ = optimizer.step()
            if grad_norm is None and update_successful:
                grad_norm = optimizer.get_grad_norm()
            return bool(update_successful), grad_norm
        if optimizer.prepare_grads():  # found inf/nan (only with fp16 loss scaling)
            return False, None
        grad_norm = float(optimizer.get_grad_norm())
        for part in parts:
            clip = part.config.clip_grad
            coeff = clip / (grad_norm + 1.0e-6)  # Megatron's formula
            if clip > 0.0 and coeff < 1.0:
                for param in part.get_parameters():
                    if param.grad is not None:
                        param.grad.mul_(coeff)
        return bool(optimizer.step_with_ready_grads()), grad_norm
    finally:
        for part, clip in zip(parts, saved):
            part.config.clip_grad = clip


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """Set the learning rate of every parameter group (for a schedule driven by the trainer)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# Checkpoint state (the engine writes files; what goes in them is decided here)
# ---------------------------------------------------------------------------------------------


def _is_expert_part(part: Any) -> bool:
    """Megatron's optimizer of the routed experts' parameters (its param groups are the `is_expert_parallel`
    ones; it lives on the expert-data-parallel group)."""
    return any(group.get("is_expert_parallel", False) for group in getattr(part, "param_groups", []) or [])


def _sharded_state_names(optimizer: Any) -> list[str | None]:
    """Per part of the (chained) optimizer, the file its DistributedOptimizer state goes to (None: not one).

    The dense part's state is gathered on its DP rank 0, one per tensor/pipeline slice:
    `optimizer_params_tpXX_ppYYY.pt`. The experts' optimizer is sharded over the expert-data-parallel group, whose
    rank 0 differs per expert-parallel rank (with EP > 1 several ranks are one): its state is named by its expert
    tensor-parallel, pipeline and expert-parallel ranks, `optimizer_params_tpXX_ppYYY_epZZZ.pt`."""
    from megatron.core import parallel_state as mpu

    parts = _parts(optimizer)
    if not any(type(part).__name__ == "DistributedOptimizer" for part in parts):
        return [None] * len(parts)
    pp = mpu.get_pipeline_model_parallel_rank()
    names: list[str | None] = []
    dense = 0
    for part in parts:
        if type(part).__name__ != "DistributedOptimizer":
            names.append(None)
        elif _is_expert_part(part):
            names.append(f"optimizer_params_tp{mpu.get_expert_tensor_parallel_rank():02d}_pp{pp:03d}"
                         f"_ep{mpu.get_expert_model_parallel_rank():03d}.pt")
        else:  # (several dense parts only with overlap_param_gather_with_optimizer_step, not used here)
            names.append(f"optimizer_params_tp{mpu.get_tensor_model_parallel_rank():02d}_pp{pp:03d}"
                         f"{f'_{dense}' if dense else ''}.pt")
            dense += 1
    return names


def training_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """This rank's model shard and optimizer state (tensors and plain data: loadable with weights_only=True)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def save_sharded_optimizer_state(optimizer: Any, directory: str | Path) -> list[Path]:
    """Megatron's DistributedOptimizer keeps the Adam moments and fp32 master weights sharded over DP ranks,
    outside `state_dict()`: write them to `directory`, one file per part of the optimizer (dense / experts) and
    slice (`_sharded_state_names`), by that part's DP rank 0 (collective over each part's DP group). Returns the
    files this rank wrote (none for other optimizers).
    The DistributedOptimizer itself is UNVERIFIED without a GPU (it needs CUDA); the naming and who writes what are
    tested on CPU with stand-in parts on real process groups."""
    written = []
    for part, name in zip(_parts(optimizer), _sharded_state_names(optimizer)):
        if name is None:
            continue
        state = part.get_parameter_state_dp_zero()  # collective over the part's DP group
        if part.data_parallel_group.rank() == 0:
            path = Path(directory) / name
            torch.save(state, path)
            written.append(path)
    return written


def load_training_state(model: torch.nn.Module, optimizer: Any, state: dict[str, Any],
                        directory: str | Path) -> None:
    """Restore what `training_state` and `save_sharded_optimizer_state` saved (collective for the
    DistributedOptimizer); any fp32 master copy follows the restored model weights. The per-group weight
    decay is re-derived from this optimizer's config (the saved groups' values are not trusted)."""
    model.load_state_dict(state["model"])
    optimizer.reload_model_params()
    optimizer.load_state_dict(state["optimizer"])
    _apply_group_weight_decay(optimizer)
    load_sharded_optimizer_state(optimizer, directory)


def load_sharded_optimizer_state(optimizer: Any, directory: str | Path) -> None:
    """Read back what `save_sharded_optimizer_state` wrote (collective over each part's DP group; nothing for
    other optimizers)."""
    names = _sharded_state_names(optimizer)
    # checked on every rank before any collective (the checkpoint directory is shared), so all raise together
    missing = [Path(directory) / name for name in names if name is not None and not (Path(directory) / name).is_file()]
    if missing:
        raise ValueError(f"{missing[0]} is missing: the checkpoint was written with another parallel layout (or "
                         f"before the experts' optimizer state got its own file per expert-parallel rank)")
    for part, name in zip(_parts(optimizer), names):
        if name is None or getattr(part, "is_stub_optimizer", False):  # (a stub holds no state: Megatron skips it)
            continue
        saved = None
        if part.data_parallel_group.rank() == 0:  # read on DP rank 0, scattered by Megatron to the others
            saved = torch.load(Path(directory) / name)
        part.load_parameter_state_from_dp_zero(saved)
