"""The suite's `tune` section: a (BLOCK_V, num_warps) sweep of the statistics and gradient passes."""
from __future__ import annotations

import torch

from benchmarks.cases import make_loss_case
from benchmarks.checks import reference_outputs
from benchmarks.runners import Runner
from benchmarks.suite import Suite
from benchmarks.timing import free_memory, measure


def _sweep(suite: Suite, lp) -> dict:
    """Time each pass alone on the same logits for every (BLOCK_V, num_warps) pair with 1-64 values a thread;
    the committed launch configuration is restored after each timing."""
    n, v = suite.sizes.n_tokens, suite.sizes.vocab
    g = torch.Generator(device=suite.device).manual_seed(30)
    logits = torch.randn(n, v, generator=g, device=suite.device, dtype=suite.dtype).mul_(3.0)
    targets = torch.randint(0, v, (n,), generator=g, device=suite.device)
    grad = torch.empty_like(logits)
    _, entropy, lse_parts = lp.combine_stats(lp.stats_triton(logits, targets, 0, 1.0))
    g_vec = torch.randn(n, generator=g, device=suite.device)  # every row has a gradient: full work
    passes = {"stats": (lambda: lp.stats_triton(logits, targets, 0, 1.0), 1),
              "grad": (lambda: lp.grad_triton(logits, grad, targets, lse_parts, entropy, g_vec, None, 0, 1.0), 2)}
    blocks, warps = ((256, 1024), (4,)) if suite.dry else ((1024, 2048, 4096, 8192, 16384), (4, 8, 16, 32))
    logits_bytes = n * v * (torch.finfo(suite.dtype).bits // 8)
    roof = suite.meta.get("copy_roofline_gbps")
    tuning = {"defaults": {k: list(x) for k, x in lp.DEFAULT_LAUNCH.items()}, "sweep": [], "best": {}}
    suite.tuning = tuning  # recorded as it fills: a section cut short keeps the rows it timed
    for name, (call, n_passes) in passes.items():
        for block in blocks:
            for w in warps:
                per_thread = block // (32 * w)
                if not 1 <= per_thread <= 64:  # idle lanes, or register spills
                    continue
                if suite.left() <= 0:
                    raise RuntimeError("time budget spent during the sweep")
                previous = lp.set_launch(name, block, w)
                try:
                    t = measure(Runner(fn=call), suite.device, warmup=1, min_reps=5, max_reps=20, target_s=0.15)
                finally:
                    lp.set_launch(name, *previous)
                gbps = n_passes * logits_bytes / (t.median_ms / 1e3) / 1e9
                row = {"pass": name, "block_v": block, "num_warps": w, "median_ms": t.median_ms,
                       "gbps": gbps, "pct_roofline": 100 * gbps / roof if roof else None}
                tuning["sweep"].append(row)
                suite.log(f"   {name:5s} BLOCK_V={block:6d} num_warps={w:2d} {t.median_ms:8.3f} ms "
                          f"{gbps:8,.0f} GB/s")
        rows = [r for r in tuning["sweep"] if r["pass"] == name]
        best = min(rows, key=lambda r: r["median_ms"])
        default = next((r for r in rows if [r["block_v"], r["num_warps"]] == tuning["defaults"][name]), None)
        tuning["best"][name] = best | {
            "speedup_vs_default": default["median_ms"] / best["median_ms"] if default else None}
    return tuning


def tune(suite: Suite):
    """Sweep (BLOCK_V, num_warps) of the statistics and the gradient pass at the benchmark size, each pass
    timed alone on the same bf16 logits, then rerun grpo_loss fwd+bwd with the best pair of each pass
    (impl `ours-tuned`). The defaults in kernels/logprobs.py stay as committed: the best pairs are printed
    as an R1_KERNEL_LAUNCH value and go into DEFAULT_LAUNCH in a later commit."""
    from r1_engine.kernels import logprobs as lp

    if not lp.HAS_TRITON:
        raise RuntimeError("triton is not importable")
    tuning = _sweep(suite, lp)  # its 10 GB of logits are freed on return, before the rerun
    env = ",".join(f"{k}={b['block_v']}x{b['num_warps']}" for k, b in tuning["best"].items())
    tuning["env"] = env
    suite.log(f"   best: R1_KERNEL_LAUNCH={env}")
    free_memory(suite.device)

    saved = {k: lp.set_launch(k, b["block_v"], b["num_warps"]) for k, b in tuning["best"].items()}
    try:
        case = make_loss_case(suite.sizes, suite.dtype, suite.device, seed=10)
        rows = suite.rows()
        ref = reference_outputs("grpo_loss", case, True, suite.settings, float64=suite.dry, rows=rows)
        for impl in ("ours", "ours-inplace"):
            suite.bench("grpo_loss", impl, True, case, ref, rows, label=impl.replace("ours", "ours-tuned"))
    finally:
        for k, pair in saved.items():
            lp.set_launch(k, *pair)
