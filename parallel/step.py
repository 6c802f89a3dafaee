"""A forward-only pass (`logprobs`) and an optimizer step of any loss (`train_step`) over Megatron's pipeline
schedule, on `PackedRows` (parallel.rows).

    logp = logprobs(model, rows, temperature=0.7)                   # [B, S] fp32, 0 off the loss positions
    metrics = train_step(model, optimizer, rows, loss_fn)           # loss_fn(micro_batch, ModelOutput)

This module hosts models and runs whatever loss it is handed; it knows no objective. The loss function gets a
micro-batch (PackedRows, with the caller's `extras`) and a `ModelOutput`: the logits [b, S, V/tp], or with
`fused_lm_head=True` the final hidden states [b, S, h] and this rank's output-layer weight, so the loss can
run lm_head fused with itself and the logits never exist. Either way it gets the tensor-parallel group, the
first global vocabulary id of this rank's shard, and the step's GLOBAL counts of loss tokens and sequences
(over every micro-batch and data-parallel rank), which make a loss split-invariant. It returns (loss,
metrics): the loss is this micro-batch's share of the full-batch loss, metrics are means over its loss
tokens.

How attention is blocked across packed sequences
    * local (CPU) layer spec: an explicit [b, 1, S, S] boolean mask, block-diagonal causal, in Megatron's
      convention (True = masked out). Megatron's RoPE ignores `position_ids` and rotates by the absolute
      position in the row; inside a block only relative offsets reach the scores, so this equals restarting
      positions per sequence (tests check packed == padded).
    * Transformer Engine spec (GPU): the micro-batch is flattened to one row [1, b*S] and passed with
      Megatron's `PackedSeqParams(qkv_format="thd", cu_seqlens...)`, so TE's fused attention and fused RoPE
      restart per sequence. NOT verified on a GPU in this repository yet.
    * with FP8 the rows are lengthened with padding positions so that each micro-batch's token count divides
      what TE's FP8 GEMMs need (`_token_multiple`); the padding carries no loss and is cut from the results.

Scaling
    Megatron divides each micro-batch loss by the number of micro-batches (2-tuple loss contract in
    schedules.forward_step_calc_loss) and Megatron DDP scales gradients by 1/dp before its sum all-reduce; a
    loss divided by global counts is already the micro-batch's share, so `train_step` multiplies it by
    num_microbatches * dp beforehand and the gradient is exactly the single-process full-batch gradient.

Padded vocabulary columns (Megatron pads the vocab to split evenly over TP ranks) are already set to a large
negative logit by the output-layer hook of parallel.models.build_gpt_model; the fused path leaves those rows
of the weight out instead.

Layout contract for callers: every tensor- and pipeline-parallel rank of one data-parallel replica passes the
same rows; different DP replicas pass their own shard (`PackedRows.shard`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from r1_engine.kernels.logprobs import token_logprobs
from r1_engine.parallel.models import unwrap_model
from r1_engine.parallel.moe import (
    ROUTED_EXPERTS,
    MoEForward,
    check_replay_training,
    defer_expert_bias_update,
    expert_bias_counts,
    restore_expert_bias_counts,
    update_expert_bias,
)
from r1_engine.parallel.nvtx import install_nvtx_timers, nvtx_range
from r1_engine.parallel.optim import optimizer_step
from r1_engine.parallel.rows import PackedRows

__all__ = ["ModelOutput", "LossFn", "logprobs", "train_step"]


@dataclass
class ModelOutput:
    """What the last pipeline stage hands a loss function besides the micro-batch.

    logits        [b, S, V/tp] on the logits path (None with the fused lm_head); needed by nothing after the
                  loss, so a kernel may overwrite it with its gradient (inplace_backward)
    hidden        [b, S, h] final hidden states with the fused lm_head (else None)
    weight        [V_real/tp, h] this rank's output-layer rows of real vocabulary entries (fused path only)
    tp_group      the tensor-parallel group the vocabulary is split over (None without TP)
    vocab_start   global id of this rank's first vocabulary entry
    num_tokens    loss tokens of the whole step (every micro-batch and DP rank), >= 1
    num_sequences sequences with a loss token in the whole step, >= 1
    """

    logits: torch.Tensor | None
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    tp_group: Any
    vocab_start: int
    num_tokens: int
    num_sequences: int

    @property
    def fused(self) -> bool:
        return self.hidden is not None


LossFn = Callable[[PackedRows, ModelOutput], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


# ---------------------------------------------------------------------------------------------
# Model plumbing shared by logprobs and train_step
# ---------------------------------------------------------------------------------------------


def _uses_te_attention(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "TEDotProductAttention" for m in unwrap_model(model).modules())


def _model_device(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _tp_group_and_vocab_start(local_vocab: int) -> tuple[Any, int]:
    from megatron.core import parallel_state as mpu

    tp_size = mpu.get_tensor_model_parallel_world_size()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    group = mpu.get_tensor_model_parallel_group() if tp_size > 1 else None
    return group, tp_rank * local_vocab


def _model_forward(model: torch.nn.Module, mb: PackedRows, use_thd: bool, moe: MoEForward) -> torch.Tensor:
    """One micro-batch through this pipeline stage. On the last stage: logits [b, S, V/tp]."""
    moe.prepare(mb, use_thd)  # MoE: padding for the expert load, routing replay targets
    if use_thd:
        from megatron.core.packed_seq_params import PackedSeqParams

        cu, max_len = mb.cu_seqlens()
        params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
        )
        out = model(mb.tokens.reshape(1, -1), mb.position_ids.reshape(1, -1), None,
                    packed_seq_params=params)
        if out.dim() == 3 and out.shape[0] == 1 and mb.num_rows > 1:  # logits [1, b*S, V]
            out = out.reshape(mb.num_rows, mb.seq_len, -1)
        return out
    return model(mb.tokens, mb.position_ids, mb.attention_mask())


def _schedule_shape(mb: PackedRows, use_thd: bool) -> tuple[int, int]:
    """(seq_length, micro_batch_size) of the activations sent between pipeline stages."""
    if use_thd:
        return mb.num_rows * mb.seq_len, 1
    return mb.seq_len, mb.num_rows


def _check_config(model: torch.nn.Module) -> Any:
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    if getattr(config, "context_parallel_size", 1) != 1:
        raise ValueError("parallel.step does not support context parallelism (context_parallel_size != 1)")
    if getattr(config, "virtual_pipeline_model_parallel_size", None):
        raise ValueError("parallel.step does not support the interleaved (virtual) pipeline schedule")
    return config


def _pipeline_last_rank() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_pipeline_model_parallel_last_rank()


def _token_multiple(config: Any) -> int:
    """What a micro-batch's token count (rows x row length) must divide for this model's linears: 1 without FP8.
    Transformer Engine's FP8 GEMMs assert the flattened token count % 8 == 0 (`assert_dim_for_fp8_exec`); 16 is
    used (also whole bf16 tensor-core tiles), 32 for MXFP8 (its scaling blocks are 32 long); with sequence
    parallelism the tokens are split over the TP ranks first, so times the TP size. Read from TE's sources only."""
    if getattr(config, "fp8", None) is None:
        return 1
    multiple = 32 if getattr(config, "fp8_recipe", "delayed") == "mxfp8" else 16
    if getattr(config, "sequence_parallel", False):
        multiple *= getattr(config, "tensor_model_parallel_size", 1)
    return multiple


