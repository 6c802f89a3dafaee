"""What a training step of an MoE model does around routing replay (issue 28, items 5, 6, 7 and 10):

* the aux-loss-free expert bias moves when told (once per rollout in the trainer), from the real tokens' load of
  the steps taken; a skipped step neither moves it nor counts;
* routing replay with activation recompute under the 1F1B pipeline schedule is refused with one clear error;
* a load-balancing loss with routing replay is refused with one clear error;
* the MoE forward makes no host sync per layer (the expert-load metric is read once, after the step)."""
from __future__ import annotations

import sys

import pytest
import torch

from tests.parallel._moe_tiny import VOCAB, write_moe_checkpoint


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return write_moe_checkpoint("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3"))


def _rows(seed: int = 2, train_on=None, routed=None):
    from r1_engine.engine.batch import rl_rows

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (5, 3, 6)]
    completions = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (6, 4, 2)]
    return rl_rows(prompts, completions, torch.randn(3, generator=gen), train_on=train_on, max_tokens_per_row=16,
                   routed_experts=routed)


def _policy(ckpt, **kwargs):
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.optim import build_optimizer, wrap_for_training

    model = build_gpt_model(ckpt, **kwargs)
    load_hf_checkpoint(model, ckpt)
    ddp = wrap_for_training(model)
    return model, ddp, build_optimizer(ddp, lr=1e-3, weight_decay=0.0, grad_clip=1.0)


def _loss(mb, out):
    logp = torch.log_softmax(out.logits.float(), dim=-1).gather(-1, mb.targets.clamp(min=0)[..., None])[..., 0]
    return -(logp * mb.loss_mask).sum() / out.num_tokens, {}


def _biases(model):
    from r1_engine.parallel.moe import router_modules

    return [r.expert_bias.detach().clone() for r in router_modules(model)]


def _routing_maps(model, rows):
    """Each MoE layer's routing map [tokens (S-major), experts] of a no-grad forward of `rows`."""
    from r1_engine.parallel.moe import router_modules

    maps = []
    hooks = [r.register_forward_hook(lambda m, a, out: maps.append(out[1].detach().clone()))
             for r in router_modules(model)]
    with torch.no_grad():
        model.eval()(rows.tokens, rows.position_ids, rows.attention_mask())
    model.train()
    for h in hooks:
        h.remove()
    return maps


def _real_load(model, rows):
    """Tokens per expert of each MoE layer over the rows' real positions (padding left out), no grad."""
    maps = _routing_maps(model, rows)
    real = (rows.seq_ids >= 0).transpose(0, 1).reshape(-1, 1)  # routers see tokens S-major
    return [(m & real).sum(0).double() for m in maps]


def test_expert_bias_moves_once_from_the_accumulated_load(deepseek_dir, single_process_parallel):
    """Two steps with update_bias=False leave the bias alone and add up their real tokens' load; one
    update_expert_bias then moves every expert by exactly rate * sign(mean load - load) and resets the counts."""
    from r1_engine.parallel.moe import expert_bias_counts, update_expert_bias
    from r1_engine.parallel.step import train_step

    model, ddp, optimizer = _policy(deepseek_dir, moe_bias_update_rate=1e-3)
    rows_a, rows_b = _rows(2), _rows(3)
    start = _biases(model)
    metrics = train_step(ddp, optimizer, rows_a, _loss, num_microbatches=2, update_bias=False)
    assert metrics["update_successful"] == 1.0
    counts_after_a = expert_bias_counts(model)
    load_b = _real_load(model, rows_b)  # the second batch is routed by the weights the first step left
    train_step(ddp, optimizer, rows_b, _loss, num_microbatches=1, update_bias=False)
    for bias, before in zip(_biases(model), start):
        assert torch.equal(bias, before)  # deferred: not moved by either step
    counts = expert_bias_counts(model)
    for total, first, second in zip(counts, counts_after_a, load_b):
        torch.testing.assert_close(total.double(), first.double() + second, rtol=0, atol=0)
    assert all(int(c.sum()) > 0 for c in counts)
    update_expert_bias(model)
    for bias, before, count in zip(_biases(model), start, counts):
        count = count.double()
        expected = before.double() + 1e-3 * torch.sign(count.mean() - count)
        torch.testing.assert_close(bias.double(), expected, rtol=0, atol=1e-8)  # the bias is fp32
        assert (bias != before).any()
    assert all(int(c.abs().sum()) == 0 for c in expert_bias_counts(model))  # counts reset
    moved = _biases(model)
    update_expert_bias(model)  # nothing counted since: no move
    for bias, before in zip(_biases(model), moved):
        assert torch.equal(bias, before)


