"""Worker run on every rank by test_models_convert's multi-process test (see dist_utils)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from tests.parallel._models_tiny import VOCAB, read_safetensors_dir


def full_logits(model, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Forward through Megatron's pipeline schedule; the last stage returns the TP-gathered
    logits [b, s, VOCAB] (padding columns cut), other stages None."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = input_ids.shape
    position_ids = torch.arange(seq).expand(batch, seq)
    collected: list[torch.Tensor] = []

    def forward_step(data_iterator, stage_model):
        ids = next(data_iterator)
        output = stage_model(ids, position_ids, attention_mask=None)

        def keep(output_tensor):
            collected.append(output_tensor.detach())
            return output_tensor.sum() * 0.0, {}

        return output, keep

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([input_ids]),
            model=[model],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=True,
        )
    if not mpu.is_pipeline_last_stage():
        return None
    shard = collected[0]
    shards = [torch.empty_like(shard) for _ in range(mpu.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, shard.contiguous(), group=mpu.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)[..., :VOCAB]


def parity_worker(ckpt_dirs: dict[str, str], input_ids: torch.Tensor, layouts: list, out_root: str) -> dict:
    """For each (tp, pp) layout and each checkpoint: load, forward, export, save.

    Returns {(kind, tp, pp): {"logits": tensor or None, "export_mismatch": [...], "exported": n}}.
    """
    from r1_engine.parallel.convert import export_hf_state, load_hf_checkpoint, save_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.state import init_parallel

    results = {}
    for tp, pp in layouts:
        state = init_parallel(tp, pp)
        for kind, ckpt in ckpt_dirs.items():
            model = build_gpt_model(ckpt)
            load_hf_checkpoint(model, ckpt)
            logits = full_logits(model, input_ids)
            reference = read_safetensors_dir(ckpt)
            exported = {name: tensor.detach().cpu().clone() for name, tensor in export_hf_state(model)}
            mismatch = sorted(
                set(reference) ^ set(exported)
                | {n for n in set(reference) & set(exported) if not torch.equal(reference[n], exported[n])}
            )
            save_hf_checkpoint(model, Path(out_root) / f"{kind}_tp{tp}_pp{pp}", tokenizer_dir=ckpt)
            keep_logits = state.is_last_stage and state.tp_rank == 0 and state.dp_rank == 0
            results[(kind, tp, pp)] = {
                "logits": logits if keep_logits else None,
                "export_mismatch": mismatch,
                "exported": len(exported),
                "stage_params": sorted(n for n, _ in model.named_parameters()),
            }
            del model
    return results


def sgd_step_worker(ckpt_dirs: dict[str, str], input_ids: torch.Tensor, labels: torch.Tensor, lr: float) -> dict:
    """TP=2 x PP=2: one SGD step through Megatron's DDP, pipeline schedule and optimizer (2
    micro-batches of one sequence); returns the grad norm and the updated model as HF tensors.
    Checks that the CPU shim carries a whole Megatron training step, tied embeddings included."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from r1_engine.parallel.convert import export_hf_state, load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.state import init_parallel

    init_parallel(2, 2)
    results = {}
    for kind, ckpt in ckpt_dirs.items():
        model = build_gpt_model(ckpt)
        load_hf_checkpoint(model, ckpt)
        model.config.finalize_model_grads_func = finalize_model_grads
        ddp = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False), model
        )
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="sgd", lr=lr, sgd_momentum=0.0, weight_decay=0.0, clip_grad=0.0,
                            params_dtype=torch.float32),
            [ddp],
        )
        micro_batches = iter(zip(input_ids.split(1), labels.split(1)))
        position_ids = torch.arange(input_ids.shape[1])[None]

        def forward_step(data_iterator, stage_model):
            ids, targets = next(data_iterator)
            per_token = stage_model(ids, position_ids, attention_mask=None, labels=targets)
            return per_token, lambda loss: (loss.mean(), {})

        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=micro_batches, model=[ddp], num_microbatches=2,
            seq_length=input_ids.shape[1], micro_batch_size=1, forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        results[kind] = {
            "grad_norm": grad_norm,
            "updated": {name: t.detach().cpu().clone() for name, t in export_hf_state(model)},
        }
    return results


def four_rank_worker(ckpt_dirs: dict[str, str], input_ids, labels, layouts: list, lr: float, out_root: str) -> dict:
    """Both checks in one launch (process start-up dominates the test's time)."""
    return {
        "parity": parity_worker(ckpt_dirs, input_ids, layouts, out_root),
        "sgd": sgd_step_worker(ckpt_dirs, input_ids, labels, lr),
    }
