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
the two route alike only when k / topk_group = 2 (DeepSeek-V3's 8 / 4) or when topk_group = n_group (every group is
kept: no group limit, built as a plain top-k); other settings are refused rather than silently routed differently.

What megatron-core 0.16.1 needs to run these without Transformer Engine (on CPU, and on GPUs without TE) is in
`parallel/megatron_compat.py`. `MoEForward` replays each token's recorded experts (Megatron's `RouterReplay`,
driven per model so a policy and its reference never share targets), keeps padding out of the expert load and
counts the load for the step's metrics.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MoEInfo", "MLAInfo", "parse_moe", "moe_config_fields", "decoder_spec", "moe_layers_of", "router_modules",
           "MoEForward", "ROUTED_EXPERTS", "check_replay_training", "defer_expert_bias_update", "expert_bias_counts",
           "restore_expert_bias_counts", "update_expert_bias"]


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
        if group_topk == groups:  # every group is kept: no group limit applies, a plain top-k over all experts
            groups = group_topk = 1
        if groups > 1 and topk != 2 * group_topk:
            raise ValueError(f"{where}: num_experts_per_tok={topk} with topk_group={group_topk} < n_group={groups}: "
                             f"HF scores a group by its top-2 experts, Megatron by its top "
                             f"num_experts_per_tok/topk_group; they route alike only when num_experts_per_tok = "
                             f"2 * topk_group (or topk_group = n_group: no group limit)")
        first_dense = int(cfg.get("first_k_dense_replace", 3) or 0)  # transformers' default is 3
        layers = tuple(i >= first_dense for i in range(num_layers))  # (HF reads no moe_layer_freq)
        moe = MoEInfo(num_experts=experts, topk=topk, ffn_hidden_size=_int(cfg, "moe_intermediate_size", where),
                      shared_ffn_hidden_size=int(cfg.get("n_shared_experts", 1) or 0)
                      * int(cfg["moe_intermediate_size"]),
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
                      bias_update_rate: float, aux_loss_coeff: float | None, use_te: bool = False) -> dict[str, Any]:
    """TransformerConfig (or MLATransformerConfig) fields for the routed experts and MLA. `use_te`: the experts
    run as Transformer Engine's grouped GEMM (`TEGroupedMLP`, one kernel for all local experts, no host list of
    per-expert token counts) instead of the local spec's `SequentialMLP` loop over experts."""
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
        # TE: TEGroupedMLP (megatron-core's gpt_layer_specs picks it for moe_grouped_gemm with TE; its weights are
        # experts.linear_fc{1,2}.weight<l>, mapped in parallel/names.py). UNVERIFIED: no TE/GPU where written.
        # Without TE: SequentialMLP, per-expert linears (the legacy GroupedMLP would need the grouped_gemm package)
        moe_grouped_gemm=use_te,
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


