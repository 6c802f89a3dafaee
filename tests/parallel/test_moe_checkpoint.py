"""Optimizer checkpoints with expert parallelism (issue 28, item 3): EP = 2 on 4 ranks, where the experts'
optimizer lives on expert-data-parallel groups of 2 whose rank 0 is not the dense optimizer's DP rank 0."""
from __future__ import annotations

import pytest
import torch

from tests.parallel._moe_tiny import write_moe_checkpoint


@pytest.mark.multiproc
def test_ep2_checkpoint_resumes_every_optimizer_tensor(tmp_path):
    """Save through engine.checkpoint after one step, resume into a fresh model and optimizer: every optimizer
    tensor (the experts' Adam moments on each EP rank included) and every weight equal the saved ones, and a
    second step from the resumed run equals the original run's."""
    from tests.parallel._moe_train_workers import ep_checkpoint_worker
    from tests.parallel.dist_utils import run_distributed

    ckpt = write_moe_checkpoint("deepseek_v3", tmp_path / "hf")
    results = run_distributed(ep_checkpoint_worker, 4, str(ckpt), str(tmp_path / "run"), timeout=600)
    for result in results:
        assert result["expert_state_tensors"] > 0  # the experts' optimizer has state to lose
        saved, loaded = result["saved"], result["loaded"]
        assert sorted(saved) == sorted(loaded) and sum(torch.is_tensor(v) for v in saved.values()) > 20
        for key, value in saved.items():
            if torch.is_tensor(value):
                assert torch.equal(loaded[key], value), (result["rank"], key)
            else:
                assert loaded[key] == value, (result["rank"], key)
        for name, weight in result["weights"].items():
            assert torch.equal(result["resumed_weights"][name], weight), (result["rank"], name)
        for name, weight in result["after"].items():
            torch.testing.assert_close(result["resumed_after"][name], weight, rtol=0, atol=0,
                                       msg=f"rank {result['rank']}: {name} after the resumed step")
    # the two EP ranks hold different experts: their optimizer states really differ
    expert_keys = [k for k in results[0]["saved"] if torch.is_tensor(results[0]["saved"][k])]
    assert any(results[0]["saved"][k].shape == results[1]["saved"][k].shape
               and not torch.equal(results[0]["saved"][k], results[1]["saved"][k]) for k in expert_keys)


@pytest.mark.multiproc
def test_ep2_sharded_optimizer_files_are_one_writer_each(tmp_path):
    """The DistributedOptimizer path (CUDA-only in Megatron) with stand-in parts on the real EP = 2 process
    groups: the dense state is one file written by DP rank 0, each expert-parallel rank's expert state its own
    file (the EP rank in the name) written by its expert-DP rank 0; nothing is written twice, and each part reads
    back its own group's state."""
    from tests.parallel._moe_train_workers import sharded_names_worker
    from tests.parallel.dist_utils import run_distributed

    results = run_distributed(sharded_names_worker, 4, str(tmp_path))
    written = [name for r in results for name in r["written"]]
    assert len(written) == len(set(written)), written  # one writer per file
    assert sorted(written) == ["optimizer_params_tp00_pp000.pt", "optimizer_params_tp00_pp000_ep000.pt",
                               "optimizer_params_tp00_pp000_ep001.pt"]
    for rank, r in enumerate(results):
        dense, experts = r["loaded"]
        dense_group, expert_group = r["groups"]
        assert dense["tag"] == "dense" and dense["shards"].tolist() == [float(x) for x in dense_group]
        assert experts["tag"] == f"experts ep{r['ep']}"
        assert experts["shards"].tolist() == [float(x) for x in expert_group] and rank in expert_group
