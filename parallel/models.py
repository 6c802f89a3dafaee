"""HF `config.json` -> Megatron-core `GPTModel` for this rank's pipeline stage.

Supported: Qwen2 / Qwen2.5 (`model_type: qwen2`) and Llama 3.x (`model_type: llama`), i.e.
pre-norm decoders with RMSNorm, SwiGLU MLP, rotary embeddings (Llama-3 frequency scaling
included), grouped-query attention, QKV bias for Qwen2, tied or untied embeddings; and the
mixture-of-experts models Qwen3-MoE (`qwen3_moe`) and DeepSeek-V3 (`deepseek_v3`, multi-latent
attention), whose MoE/MLA fields are read by `parallel/moe.py`.

Two layer specs, chosen like Megatron's `gpt_layer_specs.py` intends:
* local (`get_gpt_layer_local_spec`): pure Megatron-core modules; CPU tests and GPUs without TE;
* Transformer Engine (`get_gpt_layer_with_transformer_engine_spec`) when TE is importable and CUDA
  is present (or `use_te=True`), with FP8 from `fp8` / `fp8_recipe`.
  UNVERIFIED in this repository (no TE, no GPU where it was written): the TE path only sets the
  documented TransformerConfig fields (`transformer_impl`, `fp8`, `fp8_recipe`) and is not run by
  the CPU tests.

The vocabulary is padded to a multiple of 128 * tp (Megatron's vocab-parallel layout needs equal
shards). The padded logit columns are filled with `VOCAB_PAD_LOGIT` by a forward hook on the output
layer (`mask_vocab_padding=True`), so a softmax over the logits gives them probability exactly 0
and the log-probs equal the unpadded model's. Code that bypasses `output_layer` (an lm_head fused
with the loss) must itself ignore the columns `>= ModelInfo.vocab_size`.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from r1_engine.parallel.hf_config import ModelInfo, parse_hf_config
from r1_engine.parallel.layout import (  # noqa: F401 - re-exported: callers import them from here
    balanced_pipeline_split,
    pipeline_stage_layers,
    unwrap_model,
)
from r1_engine.parallel.megatron_compat import megatron_without_te_fixes
from r1_engine.parallel.moe import decoder_spec, moe_config_fields

__all__ = [
    "ModelInfo",
    "VOCAB_PAD_LOGIT",
    "parse_hf_config",
    "hf_config_to_transformer_config",
    "balanced_pipeline_split",
    "pipeline_stage_layers",
    "build_gpt_model",
    "llama3_inv_freq",
    "freeze",
    "offload_to_cpu",
    "onload",
    "te_available",
]

# Padded vocabulary columns get this logit: exp(-1e4 - max) is exactly 0 in fp32, and unlike -inf
# it keeps p * z (entropy) finite (0 * -inf would be NaN).
VOCAB_PAD_LOGIT = -1.0e4

def te_available() -> bool:
    """Transformer Engine importable and CUDA present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def hf_config_to_transformer_config(
    hf_config: dict | str | Path | ModelInfo,
    *,
    dtype: torch.dtype = torch.float32,
    tensor_parallel: int | None = None,
    pipeline_parallel: int | None = None,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    use_te: bool = False,
    expert_parallel: int | None = None,
    expert_tensor_parallel: int | None = None,
    moe_bias_update_rate: float = 1e-3,
    moe_aux_loss_coeff: float | None = None,
    overrides: dict | None = None,
):
    """Megatron `TransformerConfig` (`MLATransformerConfig` for DeepSeek-V3) for a supported HF config.

    tensor_parallel / pipeline_parallel / expert_parallel / expert_tensor_parallel default to Megatron's initialised
    sizes (1 if none). MoE: `moe_bias_update_rate` is the aux-loss-free expert-bias step (DeepSeek-V3's 1e-3; 0
    freezes the checkpoint's bias), `moe_aux_loss_coeff` the load-balancing loss (None: the checkpoint's own).
    `overrides` sets any further TransformerConfig field (e.g. recompute_granularity,
    sequence_parallel, variable_seq_lengths) and wins over what is derived here.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    initialised = mpu.model_parallel_is_initialized()
    if tensor_parallel is None:
        tensor_parallel = mpu.get_tensor_model_parallel_world_size() if initialised else 1
    if pipeline_parallel is None:
        pipeline_parallel = mpu.get_pipeline_model_parallel_world_size() if initialised else 1
    if expert_parallel is None:
        expert_parallel = mpu.get_expert_model_parallel_world_size() if initialised else 1
    if expert_tensor_parallel is None:
        expert_tensor_parallel = mpu.get_expert_tensor_parallel_world_size() if initialised else 1
    info = (hf_config if isinstance(hf_config, ModelInfo)
            else parse_hf_config(hf_config, tensor_parallel, expert_parallel))
    first_stage_layers, last_stage_layers = balanced_pipeline_split(info.num_layers, pipeline_parallel)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} not supported (float32, bfloat16, float16)")
    if fp8 is not None:
        if fp8 not in ("e4m3", "hybrid"):
            raise ValueError(f"fp8={fp8!r}: expected 'e4m3' or 'hybrid'")
        if fp8_recipe not in ("delayed", "tensorwise", "blockwise", "mxfp8"):
            raise ValueError(f"fp8_recipe={fp8_recipe!r}: expected delayed, tensorwise, blockwise or mxfp8")
        if fp8_recipe == "mxfp8" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (10, 0):
            # TE's MXFP8 recipe runs on Blackwell (sm_100+) only; Hopper has per-tensor and block scaling
            raise ValueError(f"fp8_recipe='mxfp8' needs compute capability >= 10.0 (Blackwell); "
                             f"{torch.cuda.get_device_name()} has {'.'.join(map(str, torch.cuda.get_device_capability()))}"
                             f": use fp8_recipe 'blockwise' or 'tensorwise'")
        if not use_te:
            raise ValueError("fp8 needs Transformer Engine (use_te=True with TE installed and CUDA)")

    kwargs: dict[str, Any] = dict(
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        num_attention_heads=info.num_attention_heads,
        num_query_groups=info.num_query_groups,
        kv_channels=info.head_dim,
        ffn_hidden_size=info.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=info.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU: fc1 = [gate; up], act(gate) * up
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=info.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=float(info.hf_config.get("attention_dropout", 0.0) or 0.0),
        init_method_std=info.initializer_range,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        # layers % PP != 0 (DeepSeek-V3's 61): the first and last stages take the remainder (None: an even split)
        num_layers_in_first_pipeline_stage=first_stage_layers,
        num_layers_in_last_pipeline_stage=last_stage_layers,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Without CUDA the full weight is built on CPU and split (also makes init TP-invariant).
        use_cpu_initialization=not torch.cuda.is_available(),
        # Other fusions need apex/TE/CUDA; the plain paths are exact and portable.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        # TE's fused RoPE also keeps packed (thd) batches free of the per-sequence Python loop and host syncs
        # of the unfused path; UNVERIFIED without a GPU
        apply_rope_fusion=use_te,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        transformer_impl="transformer_engine" if use_te else "local",
        # No MoE here; Megatron's validation rejects variable_seq_lengths=True (pipeline
        # shapes that change per micro-batch) with the default "allgather" dispatcher.
        moe_token_dispatcher_type="alltoall",
    )
    if fp8 is not None:
        kwargs.update(fp8=fp8, fp8_recipe=fp8_recipe)
    if info.qk_norm:
        kwargs.update(qk_layernorm=True)
    if info.moe is not None:
        kwargs.update(moe_config_fields(info.moe, info.mla, expert_parallel=expert_parallel,
                                        expert_tensor_parallel=expert_tensor_parallel,
                                        bias_update_rate=moe_bias_update_rate, aux_loss_coeff=moe_aux_loss_coeff,
                                        use_te=use_te))
        # Megatron's MoE layer refuses to train under TP without sequence parallelism (its token dispatch assumes
        # each TP rank holds a slice of the sequence)
        kwargs.update(sequence_parallel=tensor_parallel > 1)
    if info.mla is not None:
        # TE's fused MLA rope exists for yarn only; the unfused path is exact
        kwargs.update(rotary_base=info.rope_theta, apply_rope_fusion=False)
    if overrides:
        kwargs.update(overrides)
    with warnings.catch_warnings():
        # megatron-core 0.16 warns about its own default cuda_graph_scope on every config; we use no CUDA graphs
        warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)
        return (MLATransformerConfig if info.mla is not None else TransformerConfig)(**kwargs)




def llama3_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3 scaling (fp32), written from the published rule:
    wavelengths above original_max / low_freq_factor are divided by `factor`, those below
    original_max / high_freq_factor are kept, and the band between is interpolated linearly in
    original_max / wavelength. (Megatron's built-in `rope_scaling` hard-codes low 1, high 4 and
    8192, so it is not used.)"""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, interpolated, scaled)