def test_first_step_counts_the_real_tokens(deepseek_dir, single_process_parallel):
    from r1_engine.parallel.moe import expert_bias_counts
    from r1_engine.parallel.step import train_step

    model, ddp, optimizer = _policy(deepseek_dir)
    rows = _rows(4)
    want = _real_load(model, rows)
    train_step(ddp, optimizer, rows, _loss, num_microbatches=2, update_bias=False)
    for got, expected in zip(expert_bias_counts(model), want):
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=0)


def test_skipped_step_neither_moves_nor_counts(deepseek_dir, single_process_parallel):
    """A step with no loss token is not taken: the bias stays, with the default per-step update too, and its
    forward's load is not kept for the next update."""
    from r1_engine.parallel.moe import expert_bias_counts
    from r1_engine.parallel.step import train_step

    model, ddp, optimizer = _policy(deepseek_dir)
    start = _biases(model)
    skipped = train_step(ddp, optimizer, _rows(5, train_on=[False, False, False]), _loss, num_microbatches=1)
    assert skipped["update_successful"] == 0.0
    for bias, before in zip(_biases(model), start):
        assert torch.equal(bias, before)
    assert all(int(c.abs().sum()) == 0 for c in expert_bias_counts(model))
    taken = train_step(ddp, optimizer, _rows(5), _loss, num_microbatches=1)  # default: moves after the step
    assert taken["update_successful"] == 1.0
    steps = torch.cat([(b - a).abs() for b, a in zip(_biases(model), start)])
    assert bool(((steps < 1e-8) | ((steps - 1e-3).abs() < 1e-8)).all()) and int((steps > 5e-4).sum()) >= 4


def _recorded(model, rows):
    """The routing of `rows` under the model's own weights, [B, S, MoE layers, k] (what a rollout would record)."""
    maps = _routing_maps(model, rows)
    b, s = rows.tokens.shape
    k = int(maps[0].sum(1)[0])
    return torch.stack([m.nonzero()[:, 1].view(s, b, k).transpose(0, 1) for m in maps], dim=2)


def test_aux_loss_with_replay_is_refused(tmp_path, single_process_parallel):
    """Qwen3-MoE with its load-balancing loss: replayed rows are refused before the schedule, naming the fix;
    the same rows without replay train (and with the coefficient at 0 replay trains)."""
    from r1_engine.parallel.moe import ROUTED_EXPERTS
    from r1_engine.parallel.step import train_step

    ckpt = write_moe_checkpoint("qwen3_moe", tmp_path / "aux", router_aux_loss_coef=0.001)
    model, ddp, optimizer = _policy(ckpt)
    rows = _rows(6)
    replayed = rows.with_extras(**{ROUTED_EXPERTS: _recorded(model, rows)})
    with pytest.raises(ValueError, match=r"load-balancing loss \(moe_aux_loss_coeff=0\.001.*--model\.moe-aux-loss"
                                         r"-coeff 0, or turn routing replay off"):
        train_step(ddp, optimizer, replayed, _loss)
    assert train_step(ddp, optimizer, rows, _loss)["update_successful"] == 1.0
    model0, ddp0, optimizer0 = _policy(ckpt, moe_aux_loss_coeff=0.0)
    assert train_step(ddp0, optimizer0, replayed, _loss)["update_successful"] == 1.0


@pytest.mark.parametrize("overrides, pp, refused", [
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), 2, True),
    (dict(recompute_granularity="selective", recompute_modules=["moe"]), 2, True),
    (dict(recompute_granularity="selective", recompute_modules=["core_attn"]), 2, False),  # the router is not rerun
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), 1, False),  # no 1F1B
    ({}, 2, False),
])
def test_replay_with_recompute_under_1f1b_is_refused(overrides, pp, refused):
    from r1_engine.parallel.models import hf_config_to_transformer_config, parse_hf_config
    from r1_engine.parallel.moe import check_replay_training
    from tests.parallel._moe_tiny import moe_hf_config

    info = parse_hf_config(moe_hf_config("deepseek_v3").to_dict())
    config = hf_config_to_transformer_config(info, pipeline_parallel=pp, overrides=overrides)
    check_replay_training(config, replaying=False)  # without replay anything goes
    if refused:
        with pytest.raises(ValueError, match=r"routing replay with activation recompute of the MoE layers .* under "
                                             r"pipeline parallelism is not supported"):
            check_replay_training(config, replaying=True)
    else:
        check_replay_training(config, replaying=True)


