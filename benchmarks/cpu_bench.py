"""The kernel microbenchmarks on a CPU, as CI runs them: ours vs the eager torch reference (in the input dtype)
vs torch.compile of it, with time, bytes moved, peak memory and the ratios side by side.

    python -m benchmarks.cpu_bench --out ci-cpu-microbench.json [--sizes B,L,V,H] [--no-compile]

Every variant (op, mode, implementation) runs in a fresh subprocess, so its memory is its own: peak extra memory is
the process's peak RSS during one call (VmHWM, reset after a warm-up call) minus its RSS before the call, outputs
and gradients included, with glibc told to return freed blocks to the OS (MALLOC_MMAP_THRESHOLD_) so that a
reused free block cannot hide an allocation. "ours" on CPU is the kernels' torch path (the Triton interpreter
checks correctness elsewhere and is not meant to be fast). torch.compile is measured after its compile, which gets
`--compile-timeout-s`; a variant that cannot run is listed with its reason. Timings never fail anything: the
exit code is 1 only when ours or eager did not run. The GPU suite (gpu_suite.py) keeps the H100-scale shapes.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# N = 512 tokens, V = 8,192, H = 256, fp32: a few seconds a variant on 2 cores, logits (16 MB) well beyond L2
DEFAULT_SIZES = (4, 128, 8192, 256)
VARIANTS = (
    [("token_logprobs", "fwd", impl) for impl in ("ours", "eager", "compiled")]
    + [("grpo_loss", "fwd+bwd", impl) for impl in ("ours", "eager", "compiled")]
    + [("linear_grpo_loss", "fwd+bwd", impl) for impl in ("ours", "eager", "compiled", "matmul")]
)


# ------------------------------------------------------------------------------------------ one variant (child)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_one(op: str, mode: str, impl: str, sizes: tuple[int, ...], compile_ok: bool) -> dict:
    import torch

    from benchmarks.baselines import Unavailable
    from benchmarks.cases import Sizes, make_linear_case, make_loss_case
    from benchmarks.roofline import counted_bytes, linear_flops
    from benchmarks.runners import make_runner
    from benchmarks.timing import measure

    rec = {"op": op, "mode": mode, "impl": impl}
    s, dtype, cpu = Sizes(*sizes), torch.float32, torch.device("cpu")
    backward = mode == "fwd+bwd"
    case = (make_linear_case if op == "linear_grpo_loss" else make_loss_case)(s, dtype, cpu, seed=0)
    if impl == "compiled" and not compile_ok:
        return rec | {"status": "unavailable", "reason": "skipped (--no-compile): its C++ build takes 7-30 s a "
                                                         "function on 2 cores"}
    try:
        runner = make_runner(op, impl, case, backward, allow_compile_on_cpu=True)
        t0 = time.perf_counter()
        runner.setup()
        out = runner.fn()  # warm-up (torch.compile compiles here)
        rec["first_call_s"] = time.perf_counter() - t0
        del out
        runner.setup()
        _trim()
        base_kb = _status_kb("VmRSS")
        exact = _reset_peak_rss()
        out = runner.fn()
        peak_kb = _status_kb("VmHWM") if exact else None
        del out
        timing = measure(runner, cpu, warmup=1, min_reps=3, max_reps=20, target_s=1.0)
    except Unavailable as exc:
        return rec | {"status": "unavailable", "reason": str(exc)}
    rec.update(status="ok", median_ms=timing.median_ms, min_ms=timing.min_ms, reps=timing.reps,
               peak_extra_bytes=None if peak_kb is None or base_kb is None else max(0, peak_kb - base_kb) * 1024)
    if op == "linear_grpo_loss":
        rec["flops"] = linear_flops(s)
        rec["gflops"] = rec["flops"] / (timing.median_ms / 1e3) / 1e9
    else:
        rec["counted_bytes"], rec["bytes_formula"] = counted_bytes(op, backward, s, dtype)
        rec["gbps"] = rec["counted_bytes"] / (timing.median_ms / 1e3) / 1e9
    return rec


# ------------------------------------------------------------------------------------------ the driver (parent)


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": platform.processor()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            info["cpu"] = models[0]
        info["memory_gb"] = round((_meminfo_kb("MemTotal") or 0) / 2**20, 1)
    except OSError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def _meminfo_kb(field: str) -> int | None:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _child(variant, sizes, compile_ok: bool, timeout_s: float) -> dict:
    op, mode, impl = variant
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed blocks go back to the OS: the peak RSS sees every allocation
    cmd = [sys.executable, "-m", "benchmarks.cpu_bench", "--one", f"{op}:{mode}:{impl}",
           "--sizes", ",".join(map(str, sizes))] + ([] if compile_ok else ["--no-compile"])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"op": op, "mode": mode, "impl": impl, "status": "unavailable",
                "reason": f"did not finish in {timeout_s:.0f} s (compile included)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"op": op, "mode": mode, "impl": impl, "status": "error", "error": tail[0][:300]}
    rec = json.loads(lines[-1][len("RESULT "):])
    rec["process_s"] = time.perf_counter() - t0
    return rec


def add_ratios(records: list[dict]) -> None:
    """speedup = eager time / this time; memory_ratio = this peak extra / eager's (per op and mode)."""
    eager = {(r["op"], r["mode"]): r for r in records if r["impl"] == "eager" and r["status"] == "ok"}
    for r in records:
        e = eager.get((r["op"], r["mode"]))
        if r["status"] != "ok" or e is None:
            continue
        r["speedup_vs_eager"] = e["median_ms"] / r["median_ms"]
        if r.get("peak_extra_bytes") and e.get("peak_extra_bytes"):
            r["memory_vs_eager"] = r["peak_extra_bytes"] / e["peak_extra_bytes"]


