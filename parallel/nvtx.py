"""Every NVTX range of a training step, in one place: what Nsight Systems shows on the timeline.

Ranges are pushed only when CUDA is available (or a test turns them on with `kernels.nvtx.set_enabled`); without
it each one costs a flag check. The names follow GRPO_SPEC.md; one trainer step nests like this (the file that
pushes each range on the right):

    step 3                                  engine.profiling.StepProfiler (one a step, numbered as metrics.jsonl)
      rollout                               engine.metrics.PhaseTimer phase: sampling (and DAPO's refill rounds)
        rewards                             engine.scoring.RolloutScorer.score (the model-parallel leader only)
      advantages                            PhaseTimer phase: group-normalised advantages
      logprobs                              PhaseTimer phase: packing + the log-probs of every mini-batch
        ref_logprobs | old_logprobs         engine.trainer (beta > 0 | off-policy updates)
          forward_only                      parallel.step.logprobs: Megatron's forward-only schedule
            forward                         one per micro-batch (Megatron's forward-compute timer)
              statistics                    kernels: the statistics pass over the logits
      train                                 PhaseTimer phase: epochs x mini-batches optimizer steps
        forward_backward                    parallel.step.train_step: Megatron's schedule, one per optimizer step
          forward                           one per micro-batch
            statistics, loss                kernels.grpo_loss on the logits (loss: the [N]-vector function)
            lm_head_chunk                   or, with --algo.fused-lm-head, one per token chunk of linear_grpo_loss:
              statistics, loss, gradient      the passes of that chunk (gradient: the pass + the dhidden/dW GEMMs)
          backward                          one per micro-batch (Megatron's backward-compute timer)
            gradient                        kernels: the gradient pass over the logits (logits path)
          grad_sync                         Megatron's gradient all-reduce (finalize_model_grads; its smaller
                                            all-reduces keep their Megatron names: embedding-grads-all-reduce, ...)
        optimizer_step                      parallel.step.train_step
      weight_sync                           PhaseTimer phase: the policy streamed into the rollout engine
      eval                                  engine.trainer.evaluate (steps where --train.eval-every falls)
      checkpoint                            engine.trainer.save (steps where --train.save-every falls)

Megatron's other timers (with pipeline parallelism the p2p forward-recv / backward-send / ...) appear under
forward_backward with their Megatron names. tests/engine/test_profiling.py records a two-step run and checks
this tree.
"""
from __future__ import annotations

from r1_engine.kernels.nvtx import enabled, nvtx_range, set_enabled

__all__ = ["enabled", "install_nvtx_timers", "nvtx_range", "set_enabled"]


# Megatron's timer names -> ours (None: no range); the others keep their names
_MEGATRON_TIMER_NAMES = {"forward-compute": "forward", "backward-compute": "backward", "all-grads-sync": "grad_sync",
                         "forward-backward": None}


class _NvtxTimer:
    def __init__(self, name: str | None):
        self.name = name

    def start(self, barrier: bool = False) -> None:
        if self.name is not None and enabled():
            import torch

            torch.cuda.nvtx.range_push(self.name)

    def stop(self, barrier: bool = False) -> None:
        if self.name is not None and enabled():
            import torch

            torch.cuda.nvtx.range_pop()


class _NvtxTimers:
    """Megatron's `config.timers` hook turned into NVTX ranges, so the forward and backward computations inside
    the pipeline schedule show up as "forward" / "backward" in Nsight. Its "forward-backward" timer is left out:
    forward_only / forward_backward already cover the schedule."""

    def __call__(self, name: str, log_level: int | None = None) -> _NvtxTimer:
        return _NvtxTimer(_MEGATRON_TIMER_NAMES.get(name, name))


def install_nvtx_timers(config) -> None:
    """Give a Megatron model config the NVTX timers while ranges are on (an existing timers object is kept)."""
    if enabled() and config.timers is None:
        config.timers = _NvtxTimers()