@pytest.mark.multiproc
def test_replay_with_recompute_is_refused_by_train_step_on_every_stage(deepseek_dir):
    """PP = 2 with full recompute: both stages raise the same error before the schedule (none waits in it)."""
    from tests.parallel._moe_train_workers import recompute_replay_worker
    from tests.parallel.dist_utils import run_distributed

    results = run_distributed(recompute_replay_worker, 2, str(deepseek_dir), timeout=240)
    assert all("routing replay with activation recompute" in message for message in results), results


def test_moe_forward_makes_no_host_sync_per_layer(deepseek_dir, single_process_parallel, monkeypatch):
    """A training forward of 3 MoE layers x 2 micro-batches: the project's per-forward MoE work (padding, replay
    targets, the expert-load count) moves nothing to the host; the load stays on the device until the step's
    metrics."""
    from r1_engine.parallel.moe import ROUTED_EXPERTS
    from r1_engine.parallel import step as step_module

    model, ddp, optimizer = _policy(deepseek_dir)
    rows = _rows(7)
    rows = rows.with_extras(**{ROUTED_EXPERTS: _recorded(model, rows)})
    inside = {"flag": False, "syncs": []}
    real_cpu, real_item, real_tolist = torch.Tensor.cpu, torch.Tensor.item, torch.Tensor.tolist

    def spy(real, name):
        def wrapper(self, *args, **kwargs):
            # this project's MoE code (Megatron's own SequentialMLP splits by a host list: the TE grouped GEMM
            # path is what avoids that, and it cannot run here)
            if inside["flag"] and sys._getframe(1).f_code.co_filename.endswith(("parallel/moe.py",
                                                                                   "parallel/step.py")):
                inside["syncs"].append(f"{name} in {sys._getframe(1).f_code.co_name}")
            return real(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch.Tensor, "cpu", spy(real_cpu, "cpu"))
    monkeypatch.setattr(torch.Tensor, "item", spy(real_item, "item"))
    monkeypatch.setattr(torch.Tensor, "tolist", spy(real_tolist, "tolist"))
    real_forward = step_module._model_forward

    def forward(*args, **kwargs):
        inside["flag"] = True
        try:
            return real_forward(*args, **kwargs)
        finally:
            inside["flag"] = False

    monkeypatch.setattr(step_module, "_model_forward", forward)
    metrics = step_module.train_step(ddp, optimizer, rows, _loss, num_microbatches=2)
    assert metrics["moe/load_max"] >= 1.0
    assert inside["syncs"] == [], inside["syncs"]


def test_grouped_gemm_with_te_and_its_expert_names():
    """With TE the experts are built as TE's grouped GEMM (moe_grouped_gemm, read from megatron-core's specs; it
    cannot run here) and its per-expert weights experts.linear_fc{1,2}.weight<l> map to the same HF experts as
    SequentialMLP's experts.local_experts.<l>.linear_fc{1,2}.weight."""
    from r1_engine.parallel.models import parse_hf_config
    from r1_engine.parallel.moe import moe_config_fields
    from r1_engine.parallel.names import hf_tensor_shapes, unit_of
    from tests.parallel._moe_tiny import moe_hf_config

    info = parse_hf_config(moe_hf_config("deepseek_v3").to_dict())
    common = dict(expert_parallel=1, expert_tensor_parallel=1, bias_update_rate=1e-3, aux_loss_coeff=None)
    assert moe_config_fields(info.moe, info.mla, use_te=True, **common)["moe_grouped_gemm"] is True
    assert moe_config_fields(info.moe, info.mla, use_te=False, **common)["moe_grouped_gemm"] is False
    shapes = hf_tensor_shapes(info)
    for which in ("linear_fc1", "linear_fc2"):
        for local in range(4):
            sequential = unit_of(info, shapes, f"mlp.experts.local_experts.{local}.{which}.weight", 2, 2, 1)
            grouped = unit_of(info, shapes, f"mlp.experts.{which}.weight{local}", 2, 2, 1)
            assert grouped == sequential and grouped.expert_owner == 1
            assert grouped.hf_names[0].startswith(f"model.layers.2.mlp.experts.{4 + local}.")
