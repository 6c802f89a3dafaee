"""Pretrain the embedded default's MoE base: a ~1.4M-parameter DeepSeek-V3 (MLA, a shared expert, a sigmoid router
with e_score_correction_bias and group-limited top-k, one dense first layer) on the dense base's tiny world, on CPU.

    python -m r1_engine.recipes.tiny.pretrain_moe --out DIR      # tokenizer + pretraining (~8 min on 2 idle cores), HF model dir
    python -m r1_engine.recipes.tiny.pretrain_moe --check DIR    # pass@1 on the held-out prompts, next to the dense base's

Same tokenizer, corpus, optimiser and schedule as recipes/tiny/pretrain.py (whose helpers this reuses). Experts are
balanced without an auxiliary loss, as DeepSeek-V3 does: after every optimiser step each MoE layer's
e_score_correction_bias moves by `expert_bias_rate * sign(mean load - load)`, so an overloaded expert becomes less
likely to be chosen and an idle one more (the bias only selects; the weights stay the unbiased sigmoid scores).
The loads of the last LOAD_WINDOW steps and the final biases go into pretrain_meta.json.

`ensure_moe_base_model()` returns the committed checkpoint (recipes/tiny/moe_base/) when it matches the current
settings, and otherwise rebuilds it there.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from r1_engine.recipes.tiny.pretrain import (
    BASE_DIR,
    VOCAB_MULTIPLE,
    PretrainConfig,
    evaluate_base,
    finish_run,
    is_valid_base_model,
    lr_at,
    round_up,
    start_run,
    train_step,
    with_threads,
)

MOE_DIR = Path(__file__).resolve().parent / "moe_base"
LOAD_WINDOW = 50  # steps whose expert loads the meta file reports
# The reference loop: on CPU fp32 it is the fastest of transformers' three (grouped_mm ~10 % slower, batched_mm ~30x,
# measured); consumers choose their own when they load the checkpoint.
TRAIN_EXPERTS_IMPLEMENTATION = "eager"


@dataclass(frozen=True)
class MoEShape:
    """The DeepSeek-V3 architecture of the tiny MoE base (vocab size comes from the tokenizer).

    Sixteen routed experts in four groups of four: a token's router keeps the two best groups, then its four best
    experts among their eight, so both levels of DeepSeek-V3's group-limited top-k choose something (with groups of
    two, four experts from two groups would always be both experts of each group). 1.38M parameters, 0.71M active a
    token (the dense base has 0.80M).

    routed_scaling_factor is DeepSeek-V3's 2.5 rather than a neutral 1.0: the routed weights are trained around it
    either way, and a value other than 1 makes any consumer that forgets to apply it (a converter, routing replay, a
    Megatron spec) visibly wrong instead of silently right."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    first_k_dense_replace: int = 1
    intermediate_size: int = 352  # the dense layers' MLP
    n_routed_experts: int = 16
    n_group: int = 4
    topk_group: int = 2
    num_experts_per_tok: int = 4
    n_shared_experts: int = 1
    moe_intermediate_size: int = 48
    q_lora_rank: int = 64
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    max_position_embeddings: int = 256

    def __post_init__(self):
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} is not a multiple of n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
        # HF scores a group by the sum of its top-2 experts, Megatron by its top k // topk_group: the two routers
        # pick the same experts only when that is 2 (see notes/moe_hf/REPORT.md).
        if self.num_experts_per_tok // self.topk_group != 2:
            raise ValueError(
                f"num_experts_per_tok // topk_group must be 2 (HF and Megatron score groups alike only then), "
                f"got {self.num_experts_per_tok} // {self.topk_group}"
            )
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts of topk_group groups")
        if not 0 <= self.first_k_dense_replace < self.num_layers:
            raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} leaves no MoE layer")


@dataclass(frozen=True)
class MoEPretrainConfig(PretrainConfig):
    """Everything that decides the MoE checkpoint; any change makes ensure_moe_base_model rebuild. The optimiser and
    schedule fields mean what they mean for the dense base."""

    steps: int = 1300  # the dense base's 2000 steps cost ~1.3x as much here; 1300 keep pretraining near 8 minutes
    threads: int = 1
    # DeepSeek-V3's gamma. Measured over 300 steps: the worst layer's max/mean expert load ends at 3.2 without the
    # update and at 1.09 with it.
    expert_bias_rate: float = 1e-3
    model: MoEShape = field(default_factory=MoEShape)

    def __post_init__(self):
        if self.expert_bias_rate < 0:
            raise ValueError(f"expert_bias_rate must be >= 0, got {self.expert_bias_rate}")


