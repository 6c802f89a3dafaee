"""The one-call GPU suite's code paths, run on CPU in --dry-run mode (tiny sizes, Triton interpreter, wall clock).

The GPU machine runs the same code at full size; here we check that it writes complete results, that its
correctness checks pass, and that a failing sub-benchmark is recorded as an error while the suite goes on."""
import json

import pytest

from benchmarks import baselines, gpu_suite, runners

SECTIONS = "roofline,correctness,grpo_loss,linear_grpo_loss"


def _results(out_dir):
    (json_path,) = out_dir.glob("cpu-dry-run-*.json")
    md = json_path.with_suffix(".md").read_text()
    return json.loads(json_path.read_text()), md


def test_dry_run_writes_complete_results(tmp_path):
    rc = gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--sections", SECTIONS])
    res, md = _results(tmp_path)
    assert rc == 0, [c for c in res["checks"] if not c["passed"]] + res["errors"]
    assert res["meta"]["copy_roofline_gbps"] > 0
    # correctness: every check ran and passed (including the masked-token and linear checks)
    quantities = {c["quantity"] for c in res["checks"]}
    assert {"logp", "entropy", "loss", "dL/dlogits", "dL/dhidden", "dL/dweight"} <= quantities
    assert all(c["passed"] for c in res["checks"]) and len(res["checks"]) >= 30
    by_key = {(r["op"], r["mode"], r["impl"]): r for r in res["records"]}
    for impl in ("ours", "ours-inplace", "eager"):
        r = by_key[("grpo_loss", "fwd+bwd", impl)]
        assert r["status"] == "ok" and r["agrees"] is True and r["median_ms"] > 0
        assert r["counted_bytes"] == 3 * 16 * 1000 * 2 + 16 * 48
    assert by_key[("linear_grpo_loss", "fwd+bwd", "ours")]["agrees"] is True
    assert by_key[("linear_grpo_loss", "fwd+bwd", "matmul")]["status"] == "ok"
    if baselines.liger_status().ok:
        assert by_key[("grpo_loss", "fwd+bwd", "liger")]["agrees"] is True
    # the targets are all listed (values are meaningless on CPU), and the markdown carries them
    assert len(res["targets"]) == 8
    assert "## Targets (from the issue)" in md and ">= 85% of copy roofline" in md and "cpu (dry run)" in md


def test_failing_sub_benchmark_is_recorded_and_suite_goes_on(tmp_path, monkeypatch):
    real = runners.make_runner

    def broken(op, impl, *args, **kwargs):
        if impl == "eager":
            raise RuntimeError("planted failure")
        return real(op, impl, *args, **kwargs)

    monkeypatch.setattr(runners, "make_runner", broken)
    rc = gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--sections", "roofline,grpo_loss", "--no-liger"])
    res, md = _results(tmp_path)
    assert rc == 1
    by_key = {(r["op"], r["mode"], r["impl"]): r for r in res["records"]}
    assert by_key[("grpo_loss", "fwd+bwd", "eager")]["status"] == "error"
    assert "planted failure" in by_key[("grpo_loss", "fwd+bwd", "eager")]["error"]
    assert by_key[("grpo_loss", "fwd+bwd", "ours")]["status"] == "ok"  # measured after the failure
    assert by_key[("grpo_loss", "fwd+bwd", "liger")]["status"] == "unavailable"
    eager_target = [t for t in res["targets"] if t["target"] == "grpo_loss fwd+bwd: speedup vs eager"][0]
    assert eager_target["value"] is None and "planted failure" in eager_target["note"]
    assert "planted failure" in md


def test_dry_run_refuses_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="--sizes"):
        gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--sizes", "1,2,3"])


def test_variants_and_tune_sections(tmp_path):
    from r1_engine.kernels import logprobs

    before = dict(logprobs.LAUNCH)
    rc = gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--sections", "roofline,variants,tune", "--no-liger"])
    res, md = _results(tmp_path)
    assert rc == 0, res["errors"]
    tuning = res["tuning"]
    assert {r["pass"] for r in tuning["sweep"]} == {"stats", "grad"} and len(tuning["sweep"]) == 4
    for name, best in tuning["best"].items():
        assert best["median_ms"] == min(r["median_ms"] for r in tuning["sweep"] if r["pass"] == name)
    assert tuning["env"].startswith("stats=") and "R1_KERNEL_LAUNCH=" in md
    by_key = {(r["op"], r["mode"], r["impl"]): r for r in res["records"]}
    for impl in ("ours-tuned", "ours-tuned-inplace"):
        assert by_key[("grpo_loss", "fwd+bwd", impl)]["agrees"] is True
    assert logprobs.LAUNCH == before  # the sweep leaves the committed configuration in place
    variants = [r for r in res["records"] if r["op"] == "policy_loss"]
    assert [r["impl"] for r in variants] == [f"ours-inplace [{n}]" for n in
                                             ("grpo", "gspo", "gspo-token", "cispo", "grpo+tis+entropy")]
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in variants)