def decoder_spec(config, use_te: bool):
    """The per-layer (dense or MoE) block spec Megatron builds from `config.moe_layer_freq`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from r1_engine.parallel.megatron_compat import (
        SequenceParallelTorchNorm,
        local_mla_core_attention,
        replace_module,
        replicated_linear,
    )

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
    if getattr(config, "multi_latent_attention", False) and not use_te:

        core = local_mla_core_attention()
        for layer_spec in spec.layer_specs:
            attention = layer_spec.submodules.self_attention.submodules
            attention.core_attention = core
            # the down projections replicated (as TE's spec has them), not column-parallel: with the local spec's
            # ColumnParallelLinear, megatron-core 0.16.1 gathers [kv_lora + rope] over TP and its backward keeps
            # only this rank's heads' share of the shared rope key's gradient (measured: wrong kv_down grads at
            # TP = 2). The replicated Linear marks its weights for the sequence-parallel gradient sum.
            attention.linear_q_down_proj = attention.linear_kv_down_proj = replicated_linear()
    if config.sequence_parallel and not use_te:
        replace_module(spec, WrappedTorchNorm, SequenceParallelTorchNorm)
    return spec


def moe_layers_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """This stage's MoE layers' `mlp` modules, in order."""
    from r1_engine.parallel.layout import unwrap_model

    core = unwrap_model(model)
    return [layer.mlp for layer in core.decoder.layers if hasattr(layer.mlp, "router")]


def router_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [mlp.router for mlp in moe_layers_of(model)]


# ---------------------------------------------------------------------------------------------
# The aux-loss-free expert bias: updated when the caller says (once per rollout), not inside every step
# ---------------------------------------------------------------------------------------------


def defer_expert_bias_update(finalize):
    """Megatron's `finalize_model_grads` (run by its schedules at the end of every forward-backward) without its
    expert-bias update and without the reset of the routers' token counts: the counts keep accumulating over
    steps until `update_expert_bias`. Idempotent (a wrapped function is returned as is)."""
    if getattr(finalize, "defers_expert_bias", False):
        return finalize

    def finalize_model_grads(model, *args, **kwargs):
        from megatron.core.utils import get_model_config

        config = get_model_config(model[0])
        if not getattr(config, "moe_router_enable_expert_bias", False):
            return finalize(model, *args, **kwargs)
        config.moe_router_enable_expert_bias = False  # read only by finalize's update and reset
        try:
            return finalize(model, *args, **kwargs)
        finally:
            config.moe_router_enable_expert_bias = True

    finalize_model_grads.defers_expert_bias = True
    return finalize_model_grads


def _bias_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from r1_engine.parallel.layout import unwrap_model

    if getattr(unwrap_model(model), "model_info", None) is None or unwrap_model(model).model_info.moe is None:
        return []
    return [r for r in router_modules(model) if getattr(r, "enable_expert_bias", False)]


def expert_bias_counts(model: torch.nn.Module) -> list[torch.Tensor]:
    """A copy of this stage's routers' accumulated token counts (what the next bias update will use)."""
    return [r.local_tokens_per_expert.detach().clone() for r in _bias_routers(model)]


def restore_expert_bias_counts(model: torch.nn.Module, counts: list[torch.Tensor]) -> None:
    """Put back counts taken by `expert_bias_counts`: the forwards since then do not count (a skipped step)."""
    for router, saved in zip(_bias_routers(model), counts):
        router.local_tokens_per_expert.copy_(saved)


@torch.no_grad()
def update_expert_bias(model: torch.nn.Module) -> None:
    """One aux-loss-free balancing step of every router's expert bias from the load accumulated since the last
    one (the real tokens of the training forwards of the steps that were taken), then reset the counts: bias +=
    rate * sign(mean load - load), the load summed over the tensor- and data-parallel ranks (Megatron's
    `get_updated_expert_bias`). Collective over them; a no-op on models without an expert bias."""
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    routers = _bias_routers(model)
    if not routers:
        return
    counts = torch.stack([r.local_tokens_per_expert for r in routers])
    biases = torch.stack([r.expert_bias for r in routers])
    updated = get_updated_expert_bias(counts, biases, routers[0].config.moe_router_bias_update_rate)
    for router, bias in zip(routers, updated):
        router.expert_bias.copy_(bias)
        router.local_tokens_per_expert.zero_()


def check_replay_training(config, replaying: bool) -> None:
    """What a training step with routing replay cannot do correctly, refused before the schedule starts (every
    rank of a model-parallel group sees the same rows and config, so all raise together)."""
    if not replaying:
        return
    granularity = getattr(config, "recompute_granularity", None)
    reruns_router = granularity == "full" or (granularity == "selective"
                                              and "moe" in (getattr(config, "recompute_modules", None) or []))
    if reruns_router and getattr(config, "pipeline_model_parallel_size", 1) > 1:
        raise ValueError(
            f"routing replay with activation recompute of the MoE layers (recompute_granularity={granularity!r}"
            f"{', recompute_modules=' + str(config.recompute_modules) if granularity == 'selective' else ''}) "
            f"under pipeline parallelism is not supported: the 1F1B schedule runs later micro-batches' forwards "
            f"before an earlier one's backward, so its recompute would route it through a later micro-batch's "
            f"recorded experts. Turn recompute off for the MoE layers, use pipeline_parallel=1, or turn routing "
            f"replay off (--model.no-routing-replay)")
    if getattr(config, "moe_aux_loss_coeff", 0.0) and getattr(config, "moe_router_load_balancing_type",
                                                               "none") != "none":
        raise ValueError(
            f"a load-balancing loss (moe_aux_loss_coeff={config.moe_aux_loss_coeff}, e.g. Qwen3-MoE's "
            f"router_aux_loss_coef) with routing replay is not supported: Megatron computes it from the policy's "
            f"own top-k, not the replayed experts, and over padding positions too. Set --model.moe-aux-loss-coeff "
            f"0, or turn routing replay off (--model.no-routing-replay)")


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
    * expert load: tokens routed to each expert of each MoE layer over the forwards inside `count_load()`.
    Tokens reach a router as [S, B] flattened S-major (sequence parallelism: this TP rank's slice of S;
    packed `thd`: one row of B * S)."""

    def __init__(self, model: torch.nn.Module, replay: bool = True):
        from r1_engine.parallel.layout import unwrap_model

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
        self.device = next((p.device for p in core.parameters()), torch.device("cpu"))

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

    def prepare(self, mb, thd: bool) -> None:
        """Before a micro-batch's forward: its padding (for the load) and, with replay, its routers' targets."""
        if not self.active:
            return
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

    def clear(self) -> None:
        for mlp in self.mlps:
            replay = mlp.router.router_replay
            if replay is not None:
                replay.router_replay_action, replay.target_topk_idx = None, None

    # -- expert load ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def count_load(self):
        """Count tokens per expert of each MoE layer in the forwards inside this context (on the model's device:
        no host sync per layer; `load_metrics` reads it once); replay targets are cleared on the way out."""
        hooks = []
        if self.active:
            self.load = torch.zeros(self.moe.num_moe_layers, self.moe.num_experts, dtype=torch.float64,
                                    device=self.device)
            hooks = [mlp.router.register_forward_hook(self._hook(layer))
                     for mlp, layer in zip(self.mlps, self.layer_ids)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()
            self.clear()

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
            self.load[layer] += routing_map.sum(0).to(self.load.device, torch.float64)

        return hook

    def _every_stage_has_moe(self) -> bool:
        """Megatron's aux-loss reduction is collective over the pipeline: only taken when every stage (uneven
        first/last stages included) tracks one."""
        from r1_engine.parallel.layout import pipeline_stage_layers

        return all(any(self.moe.moe_layers[i] for i in stage) for stage in pipeline_stage_layers(self.config))

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
        load = load.cpu()  # the step's one host copy of the load
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
