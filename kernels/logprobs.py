"""Token log-probabilities and entropy from logits: the statistics pass and the gradient pass.

    logp_t = z_t[y_t]/T - logsumexp(z_t/T)          H_t = logsumexp(z_t/T) - sum_j p_j z_j/T

Statistics pass (forward): one read of each row of logits, an online logsumexp in fp32 that also
carries sum_j e^{u_j - m} (u_j - m) (for the entropy) and picks the target logit; the running max is a
scalar, the two sums are kept per lane and reduced once at the end of the row. It writes four fp32
numbers per token, never an [N, V] fp32 tensor. Under vocab-parallel TP each rank reduces its shard
to those four numbers; the ranks all-gather them ([tp, 4, N], a few bytes per token) and combine (with one
more row, whether the shard owns the target: the TP range check of the targets, see validate_targets).

Gradient pass (backward): one more read and one write per row,
    dL/dz_j = [ g_t (onehot(y_t)_j - p_j) + h_t p_j (E_t - u_j) ] / T,    u = z/T, E_t = sum p u
with logp_j = u_j - lse (so -H - logp_j = E_t - u_j), g_t = dL/dlogp_t and h_t = dL/dH_t from whatever loss
consumed the vectors (loss_family.py). lse = m + log(sum e^{u-m}) is kept as its two parts and logp_j computed
as (u_j - m) - log(sum): at |u| ~ 1e4 a rounded fp32 lse would be off by ~1e-3 in every logp_j.
The grad_output scale is already folded into g_t and h_t by autograd, so backward needs no extra
scaling pass and no host sync. Rows with g_t = h_t = 0 (prompt, padding) write zeros without reading.
It stays local to each vocab shard. With `inplace_backward=True` the gradient overwrites the logits'
storage (as Liger's cross entropy does), so the logits' memory never doubles; only use it when
nothing else needs the logits after the loss.

Backends: Triton for CUDA tensors (and for CPU tensors under TRITON_INTERPRET=1, which is how CI
tests the kernels); a row-chunked torch implementation of the same two passes otherwise.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .nvtx import nvtx_range

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a core dependency on Linux
    HAS_TRITON = False

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp32 bytes of one block of rows of the torch backend: its temporaries (at most two fp32 blocks) stay within the
# last-level cache across a block's passes, whatever N (and the per-block Python overhead is noise: 27 rows at V = 151,936)
_TORCH_BLOCK_BYTES = 1 << 20


def _torch_rows(v: int) -> int:
    return max(1, _TORCH_BLOCK_BYTES // (4 * max(v, 1)))


if HAS_TRITON:

    @triton.jit
    def _online_update(u, m, s, su):
        """Fold one block of scaled logits u into the running max m (scalar) and the per-lane sums
        s = sum e^{u-m}, su = sum e^{u-m} (u - m)."""
        m_new = tl.maximum(m, tl.max(u, axis=0))
        # guard -inf - -inf: a chunk (or a shard) of -inf logits contributes nothing
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - m_safe)
        e = tl.exp(u - m_safe)
        # su kept relative to the running max: no cancellation at |z| ~ 1e4
        eu = e * tl.where(e > 0.0, u - m_safe, 0.0)
        su = (su + tl.where(s > 0.0, m - m_safe, 0.0) * s) * scale + eu
        s = s * scale + e
        return m_new, s, su

    @triton.jit
    def _stats_kernel(logits_ptr, targets_ptr, stats_ptr, stride_row, n_rows, n_cols, vocab_start, inv_temp,
                      BLOCK_V: tl.constexpr):
        # one program per token row; int64 offsets because N * V passes 2^31 at realistic sizes
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        m = tl.full((), float("-inf"), tl.float32)
        # the sums stay per lane until the end: one block reduction (the max) an iteration instead of three,
        # and the rescale is one scalar exp an iteration, so the loop still costs one exp an element
        s = tl.zeros((BLOCK_V,), tl.float32)
        su = tl.zeros((BLOCK_V,), tl.float32)
        # full blocks load without a mask: with a row stride that is a multiple of 16 elements (Megatron's padded
        # vocab shards; linear_grpo's chunk buffers) they are 16-byte vector loads whatever V is, where a mask on
        # offs < V would split them into scalar loads unless V itself is a multiple of 16; one masked tail block
        n_full = (n_cols // BLOCK_V) * BLOCK_V
        for start in range(0, n_full, BLOCK_V):
            u = tl.load(base + start + cols).to(tl.float32) * inv_temp
            m, s, su = _online_update(u, m, s, su)
        if n_full < n_cols:
            offs = n_full + cols
            u = tl.load(base + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32) * inv_temp
            m, s, su = _online_update(u, m, s, su)
        su = tl.sum(su, axis=0)
        s = tl.sum(s, axis=0)
        target = tl.load(targets_ptr + row) - vocab_start
        owned = (target >= 0) & (target < n_cols)
        zt = tl.load(base + tl.where(owned, target, 0)).to(tl.float32) * inv_temp
        zt = tl.where(owned, zt, 0.0)
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + n_rows + row, s)
        tl.store(stats_ptr + 2 * n_rows + row, zt)
        tl.store(stats_ptr + 3 * n_rows + row, su)

    @triton.jit
    def _grad_block(u, offs, target, row_max, log_sum, entropy, g, h, inv_temp, HAS_H: tl.constexpr):
        """dL/dz of one block: [g (onehot - p) + h p (-H - logp)] / T."""
        logp = (u - row_max) - log_sum
        p = tl.exp(logp)
        d = -g * p
        d = tl.where(offs == target, d + g, d)
        if HAS_H:
            # dH/du_j = p_j (sum_k p_k u_k - u_j) = p_j (-H - logp_j)
            d += h * p * tl.where(p > 0.0, -entropy - logp, 0.0)
        return d * inv_temp

    @triton.jit
    def _grad_kernel(logits_ptr, grad_ptr, targets_ptr, max_ptr, log_sum_ptr, entropy_ptr, g_ptr, h_ptr, stride_row,
                     stride_grad_row, n_cols, vocab_start, inv_temp, HAS_H: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        gbase = grad_ptr + row * stride_grad_row
        cols = tl.arange(0, BLOCK_V)
        out_ty = grad_ptr.dtype.element_ty
        g = tl.load(g_ptr + row)
        if HAS_H:  # constexpr: one of the two is compiled
            h = tl.load(h_ptr + row)
            no_grad = (g == 0.0) & (h == 0.0)
        else:
            h = 0.0
            no_grad = g == 0.0
        # as in the statistics pass: unmasked (vector) full blocks, one masked tail
        n_full = (n_cols // BLOCK_V) * BLOCK_V
        tail = n_full + cols
        if no_grad:
            # prompt/padding tokens: no gradient, and no need to read their logits
            zeros = tl.zeros((BLOCK_V,), tl.float32).to(out_ty)
            for start in range(0, n_full, BLOCK_V):
                tl.store(gbase + start + cols, zeros)
            if n_full < n_cols:
                tl.store(gbase + tail, zeros, mask=tail < n_cols)
        else:
            row_max = tl.load(max_ptr + row)
            log_sum = tl.load(log_sum_ptr + row)
            entropy = tl.load(entropy_ptr + row)
            target = tl.load(targets_ptr + row) - vocab_start
            for start in range(0, n_full, BLOCK_V):
                offs = start + cols
                u = tl.load(base + offs).to(tl.float32) * inv_temp
                d = _grad_block(u, offs, target, row_max, log_sum, entropy, g, h, inv_temp, HAS_H)
                tl.store(gbase + offs, d.to(out_ty))
            if n_full < n_cols:
                valid = tail < n_cols
                u = tl.load(base + tail, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
                d = _grad_block(u, tail, target, row_max, log_sum, entropy, g, h, inv_temp, HAS_H)
                tl.store(gbase + tail, d.to(out_ty), mask=valid)


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


# (BLOCK_V, num_warps) of each pass, NOT yet timed on hardware. Chosen from the kernels' static resource usage
# compiled for sm_90 as the JIT specialises a launch on 151,936-wide bf16 logits (benchmarks/sm90_resources.py
# -> benchmarks/results/sm90-resources-bf16.md): 16 values a thread (two 16-byte loads), no spills, and many
# resident programs per SM to hide HBM latency: stats 2048x4 = 72 regs, 7 programs (28 warps) per SM; grad
# 2048x4 = 40 regs, 12 programs (48 warps). (8192x8 needs 127/80 regs: 2-3 programs per SM.)
# benchmarks/gpu_suite.py's `tune` section times both passes on the device and prints the best pairs;
# R1_KERNEL_LAUNCH="stats=8192x8,grad=4096x16" overrides them without a code change.
DEFAULT_LAUNCH = {"stats": (2048, 4), "grad": (2048, 4)}


def _parse_launch(spec: str) -> dict:
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        try:
            name, value = item.split("=")
            block, warps = (int(x) for x in value.lower().split("x"))
        except ValueError:
            raise ValueError(f"R1_KERNEL_LAUNCH: cannot parse {item!r}; expected e.g. 'stats=8192x8,grad=4096x16'") \
                from None
        if name not in DEFAULT_LAUNCH:
            raise ValueError(f"R1_KERNEL_LAUNCH: unknown pass {name!r}; the passes are {sorted(DEFAULT_LAUNCH)}")
        if block < 16 or block & (block - 1) or warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"R1_KERNEL_LAUNCH: {item!r} needs a power-of-two BLOCK_V >= 16 and num_warps in "
                             "1, 2, 4, 8, 16, 32")
        out[name] = (block, warps)
    return out


LAUNCH = DEFAULT_LAUNCH | _parse_launch(os.environ.get("R1_KERNEL_LAUNCH", ""))


def set_launch(pass_name: str, block_v: int, num_warps: int) -> tuple[int, int]:
    """Set one pass's (BLOCK_V, num_warps) for later launches; returns the previous pair (for the tuner)."""
    new = _parse_launch(f"{pass_name}={block_v}x{num_warps}")[pass_name]
    previous, LAUNCH[pass_name] = LAUNCH[pass_name], new
    return previous