def _column_multiple(config: Any) -> int:
    """Sequence parallelism splits each micro-batch's [S, b, h] activations along S over the TP ranks."""
    return getattr(config, "tensor_model_parallel_size", 1) if getattr(config, "sequence_parallel", False) else 1


def _micro_batches(batch: PackedRows, num_microbatches: int | None, micro_batch_size: int | None,
                   token_multiple: int = 1, column_multiple: int = 1) -> tuple[list[PackedRows], int]:
    """Split into equal micro-batches (padding with empty rows); returns them and the real row count. With
    `token_multiple` > 1 every row is lengthened with padding positions (the fewest for which rows x row length
    divides it), so callers cut results back to the batch's own row length."""
    if (num_microbatches is None) == (micro_batch_size is None):
        raise ValueError("give exactly one of num_microbatches and micro_batch_size")
    if batch.num_rows == 0:
        raise ValueError("the batch has no rows (shard() gives every DP rank at least one)")
    if micro_batch_size is not None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        num_microbatches = math.ceil(batch.num_rows / micro_batch_size)
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if num_microbatches > batch.num_rows:
        num_microbatches = batch.num_rows
    padded = batch.pad_rows(num_microbatches)
    rows_per_micro = padded.num_rows // num_microbatches
    padded = padded.pad_columns(math.lcm(token_multiple // math.gcd(rows_per_micro, token_multiple), column_multiple))
    return padded.split(num_microbatches), batch.num_rows


# ---------------------------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def logprobs(model: torch.nn.Module, rows: PackedRows, *, temperature: float = 1.0,
             micro_batch_size: int | None = None, num_microbatches: int | None = None,
             return_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(targets[t] | tokens[:t+1]) / T for every position, fp32 [B, S] (0 where loss_mask is 0), and the
    entropy [B, S] if asked; the same values on every rank of this DP replica.

    Runs Megatron's forward-only pipeline schedule; the last stage reduces its vocab shard with the
    vocab-parallel `kernels.token_logprobs` (the vocabulary is never gathered) and broadcasts the result over
    the pipeline group. Works on a Megatron-DDP-wrapped or a bare GPTModel. Give one of micro_batch_size /
    num_microbatches (default: one micro-batch)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if micro_batch_size is None and num_microbatches is None:
        num_microbatches = 1
    with nvtx_range("forward_only"):
        config = _check_config(model)
        install_nvtx_timers(config)
        use_thd = _uses_te_attention(model)
        rows = rows.to(_model_device(model))
        micro, real_rows = _micro_batches(rows, num_microbatches, micro_batch_size, _token_multiple(config),
                                          _column_multiple(config))

        def collect(mb: PackedRows, output: torch.Tensor, non_loss_data: bool = True):
            tp_group, vocab_start = _tp_group_and_vocab_start(output.shape[-1])
            result = token_logprobs(output, mb.targets, temperature, return_entropy=return_entropy,
                                    tp_group=tp_group, vocab_start=vocab_start)
            logp, entropy = result if return_entropy else (result, None)
            keep = mb.loss_mask > 0
            logp = torch.where(keep, logp.float(), torch.zeros_like(logp, dtype=torch.float32))
            if entropy is not None:
                entropy = torch.where(keep, entropy.float(), torch.zeros_like(logp))
            return logp, entropy

        moe = MoEForward(model)

        def forward_step(data_iterator: Iterator[PackedRows], model_chunk: torch.nn.Module):
            mb = next(data_iterator)
            return _model_forward(model_chunk, mb, use_thd, moe), partial(collect, mb)

        seq_length, mbs = _schedule_shape(micro[0], use_thd)
        was_training = model.training
        model.eval()
        try:
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
                num_microbatches=len(micro), seq_length=seq_length, micro_batch_size=mbs,
                forward_only=True, collect_non_loss_data=True)
        finally:
            model.train(was_training)
            moe.clear()

        shape = (len(micro) * micro[0].num_rows, micro[0].seq_len)
        if mpu.is_pipeline_last_stage():
            logp = torch.cat([o[0] for o in outputs], dim=0)
            entropy = torch.cat([o[1] for o in outputs], dim=0) if return_entropy else None
        else:
            logp = torch.empty(shape, dtype=torch.float32, device=rows.device)
            entropy = torch.empty(shape, dtype=torch.float32, device=rows.device) if return_entropy else None
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            group, src = mpu.get_pipeline_model_parallel_group(), _pipeline_last_rank()
            for t in (logp, entropy):
                if t is not None:
                    dist.broadcast(t, src=src, group=group)
        keep = (slice(0, real_rows), slice(0, rows.seq_len))  # without the padding rows and positions
        if return_entropy:
            return logp[keep], entropy[keep]
        return logp[keep]


# ---------------------------------------------------------------------------------------------
# train_step
# ---------------------------------------------------------------------------------------------


def _global_counts(rows: PackedRows) -> tuple[int, int]:
    """(loss tokens, sequences with at least one loss token) over all DP ranks: one host sync a step."""
    from megatron.core import parallel_state as mpu

    keep = rows.loss_mask > 0
    counts = torch.tensor([float(keep.sum().item()), float(torch.unique(rows.seq_ids[keep]).numel())],
                          dtype=torch.float64, device=rows.device)
    if mpu.get_data_parallel_world_size() > 1:
        dist.all_reduce(counts, group=mpu.get_data_parallel_group())
    tokens, sequences = counts.cpu().tolist()
    return int(tokens), int(sequences)


def train_step(model: torch.nn.Module, optimizer: Any, rows: PackedRows, loss_fn: LossFn, *,
               num_microbatches: int = 1, grad_clip: float | None = None, fused_lm_head: bool = False,
               update_bias: bool = True) -> dict[str, float]:
    """One optimizer step of `loss_fn` over this DP rank's `rows`.

    `model` is the Megatron-DDP-wrapped stage (parallel.optim.wrap_for_training) and `optimizer` the one from
    parallel.optim.build_optimizer. With a loss divided by the global counts of its ModelOutput, the gradient
    is the full-batch gradient over all DP ranks' rows, whatever the split into micro-batches and ranks.
    fused_lm_head: the last stage's output layer is bypassed and the loss gets the hidden states and the
    weight (see ModelOutput). `grad_clip` overrides the optimizer's clip for this step (0 = none). A step with
    no loss token anywhere makes no optimizer step (Adam would still move the weights).

    MoE with an expert bias (DeepSeek-V3): the routers count the load of the step's real tokens; a step not taken
    (no loss token, or an fp16 overflow) forgets its counts, and a taken one moves the bias from the counts
    accumulated so far when `update_bias` (else they wait for `parallel.moe.update_expert_bias`: the trainer
    moves the bias once per rollout, whatever its epochs x mini-batches). Routing replay (the rows'
    `routed_experts`) refuses what it cannot do right before the schedule starts (`check_replay_training`).

    Returns (same on every rank): "loss" (the sum of the micro-batch losses over DP ranks), "grad_norm" (before
    clipping), "num_tokens", "num_sequences", "update_successful", and every metric of the loss averaged over
    all loss tokens of the step."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not hasattr(model, "zero_grad_buffer"):
        raise ValueError("train_step needs the model returned by parallel.optim.wrap_for_training "
                         "(Megatron DistributedDataParallel)")
    config = _check_config(model)
    if config.calculate_per_token_loss:
        raise ValueError("train_step normalises the loss itself; build the model with "
                         "calculate_per_token_loss=False")
    install_nvtx_timers(config)
    use_thd = _uses_te_attention(model)
    rows = rows.to(_model_device(model))
    micro, _ = _micro_batches(rows, num_microbatches, None, _token_multiple(config), _column_multiple(config))
    total_tokens, total_sequences = _global_counts(rows)
    # Megatron divides each micro-batch loss by len(micro) and DDP averages gradients over dp ranks; a loss
    # divided by global counts is already the micro-batch's share, so undo both.
    undo_megatron_scaling = float(len(micro) * mpu.get_data_parallel_world_size())
    bypass = _LMHeadBypass(model) if fused_lm_head else contextlib.nullcontext()

    def loss_func(mb: PackedRows, output: torch.Tensor):
        if fused_lm_head:  # output: hidden states [b, S, h]
            weight, tp_group, vocab_start = bypass.vocab_weight()
            out = ModelOutput(None, output, weight, tp_group, vocab_start, max(total_tokens, 1),
                              max(total_sequences, 1))
        else:
            tp_group, vocab_start = _tp_group_and_vocab_start(output.shape[-1])
            out = ModelOutput(output, None, None, tp_group, vocab_start, max(total_tokens, 1),
                              max(total_sequences, 1))
        loss, metrics = loss_fn(mb, out)
        report = {k: (v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=output.device))
                  for k, v in metrics.items()}
        report["loss"] = loss.detach().float()
        report["num_tokens"] = mb.loss_mask.sum().float()
        return loss * undo_megatron_scaling, report

    moe = MoEForward(model)
    check_replay_training(config, moe.active and moe.replay and rows.extras.get(ROUTED_EXPERTS) is not None)
    # Megatron's schedule would move the expert bias inside every forward-backward (even one whose step is then
    # skipped): the counts are kept here and the bias moved below, after the step
    config.finalize_model_grads_func = defer_expert_bias_update(config.finalize_model_grads_func)
    counts_before = expert_bias_counts(model)

    def forward_step(data_iterator: Iterator[PackedRows], model_chunk: torch.nn.Module):
        mb = next(data_iterator)
        return _model_forward(model_chunk, mb, use_thd, moe), partial(loss_func, mb)

    model.zero_grad_buffer()
    optimizer.zero_grad()
    seq_length, mbs = _schedule_shape(micro[0], use_thd)
    with nvtx_range("forward_backward"), bypass, moe.count_load():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
            num_microbatches=len(micro), seq_length=seq_length, micro_batch_size=mbs, forward_only=False)

    if total_tokens == 0:
        update_successful, grad_norm = False, 0.0
    else:
        with nvtx_range("optimizer_step"):
            update_successful, grad_norm = optimizer_step(optimizer, grad_clip)
    if not update_successful:
        restore_expert_bias_counts(model, counts_before)
    elif update_bias:
        update_expert_bias(model)
    result = _reduce_step_metrics(outputs)
    result["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
    result["update_successful"] = float(bool(update_successful))
    result["num_sequences"] = float(total_sequences)
    result.update(moe.load_metrics(len(micro)))
    return result


class _LMHeadBypass:
    """While active, the last stage's output layer returns its input (the final hidden states) and records the
    weight it would have multiplied them by (its own, or the tied embedding), so the loss can run lm_head + loss
    fused. Its forward hooks (the vocab-padding mask) are set aside meanwhile."""

    def __init__(self, model: torch.nn.Module):
        core = unwrap_model(model)
        self.layer = core.output_layer if getattr(core, "post_process", False) else None
        self.info = getattr(core, "model_info", None)
        self.weight = None

    def __enter__(self):
        if self.layer is not None:
            self._hooks = dict(self.layer._forward_hooks)
            self.layer._forward_hooks.clear()

            def forward(input_, weight=None, runtime_gather_output=None, **_):
                self.weight = self.layer.weight if weight is None else weight
                if self.layer.sequence_parallel:  # [S/tp, b, h] -> [S, b, h], as the layer's own input gather
                    from megatron.core.tensor_parallel import (
                        gather_from_sequence_parallel_region,
                    )

                    # the fused loss returns dhidden already summed over the TP ranks: backward only splits it
                    input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False)
                return input_, None

            self.layer.forward = forward
        return self

    def __exit__(self, *exc):
        if self.layer is not None:
            del self.layer.forward  # the class's forward again
            self.layer._forward_hooks.update(self._hooks)
        return False

    def vocab_weight(self):
        """(this rank's weight rows of real vocabulary entries, tp group, their first global id)."""
        from megatron.core import parallel_state as mpu

        tp = mpu.get_tensor_model_parallel_world_size()
        rank = mpu.get_tensor_model_parallel_rank()
        local = self.weight.shape[0]
        start = rank * local
        valid = min(local, self.info.vocab_size - start) if self.info is not None else local
        if valid < 1:
            raise ValueError(f"fused_lm_head: tensor-parallel rank {rank} holds only vocabulary padding "
                             f"(vocab {self.info.vocab_size}, {local} rows a rank); use fewer TP ranks")
        group = mpu.get_tensor_model_parallel_group() if tp > 1 else None
        return self.weight[:valid], group, start


def _reduce_step_metrics(outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum the loss and token-weight the metrics over micro-batches and DP ranks (last pipeline stage), then
    share the result with the other stages."""
    from megatron.core import parallel_state as mpu

    result: dict[str, float] | None = None
    if mpu.is_pipeline_last_stage():
        keys = sorted(k for k in outputs[0] if k not in ("loss", "num_tokens"))
        sums = []
        for out in outputs:
            n = out["num_tokens"].double()
            # a micro-batch of padding rows has no tokens (and NaN means): weight 0, value 0
            means = [torch.where(n > 0, out[k].double().mean() * n, torch.zeros_like(n)) for k in keys]
            sums.append(torch.stack([out["loss"].double(), n, *means]))
        total = torch.stack(sums).sum(dim=0)  # one device tensor: a single sync below
        if mpu.get_data_parallel_world_size() > 1:
            dist.all_reduce(total, group=mpu.get_data_parallel_group())
        total = total.cpu()
        n = float(total[1])
        result = {"loss": float(total[0]), "num_tokens": n}
        for j, k in enumerate(keys):
            result[k] = float(total[2 + j]) / n if n > 0 else 0.0
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=_pipeline_last_rank(), group=mpu.get_pipeline_model_parallel_group())
        result = box[0]
    return result
