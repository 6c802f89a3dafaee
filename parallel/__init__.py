"""Models on Megatron-core and weight movement: parallel state, HF <-> Megatron models and
checkpoints. Knows no RL and no recipe.

    from parallel import init_parallel, build_gpt_model, load_hf_checkpoint, export_hf_state
    state = init_parallel(tensor_parallel=2, pipeline_parallel=1)   # under torchrun, or 1 process
    model = build_gpt_model("ckpt/")                                # this rank's stage, random init
    load_hf_checkpoint(model, "ckpt/")                              # this rank's TP/PP shard
"""
import warnings

# Megatron warns at import that TE/Apex are absent, once per module; on CPU that is the plan, not news.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")

from parallel.convert import export_hf_state, load_hf_checkpoint, save_hf_checkpoint
from parallel.models import (
    VOCAB_PAD_LOGIT,
    ModelInfo,
    build_gpt_model,
    freeze,
    hf_config_to_transformer_config,
    offload_to_cpu,
    onload,
    parse_hf_config,
    unwrap_model,
)
from parallel.state import (  # noqa: E402
    ParallelState,
    destroy_parallel,
    get_parallel_state,
    init_parallel,
    nvtx_range,
)

__all__ = [
    "ParallelState",
    "init_parallel",
    "destroy_parallel",
    "get_parallel_state",
    "nvtx_range",
    "ModelInfo",
    "VOCAB_PAD_LOGIT",
    "parse_hf_config",
    "hf_config_to_transformer_config",
    "build_gpt_model",
    "freeze",
    "offload_to_cpu",
    "onload",
    "unwrap_model",
    "load_hf_checkpoint",
    "export_hf_state",
    "save_hf_checkpoint",
]
