"""Registers, spills and occupancy of the Triton kernels compiled for an H100 (sm_90), without a GPU.

    python -m benchmarks.sm90_resources [--out benchmarks/results/sm90-resources.md]

Triton compiles the kernels ahead of time for GPUTarget("cuda", 90, 32) and the cuobjdump bundled with its
wheel reads the cubin's resource usage. Occupancy is derived from the H100's per-SM limits (65,536 registers,
64 warps, 32 blocks); bytes in flight count one iteration's logits load per resident program. This is a
static proxy that guides the launch-configuration defaults until `gpu_suite.py --sections tune` has timed
them on hardware; it measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGS_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM = 65_536, 64, 32
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _imports():
    """triton + our kernels, compiled for real: the interpreter (TRITON_INTERPRET=1) must be off before
    kernels.logprobs is imported, so this module imports them lazily and only as a script."""
    if os.environ.get("TRITON_INTERPRET") == "1" and "r1_engine.kernels.logprobs" in sys.modules:
        raise RuntimeError("kernels were imported under TRITON_INTERPRET=1; run this script in its own process")
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from r1_engine.kernels import logprobs

    return triton, GPUTarget("cuda", 90, 32), ASTSource, logprobs


def cuobjdump() -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.is_file() else None


def compile_pass(name: str, dtype: str, block_v: int, num_warps: int, has_h: bool = False,
                 n_cols_multiple_of_16: bool = True):
    """The compiled kernel of one pass ('stats' or 'grad') for sm_90, specialised as Triton's JIT specialises
    a launch on [N, V] logits with 16-byte aligned buffers and a row stride divisible by 16 (e.g. V = 151,936,
    or any Megatron-padded vocabulary shard): `tt.divisibility = 16` on the pointers, the row strides, the
    row count, and on n_cols unless `n_cols_multiple_of_16` is False (a shard of 151,665 real vocabulary rows
    in a buffer whose row stride is padded, as linear_grpo allocates it). A contiguous [N, 151,665] tensor has
    an unaligned row stride too, and then every access is scalar: keep vocabularies padded (Megatron does)."""
    triton, h100, ASTSource, logprobs = _imports()
    aligned = [["tt.divisibility", 16]]
    if name == "stats":
        signature = {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "stats_ptr": "*fp32", "stride_row": "i64",
                     "n_rows": "i32", "n_cols": "i32", "vocab_start": "i64", "inv_temp": "fp32",
                     "BLOCK_V": "constexpr"}
        divisible = ["logits_ptr", "targets_ptr", "stats_ptr", "stride_row", "n_rows"]
        fn, constexprs = logprobs._stats_kernel, {"BLOCK_V": block_v}
    elif name == "grad":
        signature = {"logits_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "targets_ptr": "*i64", "max_ptr": "*fp32",
                     "log_sum_ptr": "*fp32", "entropy_ptr": "*fp32", "g_ptr": "*fp32", "h_ptr": "*fp32",
                     "stride_row": "i64", "stride_grad_row": "i64", "n_cols": "i32", "vocab_start": "i64",
                     "inv_temp": "fp32", "HAS_H": "constexpr", "BLOCK_V": "constexpr"}
        divisible = ["logits_ptr", "grad_ptr", "targets_ptr", "max_ptr", "log_sum_ptr", "entropy_ptr", "g_ptr",
                     "h_ptr", "stride_row", "stride_grad_row"]
        fn, constexprs = logprobs._grad_kernel, {"HAS_H": has_h, "BLOCK_V": block_v}
    else:
        raise ValueError(f"unknown pass {name!r}")
    if n_cols_multiple_of_16:
        divisible.append("n_cols")
    names = list(signature)
    attrs = {(names.index(k),): aligned for k in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=h100, options={"num_warps": num_warps})


def global_access_widths(kernel) -> dict[str, int]:
    """How many PTX global loads/stores of each width the kernel has ('ld.global.v4.b32': 16-byte vectors)."""
    counts: dict[str, int] = {}
    for op in re.findall(r"\b(ld\.global[.\w]*|st\.global[.\w]*)", kernel.asm["ptx"]):
        counts[op] = counts.get(op, 0) + 1
    return counts


def resource_usage(kernel) -> dict[str, int]:
    """{'reg', 'stack', 'shared', 'local'} of a compiled kernel, from cuobjdump -res-usage."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump is not bundled with this triton wheel")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{out}")
    return dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups())))


