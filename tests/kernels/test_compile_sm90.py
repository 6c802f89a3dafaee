"""The Triton kernels compiled for an H100 (sm_90) by the real Triton compiler, no GPU needed.

The interpreter (how the other kernel tests run) never lowers to PTX, so a kernel can pass every CPU test
and still fail to compile, or spill registers, on the GPU. This compiles both passes at their default launch
configuration for bf16/fp16/fp32 logits (in a subprocess: the kernels must be imported without
TRITON_INTERPRET), specialised as the JIT specialises a real launch, and checks the cubins and the PTX: no
spills, at least 4 resident programs per SM, and 16-byte vector loads/stores of the logits and gradient."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _has_ptxas() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file()


@pytest.mark.skipif(not _has_ptxas(), reason="this triton wheel bundles no ptxas/cuobjdump")
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_default_launch_compiles_for_h100_without_spills(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-m", "benchmarks.sm90_resources", "--defaults-json",
                          "--dtype", dtype], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["pass"] for r in rows} == {"stats", "grad"}
    scalar = {"bf16": "b16", "fp16": "b16", "fp32": "b32"}[dtype]
    for r in rows:
        assert r["local"] == 0, f"{r['pass']} spills registers to local memory: {r}"
        assert r["programs_per_sm"] >= 4, f"{r['pass']} leaves too few resident programs per SM: {r}"
        # the logits stream in 16-byte vectors (ld.global.v4.b32) when V is a multiple of 16, and the full
        # blocks still do when only the row stride is (a shard of real vocabulary rows in linear_grpo's padded
        # chunk buffer): then only the masked tail block goes scalar
        for case in ("ptx_global_v16", "ptx_global_odd_v"):
            assert r[case].get("ld.global.v4.b32", 0) >= 1, (case, r)
        if r["pass"] == "grad":  # dL/dlogits is written in 16-byte vectors too
            assert r["with_entropy_term"]["local"] == 0, r  # the entropy-bonus variant does not spill either
            assert r["ptx_global_v16"].get(f"st.global.{scalar}", 0) == 0, r
            assert r["ptx_global_v16"].get("st.global.v4.b32", 0) >= 1, r
        else:  # one scalar load of the logits: the target's logit
            assert r["ptx_global_v16"].get(f"ld.global.{scalar}", 0) <= (1 if scalar == "b16" else 2), r
