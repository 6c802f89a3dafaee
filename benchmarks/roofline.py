"""Measured ceilings (copy bandwidth, matmul rate), counted bytes and flops, and the numbers derived from them."""
from __future__ import annotations

import torch

from benchmarks.cases import Sizes
from benchmarks.runners import Runner
from benchmarks.timing import measure

GiB = 1024 ** 3


def measure_ceilings(meta: dict, device: torch.device, dry: bool, log):
    """The copy roofline (a device-to-device copy, bytes read + written counted; METHOD.md) and the matmul
    rate on random data, written into `meta` as each is measured (a failing matmul keeps the copy roofline)."""
    n_bytes = 64 * 2 ** 20 if dry else 4 * GiB
    if device.type == "cuda":
        n_bytes = min(n_bytes, torch.cuda.mem_get_info(device)[0] // 4)
    src = torch.rand(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = measure(Runner(fn=lambda: dst.copy_(src)), device, warmup=3, min_reps=20, max_reps=50)
    bw = 2 * n_bytes / (t.median_ms / 1e3)
    meta["copy_roofline_gbps"] = bw / 1e9
    meta["copy_roofline_detail"] = (f"device-to-device copy of {n_bytes / 1e9:.2f} GB, read + written "
                                    f"counted, median of {t.reps} ({t.clock})")
    log(f"   copy roofline: {bw / 1e9:,.0f} GB/s")
    src = dst = None  # free the 8 GB before the matmul (the lambda above is done with them)
    m = 512 if dry else 8192
    dt = torch.float32 if dry else torch.bfloat16
    a, b = (torch.randn(m, m, device=device, dtype=dt) for _ in range(2))
    t = measure(Runner(fn=lambda: a @ b), device, warmup=3, min_reps=10, max_reps=30)
    meta["matmul_tflops"] = 2 * m ** 3 / (t.median_ms / 1e3) / 1e12
    meta["matmul_detail"] = f"{m}x{m}x{m} {str(dt).replace('torch.', '')} on random data, median of {t.reps}"
    log(f"   matmul: {meta['matmul_tflops']:,.0f} TFLOP/s")


def counted_bytes(op: str, backward: bool, sizes: Sizes, dtype: torch.dtype) -> tuple[int, str]:
    """Bytes the op must move through device memory under the three-pass design, and the formula.

    Forward: read the logits once (N*V*b) plus the per-token vectors. Forward + backward: + read the logits
    again and write dL/dlogits (2*N*V*b) plus the per-token vectors of the gradient pass. So fwd+bwd counts
    3*N*V*b: a kernel at 100% of the copy roofline under this count does exactly three passes.
    Per-token vectors: targets int64 (8 B); token_logprobs writes logp (4 B); grpo_loss reads old_logp, ref_logp,
    advantages, mask (16 B); the gradient pass reads targets, the row max and log-sum, entropy, dL/dlogp (24 B)."""
    n, v = sizes.n_tokens, sizes.vocab
    b = torch.finfo(dtype).bits // 8
    small_fwd = n * (8 + 4) if op == "token_logprobs" else n * (8 + 16)
    if not backward:
        return n * v * b + small_fwd, f"N*V*{b} + N*{small_fwd // n}"
    small = small_fwd + n * 24
    return 3 * n * v * b + small, f"3*N*V*{b} + N*{small // n}"


def linear_flops(sizes: Sizes) -> int:
    """lm_head forward + backward: three GEMMs of N x V x H (logits, dhidden, dweight)."""
    return 6 * sizes.n_tokens * sizes.vocab * sizes.hidden


def derive(rec: dict, op: str, backward: bool, sizes: Sizes, dtype: torch.dtype, roof_gbps: float | None):
    """Add to a timed record its rate: TFLOP/s for the linear op; else counted bytes, GB/s and, given the copy
    roofline, % of it and pass-equivalents."""
    seconds = rec["median_ms"] / 1e3
    if op == "linear_grpo_loss":
        rec["flops"] = linear_flops(sizes)
        rec["tflops"] = rec["flops"] / seconds / 1e12
        return
    n_bytes, formula = counted_bytes(op, backward, sizes, dtype)
    rec.update(counted_bytes=n_bytes, bytes_formula=formula, gbps=n_bytes / seconds / 1e9)
    if roof_gbps:
        rec["pct_roofline"] = 100 * rec["gbps"] / roof_gbps
        # how many full passes over the logits the measured time would allow at the copy roofline
        logits_bytes = sizes.n_tokens * sizes.vocab * (torch.finfo(dtype).bits // 8)
        rec["pass_equivalents"] = seconds * roof_gbps * 1e9 / logits_bytes