def occupancy(regs: int, num_warps: int) -> int:
    """Resident programs per SM (register file, warp slots, block slots)."""
    regs_per_program = max(regs, 1) * 32 * num_warps
    return max(0, min(REGS_PER_SM // regs_per_program, WARPS_PER_SM // num_warps, BLOCKS_PER_SM))


def table(dtype: str = "bf16", configs=None) -> list[dict]:
    """One row per (pass, BLOCK_V, num_warps); configs: [(block, warps)] (default: the tune grid)."""
    *_, logprobs = _imports()
    if configs is None:
        configs = [(b, w) for b in (1024, 2048, 4096, 8192, 16384) for w in (4, 8, 16, 32)
                   if 1 <= b // (32 * w) <= 64]
    rows = []
    for block, warps in configs:
        for name in ("stats", "grad"):
            u = resource_usage(compile_pass(name, dtype, block, warps))
            programs = occupancy(u["reg"], warps)
            rows.append({"pass": name, "block_v": block, "num_warps": warps, **u, "programs_per_sm": programs,
                         "warps_per_sm": programs * warps,
                         "kib_in_flight_per_sm": programs * block * DTYPE_BYTES[dtype] / 1024,
                         "default": tuple(logprobs.DEFAULT_LAUNCH[name]) == (block, warps)})
    return rows


def markdown(rows: list[dict], dtype: str) -> str:
    import triton

    lines = [f"# Triton kernels compiled for sm_90 (H100), {dtype} logits: static resource usage", "",
             f"triton {triton.__version__}; specialised as the JIT specialises a launch on [N, V] logits with V a "
             "multiple of 16 (aligned pointers and strides); registers and local memory (spills) from cuobjdump "
             "-res-usage; "
             "programs/SM from 65,536 registers, 64 warps, 32 blocks per SM; KiB in flight = programs x one "
             "iteration's logits load. A proxy for choosing defaults, not a measurement "
             "(benchmarks/sm90_resources.py).", "",
             "| pass | BLOCK_V | num_warps | regs/thread | spill (local B) | programs/SM | warps/SM | KiB in flight/SM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " (default)" if r["default"] else ""
        lines.append(f"| {r['pass']}{mark} | {r['block_v']} | {r['num_warps']} | {r['reg']} | {r['local']} | "
                     f"{r['programs_per_sm']} | {r['warps_per_sm']} | {r['kib_in_flight_per_sm']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--defaults-json", action="store_true",
                    help="print only the default launch configurations' rows as JSON (used by the CI test)")
    args = ap.parse_args(argv)
    if args.defaults_json:
        *_, logprobs = _imports()
        rows = []
        for name, (block, warps) in logprobs.DEFAULT_LAUNCH.items():
            for row in (r for r in table(args.dtype, [(block, warps)]) if r["pass"] == name):
                for multiple in (True, False):
                    widths = global_access_widths(compile_pass(name, args.dtype, block, warps,
                                                               n_cols_multiple_of_16=multiple))
                    row[f"ptx_global_{'v16' if multiple else 'odd_v'}"] = widths
                if name == "grad":  # the entropy-bonus variant of the gradient pass (HAS_H) too
                    row["with_entropy_term"] = resource_usage(compile_pass(name, args.dtype, block, warps, has_h=True))
                rows.append(row)
        print(json.dumps(rows))
        return 0
    text = markdown(table(args.dtype), args.dtype)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
