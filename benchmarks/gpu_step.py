"""Megatron step checks for a GPU session (issue 3): bf16 parity and the step time of a 0.5B-shaped Qwen2.

    python -m benchmarks.gpu_step --out $OUT          # on the GPU machine, megatron-core installed
    python -m benchmarks.gpu_step --dry-run --out /tmp/x   # CPU, a tiny shape: exercises the code paths

1. parity: the same random weights in fp32 and in bf16; per-token log-probs of a packed batch and the
   GRPO loss, bf16 vs fp32 (max / mean |diff|), through parallel.step.logprobs and train_step's loss.
2. step time: Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV, ffn 4864, vocab 151,936, tied),
   bf16, TP=PP=DP=1: forward-only log-probs, and train_step with the fused lm_head and without, each with
   its peak memory. Writes gpu-step-<device>-<date>.json/.md under --out.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
import time
from pathlib import Path

import torch

QWEN2_05B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, intermediate_size=4864,
    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="silu", torch_dtype="bfloat16",
)
TINY = dict(QWEN2_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000)


def _batch(vocab: int, n_seq: int, prompt: int, completion: int, row: int, seed: int = 0):
    from r1_engine.engine.batch import rl_rows

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(n_seq)]
    completions = [torch.randint(0, vocab, (completion - (i % 7) * 3,), generator=g).tolist() for i in range(n_seq)]
    adv = torch.rand(n_seq, generator=g) * 2 - 1
    return rl_rows(prompts, completions, adv, pack=True, max_tokens_per_row=row)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps: int):
    fn()  # warm-up (Triton compiles, allocator settles)
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if torch.cuda.is_available() else None  # CPU: not measured (JSON null)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "peak_extra_gib": peak}


def parity(cfg: dict, device, batch_args) -> dict:
    from r1_engine.kernels.loss_family import PolicyLossConfig
    from r1_engine.kernels.logits_loss import policy_loss
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.step import logprobs

    torch.manual_seed(0)
    fp32 = build_gpt_model(cfg, dtype=torch.float32).to(device)
    bf16 = build_gpt_model(cfg, dtype=torch.bfloat16).to(device)
    with torch.no_grad():  # the same weights, rounded to bf16
        for (name, p32), (_, p16) in zip(fp32.named_parameters(), bf16.named_parameters()):
            p16.copy_(p32)
    batch = _batch(cfg["vocab_size"], *batch_args).to(device)
    lp32, ent32 = logprobs(fp32, batch, temperature=0.7, return_entropy=True)
    lp16, ent16 = logprobs(bf16, batch, temperature=0.7, return_entropy=True)
    m = batch.loss_mask > 0
    out = {"logp_max_abs_diff": (lp16 - lp32)[m].abs().max().item(),
           "logp_mean_abs_diff": (lp16 - lp32)[m].abs().mean().item(),
           "entropy_max_abs_diff": (ent16 - ent32)[m].abs().max().item()}
    cfg_loss = PolicyLossConfig(beta=0.0, eps_high=0.28)
    losses = []
    for model in (fp32, bf16):
        logits = model(batch.tokens, batch.position_ids, batch.attention_mask())
        loss, _ = policy_loss(logits, batch.targets, old_logp=lp32, ref_logp=None,
                              advantages=batch.extras["advantages"],
                              mask=batch.loss_mask, config=cfg_loss, temperature=0.7, seq_ids=batch.seq_ids)
        losses.append(loss.item())
    out["loss_fp32"], out["loss_bf16"] = losses
    return out


def step_time(cfg: dict, device, batch_args, reps: int) -> dict:
    from r1_engine.engine.batch import with_logprobs
    from r1_engine.engine.objectives import policy_objective
    from r1_engine.kernels.loss_family import PolicyLossConfig
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.optim import build_optimizer, wrap_for_training
    from r1_engine.parallel.step import logprobs, train_step

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = build_gpt_model(cfg, dtype=dtype).to(device)
    ddp = wrap_for_training(model)
    opt = build_optimizer(ddp, lr=1e-6)
    batch = _batch(cfg["vocab_size"], *batch_args).to(device)
    tokens = int(batch.loss_mask.numel())
    objective = policy_objective(PolicyLossConfig(beta=0.0), temperature=1.0)
    res = {"tokens_per_step": tokens, "completion_tokens": int(batch.loss_mask.sum()),
           "params_millions": sum(p.numel() for p in model.parameters()) / 1e6}
    batch = with_logprobs(batch, old_logp=logprobs(ddp, batch, temperature=1.0, num_microbatches=4))
    res["logprobs"] = _timed(lambda: logprobs(ddp, batch, temperature=1.0, num_microbatches=4), reps)
    for fused in (True, False):
        r = _timed(lambda: train_step(ddp, opt, batch, objective, num_microbatches=4, fused_lm_head=fused), reps)
        r["tokens_per_s"] = tokens / r["median_s"]
        res[f"train_step_fused_{fused}"] = r
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    cfg = TINY if dry else QWEN2_05B
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"device": device_name, "torch": torch.__version__, "dry_run": dry, "shape": cfg}
    try:  # megatron-core may be missing from the image: both sections then say so, and the exit code is 1
        from r1_engine.parallel.state import init_parallel

        device = init_parallel(1, 1).device
    except Exception as err:  # noqa: BLE001 - recorded, not raised: the results file is still written
        results["parity"] = results["step"] = {"error": f"init_parallel: {err!r}"}
    else:
        try:
            results["parity"] = parity(TINY, device, (8, 16, 24, 64))
        except Exception as err:  # record and go on: the next section is independent
            results["parity"] = {"error": repr(err)}
        try:
            results["step"] = step_time(cfg, device, (6, 16, 32, 64) if dry else (32, 256, 768, 4096), args.reps)
        except Exception as err:
            results["step"] = {"error": repr(err)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    stem = out / f"gpu-step-{slug}-{_dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [f"# Megatron step on {device_name} (torch {torch.__version__}){' — DRY RUN' if dry else ''}", ""]
    for section in ("parity", "step"):
        lines.append(f"## {section}")
        for k, v in results[section].items():
            lines.append(f"- {k}: {json.dumps(v)}")
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if all("error" not in results[s] for s in ("parity", "step")) else 1


if __name__ == "__main__":
    sys.exit(main())
