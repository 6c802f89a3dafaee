"""Mixture-of-experts and multi-latent attention: HF Qwen3-MoE and DeepSeek-V3 on Megatron-core's MoE layers.

What the HF fields mean in Megatron's terms (transformers 5.x modeling code, megatron-core 0.16):

* Qwen3-MoE: softmax router over all experts, top-k, renormalised when `norm_topk_prob` (= Megatron's softmax over
  the top-k logits; without it, `moe_router_pre_softmax`); q/k RMSNorm per head (`qk_layernorm`); dense MLP layers
  from `mlp_only_layers` / `decoder_sparse_step`; no shared expert.
* DeepSeek-V3: sigmoid scores; `e_score_correction_bias` (Megatron's `expert_bias` buffer, aux-loss-free balancing)
  only chooses the experts, the weights come from the unbiased scores, renormalised over the top-k and times
  `routed_scaling_factor`; group-limited top-k (`n_group`, `topk_group`); one shared expert of
  n_shared_experts x moe_intermediate_size; the first `first_k_dense_replace` layers dense; multi-latent attention
  (q/kv low-rank projections with their RMSNorms, rope on a separate `qk_rope_head_dim` slice, interleaved pairs).
  Multi-token-prediction layers are not part of HF's model (transformers drops them) and are not hosted here.

Megatron scores an expert group by the sum of its top (k / topk_group) experts while HF always sums the top 2, so
the two route alike only when k / topk_group = 2 (DeepSeek-V3's 8 / 4); other settings are refused rather than
silently routed differently.

`megatron_without_te_fixes()` works around three megatron-core 0.16.1 defects that stop MoE/MLA without Transformer
Engine (on CPU, and on GPUs without TE). `RoutingReplay` records each token's experts and replays them
(Megatron's `RouterReplay`, driven per model so a policy and its reference do not share one global list).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MoEInfo", "MLAInfo", "parse_moe", "moe_config_fields", "megatron_without_te_fixes", "decoder_spec",
           "moe_layers_of", "router_modules"]


@dataclass(frozen=True)
class MoEInfo:
    """The routed-expert facts the builder, the converter and the metrics share."""

    num_experts: int
    topk: int
    ffn_hidden_size: int  # one expert's intermediate size
    shared_ffn_hidden_size: int  # 0: no shared expert
    moe_layers: tuple[bool, ...]  # per global layer: MoE (True) or dense MLP
    score_function: str  # "softmax" | "sigmoid"
    norm_topk_prob: bool
    expert_bias: bool  # DeepSeek's e_score_correction_bias
    num_groups: int | None = None
    group_topk: int | None = None
    scaling_factor: float | None = None
    aux_loss_coeff: float = 0.0  # the checkpoint's own (Qwen3-MoE: router_aux_loss_coef)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)


@dataclass(frozen=True)
class MLAInfo:
    q_lora_rank: int | None  # None: one q_proj (DeepSeek-V2-Lite style)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_scaling: dict | None  # yarn parameters, or None


def _int(cfg: dict, key: str, where: str) -> int:
    if cfg.get(key) is None:
        raise ValueError(f"{where}: missing field {key!r}")
    try:
        return int(cfg[key])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field {key!r}={cfg[key]!r} is not an integer") from None


def _yarn(cfg: dict, where: str) -> dict | None:
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ValueError(f"{where}: unsupported rope scaling rope_type={rope_type!r} for deepseek_v3 (default, yarn)")
    return {"factor": float(params.get("factor", 1.0)),
            "original_max_position_embeddings": int(params.get("original_max_position_embeddings", 4096)),
            "beta_fast": float(params.get("beta_fast", 32)), "beta_slow": float(params.get("beta_slow", 1)),
            "mscale": float(params.get("mscale", 1.0)), "mscale_all_dim": float(params.get("mscale_all_dim", 0.0))}


def parse_moe(cfg: dict, model_type: str, where: str, num_layers: int) -> tuple[MoEInfo, MLAInfo | None]:
    """The MoE (and, for DeepSeek-V3, MLA) part of an HF config; ValueError naming the field for what Megatron would
    compute differently."""
    if model_type == "qwen3_moe":
        experts = _int(cfg, "num_experts" if cfg.get("num_experts") is not None else "num_local_experts", where)
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        layers = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers))
        moe = MoEInfo(num_experts=experts, topk=_int(cfg, "num_experts_per_tok", where),
                      ffn_hidden_size=_int(cfg, "moe_intermediate_size", where), shared_ffn_hidden_size=0,
                      moe_layers=layers, score_function="softmax",
                      norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), expert_bias=False,
                      aux_loss_coeff=float(cfg.get("router_aux_loss_coef") or 0.0))
        mla = None
    else:  # deepseek_v3
        scoring = cfg.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ValueError(f"{where}: unsupported scoring_func={scoring!r} for deepseek_v3 (sigmoid)")
        method = cfg.get("topk_method", "noaux_tc")
        if method != "noaux_tc":
            raise ValueError(f"{where}: unsupported topk_method={method!r} for deepseek_v3 (noaux_tc)")
        if cfg.get("norm_topk_prob", True) is False:
            raise ValueError(f"{where}: norm_topk_prob=False is not supported for deepseek_v3 (Megatron always "
                             f"renormalises sigmoid scores over the top-k)")
        if cfg.get("rope_interleave", True) is False:
            raise ValueError(f"{where}: rope_interleave=False is not supported (Megatron's MLA rotates interleaved "
                             f"pairs)")
        experts = _int(cfg, "n_routed_experts", where)
        topk = _int(cfg, "num_experts_per_tok", where)
        # an absent field means transformers' default (DeepseekV3Config), as HF would read the same file
        groups, group_topk = int(cfg.get("n_group", 8) or 1), int(cfg.get("topk_group", 4) or 1)
        if experts % groups or group_topk > groups:
            raise ValueError(f"{where}: n_routed_experts={experts}, n_group={groups}, topk_group={group_topk} "
                             f"do not form groups")
        if groups > 1 and topk != 2 * group_topk:
            raise ValueError(f"{where}: num_experts_per_tok={topk} with topk_group={group_topk}: HF scores a group "
                             f"by its top-2 experts, Megatron by its top num_experts_per_tok/topk_group; they route "
                             f"alike only when num_experts_per_tok = 2 * topk_group")
        first_dense = int(cfg.get("first_k_dense_replace", 3) or 0)  # transformers' default is 3
        layers = tuple(i >= first_dense for i in range(num_layers))  # (HF reads no moe_layer_freq)
        moe = MoEInfo(num_experts=experts, topk=topk, ffn_hidden_size=_int(cfg, "moe_intermediate_size", where),
                      shared_ffn_hidden_size=int(cfg.get("n_shared_experts", 1) or 0) * int(cfg["moe_intermediate_size"]),
                      moe_layers=layers, score_function="sigmoid", norm_topk_prob=True, expert_bias=True,
                      num_groups=groups if groups > 1 else None, group_topk=group_topk if groups > 1 else None,
                      scaling_factor=float(cfg.get("routed_scaling_factor", 2.5)))
        q_rank = cfg.get("q_lora_rank")
        mla = MLAInfo(q_lora_rank=None if q_rank is None else int(q_rank),
                      kv_lora_rank=_int(cfg, "kv_lora_rank", where),
                      qk_nope_head_dim=_int(cfg, "qk_nope_head_dim", where),
                      qk_rope_head_dim=_int(cfg, "qk_rope_head_dim", where),
                      v_head_dim=_int(cfg, "v_head_dim", where), rope_scaling=_yarn(cfg, where))
    if moe.topk < 1 or moe.topk > moe.num_experts:
        raise ValueError(f"{where}: num_experts_per_tok={moe.topk} must be in [1, {moe.num_experts}]")
    return moe, mla


def moe_config_fields(moe: MoEInfo, mla: MLAInfo | None, *, expert_parallel: int, expert_tensor_parallel: int,
                      bias_update_rate: float, aux_loss_coeff: float | None) -> dict[str, Any]:
    """TransformerConfig (or MLATransformerConfig) fields for the routed experts and MLA."""
    coeff = moe.aux_loss_coeff if aux_loss_coeff is None else aux_loss_coeff
    fields: dict[str, Any] = dict(
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_router_topk=moe.topk,
        moe_layer_freq=[int(m) for m in moe.moe_layers],
        moe_router_score_function=moe.score_function,
        # softmax: norm_topk_prob = a softmax over the top-k logits (Megatron's default); else softmax over all
        # experts first, no renormalisation. Sigmoid scores are always renormalised over the top-k.
        moe_router_pre_softmax=moe.score_function == "softmax" and not moe.norm_topk_prob,
        moe_router_dtype="fp32",  # HF computes DeepSeek's router in fp32; harmless for Qwen3-MoE in fp32 runs
        moe_token_dispatcher_type="alltoall",
        moe_enable_routing_replay=True,  # each router gets a RouterReplay; inert until a replay target is set
        moe_grouped_gemm=False,  # SequentialMLP: per-expert linears, the local spec's only choice without TE
        moe_permute_fusion=False,
        moe_router_fusion=False,
        moe_aux_loss_coeff=coeff,
        moe_router_load_balancing_type="aux_loss" if coeff > 0 else "none",
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )
    if moe.shared_ffn_hidden_size:
        fields.update(moe_shared_expert_intermediate_size=moe.shared_ffn_hidden_size, moe_shared_expert_gate=False)
    if moe.expert_bias:
        fields.update(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=bias_update_rate)
    if moe.num_groups:
        fields.update(moe_router_num_groups=moe.num_groups, moe_router_group_topk=moe.group_topk)
    if moe.scaling_factor is not None:
        fields.update(moe_router_topk_scaling_factor=moe.scaling_factor)
    if mla is not None:
        yarn = mla.rope_scaling
        fields.update(
            multi_latent_attention=True,
            qk_layernorm=True,  # q_a_layernorm / kv_a_layernorm: without it Megatron silently builds no norm
            q_lora_rank=mla.q_lora_rank,
            kv_lora_rank=mla.kv_lora_rank,
            qk_head_dim=mla.qk_nope_head_dim,
            qk_pos_emb_head_dim=mla.qk_rope_head_dim,
            v_head_dim=mla.v_head_dim,
            rotary_interleaved=False,  # MLA de-interleaves its rope slice itself (= HF rope_interleave=True)
            rope_type="yarn" if yarn else "rope",
            # MLATransformerConfig's defaults are DeepSeek-V3's yarn (factor 40): a plain-rope model must reset them
            rotary_scaling_factor=yarn["factor"] if yarn else 1.0,
            mscale=yarn["mscale"] if yarn else 1.0,
            mscale_all_dim=yarn["mscale_all_dim"] if yarn else 0.0,
        )
        if yarn:
            fields.update(original_max_position_embeddings=yarn["original_max_position_embeddings"],
                          beta_fast=yarn["beta_fast"], beta_slow=yarn["beta_slow"])
    return fields


def megatron_without_te_fixes() -> None:
    """megatron-core 0.16.1 without Transformer Engine: (1) `moe_utils` tests `te_general_gemm is not None` but
    defines the name only when TE imports (NameError in every router forward); (2) `extensions.transformer_engine`
    defines TELinear & co as MagicMock stand-ins, so `multi_latent_attention` believes TE is present and its
    `isinstance(..., TELinear)` raises; (3, CPU only) the all-to-all dispatcher converts its split sizes to numpy
    only for CUDA tensors, and `all_to_all_single` rejects CPU tensors as sizes; (4, CPU only) gloo has no
    uneven all_gather / reduce_scatter. Idempotent."""
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not getattr(moe_utils, "HAVE_TE", True) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        multi_latent_attention.HAVE_TE = False
    original = moe_utils.maybe_move_tensor_to_cpu
    if not getattr(token_dispatcher.maybe_move_tensor_to_cpu, "_numpy_for_cpu", False):
        def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
            if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.numpy()
            return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

        maybe_move_tensor_to_cpu._numpy_for_cpu = True
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if not torch.cuda.is_available():
        _uneven_collectives_over_gloo()


def _uneven_collectives_over_gloo() -> None:
    """(4, CPU) With experts split over TP ranks, the all-to-all dispatcher gathers and reduce-scatters a different
    number of tokens per rank; gloo's all_gather and reduce_scatter take equal sizes only. The same results
    through equal-sized collectives: pad to the largest part and gather; all-reduce and keep this rank's part."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    if getattr(mappings._gather_along_first_dim, "_uneven_over_gloo", False):
        return
    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or len(set(output_split_sizes)) == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in range(group.size())]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, output_split_sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or len(set(input_split_sizes)) == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start:start + input_split_sizes[group.rank()]].contiguous()

    gather_along_first_dim._uneven_over_gloo = True
    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def _local_mla_core_attention():
    """Megatron's MLA builds its core attention with k_channels / v_channels, which only TE's accepts; the local
    DotProductAttention computes q.k and p.v for any head sizes and only sizes its output by kv_channels."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return MLADotProductAttention


class SequenceParallelTorchNorm:
    """The local spec's torch norm, allowed under sequence parallelism: Megatron's WrappedTorchNorm refuses it only
    because its weights lack the `sequence_parallel` mark by which finalize_model_grads sums a norm's gradient over
    the TP ranks (each rank saw S / TP of the tokens). Norms are per token, so the forward is the same."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


