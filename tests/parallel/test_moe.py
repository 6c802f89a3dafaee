"""MoE models (Qwen3-MoE, DeepSeek-V3 with MLA) on Megatron-core: HF float64 parity, exact round trips, expert
parallelism (EP=2 alone and with TP=2 / PP=2) against EP=1, routing replay, and bad configurations."""
from __future__ import annotations

import pytest
import torch

from tests.parallel._models_tiny import read_safetensors_dir
from tests.parallel._moe_tiny import (
    VOCAB,
    hf_reference,
    moe_hf_config,
    write_moe_checkpoint,
)

KINDS = ["qwen3_moe", "deepseek_v3"]


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    return {kind: write_moe_checkpoint(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


def _megatron_logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids, torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)[..., :VOCAB]


def test_parse_moe_configs(moe_dirs):
    from r1_engine.parallel.models import parse_hf_config

    qwen = parse_hf_config(moe_dirs["qwen3_moe"])
    assert qwen.moe.moe_layers == (True, False) and qwen.moe.num_experts == 4 and qwen.moe.topk == 2
    assert qwen.qk_norm and qwen.mla is None and qwen.head_dim == 8 and qwen.moe.score_function == "softmax"
    ds = parse_hf_config(moe_dirs["deepseek_v3"])
    assert ds.moe.moe_layers == (False, True, True, True) and ds.moe.shared_ffn_hidden_size == 16
    assert (ds.moe.num_groups, ds.moe.group_topk, ds.moe.scaling_factor, ds.moe.expert_bias) == (4, 2, 2.5, True)
    assert (ds.mla.q_lora_rank, ds.mla.kv_lora_rank, ds.mla.qk_rope_head_dim) == (24, 16, 4)


@pytest.mark.parametrize("kind, changes", [
    ("qwen3_moe", {}), ("deepseek_v3", {}),
    ("qwen3_moe", {"norm_topk_prob": False}),  # transformers' default: softmax over all experts, no renormalising
    ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": []}),  # MoE every second layer
    ("deepseek_v3", {"q_lora_rank": None}),  # one q_proj (DeepSeek-V2-Lite style)
    # topk_group = n_group: every group kept, no group limit (k != 2 * topk_group was refused before)
    ("deepseek_v3", {"topk_group": 4, "num_experts_per_tok": 3}),
])
def test_logits_match_hf_float64(kind, changes, moe_dirs, tmp_path, single_process_parallel):
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    ckpt = write_moe_checkpoint(kind, tmp_path / "ckpt", **changes) if changes else moe_dirs[kind]
    model = build_gpt_model(ckpt)
    load_hf_checkpoint(model, ckpt)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf_reference(ckpt)(ids).logits
    got = _megatron_logits(model, ids)
    assert want.abs().max() > 1.0  # logits of a size where a wrong mapping shows
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bitwise(kind, moe_dirs, tmp_path, single_process_parallel):
    from r1_engine.parallel.convert import load_hf_checkpoint, save_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    model = build_gpt_model(moe_dirs[kind])
    load_hf_checkpoint(model, moe_dirs[kind])
    save_hf_checkpoint(model, tmp_path / "out")
    original, exported = read_safetensors_dir(moe_dirs[kind]), read_safetensors_dir(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    if kind == "deepseek_v3":  # the router bias travels (a buffer, not a parameter)
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in exported


@pytest.mark.parametrize("kind, changes, message", [
    ("deepseek_v3", {"scoring_func": "softmax"}, "unsupported scoring_func='softmax'"),
    ("deepseek_v3", {"topk_method": "greedy"}, "unsupported topk_method='greedy'"),
    ("deepseek_v3", {"num_experts_per_tok": 2}, "num_experts_per_tok=2 with topk_group=2"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave=False is not supported"),
    ("deepseek_v3", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "unsupported rope scaling"),
    ("qwen3_moe", {"num_experts_per_tok": 5}, "num_experts_per_tok=5 must be in [1, 4]"),
])
def test_unsupported_routing_is_named(kind, changes, message):
    from r1_engine.parallel.models import parse_hf_config

    cfg = moe_hf_config(kind).to_dict() | changes
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_hf_config(cfg)


@pytest.mark.parametrize("n_group, topk_group, topk", [(4, 4, 3), (4, 4, 1), (1, 1, 3), (8, 8, 4)])
def test_no_group_limit_is_a_plain_topk(n_group, topk_group, topk):
    """topk_group = n_group keeps every group: HF's group mask is a no-op, so any num_experts_per_tok routes alike
    and Megatron is built without group-limited routing."""
    from r1_engine.parallel.models import parse_hf_config

    info = parse_hf_config(moe_hf_config("deepseek_v3").to_dict()
                           | {"n_group": n_group, "topk_group": topk_group, "num_experts_per_tok": topk})
    assert info.moe.num_groups is None and info.moe.group_topk is None and info.moe.topk == topk


def test_expert_parallel_must_divide(moe_dirs):
    from r1_engine.parallel.models import parse_hf_config
    from tests.parallel._models_tiny import tiny_hf_config

    with pytest.raises(ValueError, match=r"num_experts=4 is not divisible by expert_parallel=3"):
        parse_hf_config(moe_dirs["qwen3_moe"], expert_parallel=3)
    with pytest.raises(ValueError, match=r"expert_parallel=2: .* is a dense model \(qwen2\)"):
        parse_hf_config(tiny_hf_config("qwen2").to_dict(), expert_parallel=2)


def _recorded_experts(model, rows):
    """Each token's experts in every MoE layer, read off the routers' routing maps: [B, S, layers, k]."""
    from r1_engine.parallel.moe import router_modules

    maps = []
    hooks = [r.register_forward_hook(lambda m, a, out: maps.append(out[1].detach().clone()))
             for r in router_modules(model)]
    with torch.no_grad():
        model.eval()(rows.tokens, rows.position_ids, rows.attention_mask())
    for h in hooks:
        h.remove()
    b, s = rows.tokens.shape
    k = int(maps[0].sum(1)[0])
    # routing maps are [S * B, E] in S-major order; the k chosen experts in ascending order
    idx = [m.nonzero()[:, 1].view(s, b, k).transpose(0, 1) for m in maps]
    return torch.stack(idx, dim=2)


def test_routing_replay_restores_the_rollout_routing(moe_dirs, single_process_parallel):
    """DeepSeek-V3: shifting the routers' expert bias (it selects experts but weighs nothing) flips some tokens'
    experts; replaying the recorded experts gives back the original log-probs exactly."""
    from r1_engine.engine.batch import rl_rows
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.moe import ROUTED_EXPERTS, router_modules
    from r1_engine.parallel.step import logprobs

    model = build_gpt_model(moe_dirs["deepseek_v3"])
    load_hf_checkpoint(model, moe_dirs["deepseek_v3"])
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (4, 6, 3)]
    completions = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (5, 3, 6)]
    rows = rl_rows(prompts, completions, torch.zeros(3), max_tokens_per_row=16)
    recorded = _recorded_experts(model, rows)
    before = logprobs(model, rows)

    with torch.no_grad():
        for router in router_modules(model):
            router.expert_bias += 0.3 * torch.randn(router.expert_bias.shape, generator=gen)
    flipped = (_recorded_experts(model, rows) != recorded).any(-1)
    real = (rows.seq_ids >= 0)[:, :, None]
    assert (flipped & real).sum() >= 5  # the perturbation really changes routing
    drifted = logprobs(model, rows)
    replayed = logprobs(model, rows.with_extras(**{ROUTED_EXPERTS: recorded}))
    assert (drifted - before).abs().max() > 1e-3
    torch.testing.assert_close(replayed, before, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Four processes: EP=2, EP=4, TP=2 (sequence parallel), TP=2 x EP=2, PP=2 x EP=2 against EP=1
# ---------------------------------------------------------------------------------------------

# (tp, pp, pack, num_microbatches, aggregation, fused_lm_head, ep); all on 4 ranks (DP = 4 / (tp * pp))
AGG = "seq-mean-token-mean"
MOE_REFERENCE = (1, 1, True, 2, AGG, False, 1)
# TP=2 runs with sequence parallelism (Megatron's MoE layer requires it in training); Qwen3-MoE's PP=2 leaves the
# last stage without an MoE layer
MOE_LAYOUTS = {"deepseek_v3": [MOE_REFERENCE, (1, 1, True, 2, AGG, False, 2), (1, 1, True, 2, AGG, True, 4),
                               (1, 2, True, 2, AGG, False, 2), (2, 1, True, 2, AGG, True, 1),
                               (2, 1, True, 2, AGG, False, 2)],
               "qwen3_moe": [MOE_REFERENCE, (2, 1, True, 2, AGG, True, 1), (2, 1, True, 2, AGG, False, 2),
                             (1, 2, True, 2, AGG, True, 2)]}


def _moe_problem(ckpt):
    """test_step's batch and loss on an MoE checkpoint, with float64 HF log-probs per sequence."""
    from r1_engine.kernels.reference import token_logprobs_ref
    from tests.parallel.test_step import (
        COMPLETION_LENGTHS,
        LOSS,
        PROMPT_LENGTHS,
        TEMPERATURE,
        _hf_per_sequence,
    )

    hf = hf_reference(ckpt)
    gen = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    completions = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in COMPLETION_LENGTHS]
    with torch.no_grad():
        pieces = _hf_per_sequence(hf, prompts, completions)
    logp = [token_logprobs_ref(z, y, TEMPERATURE)[0] for z, y in pieces]

    def jitter(values, scale):
        return [v + scale * (2 * torch.rand(v.shape, generator=gen, dtype=torch.float64) - 1) for v in values]

    spec = dict(prompts=prompts, completions=completions,
                advantages=torch.randn(len(prompts), generator=gen, dtype=torch.float64).tolist(),
                old_logp=[v.tolist() for v in jitter(logp, 0.4)], ref_logp=[v.tolist() for v in jitter(logp, 0.2)],
                rollout_logp=[v.tolist() for v in jitter(logp, 0.5)], max_tokens_per_row=16,
                temperature=TEMPERATURE, export_names=None, lr=0.5, adam_eps=0.5, grad_clip=1.0, loss=LOSS)
    return dict(spec=spec, logp=logp)


@pytest.fixture(scope="module", params=KINDS)
def moe_world4(request, moe_dirs):
    from tests.parallel._step_workers import layouts_worker
    from tests.parallel.dist_utils import run_distributed

    kind = request.param
    problem = _moe_problem(moe_dirs[kind])
    per_rank = run_distributed(layouts_worker, 4, str(moe_dirs[kind]), problem["spec"], MOE_LAYOUTS[kind])
    for rank_results in per_rank[1:]:  # every rank reports the same step
        for mine, first in zip(rank_results, per_rank[0]):
            assert mine["metrics"] == pytest.approx(first["metrics"], rel=1e-12), mine["layout"]
    return kind, problem, {layout: result for layout, result in zip(MOE_LAYOUTS[kind], per_rank[0])}


@pytest.mark.multiproc
def test_moe_layouts_match_ep1_and_hf(moe_world4):
    """EP=2, EP=4 (fused lm_head), PP=2 x EP=2, TP=2 (sequence parallel, fused lm_head), TP=2 x EP=2: log-probs,
    loss, grad norm, every weight's update (the router's expert bias included) and the log-probs after the step
    equal EP=1's; EP=1's log-probs equal HF float64's."""
    from tests.parallel.test_step import _assert_same_run, _assert_sequences_close

    kind, problem, results = moe_world4
    reference = results[MOE_REFERENCE]
    _assert_sequences_close(reference["logp"], problem["logp"], 2e-5, "logp vs HF float64")
    assert reference["metrics"]["moe/load_max"] > 1.0  # a real, uneven routing is being compared
    if kind == "deepseek_v3":  # the aux-loss-free expert bias moved by rate * sign(mean load - load) per expert
        steps = reference["delta"]["model.layers.1.mlp.gate.e_score_correction_bias"].abs()
        assert bool(((steps < 1e-8) | ((steps - 1e-3).abs() < 1e-8)).all()) and int((steps > 5e-4).sum()) >= 4
    for layout, result in results.items():
        if layout != MOE_REFERENCE:
            try:
                _assert_same_run(result, reference)
            except AssertionError as err:
                worst = sorted(((float((result["delta"][n] - reference["delta"][n]).abs().max()), n)
                                for n in reference["delta"]))[-4:]
                raise AssertionError(f"{kind} layout {layout}: grad norm {result['metrics']['grad_norm']} vs "
                                     f"{reference['metrics']['grad_norm']}; worst updates {worst}: {err}") from None
            assert result["metrics"]["moe/load_max"] == pytest.approx(reference["metrics"]["moe/load_max"])


def test_load_balancing_loss_is_trained_and_reported(tmp_path, single_process_parallel):
    """Qwen3-MoE with transformers' default router_aux_loss_coef (0.001): the loss reaches the router's gradient
    with a zero policy loss, and train_step reports it (~1 for an even load, the Switch loss's normalisation)."""
    from r1_engine.engine.batch import rl_rows
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model
    from r1_engine.parallel.moe import router_modules
    from r1_engine.parallel.optim import build_optimizer, wrap_for_training
    from r1_engine.parallel.step import train_step

    ckpt = write_moe_checkpoint("qwen3_moe", tmp_path / "aux", router_aux_loss_coef=0.001)
    model = build_gpt_model(ckpt)
    load_hf_checkpoint(model, ckpt)
    assert model.config.moe_aux_loss_coeff == 0.001
    ddp = wrap_for_training(model)
    optimizer = build_optimizer(ddp, lr=1e-8, weight_decay=0.0, grad_clip=0.0)
    gen = torch.Generator().manual_seed(2)
    rows = rl_rows([torch.randint(1, VOCAB, (5,), generator=gen).tolist() for _ in range(3)],
                   [torch.randint(1, VOCAB, (6,), generator=gen).tolist() for _ in range(3)], torch.zeros(3))

    def zero_loss(mb, out):  # no policy gradient: whatever reaches the router comes from the aux loss
        return (out.logits.float().sum() * 0.0), {}

    metrics = train_step(ddp, optimizer, rows, zero_loss, num_microbatches=1)
    router = router_modules(model)[0]
    grad = router.weight.main_grad if hasattr(router.weight, "main_grad") else router.weight.grad
    assert grad is not None and grad.abs().max() > 0
    assert 0.9 < metrics["moe/aux_loss"] < 4.0 and metrics["moe/load_max"] >= 1.0


def test_fp8_block_scaled_checkpoint_with_mtp_layers(moe_dirs, tmp_path, single_process_parallel):
    """DeepSeek-V3 as published: linear weights in e4m3 with one scale per block (here 16 x 16, partial blocks at
    the edges) and a multi-token-prediction layer after the last layer. The weights load dequantized (checked
    against a float64 dequantization), the MTP layer is left unread, and the export is unquantized without it."""
    import json

    from safetensors.torch import save_file

    from r1_engine.parallel.convert import export_hf_state, load_hf_checkpoint, save_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    src = moe_dirs["deepseek_v3"]
    tensors = read_safetensors_dir(src)
    quantized, want = {}, {}
    for name, w in tensors.items():
        if w.dim() == 2 and "layers." in name and not name.endswith(("norm.weight", "gate.weight")):
            blocks = torch.zeros(-(-w.shape[0] // 16), -(-w.shape[1] // 16), dtype=torch.float32)
            q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
            for i in range(blocks.shape[0]):
                for j in range(blocks.shape[1]):
                    part = w[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)]
                    blocks[i, j] = part.abs().max() / 448.0
                    q[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)] = (part / blocks[i, j]).to(torch.float8_e4m3fn)
            quantized[name], quantized[name + "_scale_inv"] = q, blocks
            scale64 = torch.kron(blocks.double(), torch.ones(16, 16, dtype=torch.float64))[: w.shape[0], : w.shape[1]]
            want[name] = (q.double() * scale64).float()
        else:
            quantized[name] = w
    # one MTP layer (DeepSeek-V3 stores it as layer num_hidden_layers)
    quantized["model.layers.4.enorm.weight"] = torch.ones(48)
    quantized["model.layers.4.eh_proj.weight"] = torch.randn(48, 96)
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(quantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16],
                                     "activation_scheme": "dynamic"}
    config["num_nextn_predict_layers"] = 1
    (out / "config.json").write_text(json.dumps(config))

    model = build_gpt_model(out)
    load_hf_checkpoint(model, out)
    exported = {k: v.clone() for k, v in export_hf_state(model)}
    assert len(want) >= 30 and set(exported) == set(tensors)
    for name, value in want.items():
        assert torch.equal(exported[name], value), name
        assert not torch.equal(value, tensors[name])  # the quantization really changed the weight
    save_hf_checkpoint(model, tmp_path / "export")
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "quantization_config" not in written and written["num_nextn_predict_layers"] == 0
    assert set(read_safetensors_dir(tmp_path / "export")) == set(tensors)

    config["quantization_config"] = {"quant_method": "awq"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported quantization_config \(quant_method='awq'"):
        load_hf_checkpoint(build_gpt_model(out), out)


@pytest.mark.parametrize("mscale", [1.0, 0.707])
def test_yarn_rope_matches_hf(mscale, tmp_path, single_process_parallel):
    """DeepSeek-V3's yarn rope (factor 4 over an original context of 64, read at 120 positions), with mscale equal
    to mscale_all_dim and not (then HF also scales cos/sin): Megatron's MLA yarn equals transformers'."""
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": mscale,
            "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
    ckpt = write_moe_checkpoint("deepseek_v3", tmp_path / "yarn", rope_scaling=yarn)
    plain = write_moe_checkpoint("deepseek_v3", tmp_path / "plain")
    model = build_gpt_model(ckpt)
    load_hf_checkpoint(model, ckpt)
    ids = torch.randint(0, VOCAB, (2, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_reference(ckpt)(ids).logits
        unscaled = hf_reference(plain)(ids).logits
    assert (want - unscaled).abs().max() > 0.05  # the scaling changes the model at these positions
    torch.testing.assert_close(_megatron_logits(model, ids).double(), want, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Uneven pipeline stages (DeepSeek-V3's 61 layers): 7 layers over PP = 2 (4 + 3) and PP = 3 (2 + 3 + 2)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, pp, want", [(61, 8, (7, 6)), (61, 2, (31, 30)), (61, 16, (3, 2)), (7, 2, (4, 3)),
                                              (7, 3, (2, 2)), (7, 4, (2, 1)), (8, 4, (None, None)),
                                              (4, 1, (None, None))])
def test_balanced_pipeline_split(layers, pp, want):
    from r1_engine.parallel.models import (
        balanced_pipeline_split,
        hf_config_to_transformer_config,
        parse_hf_config,
        pipeline_stage_layers,
    )

    assert balanced_pipeline_split(layers, pp) == want
    info = parse_hf_config(moe_hf_config("deepseek_v3", num_hidden_layers=layers).to_dict())
    config = hf_config_to_transformer_config(info, pipeline_parallel=pp)
    assert (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) == want
    stages = pipeline_stage_layers(config)  # Megatron's own offsets: contiguous, every layer once
    assert [i for stage in stages for i in stage] == list(range(layers)) and len(stages) == pp
    sizes = [len(stage) for stage in stages]
    assert max(sizes) - min(sizes) <= 2 and min(sizes) >= 1


def test_too_few_layers_for_the_pipeline():
    from r1_engine.parallel.models import balanced_pipeline_split

    with pytest.raises(ValueError, match=r"num_hidden_layers=3 is fewer than pipeline_parallel=4"):
        balanced_pipeline_split(3, 4)


@pytest.mark.multiproc
@pytest.mark.parametrize("pp", [2, 3])
def test_uneven_pipeline_matches_pp1(pp, tmp_path_factory):
    """A 7-layer DeepSeek-V3 over PP = 2 (stages of 4 + 3 layers) and PP = 3 (2 + 3 + 2), each on `pp` ranks
    against PP = 1 (DP = pp) on the same ranks: log-probs equal HF float64's, and the log-probs, loss, grad norm,
    every weight's update (exported through the per-stage layer offsets) and the log-probs after the step equal
    PP = 1's."""
    from tests.parallel._step_workers import layouts_worker
    from tests.parallel.dist_utils import run_distributed
    from tests.parallel.test_step import _assert_same_run, _assert_sequences_close

    ckpt = write_moe_checkpoint("deepseek_v3", tmp_path_factory.mktemp("ds7"), num_hidden_layers=7)
    problem = _moe_problem(ckpt)
    layouts = [(1, 1, True, 2, AGG, False, 1), (1, pp, True, 2, AGG, False, 1)]
    per_rank = run_distributed(layouts_worker, pp, str(ckpt), problem["spec"], layouts)
    reference, uneven = per_rank[0]
    assert uneven["layout"]["pp"] == pp and reference["layout"]["pp"] == 1
    _assert_sequences_close(reference["logp"], problem["logp"], 2e-5, "logp vs HF float64")
    _assert_sequences_close(uneven["logp"], problem["logp"], 2e-5, f"PP={pp} logp vs HF float64")
    _assert_same_run(uneven, reference)
    assert "model.layers.6.mlp.gate.e_score_correction_bias" in uneven["delta"]
