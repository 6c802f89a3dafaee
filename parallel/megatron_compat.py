"""Workarounds for megatron-core 0.16.1 gaps met by MoE / multi-latent-attention models without Transformer Engine
(CPU over gloo, and GPUs without TE), in one place so that they can go when Megatron fixes them.

* `megatron_without_te_fixes()`: module-level names Megatron assumes TE defines, and gloo's collectives;
* `local_mla_core_attention()`: a local core attention that accepts MLA's separate k/v head sizes;
* `replicated_linear()`: the plain Linear for MLA's down projections (see `parallel.moe.decoder_spec`);
* `SequenceParallelTorchNorm` + `replace_module`: the local spec's torch norms under sequence parallelism.
"""
from __future__ import annotations

import warnings

import torch

# Megatron warns at import that TE/Apex are absent, once per module; on CPU that is the plan, not news.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")

__all__ = ["megatron_without_te_fixes", "local_mla_core_attention", "replicated_linear", "SequenceParallelTorchNorm",
           "replace_module"]


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


def local_mla_core_attention():
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


def replace_module(spec, old, new, seen=None) -> None:
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
            replace_module(child, old, new, seen)
    sub = getattr(spec, "submodules", None)
    if sub is not None and not dataclasses.is_dataclass(spec):
        replace_module(sub, old, new, seen)


def replicated_linear():
    """Megatron's plain (replicated) Linear, the one MLA accepts besides the column-parallel ones."""
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer import multi_latent_attention

    if getattr(multi_latent_attention, "Linear", None) is None:  # MLA's own name for it, None when TE failed to import
        multi_latent_attention.Linear = Linear
    return multi_latent_attention.Linear