def _mask_padding_hook(vocab_size: int, padded_vocab_size: int, tp_size: int, tp_rank: int):
    shard = padded_vocab_size // tp_size
    first_pad = vocab_size - tp_rank * shard  # local column where padding starts (may be > shard)

    def hook(module, args, output):
        logits, bias = output
        if first_pad >= logits.shape[-1]:
            return output
        # In place: a copy would double the largest activation; autograd zeroes these columns' grads.
        logits[..., max(first_pad, 0) :] = VOCAB_PAD_LOGIT
        return logits, bias

    return hook


def build_gpt_model(
    hf_config: dict | str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    use_te: bool | None = None,
    seq_length: int | None = None,
    config_overrides: dict | None = None,
    mask_vocab_padding: bool = True,
    moe_bias_update_rate: float = 1e-3,
    moe_aux_loss_coeff: float | None = None,
):
    """This rank's pipeline stage of the model, weights randomly initialised (load them with
    `parallel.convert.load_hf_checkpoint`). Requires `parallel.init_parallel()` first.

    Returns a Megatron `GPTModel` with `model.model_info` (ModelInfo). Forward:
    `model(input_ids [b, s], position_ids [b, s], attention_mask=None)` is causal and returns
    vocab-parallel logits [b, s, padded_vocab / tp] on the last stage, hidden states
    [s, b, h] on the others.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel

    if not mpu.model_parallel_is_initialized():
        raise RuntimeError("call parallel.init_parallel() before build_gpt_model()")
    tp = mpu.get_tensor_model_parallel_world_size()
    info = parse_hf_config(hf_config, tensor_parallel=tp, expert_parallel=mpu.get_expert_model_parallel_world_size())
    if use_te is None:
        use_te = te_available()
    elif use_te and not te_available():
        raise ValueError("use_te=True but Transformer Engine is not importable or CUDA is absent")
    config = hf_config_to_transformer_config(
        info, dtype=dtype, fp8=fp8, fp8_recipe=fp8_recipe, use_te=use_te, overrides=config_overrides,
        moe_bias_update_rate=moe_bias_update_rate, moe_aux_loss_coeff=moe_aux_loss_coeff,
    )
    if info.moe is not None or info.qk_norm:
        megatron_without_te_fixes()
        layer_spec = decoder_spec(config, use_te)  # per layer: dense or MoE MLP, MLA or grouped-query attention
    elif use_te:
        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")

    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=info.padded_vocab_size,
        max_sequence_length=seq_length or info.max_position_embeddings,
        pre_process=mpu.is_pipeline_first_stage(),
        post_process=mpu.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=info.tie_word_embeddings,
        parallel_output=True,
        position_embedding_type="rope",
        rotary_base=info.rope_theta,
    )
    if not use_te:
        # the local spec builds its norms as torch.nn.RMSNorm in fp32 whatever params_dtype says; one dtype for
        # every parameter (as TE builds them, and as Megatron's mixed-precision optimizer needs). Parameters
        # only: buffers such as RoPE's inv_freq stay fp32.
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    if info.rope_scaling is not None and info.mla is None:
        # Set before any forward: RotaryEmbedding.forward is lru-cached.
        model.rotary_pos_emb.inv_freq = llama3_inv_freq(info.head_dim, info.rope_theta, info.rope_scaling).to(
            model.rotary_pos_emb.inv_freq.device
        )
    if mask_vocab_padding and model.post_process and info.padded_vocab_size != info.vocab_size:
        model.output_layer.register_forward_hook(
            _mask_padding_hook(info.vocab_size, info.padded_vocab_size, tp, mpu.get_tensor_model_parallel_rank())
        )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    model.model_info = info
    return model



def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Reference policy: no gradients, eval mode (dropout off)."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def offload_to_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Move parameters and buffers to host memory (pinned when CUDA is present), in place, so a
    frozen reference model leaves the GPU between its uses. Not for models whose parameters live
    in a DDP grad/param buffer (the trained policy)."""
    pin = torch.cuda.is_available()
    for tensor in _tensors(model):
        if tensor.data.device.type != "cpu":
            host = torch.empty_like(tensor.data, device="cpu", pin_memory=pin)
            host.copy_(tensor.data, non_blocking=pin)
            tensor.data = host
    if pin:
        torch.cuda.synchronize()
    return model


def onload(model: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """Move parameters and buffers back to `device` (default: the current CUDA device, or CPU)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    for tensor in _tensors(model):
        if tensor.data.device != device:
            tensor.data = tensor.data.to(device, non_blocking=True)
    return model


def _tensors(model: torch.nn.Module):
    yield from model.parameters()
    yield from model.buffers()