def _replace_module(spec, old, new, seen=None) -> None:
    """Swap `old` for `new` everywhere in a (nested) Megatron ModuleSpec / submodules dataclass."""
    import dataclasses

    seen = set() if seen is None else seen
    if id(spec) in seen:
        return
    seen.add(id(spec))
    if getattr(spec, "module", None) is old:
        spec.module = new
    children = [getattr(spec, f.name) for f in dataclasses.fields(spec)] if dataclasses.is_dataclass(spec) else []
    for child in children + list(getattr(spec, "layer_specs", None) or []):
        if child is old:
            for f in dataclasses.fields(spec):
                if getattr(spec, f.name) is old:
                    setattr(spec, f.name, new)
        elif dataclasses.is_dataclass(child) or hasattr(child, "submodules"):
            _replace_module(child, old, new, seen)
    sub = getattr(spec, "submodules", None)
    if sub is not None and not dataclasses.is_dataclass(spec):
        _replace_module(sub, old, new, seen)


def _replicated_linear():
    """Megatron's plain (replicated) Linear, the one MLA accepts besides the column-parallel ones."""
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer import multi_latent_attention

    if getattr(multi_latent_attention, "Linear", None) is None:  # MLA's own name for it, None when TE failed to import
        multi_latent_attention.Linear = Linear
    return multi_latent_attention.Linear


