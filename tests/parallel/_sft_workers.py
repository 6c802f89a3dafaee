"""Workers for the SFT-objective tests in tests/engine/test_sft.py (importable by spawned children; the one-process
layouts run in the pytest process itself).

`sft_layouts_worker(hf_dir, spec, layouts)` runs, for each (tp, pack, num_microbatches, fused_lm_head) in turn: load
the HF checkpoint into this layout, one train_step of engine.objectives.sft_objective on this DP rank's share of the
packed batch, and the weights' change exported to HF names. `sft_layouts_and_trainer_worker` then also runs an
SFTTrainer on the same process group (one spawn for both: starting processes is most of the cost).
"""
from __future__ import annotations

import torch


def _run_layout(hf_dir: str, spec: dict, tp: int, pack: bool, num_microbatches: int, fused_lm_head: bool) -> dict:
    from r1_engine.engine.batch import pack_sequences
    from r1_engine.engine.objectives import sft_objective
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.state import init_parallel
    from r1_engine.parallel.convert import export_hf_state, load_hf_checkpoint
    from r1_engine.parallel.optim import build_optimizer, wrap_for_training
    from r1_engine.parallel.step import train_step

    state = init_parallel(tensor_parallel=tp, pipeline_parallel=1)
    batch = pack_sequences(spec["prompts"], spec["completions"], pack=pack,
                           max_tokens_per_row=spec["max_tokens_per_row"])
    local = batch.shard(state.dp_rank, state.dp_size)
    model = build_gpt_model(hf_dir)
    load_hf_checkpoint(model, hf_dir)
    before = {k: v.detach().double().clone() for k, v in export_hf_state(model)}
    ddp = wrap_for_training(model)
    # Adam's first step with lr = eps: delta = -lr * g / (|g| + eps), a smooth function of the gradient; no clip
    optimizer = build_optimizer(ddp, lr=spec["lr"], eps=spec["adam_eps"], weight_decay=0.0, grad_clip=0.0)
    metrics = train_step(ddp, optimizer, local, sft_objective(), num_microbatches=num_microbatches,
                         fused_lm_head=fused_lm_head)
    after = {k: v.detach().double().clone() for k, v in export_hf_state(model)}
    sequences_per_row = [len(set(r.tolist()) - {-1}) for r in batch.seq_ids]
    return {"metrics": metrics, "delta": {k: after[k] - before[k] for k in before}, "rows": batch.num_rows,
            "local_rows": local.num_rows, "sequences_per_row": sequences_per_row,
            "layout": dict(tp=tp, dp=state.dp_size, pack=pack, num_microbatches=num_microbatches,
                           fused_lm_head=fused_lm_head, rank=state.rank)}


def sft_layouts_worker(hf_dir: str, spec: dict, layouts: list[tuple]) -> list[dict]:
    torch.manual_seed(0)
    return [_run_layout(hf_dir, spec, *layout) for layout in layouts]


def sft_trainer_worker(config, model_dir: str, examples: list, held_out: list) -> dict:
    """An SFTTrainer run to the end: the per-step metrics (timings left out), the final weights in HF names and
    the held-out loss."""
    from r1_engine.engine.sft import SFTTrainer
    from r1_engine.parallel.convert import export_hf_state

    trainer = SFTTrainer(config, model_dir, examples)
    history = [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))} for m in trainer.fit()]
    weights = {k: v.detach().clone() for k, v in export_hf_state(trainer.policy)}
    held_out_loss = trainer.evaluate_loss(held_out)
    trainer.close()
    return {"history": history, "weights": weights, "held_out_loss": held_out_loss, "dp": trainer.ps.dp_size}


def sft_layouts_and_trainer_worker(hf_dir: str, spec: dict, layouts: list[tuple], trainer_args: tuple) -> dict:
    return {"layouts": sft_layouts_worker(hf_dir, spec, layouts), "trainer": sft_trainer_worker(*trainer_args)}
