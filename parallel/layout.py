"""Where a model's layers live: the pipeline split (uneven first/last stages included) and the model inside its
training wrappers. A leaf module: parallel.models, parallel.moe and the converters import it, it imports none of them
(so the three do not import each other in a circle)."""
from __future__ import annotations

import torch


def balanced_pipeline_split(num_layers: int, pipeline_parallel: int) -> tuple[int | None, int | None]:
    """(layers of the first stage, layers of the last stage) for Megatron's `num_layers_in_first_pipeline_stage` /
    `num_layers_in_last_pipeline_stage`: (None, None) when the layers split evenly. Otherwise the middle stages get
    m layers each and the first and last stages share the rest (the first the larger half: the last stage also
    computes the output layer and the loss), with m chosen so that the busiest stage has the fewest layers (then
    the lightest last stage). 61 layers over 8 stages: 7 + 6 x 8 + 6; 7 over 3: 2 + 3 + 2; 7 over 2: 4 + 3."""
    if pipeline_parallel < 1:
        raise ValueError(f"pipeline_parallel must be >= 1, got {pipeline_parallel}")
    if num_layers % pipeline_parallel == 0:
        return None, None
    if num_layers < pipeline_parallel:
        raise ValueError(f"num_hidden_layers={num_layers} is fewer than pipeline_parallel={pipeline_parallel}: "
                         f"every pipeline stage needs at least one layer")
    middle_stages = pipeline_parallel - 2
    best = None
    for per_middle in ([0] if middle_stages == 0 else range(1, num_layers)):
        rest = num_layers - middle_stages * per_middle
        if rest < 2:
            break
        first, last = (rest + 1) // 2, rest // 2
        key = (max(first, last, per_middle), last, first)
        if best is None or key < best[0]:
            best = (key, first, last)
    return best[1], best[2]


def pipeline_stage_layers(config) -> list[range]:
    """The global layer indices each pipeline stage builds (Megatron's own offsets, uneven first/last included)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pp = getattr(config, "pipeline_model_parallel_size", 1) or 1
    if pp == 1:
        return [range(config.num_layers)]
    stages = []
    for rank in range(pp):
        offset = get_transformer_layer_offset(config, pp_rank=rank)
        stages.append(range(offset, offset + get_num_layers_to_build(config, pp_rank=rank)))
    return stages


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside training wrappers (Megatron DDP, Float16Module): what conversion and checkpoints see."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model
