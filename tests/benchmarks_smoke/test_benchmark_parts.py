"""The benchmark pieces on their own: chunked case log-probs, byte counts, scoring and the markdown notes."""
import pytest
import torch

from benchmarks import report
from benchmarks.cases import LossSettings, Sizes, logp_rows
from benchmarks.roofline import counted_bytes, derive
from r1_engine.kernels.reference import token_logprobs_ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_logp_rows_match_the_whole_tensor(dtype):
    """Blocks of 3 rows (not dividing N = 10) give the float64 log-probs of the whole tensor: fp32 out, the
    input's own numbers (a bf16 input is upcast, not rounded again)."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(10, 40, generator=g)).to(dtype)
    targets = torch.randint(0, 40, (10,), generator=g)
    got = logp_rows(lambda a, b: logits[a:b], 10, targets, 0.7, chunk_rows=3)
    expected, _ = token_logprobs_ref(logits.double(), targets, 0.7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def test_counted_bytes_by_hand():
    s = Sizes(batch=2, seq_len=8, vocab=1000, hidden=64)  # N = 16
    assert counted_bytes("token_logprobs", False, s, torch.bfloat16) == (16 * 1000 * 2 + 16 * 12, "N*V*2 + N*12")
    assert counted_bytes("grpo_loss", False, s, torch.float32) == (16 * 1000 * 4 + 16 * 24, "N*V*4 + N*24")
    assert counted_bytes("token_logprobs", True, s, torch.bfloat16) == (3 * 16 * 1000 * 2 + 16 * 36,
                                                                       "3*N*V*2 + N*36")
    rec = {"median_ms": 2.0}
    derive(rec, "grpo_loss", True, s, torch.bfloat16, roof_gbps=0.1)
    assert rec["gbps"] == pytest.approx((3 * 32_000 + 16 * 48) / 2e-3 / 1e9)
    assert rec["pct_roofline"] == pytest.approx(100 * rec["gbps"] / 0.1)
    assert rec["pass_equivalents"] == pytest.approx(2e-3 * 0.1e9 / 32_000)  # 6.25 passes over the logits


def _rec(op, impl, ms, mode="fwd+bwd", **extra):
    return {"op": op, "mode": mode, "impl": impl, "status": "ok", "median_ms": ms} | extra


def test_targets_and_speedups_from_records():
    records = [_rec("grpo_loss", "ours", 10.0, pct_roofline=90.0),
               _rec("grpo_loss", "ours-inplace", 12.0, pct_roofline=80.0),
               _rec("grpo_loss", "eager", 110.0),
               {"op": "grpo_loss", "mode": "fwd+bwd", "impl": "liger", "status": "unavailable", "reason": "absent"},
               _rec("linear_grpo_loss", "ours", 24.0, peak_extra_bytes=100),
               _rec("linear_grpo_loss", "eager", 40.0, peak_extra_bytes=1000),
               _rec("linear_grpo_loss", "matmul", 20.0)]
    rows = {t["target"]: t for t in report.targets(records)}
    assert len(rows) == 8
    bw = rows["grpo_loss fwd+bwd: bandwidth, 3 passes counted"]
    assert (bw["value"], bw["met"]) == (90.0, True)
    assert rows["grpo_loss fwd+bwd (inplace_backward): bandwidth, 3 passes counted"]["met"] is False
    eager = rows["grpo_loss fwd+bwd: speedup vs eager"]
    assert eager["value"] == pytest.approx(11.0) and eager["met"] is True
    assert rows["grpo_loss fwd+bwd (inplace_backward): speedup vs eager"]["met"] is False  # 110/12 < 10
    liger = rows["grpo_loss fwd+bwd: speedup vs liger"]
    assert liger["value"] is None and liger["met"] is None and "liger: unavailable (absent)" in liger["note"]
    mem = rows["linear_grpo_loss fwd+bwd: peak extra memory vs eager"]
    assert (mem["value"], mem["met"]) == (0.1, True)
    tm = rows["linear_grpo_loss fwd+bwd: time vs bare lm_head matmul fwd+bwd"]
    assert tm["value"] == pytest.approx(1.2) and tm["met"] is False
    assert [(x["ours"], x["versus"], x["speedup"]) for x in report.speedups(records)] == [
        ("ours", "eager", 11.0), ("ours-inplace", "eager", pytest.approx(110 / 12))]


def test_markdown_notes_carry_the_counted_bytes():
    res = {"meta": {"device": "cpu (dry run)", "date": "2026-01-01T00:00:00", "torch": "x", "torch_cuda": None,
                    "triton": "y", "liger": None, "liger_status": "absent", "python": "3", "dtype": "bfloat16",
                    "elapsed_s": 1.0},
           "targets": report.targets([]), "records": [], "speedups": [], "checks": [], "errors": [], "tuning": None}
    md = report.markdown(res, Sizes(2, 8, 1000, 64), LossSettings(), dry=True)
    assert "(N*36 token_logprobs, N*48 grpo_loss)" in md  # 12 + 24 and 24 + 24 bytes a token
    assert md.count("| not measured: ") == 8 and "## Timings" in md and "## Section errors" not in md