def build_moe_model(shape: MoEShape, vocab_size: int, eos_token_id: int, seed: int):
    """A randomly initialised DeepseekV3ForCausalLM (fp32, no MTP layer); the init depends only on the seed."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=round_up(vocab_size, VOCAB_MULTIPLE),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        moe_intermediate_size=shape.moe_intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        n_shared_experts=shape.n_shared_experts,
        n_routed_experts=shape.n_routed_experts,
        routed_scaling_factor=shape.routed_scaling_factor,
        kv_lora_rank=shape.kv_lora_rank,
        q_lora_rank=shape.q_lora_rank,
        qk_rope_head_dim=shape.qk_rope_head_dim,
        v_head_dim=shape.v_head_dim,
        qk_nope_head_dim=shape.qk_nope_head_dim,
        n_group=shape.n_group,
        topk_group=shape.topk_group,
        num_experts_per_tok=shape.num_experts_per_tok,
        first_k_dense_replace=shape.first_k_dense_replace,
        norm_topk_prob=shape.norm_topk_prob,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,  # MLA's q_a/kv_a norms are fixed at 1e-6; one eps everywhere
        tie_word_embeddings=False,
        num_nextn_predict_layers=0,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        experts_implementation=TRAIN_EXPERTS_IMPLEMENTATION,
    )
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(config).float()


def routers(model) -> dict[int, torch.nn.Module]:
    """Layer index -> that MoE layer's router (`mlp.gate`; the dense layers' `mlp.gate_proj` is not one)."""
    return {index: layer.mlp.gate for index, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")}


def active_parameters(model, shape: MoEShape) -> int:
    """Parameters one token uses: all but the routed experts it is not sent to."""
    routed = sum(layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
                 for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    total = sum(p.numel() for p in model.parameters())
    return total - routed + routed * shape.num_experts_per_tok // shape.n_routed_experts


class ExpertLoadCounter:
    """Counts the tokens each router sends to each expert (padding excluded), via forward hooks on the routers.

    Set `token_mask` (the batch's attention_mask) before each forward; the routers see the batch flattened in the
    same order. `step_loads()` returns and resets the counts since the last call."""

    def __init__(self, model):
        self.gates = routers(model)
        self.token_mask: torch.Tensor | None = None
        self._loads = {index: torch.zeros(gate.num_experts, dtype=torch.long) for index, gate in self.gates.items()}
        self._handles = [gate.register_forward_hook(self._hook(index)) for index, gate in self.gates.items()]

    def _hook(self, index: int):
        def count(module, inputs, outputs):
            indices = outputs[2]  # (router_logits, topk_weights, topk_indices), one row per token
            if self.token_mask is not None:
                indices = indices[self.token_mask.reshape(-1).bool()]
            self._loads[index] += torch.bincount(indices.reshape(-1), minlength=module.num_experts)

        return count

    def step_loads(self) -> dict[int, torch.Tensor]:
        loads = self._loads
        self._loads = {index: torch.zeros_like(load) for index, load in loads.items()}
        return loads

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def update_expert_bias(gates: dict[int, torch.nn.Module], loads: dict[int, torch.Tensor], rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: bias += rate * sign(mean load - load), per MoE layer."""
    for index, gate in gates.items():
        load = loads[index].float()
        gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)


def load_stats(loads: dict[int, torch.Tensor]) -> dict[str, dict]:
    """Per MoE layer: tokens per expert and max/mean, min/mean of them (1.0 and 1.0 is perfectly balanced)."""
    stats = {}
    for index, load in loads.items():
        mean = load.float().mean().item()
        stats[str(index)] = {
            "tokens_per_expert": load.tolist(),
            "max_over_mean": round(load.max().item() / mean, 4) if mean else None,
            "min_over_mean": round(load.min().item() / mean, 4) if mean else None,
        }
    return stats