def decoder_spec(config, use_te: bool):
    """The per-layer (dense or MoE) block spec Megatron builds from `config.moe_layer_freq`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
    if getattr(config, "multi_latent_attention", False) and not use_te:

        core = _local_mla_core_attention()
        for layer_spec in spec.layer_specs:
            attention = layer_spec.submodules.self_attention.submodules
            attention.core_attention = core
            # the down projections replicated (as TE's spec has them), not column-parallel: with the local spec's
            # ColumnParallelLinear, megatron-core 0.16.1 gathers [kv_lora + rope] over TP and its backward keeps
            # only this rank's heads' share of the shared rope key's gradient (measured: wrong kv_down grads at
            # TP = 2). The replicated Linear marks its weights for the sequence-parallel gradient sum.
            attention.linear_q_down_proj = attention.linear_kv_down_proj = _replicated_linear()
    if config.sequence_parallel and not use_te:
        _replace_module(spec, WrappedTorchNorm, SequenceParallelTorchNorm)
    return spec


def moe_layers_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """This stage's MoE layers' `mlp` modules, in order."""
    from parallel.models import unwrap_model

    core = unwrap_model(model)
    return [layer.mlp for layer in core.decoder.layers if hasattr(layer.mlp, "router")]


def router_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [mlp.router for mlp in moe_layers_of(model)]


# ---------------------------------------------------------------------------------------------
# Per-step work on MoE models: padding, routing replay, expert-load metrics
# ---------------------------------------------------------------------------------------------

ROUTED_EXPERTS = "routed_experts"  # PackedRows extra [B, S, num MoE layers, k]: the rollout's experts per token


class MoEForward:
    """What a forward of an MoE model needs beyond tokens, for one pipeline stage (inert on dense models).

    * padding left out of the expert-bias load: Megatron 0.16.1's own `padding_mask` breaks the bias update
      (it ANDs a [tokens] mask into the [tokens, experts] routing map) and has the opposite sense in its switch
      aux loss, so it is not passed; instead the padding's share is taken back out of each router's
      `local_tokens_per_expert` right after its forward (aux and z losses still see padding positions);
    * routing replay: with the rows' `routed_experts` and `replay=True`, every router takes the recorded experts
      instead of its own top-k (the weights still come from its current scores, so it keeps its gradient);
    * expert load: tokens routed to each expert of each MoE layer over the forwards since `reset_load`.
    Tokens reach a router as [S, B] flattened S-major (sequence parallelism: this TP rank's slice of S;
    packed `thd`: one row of B * S)."""

    def __init__(self, model: torch.nn.Module, replay: bool = True):
        from parallel.models import unwrap_model

        core = unwrap_model(model)
        info = getattr(core, "model_info", None)
        self.moe = info.moe if info is not None else None
        self.mlps = moe_layers_of(core) if self.moe is not None else []
        self.replay = replay
        self.config = core.config
        ordinal = {layer: n for n, layer in enumerate(i for i, m in enumerate(self.moe.moe_layers) if m)} \
            if self.moe else {}
        self.layer_ids = [ordinal[layer.layer_number - 1] for layer in core.decoder.layers
                          if hasattr(layer.mlp, "router")]
        self.load = None
        self._pad_flat = None
        self._hooks = []

    @property
    def active(self) -> bool:
        """An MoE model (this pipeline stage may hold none of its MoE layers: it still joins the load's sum)."""
        return self.moe is not None

    def _flat(self, t: torch.Tensor, thd: bool) -> torch.Tensor:
        """[B, S, ...] -> this rank's router token order [tokens, ...]."""
        from megatron.core import parallel_state as mpu

        flat = t.reshape(-1, *t.shape[2:]) if thd else t.transpose(0, 1).reshape(-1, *t.shape[2:])
        if getattr(self.config, "sequence_parallel", False):
            tp, rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
            flat = flat.chunk(tp, dim=0)[rank]
        return flat

    def forward_kwargs(self, mb, thd: bool) -> dict:
        """Set this micro-batch's replay targets; the model's extra forward arguments."""
        if not self.active:
            return {}
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        padding = mb.seq_ids < 0
        self._pad_flat = self._flat(padding, thd)
        routed = mb.extras.get(ROUTED_EXPERTS) if self.replay else None
        if routed is not None:
            k = routed.shape[-1]
            # padding positions: distinct valid experts (zeros would route one token to one expert k times)
            routed = torch.where(padding[:, :, None, None], torch.arange(k, device=routed.device), routed)
        for mlp, layer in zip(self.mlps, self.layer_ids):
            replay = mlp.router.router_replay
            if replay is None:
                if routed is not None:
                    raise ValueError("routing replay needs the model built with moe_enable_routing_replay=True")
                continue
            if routed is None:
                replay.router_replay_action, replay.target_topk_idx = None, None
            else:
                replay.target_topk_idx = self._flat(routed[:, :, layer], thd).long()
                replay.router_replay_action = RouterReplayAction.REPLAY_FORWARD
        return {}

    def clear(self) -> None:
        for mlp in self.mlps:
            replay = mlp.router.router_replay
            if replay is not None:
                replay.router_replay_action, replay.target_topk_idx = None, None

    # -- expert load ---------------------------------------------------------------------------

    def count_load(self):
        """Context: count tokens per expert of each MoE layer in the forwards inside it."""
        owner = self

        class _Counting:
            def __enter__(self_inner):
                if owner.active:
                    owner.load = torch.zeros(owner.moe.num_moe_layers, owner.moe.num_experts, dtype=torch.float64)
                    for mlp, layer in zip(owner.mlps, owner.layer_ids):
                        owner._hooks.append(mlp.router.register_forward_hook(owner._hook(layer)))
                return owner

            def __exit__(self_inner, *exc):
                for h in owner._hooks:
                    h.remove()
                owner._hooks.clear()
                owner.clear()
                return False

        return _Counting()

    def _hook(self, layer: int):
        def hook(module, args, output):
            routing_map = output[1].detach().bool()
            if self._pad_flat is not None and self._pad_flat.numel() == routing_map.shape[0]:
                pad = self._pad_flat.reshape(-1, 1).to(routing_map.device)
                if getattr(module, "enable_expert_bias", False) and torch.is_grad_enabled():
                    # Megatron counted every token towards the bias update (as it does when grad is enabled)
                    module.local_tokens_per_expert -= (routing_map & pad).sum(0).to(
                        module.local_tokens_per_expert.dtype)
                routing_map = routing_map & ~pad
            self.load[layer] += routing_map.sum(0).double().cpu()

        return hook

    def _every_stage_has_moe(self) -> bool:
        """Megatron's aux-loss reduction is collective over the pipeline: only taken when every stage (an even
        split of the layers) tracks one."""
        pp = getattr(self.config, "pipeline_model_parallel_size", 1)
        per_stage = len(self.moe.moe_layers) // pp
        return all(any(self.moe.moe_layers[s * per_stage:(s + 1) * per_stage]) for s in range(pp))

    def load_metrics(self, num_microbatches: int = 1) -> dict[str, float]:
        """Expert load over all ranks (every token is routed once per layer, by one rank): the busiest and the
        idlest expert relative to a perfectly even load (1.0), and the idle experts per layer; with a
        load-balancing loss, its value (before the coefficient; 1.0 = even) averaged over MoE layers and
        micro-batches. Dropless routing (no capacity factor): no token is ever dropped."""
        if not self.active or self.load is None:
            return {}
        import torch.distributed as dist

        load = self.load.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load)
        mean = load.sum(1, keepdim=True) / load.shape[1]
        rel = load / mean.clamp(min=1e-12)
        metrics = {"moe/load_max": float(rel.max()), "moe/load_min": float(rel.min()),
                   "moe/idle_experts": float((load == 0).sum()) / load.shape[0]}
        if self.config.moe_aux_loss_coeff and self._every_stage_has_moe():
            from megatron.core.transformer.moe import moe_utils

            tracker = moe_utils.get_moe_layer_wise_logging_tracker()
            if "load_balancing_loss" in tracker:
                # Megatron's own reduction: summed over pipeline stages, averaged over data-parallel ranks
                moe_utils.reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
                values = tracker["load_balancing_loss"]["values"]
                metrics["moe/aux_loss"] = float(values.sum()) / self.moe.num_moe_layers / num_microbatches
                moe_utils.clear_aux_losses_tracker()
        return metrics
