"""The kernel microbenchmarks run for real on CI's CPU (benchmarks/cpu_bench.py): the side-by-side table goes
to the CI log (printed past pytest's capture) and the JSON with the machine description to the test's tmp dir,
or to $R1_CPU_BENCH_JSON when CI sets it. Timings never fail: only a variant of ours or eager that does not run,
or an incomplete record. torch.compile is left out here (its C++ build takes 7-30 s a function on 2 cores,
cache warm or cold)."""
import json
import os
from pathlib import Path

from benchmarks import cpu_bench


def test_cpu_microbenchmarks_table_and_json(tmp_path, capsys):
    out = Path(os.environ.get("R1_CPU_BENCH_JSON") or tmp_path / "ci-cpu-microbench.json")
    lines = []
    result = cpu_bench.run(compile_ok=False, out=out, log=lines.append)
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    saved = json.loads(out.read_text())
    assert saved["records"] == result["records"] and saved["machine"]["cpu_count"] >= 1
    assert {"torch", "cpu", "platform"} <= set(saved["machine"])
    by = {(r["op"], r["mode"], r["impl"]): r for r in saved["records"]}
    assert set(by) == set(cpu_bench.VARIANTS)
    for (op, mode, impl), r in by.items():
        if impl == "compiled":
            assert r["status"] == "unavailable" and "--no-compile" in r["reason"]
            continue
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["reps"] >= 3
        assert ("counted_bytes" in r) == (op != "linear_grpo_loss")
        if impl != "matmul":
            assert r["speedup_vs_eager"] > 0
        if impl == "eager":  # eager holds at least the fp32 logits: N x V x 4 bytes
            n, v = saved["sizes"]["n_tokens"], saved["sizes"]["vocab"]
            assert r["peak_extra_bytes"] is None or r["peak_extra_bytes"] >= n * v * 4
    assert "| grpo_loss | fwd+bwd | ours |" in saved["table"]


def test_table_ratios_by_hand():
    records = [{"op": "grpo_loss", "mode": "fwd+bwd", "impl": "eager", "status": "ok", "median_ms": 10.0,
                "peak_extra_bytes": 400, "counted_bytes": 1000, "gbps": 1.0},
               {"op": "grpo_loss", "mode": "fwd+bwd", "impl": "ours", "status": "ok", "median_ms": 4.0,
                "peak_extra_bytes": 100, "counted_bytes": 1000, "gbps": 2.5},
               {"op": "grpo_loss", "mode": "fwd+bwd", "impl": "compiled", "status": "unavailable", "reason": "off"}]
    cpu_bench.add_ratios(records)
    assert records[1]["speedup_vs_eager"] == 2.5 and records[1]["memory_vs_eager"] == 0.25
    assert "speedup_vs_eager" not in records[2]
    text = cpu_bench.table(records)
    assert "| grpo_loss | fwd+bwd | ours | 4.00 |" in text and "| 2.50x | 0.25x |" in text
    assert "unavailable: off" in text
