"""parallel.models + parallel.convert against HF transformers on tiny random Qwen2 / Llama-3.

References are independent of the code under test: HF's own modelling code and safetensors files,
HF's llama3 RoPE initialisation, and the TP=1 run for the TP/PP layouts.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.parallel._models_tiny import VOCAB, read_safetensors_dir, tiny_hf_config, tiny_hf_model

KINDS = ("qwen2", "llama")


def _config_dict(kind: str) -> dict:
    return tiny_hf_config(kind).to_dict()


@pytest.fixture(scope="session")
def tiny_dirs(tiny_qwen2_dir, tiny_llama_dir):
    return {"qwen2": tiny_qwen2_dir, "llama": tiny_llama_dir}


@pytest.fixture(scope="session")
def input_ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------
# Config parsing (no process group needed)
# ---------------------------------------------------------------------------------------------


def test_parse_qwen2_and_llama_configs():
    from r1_engine.parallel.models import parse_hf_config

    qwen = parse_hf_config(_config_dict("qwen2"))
    assert (qwen.model_type, qwen.vocab_size, qwen.padded_vocab_size) == ("qwen2", 250, 256)
    assert (qwen.num_attention_heads, qwen.num_query_groups, qwen.head_dim) == (4, 2, 16)
    assert qwen.qkv_bias and qwen.tie_word_embeddings and qwen.rope_scaling is None
    assert qwen.rope_theta == 1_000_000.0 and qwen.rms_norm_eps == 1e-6

    llama = parse_hf_config(_config_dict("llama"), tensor_parallel=4)
    assert not llama.qkv_bias and not llama.tie_word_embeddings
    assert llama.padded_vocab_size == 512  # multiple of 128 * tp
    assert llama.rope_scaling == {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32.0,
    }
    # The pre-transformers-5 spelling of the same config parses to the same facts.
    legacy = {k: v for k, v in _config_dict("llama").items() if k != "rope_parameters"}
    legacy.update(rope_theta=10_000.0, rope_scaling={"rope_type": "llama3", **{k: v for k, v in llama.rope_scaling.items()}})
    again = parse_hf_config(legacy, tensor_parallel=4)
    assert (again.rope_theta, again.rope_scaling) == (llama.rope_theta, llama.rope_scaling)


def test_transformer_config_fields():
    from r1_engine.parallel.models import hf_config_to_transformer_config

    cfg = hf_config_to_transformer_config(_config_dict("qwen2"), tensor_parallel=1, pipeline_parallel=1)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (2, 64, 4, 2)
    assert (cfg.kv_channels, cfg.ffn_hidden_size, cfg.layernorm_epsilon) == (16, 128, 1e-6)
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and cfg.add_qkv_bias
    assert not cfg.add_bias_linear and cfg.activation_func is torch.nn.functional.silu
    assert cfg.hidden_dropout == 0.0 and cfg.params_dtype == torch.float32
    llama = hf_config_to_transformer_config(
        _config_dict("llama"), dtype=torch.bfloat16, tensor_parallel=1, pipeline_parallel=1
    )
    assert not llama.add_qkv_bias and llama.bf16 and llama.params_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="pipeline_parallel=4"):
        hf_config_to_transformer_config(_config_dict("llama"), tensor_parallel=1, pipeline_parallel=4)
    with pytest.raises(ValueError, match="Transformer Engine"):
        hf_config_to_transformer_config(_config_dict("llama"), tensor_parallel=1, pipeline_parallel=1, fp8="e4m3")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "mistral"}, "mistral"),
        ({"architectures": ["Qwen2MoeForCausalLM"]}, "Qwen2MoeForCausalLM"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_attention_heads": 6, "num_key_value_heads": 3}, "tensor_parallel=2"),
    ],
)
def test_unsupported_configs_are_named(change, message):
    from r1_engine.parallel.models import parse_hf_config

    cfg = _config_dict("qwen2")
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        parse_hf_config(cfg, tensor_parallel=2)


def test_llama3_inv_freq_matches_hf_and_megatron():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from r1_engine.parallel.models import llama3_inv_freq, parse_hf_config

    hf_config = tiny_hf_config("llama")
    info = parse_hf_config(hf_config.to_dict())
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config)
    ours = llama3_inv_freq(info.head_dim, info.rope_theta, info.rope_scaling)
    assert torch.allclose(ours, hf_inv_freq.float(), rtol=1e-6, atol=0)
    plain = 1.0 / (10_000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert (ours < plain).any() and (ours == plain).any()  # all bands occur: scaled, kept (and mixed)

    # Megatron's built-in scaling (hard-wired 8192 / 1 / 4) agrees where its constants apply.
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0}
    rope = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=500_000, rope_scaling=True,
                           rope_scaling_factor=8.0, use_cpu_initialization=True)
    assert torch.allclose(llama3_inv_freq(128, 500_000.0, scaling), rope.inv_freq, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# One process, TP = PP = 1
# ---------------------------------------------------------------------------------------------


def _megatron_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        return model(input_ids, position_ids, attention_mask=None)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_model_has_one_parameter_dtype_and_matches_hf_in_bf16(kind, tiny_dirs, input_ids,
                                                                  single_process_parallel):
    """The local spec builds its RMSNorms in fp32 whatever params_dtype says; Megatron's mixed-precision
    optimizer needs one dtype, so every parameter is cast (as TE would build them)."""
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    model = build_gpt_model(tiny_dirs[kind], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    load_hf_checkpoint(model, tiny_dirs[kind])
    logits = _megatron_logits(model, input_ids)[..., :VOCAB].float()
    with torch.no_grad():
        reference = tiny_hf_model(kind).to(torch.bfloat16)(input_ids).logits.float()
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()  # bf16 rounding, not a different model


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf_transformers(kind, tiny_dirs, input_ids, single_process_parallel):
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import VOCAB_PAD_LOGIT, build_gpt_model

    model = build_gpt_model(tiny_dirs[kind])
    load_hf_checkpoint(model, tiny_dirs[kind])
    logits = _megatron_logits(model, input_ids)
    with torch.no_grad():
        reference = tiny_hf_model(kind)(input_ids).logits
    assert logits.shape == (2, 12, 256)
    assert reference.abs().max() > 1.0  # a meaningful scale for the tolerance below
    torch.testing.assert_close(logits[..., :VOCAB], reference, rtol=0, atol=1e-5)
    # Padding columns carry no probability: log-softmax over 256 columns = HF's over 250.
    assert torch.all(logits[..., VOCAB:] == VOCAB_PAD_LOGIT)
    torch.testing.assert_close(
        torch.log_softmax(logits.double(), -1)[..., :VOCAB], torch.log_softmax(reference.double(), -1),
        rtol=0, atol=1e-5,
    )


def test_padding_mask_keeps_gradients_finite(tiny_dirs, input_ids, single_process_parallel):
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    model = build_gpt_model(tiny_dirs["llama"])
    load_hf_checkpoint(model, tiny_dirs["llama"])
    position_ids = torch.arange(12).expand_as(input_ids)
    logits = model(input_ids, position_ids, attention_mask=None)
    torch.log_softmax(logits, -1).gather(-1, input_ids[..., None]).sum().backward()
    grad = model.output_layer.weight.grad
    assert torch.isfinite(grad).all() and grad[VOCAB:].abs().max() == 0 and grad[:VOCAB].abs().max() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bitwise(kind, tiny_dirs, tmp_path, single_process_parallel):
    from r1_engine.parallel.convert import export_hf_state, hf_tensor_shapes, load_hf_checkpoint, save_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model, parse_hf_config

    source = tiny_dirs[kind]
    reference = read_safetensors_dir(source)
    model = build_gpt_model(source)
    load_hf_checkpoint(model, source)
    exported = {name: tensor.clone() for name, tensor in export_hf_state(model)}
    assert set(exported) == set(reference)
    assert list(exported) == list(hf_tensor_shapes(parse_hf_config(source)))  # HF's order
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name

    out = save_hf_checkpoint(model, tmp_path / "out", tokenizer_dir=source, max_shard_bytes=30_000)
    written = read_safetensors_dir(out)
    assert set(written) == set(reference)
    assert all(torch.equal(written[n], reference[n]) for n in reference)
    assert (out / "model.safetensors.index.json").is_file()  # 30 kB shards: several files
    assert json.loads((out / "tokenizer_config.json").read_text())["tiny"] == kind
    assert parse_hf_config(out) == parse_hf_config(source)

    # A second model loaded from what we wrote is the same model.
    again = build_gpt_model(out)
    load_hf_checkpoint(again, out)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def _copy_checkpoint(source, dest, edit):
    """Copy a single-file checkpoint, letting `edit(tensors)` change its tensors."""
    from safetensors.torch import save_file

    shutil.copytree(source, dest)
    tensors = read_safetensors_dir(dest)
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


def test_missing_tensor_is_named(tiny_dirs, tmp_path, single_process_parallel):
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    bad = _copy_checkpoint(tiny_dirs["llama"], tmp_path / "bad", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    model = build_gpt_model(bad)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf_checkpoint(model, bad)


def test_wrong_shape_is_named(tiny_dirs, tmp_path, single_process_parallel):
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:16]

    bad = _copy_checkpoint(tiny_dirs["llama"], tmp_path / "bad", shrink)
    model = build_gpt_model(bad)
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(16, 64\), expected \(32, 64\)"):
        load_hf_checkpoint(model, bad)


def test_unexpected_tensor_and_architecture_are_named(tiny_dirs, tmp_path, single_process_parallel):
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    def add_layer(tensors):
        tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(128, 64)

    bad = _copy_checkpoint(tiny_dirs["llama"], tmp_path / "extra", add_layer)
    model = build_gpt_model(bad)
    with pytest.raises(ValueError, match=r"unexpected tensors.*model\.layers\.2\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(model, bad)

    # A checkpoint whose config.json names another architecture.
    other = tmp_path / "other"
    shutil.copytree(tiny_dirs["llama"], other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gemma2"):
        build_gpt_model(other)
    with pytest.raises(ValueError, match="gemma2"):
        load_hf_checkpoint(model, other)

    # The Qwen2 checkpoint into the Llama model: the config mismatch is named.
    with pytest.raises(ValueError, match="model_type='qwen2'"):
        load_hf_checkpoint(model, tiny_dirs["qwen2"])


def test_missing_shard_file_and_empty_dir(tiny_dirs, tmp_path, single_process_parallel):
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    bad = tmp_path / "sharded"
    shutil.copytree(tiny_dirs["qwen2"], bad)
    (bad / "model-00003-of-00011.safetensors").unlink()
    model = build_gpt_model(bad)
    with pytest.raises(ValueError, match="model-00003-of-00011.safetensors"):
        load_hf_checkpoint(model, bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither model.safetensors"):
        load_hf_checkpoint(model, empty)


def test_reference_helpers_and_state(tiny_dirs, single_process_parallel):
    from r1_engine.parallel.models import build_gpt_model, freeze, offload_to_cpu, onload
    from r1_engine.parallel.state import init_parallel, nvtx_range

    assert init_parallel(1, 1) is single_process_parallel  # idempotent
    with pytest.raises(ValueError, match=r"world_size=1 is not divisible by .* 2 \* 1 = 2"):
        init_parallel(2, 1)
    state = single_process_parallel
    assert (state.tp_size, state.pp_size, state.dp_size) == (1, 1, 1)
    assert state.is_first_stage and state.is_last_stage and state.is_main

    model = freeze(build_gpt_model(tiny_dirs["qwen2"]))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    before = [p.clone() for p in model.parameters()]
    onload(offload_to_cpu(model), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with nvtx_range("phase"):
        pass


# ---------------------------------------------------------------------------------------------
# Four processes: TP=2, PP=2, TP=2 x PP=2 and TP=4 against TP=1
# ---------------------------------------------------------------------------------------------


LAYOUTS = [(2, 1), (1, 2), (2, 2), (4, 1)]  # (tp, pp); tp=4 > 2 KV heads splits query groups
SGD_LR = 0.5


@pytest.fixture(scope="module")
def four_ranks(tiny_dirs, input_ids, tmp_path_factory):
    """One launch of 4 gloo processes for both multi-process tests; per-rank results."""
    from tests.parallel._dist_models_worker import four_rank_worker
    from tests.parallel.dist_utils import run_distributed

    out_root = tmp_path_factory.mktemp("four_ranks")
    labels = torch.roll(input_ids, -1, dims=1)
    ranks = run_distributed(
        four_rank_worker, 4, {k: str(v) for k, v in tiny_dirs.items()}, input_ids, labels, LAYOUTS, SGD_LR,
        str(out_root),
    )
    return ranks, out_root


@pytest.mark.multiproc
def test_tp_pp_layouts_match_tp1(four_ranks, tiny_dirs, input_ids, single_process_parallel):
    from r1_engine.parallel.convert import load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    ranks, out_root = four_ranks
    ranks = [r["parity"] for r in ranks]
    for kind in KINDS:
        tp1 = build_gpt_model(tiny_dirs[kind])
        load_hf_checkpoint(tp1, tiny_dirs[kind])
        expected = _megatron_logits(tp1, input_ids)[..., :VOCAB]
        reference = read_safetensors_dir(tiny_dirs[kind])
        for tp, pp in LAYOUTS:
            per_rank = [r[(kind, tp, pp)] for r in ranks]
            logits = [r["logits"] for r in per_rank if r["logits"] is not None]
            assert len(logits) == 1, (kind, tp, pp)
            torch.testing.assert_close(logits[0], expected, rtol=0, atol=1e-5)
            for rank, result in enumerate(per_rank):
                assert result["export_mismatch"] == [], (kind, tp, pp, rank)
                assert result["exported"] == len(reference)
            written = read_safetensors_dir(out_root / f"{kind}_tp{tp}_pp{pp}")
            assert set(written) == set(reference)
            assert all(torch.equal(written[n], reference[n]) for n in reference), (kind, tp, pp)
        # PP=2: each stage holds one layer; the tied Qwen2 keeps a copy of the embedding as the
        # last stage's output layer, the untied Llama its own lm_head.
        stage0, stage1 = ranks[0][(kind, 1, 2)]["stage_params"], ranks[3][(kind, 1, 2)]["stage_params"]
        assert "embedding.word_embeddings.weight" in stage0 and "output_layer.weight" not in stage0
        assert "output_layer.weight" in stage1 and not any("layers.1" in n for n in stage0 + stage1)


@pytest.mark.multiproc
def test_sgd_step_tp2_pp2_matches_tp1(four_ranks, tiny_dirs, input_ids, single_process_parallel):
    """A whole Megatron training step (DDP, pipeline schedule, optimizer) on the CPU shim with
    TP=2 x PP=2 gives TP=1's gradient norm and updated weights; for the tied Qwen2 this needs the
    embedding gradients of the first and last stage summed."""
    from r1_engine.parallel.convert import export_hf_state, load_hf_checkpoint
    from r1_engine.parallel.models import build_gpt_model

    lr = SGD_LR
    labels = torch.roll(input_ids, -1, dims=1)
    ranks = [r["sgd"] for r in four_ranks[0]]
    for kind in KINDS:
        model = build_gpt_model(tiny_dirs[kind])
        load_hf_checkpoint(model, tiny_dirs[kind])
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        model(input_ids, position_ids, attention_mask=None, labels=labels).mean().backward()
        grads = [p.grad for p in model.parameters()]
        grad_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
        with torch.no_grad():
            for param in model.parameters():
                param -= lr * param.grad
        expected = dict(export_hf_state(model))
        for rank, result in enumerate(ranks):
            assert result[kind]["grad_norm"] == pytest.approx(grad_norm, rel=1e-5), (kind, rank)
            updated = result[kind]["updated"]
            assert set(updated) == set(expected)
            for name, tensor in expected.items():
                torch.testing.assert_close(updated[name], tensor, rtol=0, atol=2e-6, msg=f"{kind} {name} rank {rank}")