def pretrain_moe(config: MoEPretrainConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Build the tokenizer, pretrain the MoE model and save both to out_dir (written atomically).

    Returns the run summary (also saved as pretrain_meta.json): losses, time, parameters, expert loads and biases."""
    return with_threads(config.threads, lambda: _pretrain_moe(config, Path(out_dir), progress))


def _pretrain_moe(config: MoEPretrainConfig, out_dir: Path, progress: bool) -> dict:
    # the tokenizer is deterministic: the dense base's very files, read beside a deepseek_v3 config.json
    run = start_run(config, out_dir, lambda vocab, eos: build_moe_model(config.model, vocab, eos, config.seed))
    counter = ExpertLoadCounter(run.model)
    window = {index: torch.zeros(gate.num_experts, dtype=torch.long) for index, gate in counter.gates.items()}
    balance_history: list[dict] = []  # every 100 steps: max/mean load per layer over that step
    run.model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretrain moe", disable=not progress, mininterval=2.0)

    def count_real_tokens(attention_mask):
        counter.token_mask = attention_mask

    try:
        for step in bar:
            losses.append(train_step(run, config, step, before_forward=count_real_tokens))
            loads = counter.step_loads()
            update_expert_bias(counter.gates, loads, config.expert_bias_rate)
            if step >= config.steps - LOAD_WINDOW:
                for index in window:
                    window[index] += loads[index]
            if step % 100 == 0 or step == config.steps - 1:
                balance_history.append({"step": step, **{k: v["max_over_mean"] for k, v in load_stats(loads).items()}})
            if step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_at(step, config):.2e}")
    finally:
        counter.remove()
    seconds = time.perf_counter() - start
    stats = load_stats(window)
    return finish_run(
        run, config, out_dir, losses, seconds,
        active_parameters=active_parameters(run.model, config.model),
        expert_load={
            "window_steps": min(LOAD_WINDOW, config.steps),
            "max_over_mean": max(s["max_over_mean"] for s in stats.values()),  # the worst MoE layer
            "min_over_mean": min(s["min_over_mean"] for s in stats.values()),
            "layers": stats,
        },
        expert_bias={str(index): [round(x, 6) for x in gate.e_score_correction_bias.tolist()]
                     for index, gate in counter.gates.items()},
        balance_history=balance_history,
    )


def ensure_moe_base_model(cache_dir: str | Path = MOE_DIR, config: MoEPretrainConfig = MoEPretrainConfig()) -> Path:
    """The tiny MoE base's directory: the committed/cached one if it is valid, else pretrained there now."""
    cache_dir = Path(cache_dir)
    if not is_valid_base_model(cache_dir, config):
        print(f"[tiny] no valid MoE base model in {cache_dir}; pretraining one (about 8 minutes on 2 idle cores)")
        pretrain_moe(config, cache_dir)
    return cache_dir


def main(
    out: Path = MOE_DIR,
    check: Path | None = None,
    temperatures: tuple[float, ...] = (0.0, 1.0, 0.6),
    dense: Path = BASE_DIR,
    config: MoEPretrainConfig = MoEPretrainConfig(),
) -> None:
    """Pretrain into OUT, or with --check DIR only evaluate the model in DIR; either way print its pass@1 and format
    rate on the held-out prompts next to the dense base's (DENSE)."""
    if check is None:
        summary = pretrain_moe(config, out)
        print(
            f"saved {out}: {summary['parameters']:,} parameters ({summary['active_parameters']:,} active), "
            f"final loss {summary['final_loss']:.4f}, {summary['train_seconds']:.0f} s, "
            f"expert load max/mean {summary['expert_load']['max_over_mean']}, "
            f"min/mean {summary['expert_load']['min_over_mean']}"
        )
        check = out
    for temperature in temperatures:
        samples = 1 if temperature == 0 else 4
        rows = {name: evaluate_base(path, temperature=temperature, samples_per_prompt=samples)
                for name, path in (("moe", check), ("dense", dense))}
        print(json.dumps({"temperature": temperature, **{
            name: {key: row[key] for key in ("pass_at_1", "format_rate", "carry_procedure_rate", "endings")}
            for name, row in rows.items()}}, indent=1))


if __name__ == "__main__":
    import sys

    import tyro

    from r1_engine.engine.cli import run_cli

    sys.exit(run_cli(lambda: tyro.cli(main)))  # tyro reports bad flags; run_cli what main raises