def _launch(pass_name: str, n_cols: int) -> tuple[int, int]:
    block, warps = LAUNCH[pass_name]
    # a small vocabulary (tests, shards of toy models) needs no block wider than itself
    return min(block, triton.next_power_of_2(max(n_cols, 16))), warps


def stats_triton(logits2d, targets, vocab_start, inv_temp):
    n, v = logits2d.shape
    stats = torch.empty(4, n, dtype=torch.float32, device=logits2d.device)
    if n:
        block, warps = _launch("stats", v)
        _stats_kernel[(n,)](logits2d, targets, stats, logits2d.stride(0), n, v, vocab_start, inv_temp,
                            BLOCK_V=block, num_warps=warps)
    return stats


def _shifted_fp32(block: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """block - shift[:, None] in fp32, in one pass: an fp32 block is read once (no copy first); a bf16/fp16 block is
    widened before the subtraction so that nothing is rounded to its 8 mantissa bits."""
    if block.dtype == torch.float32:
        return torch.sub(block, shift[:, None], out=out)
    if out is None:
        return block.to(torch.float32).sub_(shift[:, None])
    return out.copy_(block).sub_(shift[:, None])


def stats_torch(logits2d, targets, vocab_start, inv_temp):
    """The statistics pass in torch, a block of rows at a time (the block stays in the last-level cache across its
    four passes: max, shift, exp, sum + the e.u dot). u - m and e^(u-m) are its only temporaries."""
    n, v = logits2d.shape
    stats = torch.empty(4, n, dtype=torch.float32, device=logits2d.device)
    local = targets - vocab_start
    owned = (local >= 0) & (local < v)
    rows = min(n, _torch_rows(v))
    # two work blocks for the whole pass: a fresh allocation a block would cost its page faults every time
    u_buf = torch.empty(rows, v, dtype=torch.float32, device=logits2d.device)
    e_buf = torch.empty_like(u_buf)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        x = logits2d[a:b]
        zt = x.gather(1, local[a:b].clamp(0, v - 1)[:, None]).squeeze(1).float().mul_(inv_temp)
        stats[2, a:b] = torch.where(owned[a:b], zt, torch.zeros_like(zt))
        m = x.max(dim=-1).values.float()  # max(x / T) = max(x) / T (T > 0)
        m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
        u = _shifted_fp32(x, m_safe, out=u_buf[: b - a])
        if inv_temp != 1.0:
            u.mul_(inv_temp)
        e = torch.exp(u, out=e_buf[: b - a])
        stats[0, a:b] = m * inv_temp
        stats[1, a:b] = e.sum(-1)
        # sum e (u - m) as a batched dot (one read of each, no product tensor); a -inf logit gives 0 * -inf = NaN
        # there, so those rows (masked vocabularies, never an lm_head's output) are summed again without them
        dot = torch.bmm(e[:, None, :], u[:, :, None]).view(-1)
        bad = torch.isnan(dot) & ~torch.isnan(m)
        if bool(bad.any()):
            rb = torch.nonzero(bad).squeeze(1)
            eb = e[rb]
            dot[rb] = eb.mul_(u[rb].masked_fill_(eb == 0, 0.0)).sum(-1)
        stats[3, a:b] = dot
    return stats


def grad_triton(logits2d, grad2d, targets, lse_parts, entropy, g, h, vocab_start, inv_temp):
    n, v = logits2d.shape
    if n:
        block, warps = _launch("grad", v)
        _grad_kernel[(n,)](logits2d, grad2d, targets, lse_parts[0], lse_parts[1], entropy, g,
                           h if h is not None else g,
                           logits2d.stride(0), grad2d.stride(0), v, vocab_start, inv_temp,
                           HAS_H=h is not None, BLOCK_V=block, num_warps=warps)


def grad_torch(logits2d, grad2d, targets, lse_parts, entropy, g, h, vocab_start, inv_temp):
    """The gradient pass in torch, a block of rows at a time: d = p (h (-H - logp) - g) (the h term only where
    p > 0), + g at the target, / T. An fp32 grad2d is the working buffer itself (with grad2d = logits2d, the
    linear loss's case, the pass runs in place: three passes over the block and no temporary without h)."""
    n, v = logits2d.shape
    local = targets - vocab_start
    owned = (local >= 0) & (local < v)
    block = _torch_rows(v)
    lse = lse_parts[0] + lse_parts[1]
    in_place = grad2d.dtype == torch.float32
    block = min(n, block)
    d_buf = None if in_place else torch.empty(block, v, dtype=torch.float32, device=logits2d.device)
    p_buf = None if h is None else torch.empty(block, v, dtype=torch.float32, device=logits2d.device)
    for a in range(0, n, block):
        b = min(n, a + block)
        # logp = x / T - lse = (x - T lse) / T, written over the output block when it is fp32
        d = _shifted_fp32(logits2d[a:b], lse[a:b] / inv_temp, out=grad2d[a:b] if in_place else d_buf[: b - a])
        if inv_temp != 1.0:
            d.mul_(inv_temp)
        if h is not None:
            p = torch.exp(d, out=p_buf[: b - a])
            hb = h[a:b] * inv_temp
            # (h (-H - logp) - g) / T = -(h / T) logp + (-(h / T) H - g / T), then times p
            d.mul_(-hb[:, None]).add_((-hb * entropy[a:b] - g[a:b] * inv_temp)[:, None]).mul_(p)
            d.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # p = 0 at logp = -inf: 0 * inf is 0 here, not NaN
        else:
            d.exp_().mul_(-(g[a:b] * inv_temp)[:, None])
        rows = torch.nonzero(owned[a:b]).squeeze(1)
        d[rows, local[a:b][rows]] += g[a:b][rows] * inv_temp
        if not in_place:
            grad2d[a:b] = d


def owned_targets(targets: torch.Tensor, vocab_start: int, v_local: int) -> torch.Tensor:
    """Which targets fall in this shard's ids [vocab_start, vocab_start + v_local) (for combine_stats)."""
    return (targets >= vocab_start) & (targets < vocab_start + v_local)


def _check_ownership(count: torch.Tensor):
    """Under TP each target id must lie in exactly one rank's shard: the range check, without a collective of
    its own (the count rides on the statistics' all-gather) and, on CUDA, without a host sync."""
    if not count.numel():
        return
    msg = ("targets out of range: a target id lies in no tensor-parallel rank's vocabulary shard (or in more "
           "than one: overlapping vocab_start)")
    if count.is_cuda:
        torch._assert_async((count == 1).all(), msg)
        return
    bad = torch.nonzero(count != 1).flatten()
    if bad.numel():
        raise ValueError(f"{msg}: {bad.numel()} token(s), the first at flat position {int(bad[0])}")


def combine_stats(stats: torch.Tensor, tp_group=None, owned: torch.Tensor | None = None):
    """[4, N] per-shard (max m, sum e^{u-m}, target u, sum e^{u-m}(u-m)) -> (logp, entropy, lse_parts).

    lse_parts = [2, N] (m, log sum e^{u-m}), whose sum is logsumexp(u): the gradient pass takes the parts.

    Under TP the shards' statistics are all-gathered ([tp, 5, N] with `owned`: 20 bytes a token a rank) and merged
    with the usual max-rescaling; every rank ends with the same vectors. `owned` (owned_targets of this
    shard) travels with them as a fifth row, and every target must be owned by exactly one rank."""
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        if owned is not None:
            stats = torch.cat((stats, owned.to(stats.dtype)[None]))
        parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, stats.contiguous(), group=tp_group)
        allstats = torch.stack(parts)  # [tp, 4 (or 5), N]
        if owned is not None:
            _check_ownership(allstats[:, 4].sum(0))
        m_r, s_r = allstats[:, 0], allstats[:, 1]
        m = m_r.max(dim=0).values
        m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
        scale = torch.exp(m_r - m)
        s = (s_r * scale).sum(0)
        su = torch.where(s_r > 0, (allstats[:, 3] + (m_r - m) * s_r) * scale, torch.zeros_like(s_r)).sum(0)
        zt = allstats[:, 2].sum(0)
    else:
        m, s, zt, su = stats
        m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    log_sum = torch.log(s)
    entropy = log_sum - su / s
    return (zt - m) - log_sum, entropy, torch.stack((m, log_sum))


