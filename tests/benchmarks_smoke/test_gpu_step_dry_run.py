"""benchmarks/gpu_step.py's code paths on CPU (tiny shape): both sections run and write their results."""
import json

import pytest


@pytest.mark.multiproc  # initialises torch.distributed in a child process, not in the pytest process
def test_gpu_step_dry_run(tmp_path):
    from tests.parallel.dist_utils import run_distributed

    assert run_distributed(_run, 1, str(tmp_path))[0] == 0
    (result,) = [json.loads(p.read_text()) for p in tmp_path.glob("gpu-step-*.json")]
    assert result["dry_run"] and "error" not in result["parity"] and "error" not in result["step"]
    assert 0 < result["parity"]["logp_max_abs_diff"] < 0.05  # bf16 vs fp32, same weights
    assert result["step"]["train_step_fused_True"]["median_s"] > 0


def _run(out):
    from benchmarks.gpu_step import main

    return main(["--dry-run", "--out", out, "--reps", "1"])