def table(records: list[dict]) -> str:
    head = ("| op | mode | impl | median ms | bytes moved / flops | rate | peak extra MB | speedup vs eager | "
            "memory vs eager |")
    rows = [head, "|" + "---|" * 9]
    for r in records:
        if r["status"] != "ok":
            why = r.get("reason") or r.get("error", "")
            rows.append(f"| {r['op']} | {r['mode']} | {r['impl']} | {r['status']}: {why} | | | | | |")
            continue
        work = (f"{r['counted_bytes'] / 1e6:,.1f} MB" if "counted_bytes" in r else f"{r['flops'] / 1e9:,.2f} GFLOP")
        rate = f"{r['gbps']:,.2f} GB/s" if "gbps" in r else f"{r['gflops']:,.1f} GFLOP/s"
        peak = "n/a" if r.get("peak_extra_bytes") is None else f"{r['peak_extra_bytes'] / 1e6:,.1f}"
        speed = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else ""
        mem = f"{r['memory_vs_eager']:.2f}x" if "memory_vs_eager" in r else ""
        rows.append(f"| {r['op']} | {r['mode']} | {r['impl']} | {r['median_ms']:,.2f} | {work} | {rate} | {peak} | "
                    f"{speed} | {mem} |")
    return "\n".join(rows)


def run(sizes=DEFAULT_SIZES, compile_ok: bool = True, compile_timeout_s: float = 90.0, timeout_s: float = 600.0,
        out: Path | None = None, log=print, ops=None) -> dict:
    t0 = time.perf_counter()
    records = []
    for variant in VARIANTS:
        if ops and variant[0] not in ops:
            continue
        limit = compile_timeout_s if variant[2] == "compiled" else timeout_s
        records.append(_child(variant, sizes, compile_ok, limit))
    add_ratios(records)
    b, seq, v, h = sizes
    result = {"machine": machine(), "sizes": {"batch": b, "seq_len": seq, "vocab": v, "hidden": h, "n_tokens": b * seq},
              "dtype": "float32", "wall_s": time.perf_counter() - t0, "records": records, "table": table(records)}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    m = result["machine"]
    log(f"CPU microbenchmarks: N={b * seq} tokens, V={v}, H={h}, fp32; {m.get('cpu')}, {m['cpu_count']} cores, "
        f"torch {m['torch']}; {result['wall_s']:.0f} s" + (f"; {out}" if out else ""))
    log(result["table"])
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="B,L,V,H (default %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--ops", default=None, help="comma-separated subset of token_logprobs,grpo_loss,linear_grpo_loss")
    p.add_argument("--compile-timeout-s", type=float, default=90.0, help="per torch.compile variant, compile included")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # op:mode:impl, in a child process
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sizes = tuple(int(x) for x in args.sizes.split(","))
        assert len(sizes) == 4 and min(sizes) >= 1
    except (ValueError, AssertionError):
        print(f"--sizes={args.sizes!r}: must be B,L,V,H positive integers", file=sys.stderr)
        return 2
    if args.one:
        op, mode, impl = args.one.split(":")
        print("RESULT " + json.dumps(run_one(op, mode, impl, sizes, not args.no_compile)), flush=True)
        return 0
    result = run(sizes, not args.no_compile, args.compile_timeout_s, out=args.out,
                 ops=args.ops.split(",") if args.ops else None)
    required = [r for r in result["records"] if r["impl"] in ("ours", "eager")]
    return 0 if all(r["status"] == "ok" for r in required) else 1


if __name__ == "__main__":
    sys.exit(main())