def validate_targets(targets: torch.Tensor, token_shape, v_local: int, device, tp_group=None, vocab_start=None):
    """Targets must be int token ids of the token shape, on the same device, inside the (global) vocabulary.

    Returns (targets1d int64, vocab_start). Without TP the range check is local: a ValueError on CPU, a
    device-side assert with the same message on CUDA (no host sync). Under TP no rank knows the whole
    vocabulary (shards may differ in size), so the check is that every target lies in exactly one rank's
    shard, made in combine_stats on the statistics' own all-gather: no extra collective, no host sync on CUDA.
    Either way an out-of-range id never becomes a silent wrong loss."""
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a tensor, got {type(targets).__name__}")
    if tuple(targets.shape) != tuple(token_shape):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match the token shape {tuple(token_shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device} but the logits/hidden on {device}")
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    if vocab_start is None:
        vocab_start = dist.get_rank(tp_group) * v_local if tp > 1 else 0
    if tp == 1 and targets.numel():
        v_total = vocab_start + v_local
        if targets.is_cuda:
            # no host sync on the hot path: a device-side assert carrying the same message
            torch._assert_async(((targets >= 0) & (targets < v_total)).all(),
                                f"targets out of range: the vocabulary has {v_total} entries")
        else:
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= v_total:
                raise ValueError(f"targets out of range: found ids in [{lo}, {hi}] but the vocabulary has "
                                 f"{v_total} entries")
    return targets.reshape(-1).long().contiguous(), int(vocab_start)


def validate_logits_targets(logits: torch.Tensor, targets: torch.Tensor, tp_group=None, vocab_start=None):
    """Shape/dtype/device/range checks with messages that say what is wrong. Returns (logits2d, targets1d, vocab_start)."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} is not supported; use float32, bfloat16 or float16")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    v_local = logits.shape[-1]
    targets1d, vocab_start = validate_targets(targets, logits.shape[:-1], v_local, logits.device, tp_group, vocab_start)
    logits2d = logits.reshape(-1, v_local)
    if logits2d.stride(-1) != 1 or (logits2d.shape[0] > 1 and logits2d.stride(0) < v_local):
        logits2d = logits2d.contiguous()
    return logits2d, targets1d, vocab_start


class TokenLogprobsFunction(torch.autograd.Function):
    """(logits [N, V_local], targets [N]) -> (logp [N], entropy [N]), fp32, differentiable in the logits."""

    @staticmethod
    def forward(ctx, logits2d, targets, temperature, vocab_start, tp_group, inplace_backward):
        inv_temp = 1.0 / float(temperature)
        stats_fn = stats_triton if use_triton(logits2d) else stats_torch
        with nvtx_range("statistics"):
            stats = stats_fn(logits2d, targets, vocab_start, inv_temp)
            owned = owned_targets(targets, vocab_start, logits2d.shape[1]) if tp_group is not None else None
            logp, entropy, lse_parts = combine_stats(stats, tp_group, owned)
        ctx.save_for_backward(logits2d, targets, lse_parts, entropy)
        ctx.inv_temp, ctx.vocab_start, ctx.inplace = inv_temp, vocab_start, inplace_backward
        # an unused output (the entropy, mostly) must arrive as None, not zeros: then its term is skipped
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits2d, targets, lse_parts, entropy = ctx.saved_tensors
        g = grad_logp.float().contiguous() if grad_logp is not None else torch.zeros_like(entropy)
        h = grad_entropy.float().contiguous() if grad_entropy is not None else None
        grad = logits2d.detach() if ctx.inplace else torch.empty_like(logits2d)
        grad_fn = grad_triton if use_triton(logits2d) else grad_torch
        with nvtx_range("gradient"):
            grad_fn(logits2d, grad, targets, lse_parts, entropy, g, h, ctx.vocab_start, ctx.inv_temp)
        return grad, None, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                   return_entropy: bool = False, tp_group=None, vocab_start: int | None = None,
                   inplace_backward: bool = False):
    """Per-token log-probabilities (and entropy) of `targets` under softmax(logits / temperature).

    logits: [..., V] (or a vocab shard [..., V/tp] under `tp_group`, covering global ids
    [vocab_start, vocab_start + V/tp); vocab_start defaults to tp_rank * V/tp, Megatron's layout).
    targets: [...] global token ids. Returns fp32 [...] identical on every TP rank.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits2d, targets1d, vocab_start = validate_logits_targets(logits, targets, tp_group, vocab_start)
    logp, entropy = TokenLogprobsFunction.apply(logits2d, targets1d, float(temperature), vocab_start, tp_group,
                                                inplace_backward)
    shape = logits.shape[:-1]
    if return_entropy:
        return logp.view(shape), entropy.view(shape)
    return logp.view(shape)
